"""The live rule engine: committed telemetry in, alert transitions out.

    ingest --commit--> bus "telemetry.<p>" --> RuleEngine --> alerts.service (one transaction)
                                                   |             --> bus "alert.*"
                                                   +--> bus "rule.fired", "rule.work_order"

Per factory the engine holds every active rule compiled once (conditions.validate),
and per (factory, device) an index parameter -> rules that read it and cover the
device (listed devices, group members, or the whole factory). A point therefore
touches only the rules that read its parameter on its device. Per (rule, device) a
`Slot` keeps the condition state (conditions.RuleState) and the alert state machine
(firing.FiringTracker) — the same two objects the backtest replays offline, so a
backtest shows what the engine does.

Time: a point is judged at its own timestamp; a tick (every second, injectable
clock) judges the rules whose truth can change with time alone (`for` durations,
`no_data`, windows), so "no data for 5m" and "true for 5m" fire on time. Outside
its schedule (factory timezone) a rule's condition counts as false.

Restarts: what must survive (the `for` clocks, detector memory, condition edge, open
alert, last firing for the cooldown) is written behind to `rule_device_state` in
batches (every second, detector memory at most every minute, everything on stop)
and restored when a rule is loaded; the latest stored values (`series_latest`)
prime the last value of plain leaves, so a half-elapsed `for` or a `no_data` clock
continues across a restart. Condition state written for another rule version is
discarded (the alert bookkeeping is kept: an open alert still resolves when the
edited condition is false).

Changes: `rule.changed` (published by the API after commit) reloads one rule; a
full reload every 30 s covers changes made by other processes and group
membership. A rule that raises while being evaluated is switched off with the
error recorded on it (`rule.changed` published); the others keep running.

Partitions: telemetry arrives on `telemetry.<device_id % 8>`. An engine may own
a subset of partitions (`partitions=`), and then only sees and ticks those
devices. With the in-process bus a process has exactly one engine owning all of
them; several rules workers sharing partitions needs the NATS backend (future work).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from plantwatch.alerts import service as alerts
from plantwatch.assets.models import Device, DeviceParameter, device_group_members
from plantwatch.core.bus import Bus, Subscription
from plantwatch.core.db import Database, utcnow
from plantwatch.rules import conditions as cond
from plantwatch.rules import service as rules_service
from plantwatch.rules.firing import FiringTracker, Transition
from plantwatch.rules.models import Rule, RuleDeviceState, rule_devices
from plantwatch.rules.schedules import ALWAYS, Schedule, parse_schedule
from plantwatch.stream.service import StoredEvent, StreamService
from plantwatch.telemetry.models import series_latest
from plantwatch.telemetry.pipeline import TELEMETRY_PARTITIONS
from plantwatch.tenancy.models import Factory

if TYPE_CHECKING:
    from plantwatch.cli import RoleContext

log = structlog.get_logger("plantwatch.rules.engine")

Clock = Callable[[], int]
Latest = cond.Latest
RULE_FIRED = "rule.fired"
RULE_WORK_ORDER = "rule.work_order"
TICK_S = 1.0
FLUSH_S = 1.0
DETECTOR_FLUSH_S = 60.0
RELOAD_S = 30.0
STOP_TIMEOUT_S = 5.0
_CHUNK = 500


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


def _at(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def _ms(value: dt.datetime) -> int:
    return int(value.timestamp() * 1000)


def _json_safe(value: Any) -> Any:
    """Non-finite floats as strings ("inf"), which JSON cannot hold and float() reads back."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# --- compiled rules and per-device slots --------------------------------------------------


@dataclass(eq=False)
class CompiledRule:
    """What the engine needs of a rule, compiled once per version."""

    id: int
    factory_id: int
    version: int
    name: str
    severity: str
    root: cond.Node
    schedule: Schedule
    cooldown_ms: int
    auto_resolve: bool
    scope: str  # devices | group | factory
    # listed devices or group members; for factory scope the factory's active devices
    devices: frozenset[int]
    alert: bool = True
    event: bool = True
    work_order: bool = False
    parameters: tuple[str, ...] = ()
    clocked: bool = False  # truth can change with time alone
    watches_silence: bool = False  # a no_data leaf: every device in scope is ticked
    windowed: bool = False  # a windowed leaf: slots with data are ticked
    keeps_clocks: bool = False  # a `for` somewhere
    learns: bool = False  # an anomaly leaf (detector memory to persist)
    leaf_by_path: dict[str, cond.Leaf] = field(default_factory=dict)
    program: cond.Program | None = None  # the tree compiled once, shared by every device

    @classmethod
    def build(
        cls,
        rule: Rule,
        timezone: str,
        devices: Iterable[int],
    ) -> CompiledRule:
        """Compile a stored rule; raises (ConditionError, KeyError...) if it is corrupt."""
        root = cond.validate(rule.conditions)
        schedule = parse_schedule(rule.schedule, timezone or "UTC")
        actions = rule.actions or {}
        all_leaves = cond.leaves(root)
        return cls(
            id=rule.id,
            factory_id=rule.factory_id,
            version=rule.version,
            name=rule.name,
            severity=rule.severity,
            root=root,
            schedule=schedule,
            cooldown_ms=int(rule.cooldown_s) * 1000,
            auto_resolve=bool(rule.auto_resolve),
            scope=rule.scope,
            devices=frozenset(devices) if rule.scope != "factory" else frozenset(),
            alert=bool(actions.get("alert", True)),
            event=bool(actions.get("event", True)),
            work_order=bool(actions.get("work_order", False)),
            parameters=tuple(sorted(cond.parameters_of(root))),
            clocked=cond.needs_clock(root),
            watches_silence=any(leaf.op == "no_data" for leaf in all_leaves),
            windowed=any(leaf.window_ms for leaf in all_leaves),
            keeps_clocks=cond.has_for(root),
            learns=any(leaf.op == "anomaly" for leaf in all_leaves),
            leaf_by_path={leaf.path: leaf for leaf in all_leaves},
            program=cond.Program(root),
        )

    def covers(self, device_id: int) -> bool:
        return self.scope == "factory" or device_id in self.devices

    def same_shape(self, other: CompiledRule) -> bool:
        return (
            self.version == other.version
            and self.devices == other.devices
            and self.parameters == other.parameters
        )


