"""Helpers shared by the benchmarks in bench/: throwaway databases, seeding, the
raw-insert baseline, memory sampling and JSON output.

Benchmarks print JSON lines; the last line of a run is its one summary object.
They are not tests: they measure, and say what they measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import platform
import random
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


# --- a realistic factory, for the UI bench --------------------------------------------


@dataclass(frozen=True)
class ParameterSpec:
    """One parameter every seeded device reports, with its normal range and limits."""

    key: str
    name: str
    unit: str | None
    low: float  # normal values fall in [low, high]
    high: float
    data_type: str = "float"
    is_kpi: bool = False
    is_power: bool = False
    warning_low: float | None = None
    warning_high: float | None = None
    critical_low: float | None = None
    critical_high: float | None = None


PLANT_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec(
        "temperature", "Temperature", "°C", 40, 75, is_kpi=True, warning_high=80, critical_high=95
    ),
    ParameterSpec(
        "vibration", "Vibration", "mm/s", 1, 6, is_kpi=True, warning_high=7.1, critical_high=11
    ),
    ParameterSpec(
        "pressure",
        "Pressure",
        "bar",
        4,
        8,
        warning_low=2,
        warning_high=9,
        critical_low=1,
        critical_high=10,
    ),
    ParameterSpec("power", "Power", "kW", 5, 80, is_kpi=True, is_power=True),
    ParameterSpec("state", "State", None, 0, 0, data_type="string"),
)
PLANT_STATES = ("RUNNING", "RUNNING", "RUNNING", "IDLE", "SETUP")
PLANT_KINDS = ("cnc", "press", "compressor", "pump", "conveyor", "robot", "oven")
PLANT_SEVERITIES = ("critical", "high", "medium", "low")


@dataclass
class SeededPlant:
    """What `seed_plant` made: the figures the UI must show, and ids to open pages of."""

    factory_id: int
    slug: str
    devices: int  # active (commissioned) devices: what the dashboard and machines list count
    online: int
    offline: int
    never_seen: int
    decommissioned: int
    parameters: int
    power_series: int
    groups: int
    lines: int
    rule_ids: list[int]
    open_alerts: int
    open_by_severity: dict[str, int]
    acknowledged: int
    resolved_alerts: int
    dead_letters_open: int
    users: int
    audit_entries: int
    alert_id: int  # an open alert with facts, a snapshot and a timeline
    alert_title: str
    device_id: int  # an online device with open alerts and a parameter at a limit
    device_name: str
    rule_id: int  # a rule scoped to a list of devices, with alerts
    rule_name: str
    seconds: dict[str, float | int]


def _alert_facts(spec: ParameterSpec, value: float) -> list[dict[str, Any]]:
    """The facts of a seeded alert: its parameter's value over the limit."""
    return [
        {
            "path": "conditions",
            "parameter": spec.key,
            "value": value,
            "text": f"{spec.key} = {value}",
            "operator": "gt",
            "threshold": spec.critical_high or spec.high,
        }
    ]


async def _insert_id(conn: Any, model: Any, values: dict[str, Any]) -> int:
    """Insert one row of `model`'s table; its id."""
    table = model.__table__
    result = await conn.execute(table.insert().returning(table.c.id), values)
    row_id: int = result.scalar_one()
    return row_id


async def _bulk(conn: Any, table: Any, rows: Iterable[dict[str, Any]], chunk: int = 10_000) -> int:
    """Core INSERT of many rows, `chunk` rows per executemany, in the caller's transaction."""
    from sqlalchemy import insert

    total = 0
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= chunk:
            await conn.execute(insert(table), batch)
            total += len(batch)
            batch = []
    if batch:
        await conn.execute(insert(table), batch)
        total += len(batch)
    return total


def _between(rng: random.Random, spec: ParameterSpec, level: str | None) -> float:
    """A value of `spec`: normal, or at its warning or critical limit."""
    if level == "critical" and spec.critical_high is not None:
        return round(spec.critical_high + rng.uniform(0.1, 3), 2)
    if level == "warning" and spec.warning_high is not None:
        top = spec.critical_high if spec.critical_high is not None else spec.warning_high + 5
        return round(rng.uniform(spec.warning_high + 0.05, top - 0.05), 2)
    return round(rng.uniform(spec.low, spec.high), 2)


