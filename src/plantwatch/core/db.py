"""Database engine, sessions and the column types every domain shares.

SQLite (embedded default) and PostgreSQL run the same models; the few
differences (UTC handling, JSON flavour, integer width) live in the types here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Integer,
    MetaData,
    create_engine,
    event,
    make_url,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool
from sqlalchemy.types import TypeDecorator

T = TypeVar("T")

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
        self._sync: _SyncWriter | None = None

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

    async def run_write(self, work: Callable[[Session], T]) -> T:
        """Run `work(session)`, a whole write transaction that commits, in the fewest
        round trips and thread switches the backend allows.

        SQLite, behind the write gate: right here on the event loop's thread when
        SQLite's write lock is free this instant, else on a connection of its own in
        one worker thread. A worker thread competes for the GIL with the event loop
        for every statement: under ingest load that made a five-statement alert
        transaction take ~10 ms instead of ~2 (the point-to-alert bench). Running it
        here blocks the loop for those ~2 ms, but never waits for a lock: the attempt
        gives up at once (busy timeout 0) when another connection is writing (an API
        request's transaction, another process), and the worker thread, which may
        wait, takes over. `work` may therefore be called a second time, when its first
        call failed at BEGIN having done nothing. PostgreSQL: an async session's
        run_sync (each statement is a network round trip anyway).
        """
        if self.engine.dialect.name != "sqlite" or self._memory_sqlite():
            async with self.session() as session:
                return await session.run_sync(work)
        if self._sync is None:
            self._sync = _SyncWriter(self.url)
        writer = self._sync
        async with self.write_gate():
            started, result = writer.run_if_free(work)
            if started:
                return cast(T, result)
            return await asyncio.get_running_loop().run_in_executor(writer.thread, writer.run, work)

    def _memory_sqlite(self) -> bool:
        database = make_url(self.url).database
        return not database or database == ":memory:" or database.startswith("file::memory")

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        if self._sync is not None:
            writer, self._sync = self._sync, None
            await asyncio.get_running_loop().run_in_executor(writer.thread, writer.close)
            writer.thread.shutdown(wait=True)
        await self.engine.dispose()


class _SyncWriter:
    """Synchronous SQLite connections for Database.run_write: one used only from its
    worker thread, and one used only from the event loop's thread that never waits
    for the write lock."""

    def __init__(self, url: str) -> None:
        sync_url = make_url(url).set(drivername="sqlite")
        self.engines = [create_engine(sync_url, pool_size=1, max_overflow=0) for _ in range(2)]
        self.sessionmaker = self._sessions(self.engines[0])
        self.now_sessionmaker = self._sessions(self.engines[1], busy_timeout_ms=0)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plantwatch-write")

    @staticmethod
    def _sessions(engine: Engine, busy_timeout_ms: int | None = None) -> sessionmaker[Session]:
        event.listen(engine, "connect", _sqlite_pragmas)
        if busy_timeout_ms is not None:

            def no_waiting(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")

            event.listen(engine, "connect", no_waiting)
        event.listen(engine, "begin", _sqlite_begin)
        return sessionmaker(
            engine.execution_options(**{WRITE_INTENT: True}), expire_on_commit=False
        )

    def run(self, work: Callable[[Session], T]) -> T:
        with self.sessionmaker() as session:
            return work(session)

    def run_if_free(self, work: Callable[[Session], T]) -> tuple[bool, T | None]:
        """(True, work's result) if the write lock could be taken at once; (False, None),
        having done nothing, if another connection holds it."""
        with self.now_sessionmaker() as session:
            try:
                session.connection()  # BEGIN IMMEDIATE: the write lock, or SQLITE_BUSY now
            except OperationalError as exc:
                if getattr(exc.orig, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY:
                    return False, None
                raise
            return True, work(session)

    def close(self) -> None:
        for engine in self.engines:
            engine.dispose()