class Slot:
    """One rule on one device: condition state, alert state machine, bookkeeping."""

    __slots__ = (
        "alert_id",
        "device_id",
        "key",
        "latest",
        "learned",
        "primed",
        "rule",
        "state",
        "tracker",
    )

    def __init__(self, rule: CompiledRule, device_id: int, started_ms: int, latest: Latest) -> None:
        self.rule = rule
        self.device_id = device_id
        self.key = (rule.id, device_id)
        self.latest = latest  # the device's latest values, shared by all its slots
        self.state = cond.RuleState(rule.root, started_ms, latest, rule.program)
        self.tracker = FiringTracker(rule.cooldown_ms, rule.auto_resolve)
        self.alert_id: int | None = None
        self.learned = False  # detector memory changed since last written
        self.primed = False  # given stored values at load: the next tick judges it

    def rebuild(self, rule: CompiledRule, started_ms: int) -> None:
        """A new rule version: fresh condition state; the alert bookkeeping stays, and an
        open alert counts as a true condition so it resolves when the new one is false."""
        self.rule = rule
        self.state = cond.RuleState(rule.root, started_ms, self.latest, rule.program)
        old = self.tracker
        self.tracker = FiringTracker(
            rule.cooldown_ms,
            rule.auto_resolve,
            condition_true=old.open,
            open=old.open,
            last_fired_ms=old.last_fired_ms,
        )

    def restore(self, row: RuleDeviceState) -> None:
        saved = row.state or {}
        tracker = self.tracker
        tracker.open = bool(saved.get("open", False))
        tracker.last_fired_ms = _ms(row.last_fired_at) if row.last_fired_at else None
        alert_id = saved.get("alert_id")
        self.alert_id = int(alert_id) if alert_id is not None else None
        if row.rule_version == self.rule.version:
            self.state.restore(saved.get("condition") or {})
            tracker.condition_true = bool(row.condition_true)
        else:  # written for another version: the condition state means nothing now
            tracker.condition_true = tracker.open

    def row(self, now: dt.datetime) -> dict[str, Any]:
        tracker = self.tracker
        return {
            "rule_id": self.rule.id,
            "device_id": self.device_id,
            "rule_version": self.rule.version,
            "state": _json_safe(
                {
                    "condition": self.state.snapshot(),
                    "open": tracker.open,
                    "alert_id": self.alert_id,
                }
            ),
            "condition_true": tracker.condition_true,
            "last_fired_at": _at(tracker.last_fired_ms) if tracker.last_fired_ms else None,
            "updated_at": now,
        }


class DeviceIndex:
    """A device's slots, and which read each parameter: what one of its points touches."""

    __slots__ = ("by_param", "latest", "params", "slots")

    def __init__(self, slots: list[Slot]) -> None:
        self.slots = tuple(slots)
        self.latest: Latest = slots[0].latest if slots else {}
        by_param: dict[str, list[Slot]] = {}
        for slot in slots:
            for p in slot.rule.parameters:
                by_param.setdefault(p, []).append(slot)
        self.by_param = {p: tuple(found) for p, found in by_param.items()}
        self.params = frozenset(by_param)


@dataclass
class Step:
    """A transition to act on: open/repeat raise the alert, clear resolves it."""

    slot: Slot
    kind: str  # open | repeat | clear
    at_ms: int
    message: str
    facts: list[dict[str, Any]]
    snapshot: dict[str, Any]
    received_ms: int | None


def fact_dict(rule: CompiledRule, fact: cond.Fact) -> dict[str, Any]:
    """A Fact as stored with the alert: what was read, how it was judged, and the text."""
    value = fact.value
    out: dict[str, Any] = {
        "path": fact.path,
        "parameter": fact.parameter or None,
        "value": value if value is None or math.isfinite(value) else None,
        "text": fact.text,
    }
    leaf = rule.leaf_by_path.get(fact.path)
    if leaf is None:  # a NOT group
        out["operator"] = "NOT"
        return out
    out["operator"] = leaf.op
    for key in ("threshold", "low", "high"):
        bound = getattr(leaf, key)
        if bound is not None:
            out[key] = bound
    if leaf.aggregate:
        out["aggregate"] = leaf.aggregate
    if leaf.window_ms:
        out["window"] = cond.format_duration(leaf.window_ms)
    if leaf.for_ms:
        out["for"] = cond.format_duration(leaf.for_ms)
    if leaf.duration_ms:
        out["duration"] = cond.format_duration(leaf.duration_ms)
    if leaf.op == "anomaly":
        out["detector"] = leaf.detector
    return out


