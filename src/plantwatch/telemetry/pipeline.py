"""The ingest pipeline: validated payloads in, durable rows out, then acknowledged.

Every source (HTTP, MQTT, import, replay) hands a device and raw bytes to
`IngestPipeline.ingest`, which parses them and queues the result. One writer
task per process commits whatever has queued as a single transaction
(group commit: at low load a payload is written at once, at high load
batches grow up to `max_batch_points`), and only then resolves each caller's
future — so an HTTP 200 or an MQTT PUBACK always means "on disk". Rejected
points and messages become dead letters in the same transaction.

Parsing happens in the callers, while the writer waits on the previous commit: a
message is parsed into columns (per metric, timestamps in order) and, when its
series are known and its timestamps increase, mapped to series ids. The writer
then builds the batch's rows, 1m/1h rollup aggregates (from sorted runs, with
C-level sum/min/max) and latest values in one pass, and stores them with a few
statements a batch. A message keeps only its columns until then: every object a
queued message holds is one more for the cyclic garbage collector to walk, which
measured as a quarter of the CPU on MQTT-sized messages. Anything irregular
(timestamps out of order within a message, or across messages of one batch for a
series; points already stored) takes the exact general path of `store.write_points`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, TypeVar, cast

import structlog
from prometheus_client import Counter, Histogram
from sqlalchemy import insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from plantwatch.assets.models import Device, DeviceParameter
from plantwatch.core.bus import Bus
from plantwatch.core.db import Database, utcnow
from plantwatch.core.jsonutil import dumps
from plantwatch.telemetry import payloads, store
from plantwatch.telemetry.latest import LatestCache
from plantwatch.telemetry.models import DeadLetter
from plantwatch.telemetry.partitions import DAY_MS, Partitions
from plantwatch.telemetry.rollups import HOUR_MS, MINUTE_MS, Agg, add_point, merge

log = structlog.get_logger("plantwatch.ingest")
T = TypeVar("T")

POINTS = Counter("plantwatch_ingest_points_total", "Telemetry points stored", ["source"])
REJECTS = Counter(
    "plantwatch_ingest_rejects_total", "Telemetry rejected to dead letters", ["source", "reason"]
)
BATCH_SECONDS = Histogram(
    "plantwatch_ingest_batch_seconds",
    "Time to commit one ingest batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)

# Page cache of the SQLite writer connection, KiB (SQLite's default is 2 MiB). Each
# batch touches a page per series in the raw table, both rollup tiers and the latest
# values: ten thousand series are some 40,000 pages. With the default cache nearly
# every row read its page back from the OS (MQTT bench: about 35k -> 42-47k points/s;
# 256 MiB measured no better).
WRITER_CACHE_KIB = 128 * 1024

# last_seen is persisted at most this often per device: offline detection works in
# tens of seconds, and one UPDATE per device per batch would dominate small batches.
LAST_SEEN_PERSIST_MS = 5_000


@dataclass(frozen=True)
class DeviceRef:
    factory_id: int
    device_id: int
    device_key: str


@dataclass
class IngestOutcome:
    accepted: int = 0
    rejects: list[payloads.Reject] = field(default_factory=list)


@dataclass
class _Job:
    device: DeviceRef | None
    factory_id: int | None
    source: str
    topic: str | None
    raw: bytes
    received_ms: int
    parsed: payloads.Parsed | None
    fatal: payloads.Reject | None = None
    device_key: str | None = None
    record_rejects: bool = True
    future: asyncio.Future[IngestOutcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # Series id of each of `parsed.columns`, in order, once every series of the message
    # is known and its timestamps increase: what the writer's fast path needs.
    sids: list[int] | None = None
    # The 1m and 1h aggregates of a message with several samples per series, computed
    # by the caller while the writer waits on the previous commit.
    rollups: tuple[dict[tuple[int, int], Agg], dict[tuple[int, int], Agg]] | None = None
    point_count: int = 1


def _runs(
    series_id: int,
    stamps: list[int],
    values: list[float],
    bucket_ms: int,
    out: dict[tuple[int, int], Agg],
) -> None:
    """Merge into `out` the aggregates per bucket of one series' points, timestamps
    strictly increasing and after any already in `out`: each bucket is a contiguous
    run, summarised by C-level sum/min/max over a slice."""
    start, count = 0, len(stamps)
    while start < count:
        ts = stamps[start]
        bucket = ts - ts % bucket_ms
        end = (
            bisect_left(stamps, bucket + bucket_ms, start)
            if stamps[-1] >= bucket + bucket_ms
            else count
        )
        run = values[start:end] if start or end < count else values
        agg = [end - start, sum(run), min(run), max(run), ts, run[0], stamps[end - 1], run[-1]]
        key = (series_id, bucket)
        existing = out.get(key)
        if existing is None:
            out[key] = agg
        else:
            merge(existing, agg)
        start = end


# A committed batch: each job's outcome, and the devices that came online.
_Flushed = tuple[list[IngestOutcome], list[DeviceRef]]

# Committed telemetry goes out on the bus as `telemetry.<partition>`, a stable hash of
# the device, so one rules worker sees all of a device's points in order (DESIGN §3).
TELEMETRY_PARTITIONS = 8


def telemetry_partition(device_id: int) -> int:
    return device_id % TELEMETRY_PARTITIONS


def telemetry_events(jobs: Iterable[_Job]) -> dict[int, list[dict[str, Any]]]:
    """The committed messages of a batch, grouped by partition, in commit order.

    An item is {"factory_id", "device_id", "device_key", "received_ms",
    "columns": {metric: ([ts_ms, ...], [value, ...])}, "states": {metric: (ts_ms, text)}};
    timestamps of a column are in arrival order, not necessarily sorted.
    """
    by_partition: dict[int, list[dict[str, Any]]] = {}
    for job in jobs:
        parsed, device = job.parsed, job.device
        if job.fatal is not None or parsed is None or device is None:
            continue
        if not parsed.columns and not parsed.states:
            continue
        by_partition.setdefault(telemetry_partition(device.device_id), []).append(
            {
                "factory_id": device.factory_id,
                "device_id": device.device_id,
                "device_key": device.device_key,
                "received_ms": job.received_ms,
                "columns": parsed.columns or {},
                "states": parsed.states,
            }
        )
    return by_partition


class IngestPipeline:
    def __init__(
        self,
        db: Database,
        bus: Bus,
        partitions: Partitions,
        *,
        limits: payloads.Limits = payloads.Limits(),
        max_batch_points: int = 50_000,
        linger_s: float = 0.0,
        latest: LatestCache | None = None,
    ) -> None:
        self.db = db
        self.bus = bus
        self.partitions = partitions
        self.limits = limits
        self.max_batch_points = max_batch_points
        self.linger_s = linger_s
        self.latest = latest
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        # (device_id, key) -> series id; parameters are never renamed, only deleted.
        self._series: dict[tuple[int, str], int] = {}
        self._last_seen_persisted: dict[int, int] = {}
        self._online: set[int] = set()
        # SQLite: write steady-state batches in one step (store.write_batch_in_one_step).
        self._one_step = db.engine.dialect.name == "sqlite"
        self._bind_datetime: Callable[[Any], Any] | None = None
        self._conn: AsyncConnection | None = None

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        if self._writer is None:
            return
        await self._queue.join()
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        self._writer = None
        await self._drop_connection()

    async def _on_connection(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run a batch's writes on the writer's own connection.

        The writer keeps one connection rather than taking one from the pool per batch:
        no checkout ping or reset per batch, and on PostgreSQL its prepared statements
        stay prepared (a busy pool otherwise hands out fresh connections that parse
        them again). A connection that fails is dropped; a batch that failed because
        the connection was lost is tried once more on a new one — safe, because every
        write is idempotent (a point stored twice is stored once).
        """
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = await self.db.engine.connect()
                if self._conn.dialect.name == "sqlite":
                    # On the driver's connection: through SQLAlchemy it would begin a
                    # transaction the writer then finds open.
                    raw = await self._conn.get_raw_connection()
                    driver: Any = raw.driver_connection
                    await driver.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
            try:
                return await work(self._conn)
            except DBAPIError as exc:
                await self._drop_connection()
                if attempt == 2 or not exc.connection_invalidated:
                    raise
                log.warning("ingest_connection_lost_retrying", error=str(exc)[:200])
            except BaseException:
                await self._drop_connection()
                raise
        raise AssertionError("unreachable")

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    def forget_series(self, device_id: int | None = None) -> None:
        """Drop cached series ids (after parameters are deleted)."""
        if device_id is None:
            self._series.clear()
        else:
            for key in [k for k in self._series if k[0] == device_id]:
                del self._series[key]

    # -- entry points ----------------------------------------------------------

    async def ingest(
        self,
        device: DeviceRef,
        raw: bytes,
        *,
        source: str,
        topic: str | None = None,
        limits: payloads.Limits | None = None,
        record_rejects: bool = True,
        received_ms: int | None = None,
    ) -> IngestOutcome:
        """Parse, store durably, dead-letter what is bad; returns once committed.

        `record_rejects=False` (replays) reports rejects without storing new dead letters.
        `received_ms` (replays): when the payload first arrived; timestamps are judged
        against it, not against now.
        """
        job = self._job(device, raw, source, topic, limits, record_rejects, received_ms)
        return await self._submit(job)

    async def ingest_many(
        self, messages: Sequence[tuple[DeviceRef, bytes, str | None]], *, source: str
    ) -> list[IngestOutcome]:
        """`ingest` for (device, raw, topic) messages that arrived together: queued
        together, returned together (once every one is committed). Raises if any
        could not be stored."""
        if self._writer is None:
            raise RuntimeError("ingest pipeline is not running")
        jobs = [self._job(device, raw, source, topic) for device, raw, topic in messages]
        for job in jobs:
            self._queue.put_nowait(job)
        results = await asyncio.gather(*(job.future for job in jobs), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return cast(list[IngestOutcome], results)

    def _job(
        self,
        device: DeviceRef,
        raw: bytes,
        source: str,
        topic: str | None,
        limits: payloads.Limits | None = None,
        record_rejects: bool = True,
        received_ms: int | None = None,
    ) -> _Job:
        now_ms = int(time.time() * 1000)
        parsed = payloads.parse_columns(raw, received_ms or now_ms, limits or self.limits)
        job = _Job(
            device,
            device.factory_id,
            source,
            topic,
            raw,
            now_ms,
            parsed,
            fatal=parsed.fatal,
            device_key=device.device_key,
            record_rejects=record_rejects,
            point_count=parsed.point_count if parsed.fatal is None else 1,
        )
        if parsed.fatal is None and parsed.ordered:
            # None when a series is new: the writer creates it, then maps the message.
            job.sids = sids = self._series_ids(device, parsed)
            if sids is not None and job.point_count - len(parsed.states) > len(sids):
                # Several samples a series: a few aggregates stand for many points. (One
                # sample a series goes straight into the batch's aggregates instead.)
                assert parsed.columns is not None
                minute: dict[tuple[int, int], Agg] = {}
                hour: dict[tuple[int, int], Agg] = {}
                for sid, (stamps, values) in zip(sids, parsed.columns.values(), strict=True):
                    _runs(sid, stamps, values, MINUTE_MS, minute)
                    _runs(sid, stamps, values, HOUR_MS, hour)
                job.rollups = (minute, hour)
        return job

    def _series_ids(self, device: DeviceRef, parsed: payloads.Parsed) -> list[int] | None:
        """The series id of each column of an ordered message, or None while a series of
        it (numbers or states) is still unknown."""
        known = self._series
        did = device.device_id
        sids: list[int] = []
        assert parsed.columns is not None
        for name in parsed.columns:
            sid = known.get((did, name))
            if sid is None:
                return None
            sids.append(sid)
        for name in parsed.states:
            if (did, name) not in known:
                return None
        return sids

    async def dead_letter(
        self,
        *,
        factory_id: int | None,
        source: str,
        raw: bytes,
        reason: str,
        detail: str,
        topic: str | None = None,
        device_key: str | None = None,
        device_id: int | None = None,
    ) -> None:
        """Record a message that never got as far as parsing (unknown device, bad topic)."""
        job = _Job(
            None,
            factory_id,
            source,
            topic,
            raw,
            int(time.time() * 1000),
            None,
            fatal=payloads.Reject(reason, detail),
            device_key=device_key,
        )
        if device_id is not None:
            job.device = DeviceRef(factory_id or 0, device_id, device_key or "")
        await self._submit(job)

    async def _submit(self, job: _Job) -> IngestOutcome:
        if self._writer is None:
            raise RuntimeError("ingest pipeline is not running")
        self._queue.put_nowait(job)
        return await job.future

    # -- the writer --------------------------------------------------------------

    async def _write_loop(self) -> None:
        """Commit batches one after another, two stages deep.

        When a batch commits, whatever queued meanwhile starts its write at once, and
        only then are the committed batch's callers released. They parse their next
        messages while the database works on that next batch, instead of the two
        taking turns (every caller waiting on one batch, then all parsing while the
        database idles).
        """
        running: tuple[list[_Job], asyncio.Task[_Flushed]] | None = None
        while True:
            if running is None:
                first = await self._queue.get()
                if self.linger_s:
                    await asyncio.sleep(self.linger_s)
                jobs = self._take([first])
                running = (jobs, self._start(jobs))
                continue
            jobs, task = running
            try:
                flushed: _Flushed | BaseException = await task
            except Exception as exc:
                flushed = exc
            following = self._take([])
            running = (following, self._start(following)) if following else None
            await self._finish(jobs, flushed)

    def _take(self, jobs: list[_Job]) -> list[_Job]:
        """Add queued jobs to `jobs` up to the batch size; never waits."""
        size = sum(job.point_count for job in jobs)
        while size < self.max_batch_points and not self._queue.empty():
            job = self._queue.get_nowait()
            jobs.append(job)
            size += job.point_count
        return jobs

    def _start(self, jobs: list[_Job]) -> asyncio.Task[_Flushed]:
        async def timed() -> _Flushed:
            started = time.perf_counter()
            flushed = await self._flush(jobs)
            BATCH_SECONDS.observe(time.perf_counter() - started)
            return flushed

        return asyncio.get_running_loop().create_task(timed())

    async def _finish(self, jobs: list[_Job], flushed: _Flushed | BaseException) -> None:
        """Release a batch's callers: with their outcomes once it committed, else with
        the error (nothing of theirs was acknowledged)."""
        if isinstance(flushed, BaseException):
            log.error("ingest_batch_failed", jobs=len(jobs), exc_info=flushed)
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(flushed)
                self._queue.task_done()
            return
        outcomes, came_online = flushed
        for job, outcome in zip(jobs, outcomes, strict=True):
            if not job.future.done():
                job.future.set_result(outcome)
            self._queue.task_done()
        for partition, items in telemetry_events(jobs).items():
            await self.bus.publish(f"telemetry.{partition}", {"items": items})
        for device in came_online:
            await self.bus.publish(
                "device.online",
                {
                    "factory_id": device.factory_id,
                    "device_id": device.device_id,
                    "device_key": device.device_key,
                },
            )

    async def _flush(self, jobs: list[_Job]) -> _Flushed:
        outcomes = [IngestOutcome() for _ in jobs]
        dead: list[dict[str, Any]] = []
        seen: dict[int, tuple[DeviceRef, int]] = {}
        latest: dict[int, store.LatestValues] = {}
        accepted: Tally[str] = Tally()
        rejected: Tally[tuple[str, str]] = Tally()

        unmapped = [
            job
            for job in jobs
            if job.sids is None
            and job.fatal is None
            and job.parsed is not None
            and job.device is not None
        ]
        if unmapped:
            await self._resolve_series(unmapped)
            for job in unmapped:
                assert job.parsed is not None and job.device is not None
                if job.parsed.ordered:
                    job.sids = self._series_ids(job.device, job.parsed)

        # The fast path needs every message mapped and, per series, each message's
        # points after the previous message's: then no two points in the batch share a
        # (series, ts) and the messages' aggregates merge exactly.
        fast = True
        last_ts: dict[int, int] = {}
        for job, outcome in zip(jobs, outcomes, strict=True):
            if job.fatal is not None:
                if job.record_rejects:
                    dead.append(self._dead_row(job, job.fatal, job.raw))
                outcome.rejects.append(job.fatal)
                rejected[(job.source, job.fatal.reason)] += 1
                continue
            parsed = job.parsed
            device = job.device
            if parsed is None or device is None:
                continue
            sids = job.sids
            if sids is None:
                fast = False
                for sid, row in self._latest_of(device, parsed).items():
                    current = latest.get(sid)
                    if current is None or row[3] >= current[3]:
                        latest[sid] = row
            else:
                # Ordered: each column's last sample is its newest; a state after the
                # numbers on a tie, and a later message after an earlier one.
                assert parsed.columns is not None
                fid, did = device.factory_id, device.device_id
                for sid, (job_stamps, job_values) in zip(
                    sids, parsed.columns.values(), strict=True
                ):
                    ts = job_stamps[-1]
                    if fast:
                        previous = last_ts.get(sid)
                        if previous is not None and job_stamps[0] <= previous:
                            fast = False
                        last_ts[sid] = ts
                    current = latest.get(sid)
                    if current is None or ts >= current[3]:
                        latest[sid] = (sid, fid, did, ts, job_values[-1], None)
                for name, (ts, text) in parsed.states.items():
                    sid = self._series[(did, name)]
                    current = latest.get(sid)
                    if current is None or ts >= current[3]:
                        latest[sid] = (sid, fid, did, ts, None, text)
            if job.record_rejects:
                for reject in parsed.rejects:
                    dead.append(self._dead_row(job, reject, _fragment_bytes(reject.fragment)))
            for reject in parsed.rejects:
                rejected[(job.source, reject.reason)] += 1
            outcome.accepted = job.point_count
            outcome.rejects = parsed.rejects
            accepted[job.source] += job.point_count
            seen[device.device_id] = (device, job.received_ms)

        series: list[int] = []
        stamps: list[int] = []
        values: list[float] = []
        minute: dict[tuple[int, int], Agg] = {}
        hour: dict[tuple[int, int], Agg] = {}
        rows: list[tuple[int, int, float]] = []
        days: set[int] = set()
        if fast:
            for job in jobs:
                sids = job.sids
                if sids is None or job.fatal is not None or job.parsed is None:
                    continue
                assert job.parsed.columns is not None
                rollups = job.rollups
                for sid, (job_stamps, job_values) in zip(
                    sids, job.parsed.columns.values(), strict=True
                ):
                    if len(job_stamps) == 1:  # the usual sample of a small message
                        ts, value = job_stamps[0], job_values[0]
                        series.append(sid)
                        stamps.append(ts)
                        values.append(value)
                        days.add(ts - ts % DAY_MS)
                        if rollups is None:
                            add_point(minute, (sid, ts - ts % MINUTE_MS), ts, value)
                            add_point(hour, (sid, ts - ts % HOUR_MS), ts, value)
                        continue
                    series.extend(repeat(sid, len(job_stamps)))
                    stamps.extend(job_stamps)
                    values.extend(job_values)
                    first, last = job_stamps[0], job_stamps[-1]
                    days.update(range(first - first % DAY_MS, last + 1, DAY_MS))
                    if rollups is None:
                        _runs(sid, job_stamps, job_values, MINUTE_MS, minute)
                        _runs(sid, job_stamps, job_values, HOUR_MS, hour)
                if rollups is not None:
                    for aggs, into in ((rollups[0], minute), (rollups[1], hour)):
                        for key, agg in aggs.items():
                            existing = into.get(key)
                            if existing is None:
                                into[key] = agg
                            else:
                                merge(existing, agg)
        else:
            for job in jobs:
                if job.fatal is not None or job.parsed is None or job.device is None:
                    continue
                assert job.parsed.columns is not None
                did = job.device.device_id
                for name, (job_stamps, job_values) in job.parsed.columns.items():
                    sid = self._series[(did, name)]
                    rows.extend(zip(repeat(sid), job_stamps, job_values))
            days = {ts - ts % DAY_MS for _, ts, _ in rows}
        if days:
            await self.partitions.ensure(days)

        latest_rows = list(latest.values())

        async def write(conn: AsyncConnection) -> list[DeviceRef]:
            if series and not dead and self._one_step and self._online.issuperset(seen):
                # The steady state on SQLite: the whole batch in one trip to the driver's
                # thread. Anything else (new devices, dead letters, stored points) below.
                stale = self._stale(seen)
                done = await store.write_batch_in_one_step(
                    conn,
                    series,
                    stamps,
                    values,
                    minute,
                    hour,
                    latest_rows,
                    self._last_seen_statements(stale),
                )
                if done:
                    self._persisted(stale, seen)
                    return []
                if done is None:
                    self._one_step = False  # the driver can't; don't ask again
            async with conn.begin():
                if series:
                    await store.write_distinct_points(
                        conn, series, stamps, values, minute, hour, latest=latest_rows
                    )
                else:
                    if rows:
                        await store.write_points(conn, rows)
                    if latest_rows:
                        await store.write_latest_values(conn, latest_rows)
                came_online = await self._touch_devices(conn, seen)
                if dead:
                    await conn.execute(insert(DeadLetter), dead)
            return came_online

        if self.db.dialect == "sqlite":
            # One turn of the loop before taking the gate: the rules engine, woken by the
            # commit before this batch, gets to write its alerts first instead of after
            # this whole batch (the point-to-alert latency).
            await asyncio.sleep(0)
        async with self.db.write_gate():
            came_online = await self._on_connection(write)
        if self.latest is not None:
            self.latest.apply(latest_rows)

        for source, count in accepted.items():
            POINTS.labels(source).inc(count)
        for (source, reason), count in rejected.items():
            REJECTS.labels(source, reason).inc(count)
        return outcomes, came_online

    def _latest_of(
        self, device: DeviceRef, parsed: payloads.Parsed
    ) -> dict[int, store.LatestValues]:
        """Latest value per series of a message in any order (the newest timestamp; on a
        tie the later sample, and a state after the numbers)."""
        did, fid = device.device_id, device.factory_id
        latest: dict[int, store.LatestValues] = {}
        assert parsed.columns is not None
        for name, (stamps, values) in parsed.columns.items():
            best = 0
            for i in range(1, len(stamps)):
                if stamps[i] >= stamps[best]:
                    best = i
            sid = self._series[(did, name)]
            latest[sid] = (sid, fid, did, stamps[best], values[best], None)
        for name, (ts, text) in parsed.states.items():
            sid = self._series[(did, name)]
            current = latest.get(sid)
            if current is None or ts >= current[3]:
                latest[sid] = (sid, fid, did, ts, None, text)
        return latest

    def _dead_row(self, job: _Job, reject: payloads.Reject, payload: bytes) -> dict[str, Any]:
        # Texts quote what the sender sent: made safe for the columns (topic: String(300)).
        topic = None if job.topic is None else payloads.clean_text(job.topic, 300)
        return {
            "factory_id": job.factory_id,
            "device_id": job.device.device_id if job.device else None,
            "device_key": job.device_key,
            "source": job.source,
            "topic": topic,
            "reason": reject.reason,
            "detail": payloads.clean_text(reject.detail, 2000),
            # A whole-message reject keeps the exact bytes for replay; a point reject
            # keeps the offending entry as JSON.
            "payload": payload,
            "context": None,
            "received_at": utcnow(),
        }

    async def _resolve_series(self, jobs: Iterable[_Job]) -> None:
        """Map every (device, metric) in these jobs to a series id, creating new parameters
        (in a transaction of their own, so cached ids always exist)."""
        known = self._series
        missing: dict[tuple[int, str], tuple[int, str]] = {}
        for job in jobs:
            parsed = job.parsed
            if parsed is None or job.device is None or job.fatal is not None:
                continue
            did = job.device.device_id
            fid = job.device.factory_id
            assert parsed.columns is not None
            for name in parsed.columns:
                if (did, name) not in known and (did, name) not in missing:
                    missing[(did, name)] = (fid, parsed.kinds.get(name, "float"))
            for name in parsed.states:
                if (did, name) not in known:
                    missing[(did, name)] = (fid, "string")
        if not missing:
            return
        now = utcnow()
        values = [
            {
                "factory_id": fid,
                "device_id": did,
                "key": key,
                "display_name": key,
                "data_type": kind,
                "is_kpi": False,
                "discovered_at": now,
                "updated_at": now,
            }
            for (did, key), (fid, kind) in missing.items()
        ]
        async with self.db.engine.begin() as conn:
            insert_fn = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
            await conn.execute(
                insert_fn(DeviceParameter).on_conflict_do_nothing(
                    index_elements=["device_id", "key"]
                ),
                values,
            )
            device_ids = {did for did, _ in missing}
            result = await conn.execute(
                select(DeviceParameter.device_id, DeviceParameter.key, DeviceParameter.id).where(
                    DeviceParameter.device_id.in_(device_ids)
                )
            )
            for did, key, sid in result:
                known[(did, key)] = sid

    async def _touch_devices(
        self, conn: AsyncConnection, seen: dict[int, tuple[DeviceRef, int]]
    ) -> list[DeviceRef]:
        """Persist last_seen (throttled) and mark devices that were not online, online.

        Returns the devices that came online: those the database still had as
        offline or unknown, so a restart never announces a device twice.
        """
        now = utcnow()
        unknown = [did for did in seen if did not in self._online]
        came_online: list[DeviceRef] = []
        if unknown:
            result = await conn.execute(
                update(Device)
                .where(Device.id.in_(unknown), Device.status != "online")
                .values(status="online", last_seen=now)
                .returning(Device.id)
            )
            came_online = [seen[did][0] for (did,) in result]
            self._online.update(unknown)
        stale = self._stale(seen)
        if stale:
            # One statement, not one per device: they all get the same time.
            await conn.execute(update(Device).where(Device.id.in_(stale)).values(last_seen=now))
            self._persisted(stale, seen)
        return came_online

    def _stale(self, seen: dict[int, tuple[DeviceRef, int]]) -> list[int]:
        """Devices whose last_seen is due to be written."""
        persisted = self._last_seen_persisted
        return [
            did
            for did, (_, received_ms) in seen.items()
            if received_ms - persisted.get(did, 0) >= LAST_SEEN_PERSIST_MS
        ]

    def _persisted(self, stale: list[int], seen: dict[int, tuple[DeviceRef, int]]) -> None:
        for did in stale:
            self._last_seen_persisted[did] = seen[did][1]

    def _last_seen_statements(self, stale: list[int]) -> list[store.Statement]:
        """What `_touch_devices` writes for devices already online, as plain SQLite
        statements (for the one-step batch)."""
        if not stale:
            return []
        if self._bind_datetime is None:
            column_type = Device.__table__.c.last_seen.type
            self._bind_datetime = column_type.bind_processor(self.db.engine.dialect)
        now = utcnow()
        stamp = self._bind_datetime(now) if self._bind_datetime else now
        statements: list[store.Statement] = []
        for start in range(0, len(stale), 30_000):
            chunk = stale[start : start + 30_000]
            marks = ",".join("?" * len(chunk))
            statements.append(
                (
                    f"UPDATE devices SET last_seen = ?, updated_at = ? WHERE id IN ({marks})",  # noqa: S608 (placeholders only)
                    (stamp, stamp, *chunk),
                )
            )
        return statements

    def mark_offline(self, device_id: int) -> None:
        """The device went offline: its next point must announce it online again."""
        self._online.discard(device_id)


def _fragment_bytes(fragment: Any) -> bytes:
    try:
        return dumps(fragment)
    except TypeError:
        # orjson refuses integers past 64 bits; the standard encoder keeps them (and
        # NaN as a literal our parser reads back) exactly as the device sent them.
        return json.dumps(fragment, default=repr).encode()
