"""Database engine, sessions and the column types every domain shares.

SQLite (embedded default) and PostgreSQL run the same models; the few
differences (UTC handling, JSON flavour, integer width) live in the types here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, MetaData, event, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT on PostgreSQL; INTEGER on SQLite, where only INTEGER PRIMARY KEY autoincrements.
BigId = BigInteger().with_variant(Integer(), "sqlite")
JsonType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class TimestampMixin:
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Hand transaction control to SQLAlchemy (see _sqlite_begin).
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    # WAL lets readers run beside the writer; foreign keys are off by default in SQLite.
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before we acknowledge it (WAL keeps this cheap per batch).
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


WRITE_INTENT = "plantwatch_write_intent"


def _sqlite_begin(conn: Any) -> None:
    # The sqlite3 module defers BEGIN to the first write, so a read followed by a
    # write in one transaction would not be isolated; we issue BEGIN ourselves.
    # ORM sessions (the API's unit of work: read, check, write) take the write lock
    # at once with BEGIN IMMEDIATE, waiting on busy_timeout: a deferred transaction
    # that read first fails outright ("database is locked") when it tries to write
    # after another connection committed. Plain engine connections (telemetry reads
    # and the ingest writer, which writes first) keep a deferred BEGIN, so readers
    # still run beside the writer.
    immediate = conn.get_execution_options().get(WRITE_INTENT, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(url: str, **kwargs: Any) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    if kwargs.pop("null_pool", False):
        kwargs["poolclass"] = NullPool
    return create_async_engine(url, **kwargs)


class Database:
    """One engine and its session factory; created by the composition root."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = make_engine(url, **engine_kwargs)
        self.sessionmaker = async_sessionmaker(
            self.engine.execution_options(**{WRITE_INTENT: True}), expire_on_commit=False
        )
        self._gate: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def write_gate(self) -> AsyncIterator[None]:
        """Turn-taking for this process's busy writers on SQLite (ingest batches, alert
        and stream writes), held around a whole write transaction.

        SQLite has one writer at a time. A writer that finds the lock taken waits in
        its busy handler, which sleeps 1, 2, 5, 10... ms between tries, so an alert
        written while ingest commits batch after batch can wait several sleeps. Behind
        this lock, writers queue in order and each starts the moment the last one
        commits. (The alert-latency bench did not move measurably either way at 10k
        points/s; it bounds the worst case.) Other processes, and the API's
        occasional writes, still meet at SQLite's own lock. On PostgreSQL, with row
        locks and many writers, there is no gate.
        """
        if self.engine.dialect.name != "sqlite":
            yield
            return
        loop = asyncio.get_running_loop()
        if self._gate is None or self._gate[0] is not loop:
            self._gate = (loop, asyncio.Lock())
        async with self._gate[1]:
            yield

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self.sessionmaker() as session:
            yield session

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()