# --- the engine ----------------------------------------------------------------------------


class RuleEngine:
    def __init__(
        self,
        db: Database | None,
        bus: Bus | None,
        *,
        clock: Clock = wall_clock_ms,
        partitions: Sequence[int] | None = None,
        tick_s: float = TICK_S,
        flush_s: float = FLUSH_S,
        detector_flush_s: float = DETECTOR_FLUSH_S,
        reload_s: float = RELOAD_S,
        background: bool = True,
        stream: StreamService | None = None,
    ) -> None:
        """`db`/`bus` may be None only to evaluate in memory (benchmarks). `partitions`:
        the telemetry partitions this engine owns (default all). `background=False`
        leaves ticking, flushing and reloading to the caller (tests). `stream`: alerts
        are written to the live stream's log in their own transaction."""
        self.db = db
        self.bus = bus
        self.stream = stream
        self.clock = clock
        self.partitions = (
            tuple(sorted(set(partitions)))
            if partitions is not None
            else tuple(range(TELEMETRY_PARTITIONS))
        )
        self._owned = frozenset(self.partitions)
        self._owns_all = self._owned == frozenset(range(TELEMETRY_PARTITIONS))
        self.tick_s = tick_s
        self.flush_s = flush_s
        self.detector_flush_s = detector_flush_s
        self.reload_s = reload_s
        self.background = background
        self._rules: dict[int, CompiledRule] = {}
        self._by_factory: dict[int, dict[int, CompiledRule]] = {}
        self._factory_devices: dict[int, set[int]] = {}
        # factory -> device -> its slots, by the parameters they read
        self._indexes: dict[int, dict[int, DeviceIndex]] = {}
        self._slots: dict[int, dict[int, Slot]] = {}
        self._latest: dict[int, dict[str, tuple[int, float]]] = {}
        self._device_keys: dict[int, str] = {}
        self._dirty: dict[tuple[int, int], Slot] = {}
        self._learned: dict[tuple[int, int], Slot] = {}
        self._failed: dict[int, tuple[int, str]] = {}
        self._loaded = False
        self._lock = asyncio.Lock()
        self._load_lock = asyncio.Lock()
        self._subs: list[Subscription] = []
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.stats = {"points": 0, "evaluations": 0, "transitions": 0, "disabled": 0}

    # -- lifecycle -----------------------------------------------------------

    @property
    def rules(self) -> dict[int, CompiledRule]:
        return self._rules

    async def start(self) -> None:
        """Load the active rules and their saved state, subscribe, start the clock."""
        await self.load()
        assert self.bus is not None
        if self._owns_all:
            self._subs.append(self.bus.subscribe("telemetry.*", self._on_telemetry))
        else:
            for p in self.partitions:
                self._subs.append(self.bus.subscribe(f"telemetry.{p}", self._on_telemetry))
        self._subs.append(self.bus.subscribe(rules_service.RULE_CHANGED, self._on_rule_changed))
        self._subs.append(self.bus.subscribe("alert.resolved", self._on_alert_resolved))
        self._subs.append(self.bus.subscribe("alert.reopened", self._on_alert_reopened))
        if self.background:
            self._stop.clear()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="rules:tick")

    async def stop(self) -> None:
        """Stop the clock and the subscriptions, then write every unsaved state."""
        self._stop.set()
        if self._task is not None:
            try:  # let a running cycle finish (its alert writes and their events)
                await asyncio.wait_for(asyncio.shield(self._task), timeout=STOP_TIMEOUT_S)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        unsubscribe = getattr(self.bus, "unsubscribe", None)
        async with self._lock:  # no handler is between judging and writing now
            for sub in self._subs:
                if unsubscribe is not None:
                    unsubscribe(sub)
            self._subs.clear()
        await self.flush(everything=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_flush = next_learned = next_reload = loop.time()
        next_flush += self.flush_s
        next_learned += self.detector_flush_s
        next_reload += self.reload_s
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.tick_s)
            if self._stop.is_set():
                break
            try:
                await self.tick()
                now = loop.time()
                if now >= next_flush:
                    next_flush = now + self.flush_s
                    everything = now >= next_learned
                    if everything:
                        next_learned = now + self.detector_flush_s
                    await self.flush(everything=everything)
                if now >= next_reload:
                    next_reload = now + self.reload_s
                    await self.load()
            except Exception:
                log.exception("rules_engine_cycle_failed")

    # -- loading ---------------------------------------------------------------

    async def load(self) -> None:
        """(Re)load every active rule: new ones with their saved state, changed ones
        recompiled, removed ones dropped."""
        async with self._load_lock:
            async with self._reader() as session:
                rows = (
                    await session.execute(
                        select(Rule, Factory.timezone)
                        .join(Factory, Factory.id == Rule.factory_id)
                        .where(Rule.is_active)
                    )
                ).all()
                stale = await self._sync(session, [(r, tz) for r, tz in rows], None)
            await self._after_sync(stale)

    async def reload_rule(self, factory_id: int, rule_id: int) -> None:
        async with self._load_lock:
            async with self._reader() as session:
                row = (
                    await session.execute(
                        select(Rule, Factory.timezone)
                        .join(Factory, Factory.id == Rule.factory_id)
                        .where(Rule.id == rule_id, Rule.factory_id == factory_id)
                    )
                ).first()
                if row is None:  # deleted: its saved state went with it
                    for key in [k for k in self._dirty if k[0] == rule_id]:
                        del self._dirty[key]
                    for key in [k for k in self._learned if k[0] == rule_id]:
                        del self._learned[key]
                rules = [(row[0], row[1])] if row is not None and row[0].is_active else []
                stale = await self._sync(session, rules, {rule_id})
            await self._after_sync(stale)

    async def _sync(
        self,
        session: AsyncSession,
        rows: list[tuple[Rule, str]],
        only: set[int] | None,
    ) -> list[tuple[int, int]]:
        """Make memory match `rows` (all active rules, or those of `only`)."""
        rule_ids = [r.id for r, _ in rows]
        listed = await self._rule_devices(session, [r.id for r, _ in rows if r.scope == "devices"])
        groups = await self._group_members(
            session, {r.group_id for r, _ in rows if r.scope == "group" and r.group_id}
        )
        factories = {r.factory_id for r, _ in rows}
        factory_devices = await self._active_devices(session, factories)
        compiled: dict[int, CompiledRule] = {}
        for rule, timezone in rows:
            if rule.scope == "devices":
                devices: set[int] = listed.get(rule.id, set())
            elif rule.scope == "group":
                devices = groups.get(rule.group_id or 0, set())
            else:
                devices = factory_devices.get(rule.factory_id, set())
            try:
                compiled[rule.id] = CompiledRule.build(rule, timezone, devices)
            except Exception as exc:
                log.exception("rule_compile_failed", rule_id=rule.id)
                self._failed[rule.id] = (rule.factory_id, f"{type(exc).__name__}: {exc}")
        for fid, devices in factory_devices.items():
            self._factory_devices.setdefault(fid, set()).update(devices)
        gone = (set(self._rules) if only is None else set(only) & set(self._rules)) - set(compiled)
        for rule_id in gone:
            self._uninstall(rule_id)
        new = [rid for rid in compiled if rid not in self._rules]
        saved = await self._saved_states(session, new)
        now = self.clock()
        fresh: list[Slot] = []
        for rule_id, compiled_rule in compiled.items():
            fresh.extend(self._install(compiled_rule, saved.get(rule_id, []), now))
        await self._prime(session, fresh, everyone=not self._loaded)
        self._loaded = True
        log.debug("rules_loaded", rules=len(rule_ids), new=len(new), removed=len(gone))
        # Saved states of devices the rule no longer covers: to delete.
        return [
            (rid, row.device_id)
            for rid in new
            for row in saved.get(rid, [])
            if rid in self._rules and not self._rules[rid].covers(row.device_id)
        ]

    def _reader(self) -> AsyncSession:
        """A session for reading: no write intent, so on SQLite it never holds the
        write lock (ingest and alert writes go on meanwhile)."""
        assert self.db is not None
        return AsyncSession(self.db.engine, expire_on_commit=False)

    async def _after_sync(self, stale: list[tuple[int, int]]) -> None:
        assert self.db is not None
        if stale:
            async with self.db.session() as session:
                for rid, did in stale:
                    await session.execute(
                        delete(RuleDeviceState).where(
                            RuleDeviceState.rule_id == rid, RuleDeviceState.device_id == did
                        )
                    )
                await session.commit()
        if self._failed:
            await self._disable_failed()

    async def _rule_devices(
        self, session: AsyncSession, rule_ids: list[int]
    ) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {}
        for i in range(0, len(rule_ids), _CHUNK):
            rows = await session.execute(
                select(rule_devices.c.rule_id, rule_devices.c.device_id).where(
                    rule_devices.c.rule_id.in_(rule_ids[i : i + _CHUNK])
                )
            )
            for rid, did in rows:
                out.setdefault(rid, set()).add(did)
        return out

    async def _group_members(
        self, session: AsyncSession, group_ids: set[int]
    ) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {}
        ids = sorted(group_ids)
        for i in range(0, len(ids), _CHUNK):
            rows = await session.execute(
                select(device_group_members.c.group_id, device_group_members.c.device_id).where(
                    device_group_members.c.group_id.in_(ids[i : i + _CHUNK])
                )
            )
            for gid, did in rows:
                out.setdefault(gid, set()).add(did)
        return out

    async def _active_devices(
        self, session: AsyncSession, factories: set[int]
    ) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {fid: set() for fid in factories}
        if not factories:
            return out
        rows = await session.execute(
            select(Device.factory_id, Device.id, Device.device_key).where(
                Device.factory_id.in_(sorted(factories)), Device.is_active
            )
        )
        for fid, did, key in rows:
            out[fid].add(did)
            self._device_keys[did] = key
        return out

    async def _saved_states(
        self, session: AsyncSession, rule_ids: list[int]
    ) -> dict[int, list[RuleDeviceState]]:
        out: dict[int, list[RuleDeviceState]] = {}
        for i in range(0, len(rule_ids), _CHUNK):
            rows = await session.scalars(
                select(RuleDeviceState).where(RuleDeviceState.rule_id.in_(rule_ids[i : i + _CHUNK]))
            )
            for row in rows:
                out.setdefault(row.rule_id, []).append(row)
        return out

    def _install(self, rule: CompiledRule, saved: list[RuleDeviceState], now: int) -> list[Slot]:
        """Put a compiled rule in place; the slots it created (to prime)."""
        old = self._rules.get(rule.id)
        self._rules[rule.id] = rule
        self._by_factory.setdefault(rule.factory_id, {})[rule.id] = rule
        if old is None or not old.same_shape(rule):
            self._indexes.pop(rule.factory_id, None)
        slots = self._slots.setdefault(rule.id, {})
        created: list[Slot] = []
        if old is None:
            for row in saved:
                if rule.covers(row.device_id) and self._owns(row.device_id):
                    slot = Slot(rule, row.device_id, now, self._latest_of(row.device_id))
                    slot.restore(row)
                    slots[row.device_id] = slot
                    created.append(slot)
                    if row.rule_version != rule.version:
                        self._dirty[slot.key] = slot
        else:
            for device_id, slot in list(slots.items()):
                if not rule.covers(device_id):
                    del slots[device_id]
                    continue
                if slot.rule.version != rule.version:
                    slot.rebuild(rule, now)
                    self._dirty[slot.key] = slot
                    created.append(slot)
                else:
                    slot.rule = rule
                    slot.tracker.cooldown_ms = rule.cooldown_ms
                    slot.tracker.auto_resolve = rule.auto_resolve
        if rule.watches_silence:
            for device_id in self._scope_devices(rule):
                if device_id not in slots:
                    slot = Slot(rule, device_id, now, self._latest_of(device_id))
                    slots[device_id] = slot
                    created.append(slot)
        return created

    def _latest_of(self, device_id: int) -> Latest:
        latest = self._latest.get(device_id)
        if latest is None:
            latest = self._latest[device_id] = {}
        return latest

    def add_rule(self, rule: CompiledRule, factory_devices: Iterable[int] = ()) -> None:
        """Install a compiled rule without the database (benchmarks, embedding);
        `factory_devices`: the factory's devices, for factory-wide no_data rules."""
        self._factory_devices.setdefault(rule.factory_id, set()).update(factory_devices)
        self._install(rule, [], self.clock())

    def _uninstall(self, rule_id: int) -> None:
        rule = self._rules.pop(rule_id, None)
        if rule is None:
            return
        self._by_factory.get(rule.factory_id, {}).pop(rule_id, None)
        self._indexes.pop(rule.factory_id, None)
        self._slots.pop(rule_id, None)

    async def _prime(self, session: AsyncSession, slots: list[Slot], everyone: bool) -> None:
        """Load the latest stored values of the devices of new slots (of every device in
        scope when `everyone`: the first load), so plain leaves judge from them."""
        device_ids = {s.device_id for s in slots}
        if everyone:
            for rule in self._rules.values():
                device_ids.update(self._scope_devices(rule))
        parameters = sorted({p for rule in self._rules.values() for p in rule.parameters})
        if not device_ids or not parameters:
            return
        ids = sorted(device_ids)
        for i in range(0, len(ids), _CHUNK):
            rows = await session.execute(
                select(
                    series_latest.c.device_id,
                    DeviceParameter.key,
                    series_latest.c.ts,
                    series_latest.c.value,
                )
                .join(DeviceParameter, DeviceParameter.id == series_latest.c.series_id)
                .where(
                    series_latest.c.device_id.in_(ids[i : i + _CHUNK]),
                    DeviceParameter.key.in_(parameters),
                    series_latest.c.value.is_not(None),
                )
            )
            for did, key, ts, value in rows:
                latest = self._latest_of(did)
                seen = latest.get(key)
                if seen is None or seen[0] < ts:
                    latest[key] = (int(ts), float(value))
        for slot in slots:
            if any(p in slot.latest for p in slot.rule.parameters):
                slot.primed = True

    # -- evaluation ------------------------------------------------------------

    def _owns(self, device_id: int) -> bool:
        return self._owns_all or device_id % TELEMETRY_PARTITIONS in self._owned

    def _scope_devices(self, rule: CompiledRule) -> Iterable[int]:
        devices: Iterable[int] = (
            self._factory_devices.get(rule.factory_id, ())
            if rule.scope == "factory"
            else rule.devices
        )
        return devices if self._owns_all else [d for d in devices if self._owns(d)]

    def _device_index(self, factory_id: int, device_id: int, started_ms: int) -> DeviceIndex:
        """The slots of every rule of the factory that covers the device (created now
        if new), by the parameters they read."""
        latest = self._latest_of(device_id)
        found: list[Slot] = []
        for rule in sorted(self._by_factory.get(factory_id, {}).values(), key=lambda r: r.id):
            if rule.covers(device_id):
                slots = self._slots.setdefault(rule.id, {})
                slot = slots.get(device_id)
                if slot is None:
                    slot = slots[device_id] = Slot(rule, device_id, started_ms, latest)
                found.append(slot)
        return DeviceIndex(found)

    def evaluate_item(self, item: dict[str, Any]) -> list[Step]:
        """Judge one committed telemetry message (see telemetry_events) against the rules
        that read its parameters on its device; the transitions to act on."""
        steps: list[Step] = []
        factory_id: int = item["factory_id"]
        device_id: int = item["device_id"]
        columns: dict[str, tuple[list[int], list[float]]] = item["columns"]
        if not columns:
            return steps
        # One timestamp for the whole message (the usual case), or None.
        moment: int | None = None
        for stamps, _ in columns.values():
            if len(stamps) != 1 or (moment is not None and stamps[0] != moment):
                moment = None
                break
            moment = stamps[0]
        per_factory = self._indexes.get(factory_id)
        if per_factory is None:
            if factory_id not in self._by_factory:
                return steps
            per_factory = self._indexes[factory_id] = {}
        index = per_factory.get(device_id)
        if index is None:
            if not self._owns(device_id):
                return steps
            started = moment if moment is not None else self.clock()
            index = per_factory[device_id] = self._device_index(factory_id, device_id, started)
            self._factory_devices.setdefault(factory_id, set()).add(device_id)
            self._device_keys[device_id] = item.get("device_key", "")
        if not index.slots:
            return steps
        received_ms: int | None = item.get("received_ms")
        if moment is not None:
            self._judge_moment(index, columns, moment, received_ms, steps)
        else:
            self._judge_batch(index, columns, received_ms, steps)
        return steps

    def _judge_moment(
        self,
        index: DeviceIndex,
        columns: dict[str, tuple[list[int], list[float]]],
        ts: int,
        received_ms: int | None,
        steps: list[Step],
    ) -> None:
        """Every value of the message has timestamp `ts`: update the device's latest
        values once, feed the leaves with memory, judge each rule that reads one of them."""
        by_param = index.by_param
        latest = index.latest
        touched: Iterable[Slot]
        if index.params <= columns.keys():
            touched = index.slots
        else:
            touched = dict.fromkeys(
                slot for name in columns for slot in by_param.get(name, ())
            ).keys()
        points = 0
        for name, (_, values) in columns.items():
            if name in by_param:
                points += 1
                seen = latest.get(name)
                if seen is None or ts >= seen[0]:
                    latest[name] = (ts, values[0])
        judge = self._judge
        evaluations = 0
        for slot in touched:
            try:
                for p, leaf_state in slot.state.private:
                    column = columns.get(p)
                    if column is not None:
                        leaf_state.observe(ts, column[1][0])
                judge(slot, ts, received_ms, steps)
                evaluations += 1
            except Exception as exc:
                self._fail(slot.rule, exc)
        stats = self.stats
        stats["points"] += points
        stats["evaluations"] += evaluations

    def _judge_batch(
        self,
        index: DeviceIndex,
        columns: dict[str, tuple[list[int], list[float]]],
        received_ms: int | None,
        steps: list[Step],
    ) -> None:
        """Several timestamps: in time order, one moment at a time (a device reports a
        moment as a whole: judged once after all of its values), as the backtest does."""
        by_param = index.by_param
        points = sorted(
            (
                (ts, name, value)
                for name, (stamps, values) in columns.items()
                if name in by_param
                for ts, value in zip(stamps, values, strict=True)
            ),
            key=lambda point: point[0],
        )
        start = 0
        while start < len(points):
            ts = points[start][0]
            end = start
            moment: dict[str, tuple[list[int], list[float]]] = {}
            while end < len(points) and points[end][0] == ts:
                _, name, value = points[end]
                moment[name] = ([ts], [value])  # the last value of a duplicate wins
                end += 1
            self._judge_moment(index, moment, ts, received_ms, steps)
            start = end

    def _judge(self, slot: Slot, now: int, received_ms: int | None, steps: list[Step]) -> None:
        state = slot.state
        clocks = state.clock_moves
        fired = state.holds(now)
        if state.clock_moves != clocks:
            self._dirty[slot.key] = slot
        rule = slot.rule
        if rule.learns and not slot.learned:
            slot.learned = True
            self._learned[slot.key] = slot
        if fired and rule.schedule is not ALWAYS and not rule.schedule.active(_at(now)):
            fired = False  # outside its schedule a rule counts as false
        tracker = slot.tracker
        if fired == tracker.condition_true:
            return
        self._dirty[slot.key] = slot
        transition = tracker.step(now, fired)
        if transition is not None:
            steps.append(self._step(slot, transition, received_ms))

    def _step(self, slot: Slot, transition: Transition, received_ms: int | None) -> Step:
        rule = slot.rule
        now = transition.at_ms
        self.stats["transitions"] += 1
        if transition.kind == "clear":
            return Step(slot, "clear", now, f"{rule.name}: condition cleared", [], {}, received_ms)
        verdict = slot.state.evaluate(now)  # the same moment again: same answer, with facts
        message = verdict.message or rule.name
        facts = [fact_dict(rule, f) for f in verdict.facts]
        return Step(slot, transition.kind, now, message, facts, self._snapshot(slot), received_ms)

    def _snapshot(self, slot: Slot) -> dict[str, Any]:
        values: dict[str, Any] = {}
        at: dict[str, str] = {}
        for p in slot.rule.parameters:
            seen = slot.latest.get(p)
            if seen is not None:
                values[p] = seen[1] if math.isfinite(seen[1]) else None
                at[p] = _at(seen[0]).isoformat()
        return {
            "device_key": self._device_keys.get(slot.device_id),
            "values": values,
            "at": at,
            "rule_version": slot.rule.version,
        }

    def _fail(self, rule: CompiledRule, exc: Exception) -> None:
        """The rule raised: stop evaluating it here and now; switched off in the database
        at the next commit."""
        if rule.id not in self._rules:
            return
        log.error("rule_evaluation_failed", rule_id=rule.id, error=str(exc), exc_info=exc)
        self._failed[rule.id] = (rule.factory_id, f"{type(exc).__name__}: {exc}")
        self._uninstall(rule.id)

    def evaluate_due(self, now: int) -> list[Step]:
        """Judge, at `now`, every slot whose truth can change with time alone."""
        steps: list[Step] = []
        for rule in [r for r in self._rules.values() if r.clocked]:
            slots = self._slots.get(rule.id)
            if slots is None:
                continue
            if rule.watches_silence:
                for device_id in self._scope_devices(rule):
                    if device_id not in slots:
                        slots[device_id] = Slot(rule, device_id, now, self._latest_of(device_id))
            every = rule.watches_silence or rule.windowed
            try:
                for slot in list(slots.values()):
                    if every or slot.state.since or slot.primed:
                        slot.primed = False
                        self._judge(slot, now, None, steps)
                        self.stats["evaluations"] += 1
            except Exception as exc:
                self._fail(rule, exc)
        return steps

    # -- acting on transitions ------------------------------------------------

    # Judging and writing what was judged happen under one lock, so the telemetry path,
    # the tick and alert events never interleave their transitions of one slot.

    async def _on_telemetry(self, subject: str, payload: dict[str, Any]) -> None:
        async with self._lock:
            steps: list[Step] = []
            for item in payload.get("items", ()):
                try:
                    steps.extend(self.evaluate_item(item))
                except Exception:
                    log.exception("telemetry_item_failed", device_id=item.get("device_id"))
            await self._act(steps)

    async def tick(self, now: int | None = None) -> None:
        """Judge the time-driven rules at `now` (default: the clock) and act."""
        async with self._lock:
            await self._act(self.evaluate_due(self.clock() if now is None else now))

    async def _act(self, steps: list[Step]) -> None:
        if self._failed:
            await self._disable_failed()
        if not steps:
            return
        try:
            changes = await self._write(steps)
        except Exception:
            log.exception("alert_write_failed", steps=len(steps))
            changes = []
            for step in steps:  # one by one: one bad transition must not lose the rest
                try:
                    changes.extend(await self._write([step]))
                except Exception:
                    log.exception(
                        "alert_write_failed",
                        rule_id=step.slot.rule.id,
                        device_id=step.slot.device_id,
                    )
        assert self.bus is not None
        await alerts.publish(self.bus, [change for _, change in changes])
        for step, change in changes:
            await self._publish_rule_events(step, change)
        for step in steps:
            rule = step.slot.rule
            if not rule.alert and step.kind != "clear":
                await self._publish_rule_events(step, None)

    async def _write(self, steps: list[Step]) -> list[tuple[Step, alerts.AlertChange]]:
        assert self.db is not None
        stream = self.stream

        def write(session: Session) -> tuple[list[tuple[Step, alerts.AlertChange]], list[Any]]:
            # Runs as one unit in the database's writer (Database.run_write): on SQLite
            # the whole transaction is one hop, not one per statement.
            done: list[tuple[Step, alerts.AlertChange]] = []
            for step in steps:
                slot = step.slot
                rule = slot.rule
                if not rule.alert:
                    continue
                at = _at(step.at_ms)
                if step.kind == "clear":
                    cleared = alerts.clear_alert_sync(
                        session,
                        factory_id=rule.factory_id,
                        rule_id=rule.id,
                        device_id=slot.device_id,
                        at=at,
                        message=step.message,
                    )
                    if cleared is not None:
                        done.append((step, cleared))
                else:
                    raised = alerts.raise_alert_sync(
                        session,
                        factory_id=rule.factory_id,
                        rule_id=rule.id,
                        device_id=slot.device_id,
                        severity=rule.severity,
                        title=rule.name,
                        message=step.message,
                        facts=step.facts,
                        snapshot=step.snapshot,
                        at=at,
                        received_ms=step.received_ms,
                    )
                    done.append((step, raised))
            recorded: list[StoredEvent] = []
            if stream is not None and done:
                # The stream's log entries commit with the alerts (an outbox), so the
                # alert reaches live screens without a second transaction.
                recorded = stream.record_in_sync(
                    session.connection(),
                    [(change.subject, change.payload) for _, change in done],
                )
            session.commit()
            return done, recorded

        if not any(step.slot.rule.alert for step in steps):
            return []
        done, recorded = await self.db.run_write(write)
        if recorded and stream is not None:
            stream.committed(recorded)
        for step, change in done:
            slot = step.slot
            alert_id = change.payload.get("alert_id")
            slot.alert_id = None if step.kind == "clear" else alert_id
            self._dirty[slot.key] = slot
        return done

    async def _publish_rule_events(self, step: Step, change: alerts.AlertChange | None) -> None:
        if step.kind == "clear":
            return
        assert self.bus is not None
        rule = step.slot.rule
        payload = {
            "factory_id": rule.factory_id,
            "rule_id": rule.id,
            "device_id": step.slot.device_id,
            "alert_id": change.payload.get("alert_id") if change is not None else None,
            "severity": rule.severity,
            "message": step.message,
            "at": _at(step.at_ms).isoformat(),
        }
        if rule.event:
            await self.bus.publish(RULE_FIRED, payload)
        if rule.work_order and step.kind == "open":
            await self.bus.publish(RULE_WORK_ORDER, payload)

    async def _disable_failed(self) -> None:
        assert self.db is not None and self.bus is not None
        failed, self._failed = self._failed, {}
        for rule_id, (factory_id, error) in failed.items():
            try:
                async with self.db.session() as session:
                    changed = await rules_service.disable_for_error(
                        session, factory_id, rule_id, error
                    )
            except Exception:
                log.exception("rule_disable_failed", rule_id=rule_id)
                self._failed.setdefault(rule_id, (factory_id, error))
                continue
            self._uninstall(rule_id)
            if changed:
                self.stats["disabled"] += 1
                log.warning("rule_disabled", rule_id=rule_id, factory_id=factory_id, error=error)
                await rules_service.publish_changed(self.bus, factory_id, rule_id)

    # -- other events ----------------------------------------------------------

    async def _on_rule_changed(self, subject: str, payload: dict[str, Any]) -> None:
        try:
            await self.reload_rule(int(payload["factory_id"]), int(payload["rule_id"]))
        except Exception:
            log.exception("rule_reload_failed", payload=payload)

    def _slot_of(self, payload: dict[str, Any]) -> Slot | None:
        rule_id, device_id = payload.get("rule_id"), payload.get("device_id")
        if rule_id is None or device_id is None:
            return None
        rule = self._rules.get(int(rule_id))
        if rule is None or rule.factory_id != payload.get("factory_id"):
            return None
        return self._slots.get(rule.id, {}).get(int(device_id))

    async def _on_alert_resolved(self, subject: str, payload: dict[str, Any]) -> None:
        """Someone resolved the alert (or it auto-resolved): the next rising edge of the
        condition opens a new alert."""
        async with self._lock:
            slot = self._slot_of(payload)
            if slot is None or not slot.tracker.open:
                return
            if slot.alert_id is not None and slot.alert_id != payload.get("alert_id"):
                return  # an older alert of this pair
            slot.tracker.resolved()
            slot.alert_id = None
            self._dirty[slot.key] = slot

    async def _on_alert_reopened(self, subject: str, payload: dict[str, Any]) -> None:
        async with self._lock:
            slot = self._slot_of(payload)
            if slot is None:
                return
            slot.tracker.open = True
            slot.alert_id = payload.get("alert_id")
            self._dirty[slot.key] = slot

    # -- persistence -------------------------------------------------------------

    async def flush(self, everything: bool = False) -> int:
        """Write changed states (and, with `everything`, changed detector memory). Rows."""
        slots = self._dirty
        self._dirty = {}
        if everything:
            for key, slot in self._learned.items():
                slots.setdefault(key, slot)
            self._learned = {}
        if not slots or self.db is None:
            return 0
        for slot in slots.values():
            slot.learned = False
        now = utcnow()
        rows = [slot.row(now) for slot in slots.values()]
        try:
            for i in range(0, len(rows), _CHUNK):
                await self._upsert(rows[i : i + _CHUNK])
        except Exception:
            log.warning("rule_state_flush_retry", rows=len(rows), exc_info=True)
            written = 0
            for row in rows:  # e.g. a rule or device deleted meanwhile
                try:
                    await self._upsert([row])
                    written += 1
                except Exception:
                    log.debug("rule_state_row_skipped", rule_id=row["rule_id"], exc_info=True)
            return written
        return len(rows)

    async def _upsert(self, rows: list[dict[str, Any]]) -> None:
        assert self.db is not None
        insert = pg_insert if self.db.dialect == "postgresql" else sqlite_insert
        stmt = insert(RuleDeviceState)
        stmt = stmt.on_conflict_do_update(
            index_elements=["rule_id", "device_id"],
            set_={
                name: stmt.excluded[name]
                for name in (
                    "rule_version",
                    "state",
                    "condition_true",
                    "last_fired_at",
                    "updated_at",
                )
            },
        )
        async with self.db.session() as session:
            await session.execute(stmt, rows)
            await session.commit()


# --- the role ------------------------------------------------------------------------------


class RulesRole:
    """`plantwatch run rules`: the live rule engine on the container's bus."""

    name = "rules"

    def __init__(self, ctx: RoleContext) -> None:
        self.container = ctx.container
        self.engine = RuleEngine(ctx.container.db, ctx.container.bus, stream=ctx.container.stream)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.container.start()
        await self.engine.start()
        self._task = asyncio.create_task(self._run(), name="role:rules")

    async def _run(self) -> None:
        try:
            await self._stop.wait()
        finally:
            await self.engine.stop()

    def endpoints(self) -> list[tuple[str, str]]:
        return [
            (
                "Rules",
                f"{len(self.engine.rules)} active rules, telemetry partitions "
                f"{self.engine.partitions[0]}-{self.engine.partitions[-1]}",
            )
        ]

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    def request_stop(self, force: bool = False) -> None:
        self._stop.set()
        if force and self._task is not None:
            self._task.cancel()
