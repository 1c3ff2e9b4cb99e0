"""Rules: create, change, toggle, validate, and backtest over stored history."""

from __future__ import annotations

import datetime as dt
import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from plantwatch.alerts.models import Alert
from plantwatch.assets.models import Device, DeviceGroup, DeviceParameter, device_group_members
from plantwatch.core.bus import Bus
from plantwatch.core.errors import NotFound, Problem, invalid_body
from plantwatch.core.listing import like_pattern, paginate, parse_sort
from plantwatch.core.schemas import PageParams
from plantwatch.notify.models import NotificationChannel
from plantwatch.rules import conditions as cond
from plantwatch.rules.firing import FiringTracker
from plantwatch.rules.models import Rule, RuleDeviceState, rule_devices
from plantwatch.rules.schedules import Schedule, parse_schedule
from plantwatch.rules.schemas import (
    BacktestOut,
    Firing,
    RuleBody,
    RuleOut,
    RuleUpdate,
    ValidateOut,
    Warning_,
)
from plantwatch.telemetry.models import telemetry_raw
from plantwatch.tenancy.audit import Actor, record, snapshot
from plantwatch.tenancy.models import Factory
from plantwatch.tenancy.service import SystemActor

MAX_BACKTEST_POINTS = 2_000_000
MAX_BACKTEST_SPAN = dt.timedelta(days=366)
CLOCK_TICK_MS = 10_000
RULE_CHANGED = "rule.changed"
ENGINE_ACTOR = "rules-engine"
RULE_SORTS = {"name": Rule.name, "created_at": Rule.created_at, "severity": Rule.severity}


@dataclass(frozen=True)
class CheckedRule:
    """A rule body that passed every check, with what the engine needs compiled."""

    root: cond.Node
    schedule: Schedule
    cooldown_s: int
    warnings: list[Warning_]


async def _factory_timezone(session: AsyncSession, factory_id: int) -> str:
    zone = await session.scalar(select(Factory.timezone).where(Factory.id == factory_id))
    return zone or "UTC"


