"""Telemetry services: who is sending (device directory), device online/offline,
dead letters (list, replay)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from plantwatch.assets.models import Device, DeviceKey, DeviceParameter
from plantwatch.core.bus import Bus
from plantwatch.core.db import Database, utcnow
from plantwatch.core.errors import NotFound
from plantwatch.core.listing import paginate
from plantwatch.core.schemas import PageParams
from plantwatch.telemetry.models import (
    DeadLetter,
    rollup_1h,
    rollup_1m,
    series_latest,
    telemetry_raw,
)
from plantwatch.telemetry.payloads import backfill_limits
from plantwatch.telemetry.pipeline import DeviceRef, IngestPipeline
from plantwatch.tenancy.audit import Actor, record
from plantwatch.tenancy.models import Factory
from plantwatch.tenancy.service import SystemActor
from plantwatch.tenancy.tokens import token_digest

UNKNOWN_DEVICE = "unknown_device"
DEVICE_INACTIVE = "device_inactive"
DEVICE_MISMATCH = "device_mismatch"
UNKNOWN_FACTORY = "unknown_factory"
INVALID_TOPIC = "invalid_topic"


@dataclass(frozen=True)
class FactoryRef:
    factory_id: int
    slug: str
    auto_register_devices: bool


# Cache entries kept per map: senders can present any number of unknown keys, slugs
# and topics, so each map is emptied when it reaches this size (then refilled on demand).
MAX_CACHE_ENTRIES = 50_000

_M = TypeVar("_M", bound=dict[Any, Any])


def _bounded(cache: _M) -> _M:
    if len(cache) >= MAX_CACHE_ENTRIES:
        cache.clear()
    return cache


class DeviceDirectory:
    """Resolves senders to devices with a short-lived cache, so ingest does not query
    the database per message. Revoking a key or decommissioning a device takes
    effect within `ttl_s`."""

    def __init__(self, db: Database, ttl_s: float = 10.0) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self._by_digest: dict[str, tuple[float, DeviceRef | None]] = {}
        # factory id -> (expires, the factory's active devices by key)
        self._topics: dict[int, tuple[float, dict[str, DeviceRef]]] = {}
        # (factory id, device key) -> expires: keys with no active device
        self._topic_misses: dict[tuple[int, str], float] = {}
        self._factories: dict[str, tuple[float, FactoryRef | None]] = {}
        # entry -> [lock, users]: concurrent misses of one entry wait for the first query
        # instead of each querying (an expiring entry under load would otherwise send
        # every message in flight to the database at once).
        self._loads: dict[tuple[str, ...], list[Any]] = {}

    @contextlib.asynccontextmanager
    async def _loading(self, entry: tuple[str, ...]) -> AsyncIterator[None]:
        slot = self._loads.setdefault(entry, [asyncio.Lock(), 0])
        slot[1] += 1
        try:
            async with slot[0]:
                yield
        finally:
            slot[1] -= 1
            if not slot[1]:
                del self._loads[entry]

    def invalidate(self) -> None:
        self._by_digest.clear()
        self._topics.clear()
        self._topic_misses.clear()
        self._factories.clear()

    async def by_key(self, presented_key: str) -> DeviceRef | None:
        """The active device owning this (unrevoked) key, or None."""
        if not presented_key or len(presented_key) > 200:
            return None
        digest = token_digest(presented_key)
        now = time.monotonic()
        hit = self._by_digest.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        async with self._loading(("key", digest)):
            hit = self._by_digest.get(digest)
            if hit is not None and hit[0] > time.monotonic():
                return hit[1]
            async with self.db.session() as session:
                row = (
                    await session.execute(
                        select(Device.factory_id, Device.id, Device.device_key)
                        .join(DeviceKey, DeviceKey.device_id == Device.id)
                        .where(
                            DeviceKey.key_hash == digest,
                            DeviceKey.revoked_at.is_(None),
                            Device.is_active.is_(True),
                        )
                    )
                ).first()
            ref = DeviceRef(row[0], row[1], row[2]) if row else None
            _bounded(self._by_digest)[digest] = (now + self.ttl_s, ref)
            return ref

    async def factory(self, slug: str) -> FactoryRef | None:
        now = time.monotonic()
        hit = self._factories.get(slug)
        if hit is not None and hit[0] > now:
            return hit[1]
        async with self._loading(("factory", slug)):
            hit = self._factories.get(slug)
            if hit is not None and hit[0] > time.monotonic():
                return hit[1]
            async with self.db.session() as session:
                row = (
                    await session.execute(
                        select(Factory.id, Factory.slug, Factory.auto_register_devices).where(
                            Factory.slug == slug
                        )
                    )
                ).first()
            ref = FactoryRef(row[0], row[1], row[2]) if row else None
            _bounded(self._factories)[slug] = (now + self.ttl_s, ref)
            return ref

    async def by_topic(self, factory: FactoryRef, device_key: str) -> DeviceRef | None:
        """The active device `device_key` of this factory, or None.

        The factory's active devices are loaded in one query and kept for `ttl_s`: with
        an entry per device, each expiring on its own, a thousand devices would cost a
        thousand queries every `ttl_s`. A key missing from the snapshot is looked up on
        its own (a device registered since the load is accepted at once), and a miss is
        remembered for `ttl_s`.
        """
        now = time.monotonic()
        snapshot = self._topics.get(factory.factory_id)
        if snapshot is None or snapshot[0] <= now:
            snapshot = await self._load_topics(factory)
        ref = snapshot[1].get(device_key)
        if ref is not None:
            return ref
        miss_key = (factory.factory_id, device_key)
        missed_until = self._topic_misses.get(miss_key)
        if missed_until is not None and missed_until > now:
            return None
        async with self._loading(("topic", factory.slug, device_key)):
            ref = snapshot[1].get(device_key)
            if ref is not None:
                return ref
            async with self.db.session() as session:
                row = (
                    await session.execute(
                        select(Device.id, Device.is_active).where(
                            Device.factory_id == factory.factory_id, Device.device_key == device_key
                        )
                    )
                ).first()
            if row and row[1]:
                ref = snapshot[1][device_key] = DeviceRef(factory.factory_id, row[0], device_key)
                return ref
            _bounded(self._topic_misses)[miss_key] = now + self.ttl_s
            return None

    async def _load_topics(self, factory: FactoryRef) -> tuple[float, dict[str, DeviceRef]]:
        async with self._loading(("topics", factory.slug)):
            snapshot = self._topics.get(factory.factory_id)
            if snapshot is not None and snapshot[0] > time.monotonic():
                return snapshot
            async with self.db.session() as session:
                rows = (
                    await session.execute(
                        select(Device.id, Device.device_key).where(
                            Device.factory_id == factory.factory_id, Device.is_active.is_(True)
                        )
                    )
                ).all()
            fid = factory.factory_id
            snapshot = (
                time.monotonic() + self.ttl_s,
                {key: DeviceRef(fid, did, key) for did, key in rows},
            )
            _bounded(self._topics)[fid] = snapshot
            return snapshot

    async def register(self, factory: FactoryRef, device_key: str) -> DeviceRef:
        """Auto-register a device seen for the first time (when the factory allows it)."""
        async with self.db.session() as session:
            existing = await session.scalar(
                select(Device).where(
                    Device.factory_id == factory.factory_id, Device.device_key == device_key
                )
            )
            if existing is None:
                existing = Device(
                    factory_id=factory.factory_id,
                    device_key=device_key,
                    name=device_key,
                    meta={"auto_registered": True},
                )
                session.add(existing)
                await session.flush()
                record(
                    session,
                    SystemActor(factory.factory_id, email="ingest"),
                    "device.auto_register",
                    "device",
                    existing.id,
                )
                await session.commit()
            ref = DeviceRef(factory.factory_id, existing.id, device_key)
        snapshot = self._topics.get(factory.factory_id)
        if snapshot is not None:
            snapshot[1][device_key] = ref
        self._topic_misses.pop((factory.factory_id, device_key), None)
        return ref


# --- online / offline ---------------------------------------------------------------


async def sweep_offline(
    db: Database, bus: Bus, pipeline: IngestPipeline | None, now: dt.datetime | None = None
) -> list[int]:
    """Mark online devices silent past their limit offline; publish each transition."""
    now = now or utcnow()
    limit_s = func.coalesce(Device.offline_after_s, Factory.offline_after_s)
    async with db.session() as session:
        candidates = (
            await session.execute(
                select(Device.id, Device.factory_id, Device.device_key, Device.last_seen, limit_s)
                .join(Factory, Factory.id == Device.factory_id)
                .where(Device.status == "online")
            )
        ).all()
        silent = [
            row for row in candidates if row[3] is None or (now - row[3]).total_seconds() >= row[4]
        ]
        if not silent:
            return []
        # Conditional on last_seen still being the one we judged, so a point that
        # arrived meanwhile keeps the device online.
        gone: list[Any] = []
        for device_id, factory_id, device_key, last_seen, _ in silent:
            result = await session.execute(
                update(Device)
                .where(
                    Device.id == device_id,
                    Device.status == "online",
                    Device.last_seen.is_(None)
                    if last_seen is None
                    else Device.last_seen == last_seen,
                )
                .values(status="offline")
            )
            if result.rowcount:  # type: ignore[attr-defined]
                gone.append((device_id, factory_id, device_key, last_seen))
        await session.commit()
    for device_id, factory_id, device_key, last_seen in gone:
        if pipeline is not None:
            pipeline.mark_offline(device_id)
        await bus.publish(
            "device.offline",
            {
                "factory_id": factory_id,
                "device_id": device_id,
                "device_key": device_key,
                "last_seen": last_seen.isoformat() if last_seen else None,
            },
        )
    return [g[0] for g in gone]


# --- dead letters ---------------------------------------------------------------------


@dataclass
class DeadLetterFilters:
    reason: str | None = None
    device_id: int | None = None
    device_key: str | None = None
    source: str | None = None
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    replayed: bool | None = None


def _filtered(factory_id: int, filters: DeadLetterFilters) -> Any:
    stmt = select(DeadLetter).where(DeadLetter.factory_id == factory_id)
    if filters.reason is not None:
        stmt = stmt.where(DeadLetter.reason == filters.reason)
    if filters.device_id is not None:
        stmt = stmt.where(DeadLetter.device_id == filters.device_id)
    if filters.device_key is not None:
        stmt = stmt.where(DeadLetter.device_key == filters.device_key)
    if filters.source is not None:
        stmt = stmt.where(DeadLetter.source == filters.source)
    if filters.start is not None:
        stmt = stmt.where(DeadLetter.received_at >= filters.start)
    if filters.end is not None:
        stmt = stmt.where(DeadLetter.received_at < filters.end)
    if filters.replayed is not None:
        stmt = stmt.where(
            DeadLetter.replayed_at.is_not(None)
            if filters.replayed
            else DeadLetter.replayed_at.is_(None)
        )
    return stmt


async def list_dead_letters(
    session: AsyncSession, factory_id: int, filters: DeadLetterFilters, params: PageParams
) -> tuple[Sequence[DeadLetter], int]:
    return await paginate(
        session,
        _filtered(factory_id, filters),
        params,
        [DeadLetter.received_at.desc()],
        DeadLetter.id.desc(),
    )


async def dead_letter_reasons(session: AsyncSession, factory_id: int) -> dict[str, int]:
    """Unreplayed dead letters per reason: what needs a person's attention."""
    rows = await session.execute(
        select(DeadLetter.reason, func.count())
        .where(DeadLetter.factory_id == factory_id, DeadLetter.replayed_at.is_(None))
        .group_by(DeadLetter.reason)
    )
    return {reason: count for reason, count in rows.all()}