async def seed_plant(
    url: str,
    devices: Sequence[SeededDevice],
    *,
    parameters: int = len(PLANT_PARAMETERS),
    offline_share: float = 0.08,
    never_seen_share: float = 0.02,
    decommissioned_share: float = 0.005,
    limit_share: float = 0.05,
    groups: int = 20,
    lines: int = 24,
    rules: int = 50,
    open_alerts: int = 300,
    resolved_alerts: int = 5000,
    dead_letters: int = 200,
    users: int = 25,
    audit_entries: int = 2000,
    energy_minutes: int = 60,
    offline_after_s: int = 4 * 3600,
    seed: int = 11,
) -> SeededPlant:
    """Fill the factory of `seed_devices` the way a running plant looks, fast.

    Everything bulk goes in with Core executemany in a few transactions (no API, no
    ORM unit of work); rules and open alerts go through their services (50 rules, a few
    hundred alerts: realistic rows, SLA deadlines and timelines). What it makes:

    - sites > areas > `lines` lines; each device gets a line, a kind, a manufacturer,
      and joins one of `groups` device groups (every fifth device a second one);
    - status: `offline_share` offline (last seen 1-3 days ago), `never_seen_share`
      never seen (no parameters, no values), `decommissioned_share` inactive, the rest
      online (last seen within the last minute);
    - `parameters` parameters per device that reported (PLANT_PARAMETERS: temperature,
      vibration, pressure with limits, power in kW marked as power, a string state;
      more than five adds plain `aux_<n>` ones), each with a latest value in
      `series_latest` and the two raw points before it (trend arrows); `limit_share`
      of the reporting devices have a value at a warning or critical limit;
    - 1-minute rollups of every power series for the last `energy_minutes` minutes
      (the dashboard's energy card integrates them);
    - `users` more users in several roles (invited: no password hashing);
    - `rules` rules (factory-, group- and device-scoped; some with schedules, some off)
      whose thresholds no seeded value reaches, so the rules engine of a server
      started on this database stays quiet;
    - `open_alerts` open alerts on distinct (rule, device) pairs through
      alerts.service.raise_alert, a third of them acknowledged and some assigned,
      spread over the last day; `resolved_alerts` resolved ones over 30 days (bulk,
      with their created/resolved timeline). Seeded alerts get no next SLA check, so
      the SLA sweeper has no escalations to send while a bench runs;
    - `dead_letters` dead letters (a quarter replayed) and `audit_entries` audit rows.

    The factory's offline limit becomes `offline_after_s` (4 h), so no device changes
    state while a bench runs.
    """
    from sqlalchemy import bindparam, func, select, update

    from plantwatch.alerts import service as alerts_service
    from plantwatch.alerts.models import Alert, AlertEvent
    from plantwatch.assets.models import (
        Area,
        DeviceGroup,
        DeviceParameter,
        Line,
        Site,
        device_group_members,
    )
    from plantwatch.rules import service as rules_service
    from plantwatch.rules.schemas import RuleBody
    from plantwatch.telemetry.models import DeadLetter, rollup_1m, series_latest, telemetry_raw
    from plantwatch.telemetry.partitions import Partitions
    from plantwatch.tenancy.models import AuditEntry, Factory, User

    rng = random.Random(seed)
    timings: dict[str, float | int] = {}
    started = time.perf_counter()
    factory_id = devices[0].factory_id
    now = utcnow()
    now_ms = int(now.timestamp() * 1000)
    n = len(devices)
    ids = [d.device_id for d in devices]
    shuffled = ids[:]
    rng.shuffle(shuffled)
    n_inactive = int(n * decommissioned_share)
    n_never = int(n * never_seen_share)
    n_offline = int(n * offline_share)
    inactive = set(shuffled[:n_inactive])
    never = set(shuffled[n_inactive : n_inactive + n_never])
    offline = set(shuffled[n_inactive + n_never : n_inactive + n_never + n_offline])
    reporting = [d for d in ids if d not in never]
    specs = list(PLANT_PARAMETERS[: max(1, parameters)])
    specs += [
        ParameterSpec(f"aux_{i}", f"Auxiliary {i}", "%", 0, 100)
        for i in range(max(0, parameters - len(PLANT_PARAMETERS)))
    ]
    last_seen: dict[int, dt.datetime] = {}
    for d in reporting:
        ago = rng.uniform(86_400, 3 * 86_400) if d in offline else rng.uniform(1, 60)
        last_seen[d] = now - dt.timedelta(seconds=ago)
    engine = make_engine(url)
    db = Database(url)
    try:
        # --- assets ---------------------------------------------------------------
        async with engine.begin() as conn:
            await conn.execute(
                update(Factory)
                .where(Factory.id == factory_id)
                .values(offline_after_s=offline_after_s)
            )
            site_ids = [
                await _insert_id(conn, Site, {"factory_id": factory_id, "name": f"Plant {s + 1}"})
                for s in range(2)
            ]
            area_ids = [
                await _insert_id(
                    conn,
                    Area,
                    {"factory_id": factory_id, "site_id": site_ids[a % 2], "name": f"Hall {a + 1}"},
                )
                for a in range(6)
            ]
            line_ids = [
                await _insert_id(
                    conn,
                    Line,
                    {
                        "factory_id": factory_id,
                        "area_id": area_ids[i % len(area_ids)],
                        "name": f"Line {i + 1:02d}",
                    },
                )
                for i in range(lines)
            ]
            group_ids = [
                await _insert_id(
                    conn,
                    DeviceGroup,
                    {
                        "factory_id": factory_id,
                        "name": f"Group {g + 1:02d}",
                        "description": f"Bench group {g + 1}",
                    },
                )
                for g in range(groups)
            ]
            device_rows = []
            for i, d in enumerate(ids):
                status = "unknown" if d in never else "offline" if d in offline else "online"
                device_rows.append(
                    {
                        "b_id": d,
                        "line_id": line_ids[i % len(line_ids)] if line_ids else None,
                        "kind": PLANT_KINDS[i % len(PLANT_KINDS)],
                        "manufacturer": rng.choice(("Acme", "Bosch", "Fanuc", "Siemens")),
                        "model": f"M-{rng.randint(100, 999)}",
                        "location": f"Bay {i % 40 + 1}",
                        "criticality": rng.choice(("low", "medium", "medium", "high")),
                        "is_active": d not in inactive,
                        "status": status,
                        "last_seen": last_seen.get(d),
                    }
                )
            table = Device.__table__
            stmt = (
                table.update()
                .where(table.c.id == bindparam("b_id"))
                .values(
                    line_id=bindparam("line_id"),
                    kind=bindparam("kind"),
                    manufacturer=bindparam("manufacturer"),
                    model=bindparam("model"),
                    location=bindparam("location"),
                    criticality=bindparam("criticality"),
                    is_active=bindparam("is_active"),
                    status=bindparam("status"),
                    last_seen=bindparam("last_seen"),
                )
            )
            for i in range(0, len(device_rows), 10_000):
                await conn.execute(stmt, device_rows[i : i + 10_000])
            if group_ids:
                members = [
                    {"group_id": group_ids[i % len(group_ids)], "device_id": d}
                    for i, d in enumerate(ids)
                ]
                members += [
                    {"group_id": group_ids[(i + 7) % len(group_ids)], "device_id": d}
                    for i, d in enumerate(ids)
                    if i % 5 == 0
                    and len(group_ids) > 1
                    and (i + 7) % len(group_ids) != i % len(group_ids)
                ]
                await _bulk(conn, device_group_members, members)
        timings["assets_s"] = round(time.perf_counter() - started, 1)

        # --- parameters, latest values, raw points, power rollups -----------------
        t = time.perf_counter()
        async with engine.begin() as conn:
            await _bulk(
                conn,
                DeviceParameter.__table__,
                (
                    {
                        "factory_id": factory_id,
                        "device_id": d,
                        "key": s.key,
                        "display_name": s.name,
                        "unit": s.unit,
                        "data_type": s.data_type,
                        "is_kpi": s.is_kpi,
                        "is_power": s.is_power,
                        "warning_low": s.warning_low,
                        "warning_high": s.warning_high,
                        "critical_low": s.critical_low,
                        "critical_high": s.critical_high,
                        "discovered_at": last_seen[d] - dt.timedelta(days=30),
                        "updated_at": last_seen[d] - dt.timedelta(days=30),
                    }
                    for d in reporting
                    for s in specs
                ),
            )
            rows = await conn.execute(
                select(
                    DeviceParameter.__table__.c.id,
                    DeviceParameter.__table__.c.device_id,
                    DeviceParameter.__table__.c.key,
                ).where(DeviceParameter.__table__.c.factory_id == factory_id)
            )
            series = {(r[1], r[2]): r[0] for r in rows}
        by_key = {s.key: s for s in specs}
        at_limit: dict[int, tuple[str, str]] = {}  # device -> (parameter, level)
        limited = [s.key for s in specs if s.warning_high is not None]
        if limited:
            for d in rng.sample(reporting, k=int(len(reporting) * limit_share)):
                at_limit[d] = (
                    rng.choice(limited),
                    "critical" if rng.random() < 0.25 else "warning",
                )
        latest_rows: list[dict[str, Any]] = []
        raw_rows: list[dict[str, Any]] = []
        for (d, key), sid in series.items():
            spec = by_key[key]
            ts = int(last_seen[d].timestamp() * 1000)
            if spec.data_type == "string":
                latest_rows.append(
                    {
                        "series_id": sid,
                        "factory_id": factory_id,
                        "device_id": d,
                        "ts": ts,
                        "value": None,
                        "text": rng.choice(PLANT_STATES),
                    }
                )
                continue
            level = at_limit[d][1] if at_limit.get(d, ("", ""))[0] == key else None
            value = _between(rng, spec, level)
            latest_rows.append(
                {
                    "series_id": sid,
                    "factory_id": factory_id,
                    "device_id": d,
                    "ts": ts,
                    "value": value,
                    "text": None,
                }
            )
            for back in (2, 1):
                raw_rows.append(
                    {"series_id": sid, "ts": ts - back * 10_000, "value": _between(rng, spec, None)}
                )
            raw_rows.append({"series_id": sid, "ts": ts, "value": value})
        partitions = Partitions(engine)
        await partitions.ensure({r["ts"] for r in raw_rows} | {now_ms})
        power = [
            (sid, d)
            for (d, key), sid in series.items()
            if by_key[key].is_power and d not in offline
        ]
        minute = 60_000
        first = now_ms - now_ms % minute - energy_minutes * minute

        def rollups() -> Iterable[dict[str, Any]]:
            for sid, _ in power:
                base = rng.uniform(5, 80)
                for m in range(energy_minutes + 1):
                    bucket = first + m * minute
                    if bucket > now_ms:
                        break
                    v = round(base + rng.uniform(-2, 2), 2)
                    yield {
                        "series_id": sid,
                        "bucket": bucket,
                        "cnt": 6,
                        "total": v * 6,
                        "vmin": v - 1,
                        "vmax": v + 1,
                        "first_ts": bucket,
                        "vfirst": v,
                        "last_ts": bucket + 50_000,
                        "vlast": v,
                    }

        async with engine.begin() as conn:
            await _bulk(conn, series_latest, latest_rows)
            await _bulk(conn, telemetry_raw, raw_rows)
            rollup_count = await _bulk(conn, rollup_1m, rollups())
        timings["telemetry_s"] = round(time.perf_counter() - t, 1)

        # --- users ------------------------------------------------------------------
        t = time.perf_counter()
        actor = tenancy_service.SystemActor(factory_id, email="bench")
        roles = (
            "factory_manager",
            "maintenance_manager",
            "maintenance_engineer",
            "maintenance_engineer",
            "technician",
            "technician",
            "quality_inspector",
            "viewer",
        )
        user_ids: list[int] = []
        async with db.session() as session:
            for i in range(users):
                user = await tenancy_service.add_user(
                    session,
                    factory_id,
                    email=f"user{i:03d}@bench.example",
                    role=roles[i % len(roles)],
                    password=None,
                    full_name=f"Bench User {i:03d}",
                    actor=actor,
                )
                user_ids.append(user.id)
            await session.commit()
        timings["users_s"] = round(time.perf_counter() - t, 1)

        # --- rules --------------------------------------------------------------------
        t = time.perf_counter()
        active_reporting = [d for d in reporting if d not in inactive]
        rule_scopes: dict[int, list[int]] = {}
        rule_severity: dict[int, str] = {}
        rule_names: dict[int, str] = {}
        group_members: dict[int, list[int]] = {g: [] for g in group_ids}
        for i, d in enumerate(ids):
            if group_ids:
                group_members[group_ids[i % len(group_ids)]].append(d)
        numeric = [s for s in specs if s.data_type != "string"]
        async with db.session() as session:
            for i in range(rules):
                spec = numeric[i % len(numeric)]
                ceiling = (spec.critical_high or spec.high) + 1000  # never reached
                kind = i % 5
                conditions: dict[str, Any]
                if kind == 0:
                    conditions = {"parameter": spec.key, "operator": "gt", "threshold": ceiling}
                elif kind == 1:
                    conditions = {
                        "parameter": spec.key,
                        "aggregate": "avg",
                        "window": "10m",
                        "operator": "gt",
                        "threshold": ceiling,
                    }
                elif kind == 2:
                    conditions = {
                        "operator": "AND",
                        "conditions": [
                            {
                                "parameter": spec.key,
                                "operator": "gt",
                                "threshold": ceiling,
                                "for": "5m",
                            },
                            {"parameter": numeric[0].key, "operator": "gt", "threshold": -1e6},
                        ],
                    }
                elif kind == 3:
                    conditions = {
                        "parameter": spec.key,
                        "operator": "outside",
                        "low": -1e6,
                        "high": ceiling,
                    }
                else:
                    conditions = {
                        "operator": "OR",
                        "conditions": [
                            {"parameter": spec.key, "operator": "gt", "threshold": ceiling},
                            {"parameter": spec.key, "operator": "lt", "threshold": -1e6},
                        ],
                    }
                scope: dict[str, Any]
                if i % 4 == 0 or not group_ids:
                    scope = {"type": "factory"}
                    covered = active_reporting
                elif i % 4 == 1:
                    gid = group_ids[i % len(group_ids)]
                    scope = {"type": "group", "group_id": gid}
                    covered = [
                        d for d in group_members[gid] if d not in never and d not in inactive
                    ]
                else:
                    covered = rng.sample(active_reporting, k=min(len(active_reporting), 5 + i % 40))
                    scope = {"type": "devices", "device_ids": covered}
                schedule = None
                if i % 7 == 3:
                    schedule = {
                        "type": "time_window",
                        "windows": [{"days": [1, 2, 3, 4, 5], "start": "06:00", "end": "22:00"}],
                    }
                severity = PLANT_SEVERITIES[i % len(PLANT_SEVERITIES)]
                name = f"{spec.name} watch {i + 1:02d}"
                out = await rules_service.create_rule(
                    session,
                    actor,
                    RuleBody.model_validate(
                        {
                            "name": name,
                            "description": f"Bench rule {i + 1} on {spec.key}",
                            "conditions": conditions,
                            "scope": scope,
                            "schedule": schedule,
                            "severity": severity,
                            "cooldown": 300,
                            "is_active": i % 10 != 9,
                        }
                    ),
                )
                rule_scopes[out.id] = covered
                rule_severity[out.id] = severity
                rule_names[out.id] = name
        timings["rules_s"] = round(time.perf_counter() - t, 1)

        # --- open alerts (through the service) ------------------------------------------
        t = time.perf_counter()
        spec_of_rule = {rid: numeric[i % len(numeric)] for i, rid in enumerate(sorted(rule_scopes))}
        pairs: list[tuple[int, int]] = []
        seen: set[tuple[int, int]] = set()
        online_first = sorted(
            at_limit, key=lambda d: (d in offline, d)
        )  # the busiest device: at a limit, online, with alerts
        focus = next((d for d in online_first if d not in inactive), active_reporting[0])
        for rid in sorted(rule_scopes):
            if focus in rule_scopes[rid] and len(pairs) < 3:
                pairs.append((rid, focus))
                seen.add((rid, focus))
        tries = 0
        candidates = [rid for rid in sorted(rule_scopes) if rule_scopes[rid]]
        while len(pairs) < open_alerts and candidates and tries < open_alerts * 50:
            tries += 1
            rid = rng.choice(candidates)
            d = rng.choice(rule_scopes[rid])
            if (rid, d) in seen:
                continue
            seen.add((rid, d))
            pairs.append((rid, d))
        key_of = {sd.device_id: sd.device_key for sd in devices}
        name_of = {sd.device_id: f"Machine {i}" for i, sd in enumerate(devices)}
        async with db.session() as session:

            def raise_all(sync: Any) -> None:
                for rid, d in pairs:
                    spec = spec_of_rule[rid]
                    at = now - dt.timedelta(seconds=rng.uniform(60, 86_400))
                    value = round((spec.critical_high or spec.high) + rng.uniform(0.5, 5), 2)
                    alerts_service.raise_alert_sync(
                        sync,
                        factory_id=factory_id,
                        rule_id=rid,
                        device_id=d,
                        severity=rule_severity[rid],
                        title=f"{rule_names[rid]} on {name_of[d]}",
                        message=f"{spec.key} {value} above its limit",
                        facts=_alert_facts(spec, value),
                        snapshot={
                            "device_key": key_of[d],
                            "values": {spec.key: value},
                            "at": {spec.key: at.isoformat()},
                            "rule_version": 1,
                        },
                        at=at,
                    )

            await session.run_sync(raise_all)
            await session.commit()
        async with engine.begin() as conn:
            found = await conn.execute(
                select(Alert.__table__.c.id, Alert.__table__.c.rule_id, Alert.__table__.c.device_id)
                .where(Alert.__table__.c.factory_id == factory_id)
                .order_by(Alert.__table__.c.id)
            )
            alert_rows = [(r[0], r[1], r[2]) for r in found]
            acked = [a for j, a in enumerate(alert_rows) if j % 3 == 1]
            events = []
            for alert_id, _, _ in acked:
                at = now - dt.timedelta(seconds=rng.uniform(1, 60))
                who = rng.choice(user_ids) if user_ids else None
                await conn.execute(
                    update(Alert.__table__)
                    .where(Alert.__table__.c.id == alert_id)
                    .values(
                        status="acknowledged",
                        acknowledged_at=at,
                        acknowledged_by=who,
                        assigned_to=who,
                    )
                )
                events.append(
                    {
                        "alert_id": alert_id,
                        "factory_id": factory_id,
                        "kind": "acknowledged",
                        "actor_id": who,
                        "at": at,
                        "data": {},
                    }
                )
                events.append(
                    {
                        "alert_id": alert_id,
                        "factory_id": factory_id,
                        "kind": "assigned",
                        "actor_id": who,
                        "at": at,
                        "data": {"assigned_to": who},
                    }
                )
            await _bulk(conn, AlertEvent.__table__, events)
            await conn.execute(
                update(Alert.__table__)
                .where(Alert.__table__.c.factory_id == factory_id)
                .values(next_sla_check_at=None)
            )
        timings["open_alerts_s"] = round(time.perf_counter() - t, 1)

        # --- resolved alerts, dead letters, audit (bulk) ---------------------------------
        t = time.perf_counter()
        rule_list = sorted(rule_scopes)
        resolved: list[dict[str, Any]] = []
        for j in range(resolved_alerts):
            rid = rule_list[j % len(rule_list)] if rule_list else None
            scope_devices = rule_scopes.get(rid or 0) or active_reporting
            d = rng.choice(scope_devices)
            spec = spec_of_rule[rid] if rid else numeric[0]
            at = now - dt.timedelta(seconds=rng.uniform(86_400, 30 * 86_400))
            done = at + dt.timedelta(seconds=rng.uniform(60, 8 * 3600))
            value = round((spec.critical_high or spec.high) + rng.uniform(0.5, 5), 2)
            resolved.append(
                {
                    "factory_id": factory_id,
                    "rule_id": rid,
                    "device_id": d,
                    "open_key": None,
                    "severity": rule_severity.get(rid or 0, "medium"),
                    "status": "resolved",
                    "title": f"{rule_names.get(rid or 0, 'Rule')} on {name_of[d]}",
                    "message": f"{spec.key} {value} above its limit",
                    "facts": _alert_facts(spec, value),
                    "snapshot": {"device_key": key_of[d], "values": {spec.key: value}},
                    "occurrences": rng.randint(1, 5),
                    "triggered_at": at,
                    "last_seen_at": at,
                    "resolved_at": done,
                    "created_at": at,
                    "updated_at": done,
                }
            )
        async with engine.begin() as conn:
            await _bulk(conn, Alert.__table__, resolved, chunk=5000)
            rows = await conn.execute(
                select(
                    Alert.__table__.c.id,
                    Alert.__table__.c.triggered_at,
                    Alert.__table__.c.resolved_at,
                ).where(
                    Alert.__table__.c.factory_id == factory_id,
                    Alert.__table__.c.status == "resolved",
                )
            )
            await _bulk(
                conn,
                AlertEvent.__table__,
                (
                    event
                    for alert_id, at, done in rows.all()
                    for event in (
                        {
                            "alert_id": alert_id,
                            "factory_id": factory_id,
                            "kind": "created",
                            "actor_id": None,
                            "at": at,
                            "data": {"message": "bench"},
                        },
                        {
                            "alert_id": alert_id,
                            "factory_id": factory_id,
                            "kind": "auto-resolved",
                            "actor_id": None,
                            "at": done,
                            "data": {"message": "condition cleared"},
                        },
                    )
                ),
            )
            reasons = ("unknown_device", "invalid_json", "non_finite_value", "invalid_shape")
            letters = []
            for j in range(dead_letters):
                reason = reasons[j % len(reasons)]
                payload = (
                    b"\xff\xfe not json"
                    if reason == "invalid_json"
                    else orjson.dumps({"ts": now_ms, "values": {"temperature": 51.2 + j}})
                )
                letters.append(
                    {
                        "factory_id": factory_id,
                        "device_id": None,
                        "device_key": f"X{j:05d}",
                        "source": "http" if j % 2 else "mqtt",
                        "topic": None if j % 2 else f"plantwatch/bench/X{j:05d}/telemetry",
                        "reason": reason,
                        "detail": f"bench dead letter {j}: {reason}",
                        "payload": payload,
                        "context": {"ip": "203.0.113.9"},
                        "received_at": now - dt.timedelta(seconds=rng.uniform(60, 7 * 86_400)),
                        "replayed_at": now if j % 4 == 3 else None,
                        "replay_result": "still_failing" if j % 4 == 3 else None,
                    }
                )
            await _bulk(conn, DeadLetter.__table__, letters)
            actions = ("device.update", "rule.update", "parameter.update", "user.update")
            await _bulk(
                conn,
                AuditEntry.__table__,
                (
                    {
                        "factory_id": factory_id,
                        "user_id": rng.choice(user_ids) if user_ids else None,
                        "actor": f"user{j % max(1, users):03d}@bench.example",
                        "action": actions[j % len(actions)],
                        "entity_type": actions[j % len(actions)].split(".")[0],
                        "entity_id": str(rng.choice(ids)),
                        "before": {"name": f"Old {j}", "criticality": "low"},
                        "after": {"name": f"New {j}", "criticality": "high"},
                        "request_id": uuid.uuid4().hex,
                        "ip": "203.0.113.7",
                        "at": now - dt.timedelta(seconds=rng.uniform(60, 90 * 86_400)),
                    }
                    for j in range(audit_entries)
                ),
            )
        timings["history_s"] = round(time.perf_counter() - t, 1)

        # --- what the pages must show -------------------------------------------------
        async with engine.connect() as conn:
            a = Alert.__table__

            async def count(stmt: Any) -> int:
                return int((await conn.execute(stmt)).scalar_one())

            by_severity = {
                s: await count(
                    select(func.count()).where(
                        a.c.factory_id == factory_id,
                        a.c.severity == s,
                        a.c.status.in_(("triggered", "acknowledged")),
                    )
                )
                for s in PLANT_SEVERITIES
            }
            acknowledged = await count(
                select(func.count()).where(
                    a.c.factory_id == factory_id, a.c.status == "acknowledged"
                )
            )
            resolved_total = await count(
                select(func.count()).where(a.c.factory_id == factory_id, a.c.status == "resolved")
            )
            slug = str(
                (
                    await conn.execute(
                        select(Factory.__table__.c.slug).where(Factory.__table__.c.id == factory_id)
                    )
                ).scalar_one()
            )
            user_total = await count(
                select(func.count()).where(User.__table__.c.factory_id == factory_id)
            )
            audit_total = await count(
                select(func.count()).where(AuditEntry.__table__.c.factory_id == factory_id)
            )
            focus_alert = (
                await conn.execute(
                    select(a.c.id, a.c.title)
                    .where(
                        a.c.factory_id == factory_id,
                        a.c.device_id == focus,
                        a.c.status.in_(("triggered", "acknowledged")),
                    )
                    .order_by(a.c.id)
                    .limit(1)
                )
            ).first()
            if focus_alert is None:
                focus_alert = (
                    await conn.execute(
                        select(a.c.id, a.c.title)
                        .where(a.c.factory_id == factory_id, a.c.status == "triggered")
                        .order_by(a.c.id)
                        .limit(1)
                    )
                ).first()
            devices_rule = next(
                (
                    rid
                    for rid, _, _ in alert_rows
                    if rid is not None and len(rule_scopes.get(rid, ())) < 100
                ),
                rule_list[0] if rule_list else 0,
            )
        timings["rollup_rows"] = rollup_count
        timings["total_s"] = round(time.perf_counter() - started, 1)
        active = n - len(inactive)
        return SeededPlant(
            factory_id=factory_id,
            slug=slug,
            devices=active,
            online=len(
                [d for d in ids if d not in offline and d not in never and d not in inactive]
            ),
            offline=len([d for d in offline if d not in inactive]),
            never_seen=len([d for d in never if d not in inactive]),
            decommissioned=len(inactive),
            parameters=len(series),
            power_series=len([1 for (_, key) in series if by_key[key].is_power]),
            groups=len(group_ids),
            lines=len(line_ids),
            rule_ids=rule_list,
            open_alerts=sum(by_severity.values()),
            open_by_severity=by_severity,
            acknowledged=acknowledged,
            resolved_alerts=resolved_total,
            dead_letters_open=len([1 for j in range(dead_letters) if j % 4 != 3]),
            users=user_total,
            audit_entries=audit_total,
            alert_id=int(focus_alert[0]) if focus_alert else 0,
            alert_title=str(focus_alert[1]) if focus_alert else "",
            device_id=focus,
            device_name=name_of[focus],
            rule_id=devices_rule,
            rule_name=rule_names.get(devices_rule, ""),
            seconds=timings,
        )
    finally:
        await db.dispose()
        await engine.dispose()


async def analyze(url: str) -> bool:
    """PostgreSQL: ANALYZE the whole database, as autovacuum does soon after a bulk load
    (until then the planner believes the fresh tables are empty and may pick nested
    loops over them). SQLite: nothing (plantwatch never runs ANALYZE there, so its
    planner works without statistics). True when it analyzed."""
    if backend_of(url) != "postgresql":
        return False
    engine = make_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text("ANALYZE"))
    finally:
        await engine.dispose()
    return True
