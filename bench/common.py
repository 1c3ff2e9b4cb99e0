"""Helpers shared by the benchmarks in bench/: throwaway databases, seeding, the
raw-insert baseline, memory sampling and JSON output.

Benchmarks print JSON lines; the last line of a run is its one summary object.
They are not tests: they measure, and say what they measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
from sqlalchemy import text
from sqlalchemy.engine import make_url

from plantwatch.assets.models import Device, DeviceKey
from plantwatch.core import migrate
from plantwatch.core.db import Database, make_engine, utcnow
from plantwatch.telemetry.pipeline import WRITER_CACHE_KIB
from plantwatch.tenancy import service as tenancy_service
from plantwatch.tenancy.schemas import FactoryCreate
from plantwatch.tenancy.tokens import new_opaque_token, token_digest

DAY_MS = 86_400_000


def emit(obj: dict[str, Any]) -> None:
    """One JSON object on one line of stdout."""
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def backend_of(url: str) -> str:
    return "postgresql" if url.startswith("postgresql") else "sqlite"


# --- throwaway databases ----------------------------------------------------------


@contextlib.asynccontextmanager
async def throwaway_database(url: str | None, *, keep: bool = False) -> AsyncIterator[str]:
    """A fresh, migrated database; removed afterwards.

    `url` None or a `sqlite...` URL without a path: a temp file. A PostgreSQL URL names
    the server (and the database to connect to for admin work): a new database
    `plantwatch_bench_<hex>` is created there and dropped at the end.
    """
    if url is None or backend_of(url) == "sqlite":
        explicit = make_url(url).database if url else None
        tmp = None if explicit else Path(tempfile.mkdtemp(prefix="plantwatch-bench-"))
        path = Path(explicit) if explicit else (tmp or Path(".")) / "bench.db"
        db_url = f"sqlite+aiosqlite:///{path}"
        await migrate.upgrade(db_url)
        try:
            yield db_url
        finally:
            if tmp is not None and not keep:
                shutil.rmtree(tmp, ignore_errors=True)
        return
    admin = make_url(url)
    name = f"plantwatch_bench_{uuid.uuid4().hex[:8]}"

    async def run(sql: str) -> None:
        engine = make_engine(
            admin.render_as_string(hide_password=False), isolation_level="AUTOCOMMIT"
        )
        try:
            async with engine.connect() as conn:
                await conn.execute(text(sql))
        finally:
            await engine.dispose()

    await run(f'CREATE DATABASE "{name}"')
    db_url = admin.set(database=name).render_as_string(hide_password=False)
    try:
        await migrate.upgrade(db_url)
        yield db_url
    finally:
        if not keep:
            await run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(frozen=True)
class SeededDevice:
    factory_id: int
    device_id: int
    device_key: str
    key: str  # the secret X-Device-Key


async def seed_devices(url: str, count: int, slug: str = "bench") -> list[SeededDevice]:
    """One factory with `count` active devices, each with a device key."""
    db = Database(url)
    try:
        async with db.session() as session:
            factory = await tenancy_service.create_factory(
                session, FactoryCreate(name="Bench", slug=slug, timezone="UTC")
            )
            devices = [
                Device(factory_id=factory.id, device_key=f"D{i:05d}", name=f"Machine {i}")
                for i in range(count)
            ]
            session.add_all(devices)
            await session.flush()
            keys = [new_opaque_token("pwd_") for _ in devices]
            session.add_all(
                DeviceKey(
                    factory_id=factory.id,
                    device_id=d.id,
                    prefix=k[:12],
                    key_hash=token_digest(k),
                    created_at=utcnow(),
                )
                for d, k in zip(devices, keys, strict=True)
            )
            await session.commit()
            return [
                SeededDevice(factory.id, d.id, d.device_key, k)
                for d, k in zip(devices, keys, strict=True)
            ]
    finally:
        await db.dispose()


async def series_ids(url: str) -> dict[tuple[int, str], int]:
    """(device_id, parameter key) -> series id, as discovery created them."""
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT device_id, key, id FROM device_parameters"))
            return {(r[0], r[1]): r[2] for r in rows}
    finally:
        await engine.dispose()


async def table_counts(url: str) -> dict[str, int]:
    """What the store holds: raw rows, points counted by each rollup tier, latest rows."""
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            out: dict[str, int] = {}
            for name, sql in (
                ("raw", "SELECT count(*) FROM telemetry_raw"),
                ("rollup_1m_points", "SELECT coalesce(sum(cnt), 0) FROM telemetry_1m"),
                ("rollup_1h_points", "SELECT coalesce(sum(cnt), 0) FROM telemetry_1h"),
                ("latest", "SELECT count(*) FROM series_latest"),
                ("dead_letters", "SELECT count(*) FROM dead_letters"),
            ):
                out[name] = int((await conn.execute(text(sql))).scalar_one())
            return out
    finally:
        await engine.dispose()


# --- the raw baseline ---------------------------------------------------------------

Row = tuple[int, int, float]


@dataclass
class RawResult:
    rows: int
    seconds: float
    method: str

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def _sqlite_raw(path: str, chunks: Callable[[], Iterable[Sequence[Row]]]) -> list[RawResult]:
    """The same rows twice, into a fresh table identical to telemetry_raw (WITHOUT ROWID,
    primary key (series_id, ts)) each time, with the ingest writer's pragmas (WAL,
    synchronous=FULL, its page cache), one transaction per chunk: once with executemany, once with
    multi-row VALUES statements (10,000 rows each, SQLite's variable limit). Only the
    insert + commit is timed."""
    conn = sqlite3.connect(path, isolation_level=None)
    results = []
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
        for method in ("executemany", "multi-row VALUES"):
            conn.execute("DROP TABLE IF EXISTS bench_raw")
            conn.execute(
                "CREATE TABLE bench_raw (series_id BIGINT NOT NULL, ts BIGINT NOT NULL, "
                "value FLOAT NOT NULL, PRIMARY KEY (series_id, ts)) WITHOUT ROWID"
            )
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            total = 0
            elapsed = 0.0
            for chunk in chunks():
                started = time.perf_counter()
                conn.execute("BEGIN")
                if method == "executemany":
                    conn.executemany(
                        "INSERT INTO bench_raw (series_id, ts, value) VALUES (?,?,?)", chunk
                    )
                else:
                    for start in range(0, len(chunk), 10_000):
                        part = chunk[start : start + 10_000]
                        conn.execute(
                            "INSERT INTO bench_raw (series_id, ts, value) VALUES "
                            + ",".join(["(?,?,?)"] * len(part)),
                            [x for row in part for x in row],
                        )
                conn.execute("COMMIT")
                elapsed += time.perf_counter() - started
                total += len(chunk)
            results.append(
                RawResult(total, elapsed, f"sqlite3 {method}, one transaction per chunk")
            )
        conn.execute("DROP TABLE bench_raw")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return results
    finally:
        conn.close()


def _asyncpg_args(url: str) -> dict[str, Any]:
    u = make_url(url)
    return {
        "host": u.host or "127.0.0.1",
        "port": u.port or 5432,
        "user": u.username or "postgres",
        "password": u.password,
        "database": u.database,
    }


async def _postgres_raw(
    url: str, chunks: Callable[[], Iterable[Sequence[Row]]], days: set[int]
) -> RawResult:
    """COPY (asyncpg copy_records_to_table), one COPY = one transaction per chunk, into a
    table identical to telemetry_raw: range-partitioned by day, primary key
    (series_id, ts). Only the COPY is timed."""
    import asyncpg

    conn = await asyncpg.connect(**_asyncpg_args(url))
    try:
        await conn.execute("DROP TABLE IF EXISTS bench_raw")
        await conn.execute(
            "CREATE TABLE bench_raw (series_id BIGINT NOT NULL, ts BIGINT NOT NULL, "
            "value DOUBLE PRECISION NOT NULL, PRIMARY KEY (series_id, ts)) "
            "PARTITION BY RANGE (ts)"
        )
        for day in sorted(days):
            await conn.execute(
                f"CREATE TABLE bench_raw_p{day // DAY_MS} PARTITION OF bench_raw "
                f"FOR VALUES FROM ({day}) TO ({day + DAY_MS})"
            )
        total = 0
        elapsed = 0.0
        for chunk in chunks():
            started = time.perf_counter()
            await conn.copy_records_to_table(
                "bench_raw", records=chunk, columns=["series_id", "ts", "value"]
            )
            elapsed += time.perf_counter() - started
            total += len(chunk)
        await conn.execute("DROP TABLE bench_raw")
        return RawResult(total, elapsed, "asyncpg COPY (copy_records_to_table), one per chunk")
    finally:
        await conn.close()


async def raw_insert_rate(
    url: str, chunks: Callable[[], Iterable[Sequence[Row]]], days: set[int]
) -> list[RawResult]:
    """The database's fastest bulk inserts of these rows, into a twin of telemetry_raw.
    `chunks()` yields the rows (generated lazily, untimed), one transaction's worth at a
    time; `days`: the day starts they fall in, for PostgreSQL's partitions."""
    if backend_of(url) == "sqlite":
        path = make_url(url).database
        assert path is not None
        return await asyncio.to_thread(_sqlite_raw, path, chunks)
    return [await _postgres_raw(url, chunks, days)]


async def checkpoint(url: str) -> None:
    """Write dirty pages out, so the next timed phase doesn't pay for the last one's."""
    if backend_of(url) == "sqlite":
        path = make_url(url).database
        assert path is not None

        def run() -> None:
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()

        await asyncio.to_thread(run)
        return
    import asyncpg

    conn = await asyncpg.connect(**_asyncpg_args(url))
    try:
        await conn.execute("CHECKPOINT")
    except asyncpg.PostgresError:
        pass  # not a superuser (nor pg_checkpoint): the timed phases share the noise
    finally:
        await conn.close()


def postgres_cpu_seconds() -> float:
    """CPU time of every PostgreSQL server process on this machine (user + system)."""
    total = 0.0
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "postgres":
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
    return total


# --- memory -------------------------------------------------------------------------


class RssSampler:
    """Samples a process's resident set size every `every_s` seconds on a thread."""

    def __init__(self, pid: int, every_s: float = 5.0) -> None:
        self.process = psutil.Process(pid)
        self.every_s = every_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def _sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.samples.append(
                (round(time.monotonic() - self._t0, 1), self.process.memory_info().rss)
            )

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(self.every_s):
            self._sample()

    def start(self) -> RssSampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        self._sample()
        mib = 1024 * 1024
        rss = [r for _, r in self.samples]
        if not rss:
            return {}
        # Warm-up (caches, first batches) is excluded from "flat": compare the end with the
        # sample a tenth of the run in, and report both.
        warm = rss[min(len(rss) - 1, max(1, len(rss) // 10))]
        return {
            "rss_start_mb": round(rss[0] / mib, 1),
            "rss_warm_mb": round(warm / mib, 1),
            "rss_end_mb": round(rss[-1] / mib, 1),
            "rss_max_mb": round(max(rss) / mib, 1),
            "rss_growth_after_warmup_mb": round((rss[-1] - warm) / mib, 1),
            "rss_samples": len(rss),
            "rss_every_s": self.every_s,
        }