async def get_dead_letter(session: AsyncSession, factory_id: int, dl_id: int) -> DeadLetter:
    found = await session.scalar(
        select(DeadLetter).where(DeadLetter.id == dl_id, DeadLetter.factory_id == factory_id)
    )
    if found is None:
        raise NotFound(f"no dead letter {dl_id}", code="dead_letter_not_found")
    return found


@dataclass
class ReplayResult:
    id: int
    status: str  # "stored" | "rejected" | "unresolved"
    accepted: int
    detail: str


async def replay(
    session: AsyncSession,
    actor: Actor,
    ids: Sequence[int],
    devices: DeviceDirectory,
    pipeline: IngestPipeline,
) -> list[ReplayResult]:
    """Feed stored payloads through ingest again, after their cause was fixed.

    A payload whose device is still unknown stays as it is (`unresolved`); one
    that is stored is marked replayed; one rejected again records why, without
    a second dead letter.
    """
    factory_id = actor.factory_id
    rows = (
        await session.scalars(
            select(DeadLetter)
            .where(DeadLetter.factory_id == factory_id, DeadLetter.id.in_(ids))
            .order_by(DeadLetter.id)
        )
    ).all()
    found = {row.id for row in rows}
    missing = [i for i in ids if i not in found]
    if missing:
        raise NotFound(f"no dead letters {missing}", code="dead_letter_not_found")
    factory = await session.get(Factory, factory_id)
    assert factory is not None
    ref = FactoryRef(factory.id, factory.slug, factory.auto_register_devices)
    devices.invalidate()  # the fix may be minutes old: look again
    # End the read transaction before ingest writes on its own connection: SQLite
    # cannot turn a read snapshot into a write once another writer has committed.
    await session.commit()
    results: list[ReplayResult] = []
    for letter in rows:
        device = await devices.by_topic(ref, letter.device_key) if letter.device_key else None
        if device is None:
            results.append(
                ReplayResult(
                    letter.id,
                    "unresolved",
                    0,
                    f"device '{letter.device_key}' is not registered or not active",
                )
            )
            continue
        # Timestamps are judged as when the payload arrived (a fix may come days later),
        # and an imported file's rows as an import judges them: any age.
        outcome = await pipeline.ingest(
            device,
            letter.payload,
            source="replay",
            topic=letter.topic,
            record_rejects=False,
            received_ms=int(letter.received_at.timestamp() * 1000),
            limits=backfill_limits(pipeline.limits) if letter.source == "import" else None,
        )
        if outcome.rejects:
            detail = "; ".join(f"{r.reason}: {r.detail}" for r in outcome.rejects[:3])
            status = "rejected" if not outcome.accepted else "partial"
        else:
            detail = f"stored {outcome.accepted} values"
            status = "stored"
        letter.replayed_at = utcnow() if status != "rejected" else letter.replayed_at
        letter.replay_result = f"{status}: {detail}"[:200]
        results.append(ReplayResult(letter.id, status, outcome.accepted, detail))
    record(
        session,
        actor,
        "dead_letter.replay",
        "dead_letter",
        None,
        after={"results": [{"id": r.id, "status": r.status} for r in results]},
    )
    await session.commit()
    return results


async def purge_orphans(engine: AsyncEngine) -> int:
    """Delete time-series data of parameters that no longer exist (deleted parameters,
    purged devices). The data tables carry no foreign keys, so this is their cascade."""
    async with engine.connect() as conn:
        orphans = [
            row[0]
            for row in await conn.execute(
                select(series_latest.c.series_id).where(
                    series_latest.c.series_id.not_in(select(DeviceParameter.id))
                )
            )
        ]
    for series_id in orphans:
        async with engine.begin() as conn:
            for table in (telemetry_raw, rollup_1m, rollup_1h, series_latest):
                await conn.execute(delete(table).where(table.c.series_id == series_id))
    return len(orphans)
