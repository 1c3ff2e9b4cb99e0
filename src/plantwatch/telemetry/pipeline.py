"""The ingest pipeline: validated payloads in, durable rows out, then acknowledged.

Every source (HTTP, MQTT, import, replay) hands a device and raw bytes to
`IngestPipeline.ingest`, which parses them and queues the result. One writer
task per process commits whatever has queued as a single transaction
(group commit: at low load a payload is written at once, at high load
batches grow up to `max_batch_points`), and only then resolves each caller's
future — so an HTTP 200 or an MQTT PUBACK always means "on disk". Rejected
points and messages become dead letters in the same transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import Counter, Histogram
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from plantwatch.assets.models import Device, DeviceParameter
from plantwatch.core.bus import Bus
from plantwatch.core.db import Database, utcnow
from plantwatch.core.jsonutil import dumps
from plantwatch.telemetry import payloads, store
from plantwatch.telemetry.models import DeadLetter
from plantwatch.telemetry.partitions import DAY_MS, Partitions

log = structlog.get_logger("plantwatch.ingest")

POINTS = Counter("plantwatch_ingest_points_total", "Telemetry points stored", ["source"])
REJECTS = Counter(
    "plantwatch_ingest_rejects_total", "Telemetry rejected to dead letters", ["source", "reason"]
)
BATCH_SECONDS = Histogram(
    "plantwatch_ingest_batch_seconds",
    "Time to commit one ingest batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)

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

    @property
    def point_count(self) -> int:
        return len(self.parsed.points) + len(self.parsed.states) if self.parsed else 1


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
    ) -> None:
        self.db = db
        self.bus = bus
        self.partitions = partitions
        self.limits = limits
        self.max_batch_points = max_batch_points
        self.linger_s = linger_s
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        # (device_id, key) -> series id; parameters are never renamed, only deleted.
        self._series: dict[tuple[int, str], int] = {}
        self._last_seen_persisted: dict[int, int] = {}
        self._online: set[int] = set()

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
    ) -> IngestOutcome:
        """Parse, store durably, dead-letter what is bad; returns once committed.

        `record_rejects=False` (replays) reports rejects without storing new dead letters.
        """
        now_ms = int(time.time() * 1000)
        parsed = payloads.parse(raw, now_ms, limits or self.limits)
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
        )
        return await self._submit(job)

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
        while True:
            jobs = [await self._queue.get()]
            if self.linger_s:
                await asyncio.sleep(self.linger_s)
            size = jobs[0].point_count
            while size < self.max_batch_points and not self._queue.empty():
                job = self._queue.get_nowait()
                jobs.append(job)
                size += job.point_count
            started = time.perf_counter()
            try:
                outcomes, came_online = await self._flush(jobs)
            except Exception as exc:
                log.exception("ingest_batch_failed", jobs=len(jobs))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                    self._queue.task_done()
                continue
            BATCH_SECONDS.observe(time.perf_counter() - started)
            for job, outcome in zip(jobs, outcomes, strict=True):
                if not job.future.done():
                    job.future.set_result(outcome)
                self._queue.task_done()
            for device in came_online:
                await self.bus.publish(
                    "device.online",
                    {
                        "factory_id": device.factory_id,
                        "device_id": device.device_id,
                        "device_key": device.device_key,
                    },
                )

    async def _flush(self, jobs: list[_Job]) -> tuple[list[IngestOutcome], list[DeviceRef]]:
        outcomes = [IngestOutcome() for _ in jobs]
        rows: list[tuple[int, int, float]] = []
        latest: dict[int, store.LatestRow] = {}
        dead: list[dict[str, Any]] = []
        seen: dict[int, tuple[DeviceRef, int]] = {}
        min_ts = max_ts = None

        async with self.db.engine.begin() as conn:
            await self._resolve_series(conn, jobs)

        for job, outcome in zip(jobs, outcomes, strict=True):
            if job.fatal is not None:
                if job.record_rejects:
                    dead.append(self._dead_row(job, job.fatal, job.raw))
                outcome.rejects.append(job.fatal)
                continue
            parsed = job.parsed
            device = job.device
            if parsed is None or device is None:
                continue
            series = self._series
            did = device.device_id
            for name, ts, value in parsed.points:
                sid = series[(did, name)]
                rows.append((sid, ts, value))
                current = latest.get(sid)
                if current is None or ts >= current.ts:
                    latest[sid] = store.LatestRow(sid, device.factory_id, did, ts, value, None)
            for name, (ts, text) in parsed.states.items():
                sid = series[(did, name)]
                current = latest.get(sid)
                if current is None or ts >= current.ts:
                    latest[sid] = store.LatestRow(sid, device.factory_id, did, ts, None, text)
            if parsed.points:
                lo = min(p[1] for p in parsed.points)
                hi = max(p[1] for p in parsed.points)
                min_ts = lo if min_ts is None else min(min_ts, lo)
                max_ts = hi if max_ts is None else max(max_ts, hi)
            if job.record_rejects:
                for reject in parsed.rejects:
                    dead.append(self._dead_row(job, reject, _fragment_bytes(reject.fragment)))
            outcome.accepted = len(parsed.points) + len(parsed.states)
            outcome.rejects = parsed.rejects
            seen[did] = (device, job.received_ms)

        if rows and min_ts is not None and max_ts is not None:
            await self.partitions.ensure(
                (min_ts, max_ts) if max_ts - min_ts <= DAY_MS else (r[1] for r in rows)
            )

        came_online: list[DeviceRef] = []
        async with self.db.engine.begin() as conn:
            if rows:
                await store.write_points(conn, rows)
            if latest:
                await store.write_latest(conn, list(latest.values()))
            came_online = await self._touch_devices(conn, seen)
            if dead:
                await conn.execute(insert(DeadLetter), dead)

        for job, outcome in zip(jobs, outcomes, strict=True):
            if outcome.accepted:
                POINTS.labels(job.source).inc(outcome.accepted)
            for reject in outcome.rejects:
                REJECTS.labels(job.source, reject.reason).inc()
        return outcomes, came_online

    def _dead_row(self, job: _Job, reject: payloads.Reject, payload: bytes) -> dict[str, Any]:
        return {
            "factory_id": job.factory_id,
            "device_id": job.device.device_id if job.device else None,
            "device_key": job.device_key,
            "source": job.source,
            "topic": job.topic,
            "reason": reject.reason,
            "detail": reject.detail[:2000],
            # A whole-message reject keeps the exact bytes for replay; a point reject
            # keeps the offending entry as JSON.
            "payload": payload,
            "context": None,
            "received_at": utcnow(),
        }

    async def _resolve_series(self, conn: AsyncConnection, jobs: Iterable[_Job]) -> None:
        """Map every (device, metric) in the batch to a series id, creating new parameters."""
        missing: dict[tuple[int, str], tuple[int, str]] = {}
        for job in jobs:
            if job.parsed is None or job.device is None or job.fatal is not None:
                continue
            did = job.device.device_id
            fid = job.device.factory_id
            for name, _, _ in job.parsed.points:
                if (did, name) not in self._series and (did, name) not in missing:
                    missing[(did, name)] = (fid, job.parsed.kinds.get(name, "float"))
            for name in job.parsed.states:
                if (did, name) not in self._series:
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
        insert_fn = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        await conn.execute(
            insert_fn(DeviceParameter).on_conflict_do_nothing(index_elements=["device_id", "key"]),
            values,
        )
        device_ids = {did for did, _ in missing}
        result = await conn.execute(
            select(DeviceParameter.device_id, DeviceParameter.key, DeviceParameter.id).where(
                DeviceParameter.device_id.in_(device_ids)
            )
        )
        for did, key, sid in result:
            self._series[(did, key)] = sid

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
        stale = [
            did
            for did, (_, received_ms) in seen.items()
            if received_ms - self._last_seen_persisted.get(did, 0) >= LAST_SEEN_PERSIST_MS
        ]
        if stale:
            await conn.execute(
                update(Device)
                .where(Device.id == bindparam("b_id"))
                .values(last_seen=bindparam("b_seen")),
                [{"b_id": did, "b_seen": now} for did in stale],
            )
            for did in stale:
                self._last_seen_persisted[did] = seen[did][1]
        return came_online

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