async def check(
    session: AsyncSession,
    factory_id: int,
    conditions: dict[str, Any],
    schedule: dict[str, Any] | None,
    cooldown: int | str,
    scope: dict[str, Any],
    notify: Sequence[int] = (),
) -> CheckedRule:
    """Validate everything in one pass; 422 lists every bad node with its path."""
    problems: list[tuple[str, str]] = []
    root: cond.Node | None = None
    try:
        root = cond.validate(conditions, "conditions")
    except cond.ConditionError as exc:
        problems.extend(exc.problems)
    parsed_schedule = None
    try:
        parsed_schedule = parse_schedule(
            schedule, await _factory_timezone(session, factory_id), "schedule"
        )
    except cond.ConditionError as exc:
        problems.extend(exc.problems)
    cooldown_ms = cond.parse_duration(cooldown)
    if cooldown_ms is None or cooldown_ms > 7 * 86_400_000:
        problems.append(("cooldown", "must be a duration of at most 7d, like 15m or 900"))
    problems.extend(await _scope_problems(session, factory_id, scope))
    problems.extend(await _channel_problems(session, factory_id, notify))
    if problems or root is None or parsed_schedule is None or cooldown_ms is None:
        raise invalid_body(problems)
    warnings = await _unknown_parameters(session, factory_id, root, scope)
    return CheckedRule(root, parsed_schedule, cooldown_ms // 1000, warnings)


async def _scope_problems(
    session: AsyncSession, factory_id: int, scope: dict[str, Any]
) -> list[tuple[str, str]]:
    if scope["type"] == "devices":
        ids = scope["device_ids"]
        found = set(
            (
                await session.scalars(
                    select(Device.id).where(Device.factory_id == factory_id, Device.id.in_(ids))
                )
            ).all()
        )
        return [
            (f"scope.device_ids[{i}]", f"no device {d}")
            for i, d in enumerate(ids)
            if d not in found
        ]
    if scope["type"] == "group":
        group = await session.scalar(
            select(DeviceGroup.id).where(
                DeviceGroup.factory_id == factory_id, DeviceGroup.id == scope["group_id"]
            )
        )
        return [] if group is not None else [("scope.group_id", f"no group {scope['group_id']}")]
    return []


async def _channel_problems(
    session: AsyncSession, factory_id: int, notify: Sequence[int]
) -> list[tuple[str, str]]:
    if not notify:
        return []
    found = set(
        (
            await session.scalars(
                select(NotificationChannel.id).where(
                    NotificationChannel.factory_id == factory_id,
                    NotificationChannel.id.in_(list(notify)),
                )
            )
        ).all()
    )
    return [
        (f"actions.notify[{i}]", f"no notification channel {c}")
        for i, c in enumerate(notify)
        if c not in found
    ]


async def scope_device_ids(session: AsyncSession, factory_id: int, rule: Rule) -> list[int]:
    if rule.scope == "devices":
        stmt = select(rule_devices.c.device_id).where(rule_devices.c.rule_id == rule.id)
    elif rule.scope == "group":
        stmt = select(device_group_members.c.device_id).where(
            device_group_members.c.group_id == rule.group_id
        )
    else:
        stmt = select(Device.id).where(Device.factory_id == factory_id, Device.is_active)
    return list((await session.scalars(stmt)).all())


async def _devices_in_scope(
    session: AsyncSession, factory_id: int, scope: dict[str, Any]
) -> list[int]:
    if scope["type"] == "devices":
        return list(scope["device_ids"])
    if scope["type"] == "group":
        rows = await session.scalars(
            select(device_group_members.c.device_id).where(
                device_group_members.c.group_id == scope["group_id"]
            )
        )
        return list(rows.all())
    rows = await session.scalars(
        select(Device.id).where(Device.factory_id == factory_id, Device.is_active)
    )
    return list(rows.all())


async def _unknown_parameters(
    session: AsyncSession, factory_id: int, root: cond.Node, scope: dict[str, Any]
) -> list[Warning_]:
    """Parameters no device in scope has yet: allowed (it may appear later), but said."""
    device_ids = await _devices_in_scope(session, factory_id, scope)
    known = (
        set(
            (
                await session.scalars(
                    select(DeviceParameter.key).where(
                        DeviceParameter.factory_id == factory_id,
                        DeviceParameter.device_id.in_(device_ids),
                    )
                )
            ).all()
        )
        if device_ids
        else set()
    )
    return [
        Warning_(
            path=f"{leaf.path}.parameter",
            message=f"no device in scope reports '{leaf.parameter}' yet",
        )
        for leaf in cond.leaves(root)
        if leaf.parameter not in known
    ]


def _scope_json(rule: Rule, device_ids: list[int]) -> dict[str, Any]:
    if rule.scope == "devices":
        return {"type": "devices", "device_ids": device_ids}
    if rule.scope == "group":
        return {"type": "group", "group_id": rule.group_id}
    return {"type": "factory"}


async def rule_out(
    session: AsyncSession, rule: Rule, warnings: list[Warning_] | None = None
) -> RuleOut:
    device_ids: list[int] = []
    if rule.scope == "devices":
        device_ids = list(
            (
                await session.scalars(
                    select(rule_devices.c.device_id)
                    .where(rule_devices.c.rule_id == rule.id)
                    .order_by(rule_devices.c.device_id)
                )
            ).all()
        )
    try:
        parameters = sorted(cond.parameters_of(cond.validate(rule.conditions)))
    except cond.ConditionError:  # stored by an older version or by hand: still shown
        parameters = []
    return RuleOut(
        id=rule.id,
        name=rule.name,
        description=rule.description,
        conditions=rule.conditions,
        scope=_scope_json(rule, device_ids),
        schedule=rule.schedule,
        severity=rule.severity,
        cooldown_s=rule.cooldown_s,
        auto_resolve=rule.auto_resolve,
        actions=rule.actions,
        is_active=rule.is_active,
        error=rule.error,
        version=rule.version,
        parameters=parameters,
        warnings=warnings or [],
        created_by=rule.created_by,
        created_at=rule.created_at,
        updated_at=rule.updated_at,
    )


async def _rule(session: AsyncSession, factory_id: int, rule_id: int) -> Rule:
    rule = await session.scalar(
        select(Rule).where(Rule.id == rule_id, Rule.factory_id == factory_id)
    )
    if rule is None:
        raise NotFound(f"no rule {rule_id}", code="rule_not_found")
    return rule


async def _set_scope(session: AsyncSession, rule: Rule, scope: dict[str, Any]) -> None:
    rule.scope = scope["type"]
    rule.group_id = scope.get("group_id") if scope["type"] == "group" else None
    await session.execute(delete(rule_devices).where(rule_devices.c.rule_id == rule.id))
    if scope["type"] == "devices":
        await session.execute(
            insert(rule_devices),
            [{"rule_id": rule.id, "device_id": d} for d in dict.fromkeys(scope["device_ids"])],
        )


async def create_rule(session: AsyncSession, actor: Actor, body: RuleBody) -> RuleOut:
    scope = body.scope.model_dump()
    checked = await check(
        session,
        actor.factory_id,
        body.conditions,
        body.schedule,
        body.cooldown,
        scope,
        body.actions.notify,
    )
    rule = Rule(
        factory_id=actor.factory_id,
        name=body.name,
        description=body.description,
        conditions=body.conditions,
        schedule=body.schedule,
        severity=body.severity.value,
        cooldown_s=checked.cooldown_s,
        auto_resolve=body.auto_resolve,
        actions=body.actions.model_dump(),
        is_active=body.is_active,
        created_by=actor.user_id,
        version=1,
    )
    session.add(rule)
    await session.flush()
    await _set_scope(session, rule, scope)
    record(session, actor, "rule.create", "rule", rule.id, after=snapshot(rule))
    await session.commit()
    return await rule_out(session, rule, checked.warnings)


async def update_rule(
    session: AsyncSession, actor: Actor, rule_id: int, body: RuleUpdate
) -> RuleOut:
    rule = await _rule(session, actor.factory_id, rule_id)
    changes = body.model_dump(exclude_unset=True)
    current_scope = _scope_json(
        rule,
        await scope_device_ids(session, actor.factory_id, rule) if rule.scope == "devices" else [],
    )
    scope = changes.get("scope", current_scope)
    checked = await check(
        session,
        actor.factory_id,
        changes.get("conditions", rule.conditions),
        changes.get("schedule", rule.schedule),
        changes.get("cooldown", rule.cooldown_s),
        scope,
        body.actions.notify if body.actions is not None else (),
    )
    before = snapshot(rule)
    for field in ("name", "description", "conditions", "schedule", "auto_resolve", "is_active"):
        if field in changes:
            setattr(rule, field, changes[field])
    if "severity" in changes:
        rule.severity = changes["severity"]
    if body.actions is not None:
        rule.actions = body.actions.model_dump()  # the whole object: defaults included
    rule.cooldown_s = checked.cooldown_s
    if "scope" in changes:
        await _set_scope(session, rule, scope)
    if changes.get("is_active"):
        rule.error = None  # re-enabling clears the engine's error
    rule.version += 1
    record(session, actor, "rule.update", "rule", rule.id, before=before, after=snapshot(rule))
    await session.commit()
    return await rule_out(session, rule, checked.warnings)


async def set_active(session: AsyncSession, actor: Actor, rule_id: int, active: bool) -> RuleOut:
    rule = await _rule(session, actor.factory_id, rule_id)
    if rule.is_active != active:
        before = snapshot(rule)
        rule.is_active = active
        if active:
            rule.error = None
        rule.version += 1
        record(session, actor, "rule.toggle", "rule", rule.id, before=before, after=snapshot(rule))
        await session.commit()
    return await rule_out(session, rule)


async def delete_rule(session: AsyncSession, actor: Actor, rule_id: int) -> None:
    rule = await _rule(session, actor.factory_id, rule_id)
    record(session, actor, "rule.delete", "rule", rule.id, before=snapshot(rule))
    await session.delete(rule)
    await session.commit()


async def publish_changed(bus: Bus, factory_id: int, rule_id: int) -> None:
    """Tell rule engines to reload a rule; call after the change committed."""
    await bus.publish(RULE_CHANGED, {"factory_id": factory_id, "rule_id": rule_id})


async def disable_for_error(
    session: AsyncSession, factory_id: int, rule_id: int, error: str
) -> bool:
    """The engine could not evaluate the rule: switch it off with the error recorded
    (shown on the rule; re-enabling clears it). False if it is gone or already off.
    Commits."""
    rule = await session.scalar(
        select(Rule).where(Rule.id == rule_id, Rule.factory_id == factory_id)
    )
    if rule is None or not rule.is_active:
        return False
    before = snapshot(rule)
    rule.is_active = False
    rule.error = error[:4000]
    rule.version += 1
    record(
        session,
        SystemActor(factory_id, email=ENGINE_ACTOR),
        "rule.disable",
        "rule",
        rule.id,
        before=before,
        after=snapshot(rule),
    )
    await session.commit()
    return True


async def get_rule(session: AsyncSession, factory_id: int, rule_id: int) -> RuleOut:
    return await rule_out(session, await _rule(session, factory_id, rule_id))


async def list_rules(
    session: AsyncSession,
    factory_id: int,
    params: PageParams,
    *,
    search: str | None,
    is_active: bool | None,
    severity: str | None,
    device_id: int | None,
    sort: str | None,
) -> tuple[list[RuleOut], int]:
    stmt = select(Rule).where(Rule.factory_id == factory_id)
    if search:
        stmt = stmt.where(func.lower(Rule.name).like(like_pattern(search), escape="\\"))
    if is_active is not None:
        stmt = stmt.where(Rule.is_active.is_(is_active))
    if severity is not None:
        stmt = stmt.where(Rule.severity == severity)
    if device_id is not None:
        stmt = stmt.where(
            (Rule.scope == "factory")
            | Rule.id.in_(
                select(rule_devices.c.rule_id).where(rule_devices.c.device_id == device_id)
            )
            | Rule.group_id.in_(
                select(device_group_members.c.group_id).where(
                    device_group_members.c.device_id == device_id
                )
            )
        )
    rows, total = await paginate(
        session, stmt, params, parse_sort(sort, RULE_SORTS, "name"), Rule.id
    )
    return [await rule_out(session, r) for r in rows], total


async def validate_body(session: AsyncSession, factory_id: int, body: RuleBody) -> ValidateOut:
    checked = await check(
        session,
        factory_id,
        body.conditions,
        body.schedule,
        body.cooldown,
        body.scope.model_dump(),
        body.actions.notify,
    )
    return ValidateOut(
        valid=True, parameters=sorted(cond.parameters_of(checked.root)), warnings=checked.warnings
    )


# --- backtest ------------------------------------------------------------------------------


def _ms(value: dt.datetime) -> int:
    return int(value.timestamp() * 1000)


def _at(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def replay_device(
    root: cond.Node,
    schedule: Schedule,
    cooldown_ms: int,
    auto_resolve: bool,
    points: Iterator[tuple[int, str, float]],
    start_ms: int,
    end_ms: int,
) -> list[tuple[int, int | None, int, str]]:
    """Run one device's time-ordered points through the rule; firings as
    (started_ms, ended_ms or None, occurrences, message). Points before start_ms
    only warm up windows and detectors."""
    state = cond.RuleState(root, start_ms)
    tracker = FiringTracker(cooldown_ms, auto_resolve)
    clocked = cond.needs_clock(root)
    firings: list[list[Any]] = []
    next_tick = start_ms

    def evaluate(now: int) -> None:
        verdict = state.evaluate(now)
        armed = schedule.active(_at(now))
        transition = tracker.step(now, verdict.fired and armed)
        if transition is None:
            return
        if transition.kind == "open":
            firings.append([now, None, 1, verdict.message])
        elif transition.kind == "repeat":
            firings[-1][2] += 1
        else:
            firings[-1][1] = now

    pending: int | None = None  # a timestamp whose points are observed but not judged
    for ts, parameter, value in points:
        if pending is not None and ts != pending:
            # Judge once per timestamp, after all of its values: a device reports
            # a moment as a whole, not parameter by parameter.
            evaluate(pending)
            pending = None
        while clocked and next_tick < min(ts, end_ms):
            if next_tick >= start_ms:
                evaluate(next_tick)
            next_tick += CLOCK_TICK_MS
        state.observe(parameter, ts, value)
        if ts >= start_ms:
            pending = ts
    if pending is not None:
        evaluate(pending)
    while clocked and next_tick < end_ms:
        evaluate(next_tick)
        next_tick += CLOCK_TICK_MS
    return [(f[0], f[1], f[2], f[3]) for f in firings]


def _lookback_ms(root: cond.Node) -> int:
    return max((max(leaf.window_ms, leaf.for_ms) for leaf in cond.leaves(root)), default=0)


async def backtest(
    session: AsyncSession,
    factory_id: int,
    body: RuleBody,
    start: dt.datetime,
    end: dt.datetime,
    device_ids: Sequence[int] | None,
) -> BacktestOut:
    if end <= start:
        raise invalid_body([("end", "must be after start")])
    if end - start > MAX_BACKTEST_SPAN:
        raise invalid_body([("end", "a backtest covers at most 366 days")])
    scope = body.scope.model_dump()
    checked = await check(session, factory_id, body.conditions, body.schedule, body.cooldown, scope)
    in_scope = await _devices_in_scope(session, factory_id, scope)
    targets = [d for d in in_scope if device_ids is None or d in set(device_ids)]
    if device_ids is not None:
        outside = [d for d in device_ids if d not in set(in_scope)]
        if outside:
            raise invalid_body([("device_ids", f"not in the rule's scope: {outside}")])
    keys = dict(
        (
            await session.execute(
                select(Device.id, Device.device_key).where(
                    Device.factory_id == factory_id, Device.id.in_(targets)
                )
            )
        ).all()
    )
    parameters = cond.parameters_of(checked.root)
    start_ms, end_ms = _ms(start), _ms(end)
    from_ms = start_ms - _lookback_ms(checked.root)
    series = (
        await session.execute(
            select(DeviceParameter.id, DeviceParameter.device_id, DeviceParameter.key).where(
                DeviceParameter.factory_id == factory_id,
                DeviceParameter.device_id.in_(targets),
                DeviceParameter.key.in_(parameters),
            )
        )
    ).all()
    by_device: dict[int, list[tuple[int, str]]] = {}
    for sid, did, key in series:
        by_device.setdefault(did, []).append((sid, key))
    total = (
        await session.scalar(
            select(func.count())
            .select_from(telemetry_raw)
            .where(
                telemetry_raw.c.series_id.in_([s[0] for s in series]),
                telemetry_raw.c.ts >= from_ms,
                telemetry_raw.c.ts < end_ms,
            )
        )
        if series
        else 0
    )
    if (total or 0) > MAX_BACKTEST_POINTS:
        raise Problem(
            f"{total} points in range; narrow the range or the devices (limit "
            f"{MAX_BACKTEST_POINTS})",
            status=422,
            code="backtest_too_large",
        )
    firings: list[Firing] = []
    for device_id in targets:
        streams = []
        for sid, key in by_device.get(device_id, []):
            rows = (
                await session.execute(
                    select(telemetry_raw.c.ts, telemetry_raw.c.value)
                    .where(
                        telemetry_raw.c.series_id == sid,
                        telemetry_raw.c.ts >= from_ms,
                        telemetry_raw.c.ts < end_ms,
                    )
                    .order_by(telemetry_raw.c.ts)
                )
            ).all()
            streams.append([(ts, key, value) for ts, value in rows])
        merged = heapq.merge(*streams)
        for started, ended, occurrences, message in replay_device(
            checked.root,
            checked.schedule,
            checked.cooldown_s * 1000,
            body.auto_resolve,
            merged,
            start_ms,
            end_ms,
        ):
            firings.append(
                Firing(
                    device_id=device_id,
                    device_key=keys.get(device_id, ""),
                    started_at=_at(started),
                    ended_at=_at(ended) if ended is not None else None,
                    occurrences=occurrences,
                    message=message,
                )
            )
    firings.sort(key=lambda f: (f.started_at, f.device_id))
    return BacktestOut(
        start=start, end=end, devices=len(targets), points=int(total or 0), firings=firings
    )


async def body_of(session: AsyncSession, factory_id: int, rule_id: int) -> RuleBody:
    """A saved rule as a body (to backtest it like an unsaved one)."""
    out = await get_rule(session, factory_id, rule_id)
    return RuleBody.model_validate(
        {
            "name": out.name,
            "description": out.description,
            "conditions": out.conditions,
            "scope": out.scope,
            "schedule": out.schedule,
            "severity": out.severity,
            "cooldown": out.cooldown_s,
            "auto_resolve": out.auto_resolve,
            "actions": out.actions,
            "is_active": out.is_active,
        }
    )


# --- the web UI's rule pages -----------------------------------------------------------------


@dataclass(frozen=True)
class RuleActivity:
    """When a rule last fired (any device) and how many of its alerts are open."""

    last_fired_at: dt.datetime | None = None
    open_alerts: int = 0


@dataclass(frozen=True)
class RuleRow:
    """One line of the rules list: the rule and what its summary needs, no per-row query."""

    rule: Rule
    device_count: int
    group_name: str | None
    activity: RuleActivity


async def rule_activity(
    session: AsyncSession, factory_id: int, rule_ids: Sequence[int]
) -> dict[int, RuleActivity]:
    """Last firing and open alerts of some rules: two grouped queries. A firing is
    the newest alert, or the engine's own record (it fires without alerts too)."""
    if not rule_ids:
        return {}
    ids = list(rule_ids)
    alerts = (
        await session.execute(
            select(
                Alert.rule_id,
                func.max(Alert.triggered_at),
                func.sum(case((Alert.status != "resolved", 1), else_=0)),
            )
            .where(Alert.factory_id == factory_id, Alert.rule_id.in_(ids))
            .group_by(Alert.rule_id)
        )
    ).all()
    fired = dict(
        (
            await session.execute(
                select(RuleDeviceState.rule_id, func.max(RuleDeviceState.last_fired_at))
                .where(RuleDeviceState.rule_id.in_(ids))
                .group_by(RuleDeviceState.rule_id)
            )
        ).all()
    )
    out: dict[int, RuleActivity] = {}
    for rule_id, last_alert, open_count in alerts:
        out[rule_id] = RuleActivity(last_alert, int(open_count or 0))
    for rule_id, last_state in fired.items():
        current = out.get(rule_id, RuleActivity())
        if last_state is not None and (
            current.last_fired_at is None or last_state > current.last_fired_at
        ):
            out[rule_id] = RuleActivity(last_state, current.open_alerts)
    return out


async def list_rule_rows(
    session: AsyncSession,
    factory_id: int,
    params: PageParams,
    *,
    search: str | None = None,
    is_active: bool | None = None,
    severity: str | None = None,
    sort: str | None = None,
) -> tuple[list[RuleRow], int]:
    """A page of rules with device counts, group names and activity: five queries."""
    device_count = (
        select(func.count())
        .where(rule_devices.c.rule_id == Rule.id)
        .correlate(Rule)
        .scalar_subquery()
    )
    stmt = (
        select(Rule, device_count, DeviceGroup.name)
        .outerjoin(DeviceGroup, DeviceGroup.id == Rule.group_id)
        .where(Rule.factory_id == factory_id)
    )
    if search:
        stmt = stmt.where(func.lower(Rule.name).like(like_pattern(search), escape="\\"))
    if is_active is not None:
        stmt = stmt.where(Rule.is_active.is_(is_active))
    if severity is not None:
        stmt = stmt.where(Rule.severity == severity)
    rows, total = await paginate(
        session, stmt, params, parse_sort(sort, RULE_SORTS, "name"), Rule.id, rows=True
    )
    activity = await rule_activity(session, factory_id, [r[0].id for r in rows])
    return [
        RuleRow(rule, int(count or 0), group, activity.get(rule.id, RuleActivity()))
        for rule, count, group in rows
    ], total


async def parameter_keys(session: AsyncSession, factory_id: int, limit: int = 2000) -> list[str]:
    """The parameter keys the factory's devices report, for the rule editor's suggestions."""
    rows = await session.scalars(
        select(DeviceParameter.key)
        .where(DeviceParameter.factory_id == factory_id)
        .group_by(DeviceParameter.key)
        .order_by(DeviceParameter.key)
        .limit(limit)
    )
    return list(rows.all())


async def device_labels(
    session: AsyncSession, factory_id: int, device_ids: Sequence[int]
) -> list[tuple[int, str, str]]:
    """(id, device_key, name) of some of the factory's devices, by name."""
    if not device_ids:
        return []
    rows = await session.execute(
        select(Device.id, Device.device_key, Device.name)
        .where(Device.factory_id == factory_id, Device.id.in_(list(device_ids)))
        .order_by(Device.name, Device.id)
    )
    return [(int(i), str(k), str(n)) for i, k, n in rows.all()]
