"""Alerts: one open alert per (rule, device), the lifecycle actions, SLA and escalation config.

The engine calls `raise_alert` / `clear_alert` inside its own transaction and
publishes the returned changes after it commits. API actions (acknowledge,
assign, resolve, ...) check the transition with `lifecycle.next_state`, write the
timeline entry and the audit row in one transaction, commit, and then publish
`alert.<event>` on the bus.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from plantwatch.alerts import lifecycle
from plantwatch.alerts.models import Alert, AlertEvent, AlertSlaPolicy, EscalationLevel
from plantwatch.alerts.schemas import (
    AlertCounts,
    AlertDetail,
    AlertOut,
    EscalationChainBody,
    EscalationChainOut,
    EscalationLevelOut,
    SlaConfigBody,
    SlaOut,
    SlaPolicyOut,
    TimelineEntry,
)
from plantwatch.assets.models import Device
from plantwatch.core.bus import Bus
from plantwatch.core.db import utcnow
from plantwatch.core.errors import Conflict, InvalidInput, NotFound, invalid_body
from plantwatch.core.listing import Sortable, paginate, parse_sort
from plantwatch.core.schemas import PageParams
from plantwatch.rules.models import Rule
from plantwatch.tenancy.audit import Actor, record, snapshot
from plantwatch.tenancy.models import User

SEVERITIES = ("low", "medium", "high", "critical")
SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES, start=1)}
# The detail view embeds this many timeline entries (the latest); /timeline pages the rest.
DETAIL_TIMELINE = 200


@dataclass(frozen=True)
class AlertChange:
    """What to publish after the caller commits."""

    subject: str  # "alert.created" | "alert.repeated" | "alert.resolved" ...
    payload: dict[str, Any]  # the AlertEvent: see alert_change()


def open_key(rule_id: int, device_id: int) -> str:
    return f"{rule_id}:{device_id}"


def iso(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def alert_change(
    alert: Alert,
    event: str,
    at: dt.datetime,
    *,
    actor_id: int | None = None,
    recipients: Iterable[int] = (),
    received_ms: int | None = None,
) -> AlertChange:
    return AlertChange(
        f"alert.{event}",
        {
            "event": event,
            "factory_id": alert.factory_id,
            "alert_id": alert.id,
            "rule_id": alert.rule_id,
            "device_id": alert.device_id,
            "severity": alert.severity,
            "status": alert.status,
            "title": alert.title,
            "message": alert.message,
            "occurrences": alert.occurrences,
            "escalation_level": alert.escalation_level,
            "assigned_to": alert.assigned_to,
            "actor_id": actor_id,
            "at": iso(at),
            "received_ms": received_ms,
            "recipients": list(recipients),
        },
    )


async def publish(bus: Bus, changes: Iterable[AlertChange]) -> None:
    """Publish after the transaction that made the changes committed."""
    for change in changes:
        await bus.publish(change.subject, change.payload)


def add_timeline(
    session: AsyncSession | Session,
    alert: Alert,
    kind: str,
    at: dt.datetime,
    actor_id: int | None = None,
    data: dict[str, Any] | None = None,
) -> AlertEvent:
    entry = AlertEvent(
        alert_id=alert.id,
        factory_id=alert.factory_id,
        kind=kind,
        actor_id=actor_id,
        at=at,
        data=data or {},
    )
    session.add(entry)
    return entry


# --- SLA policies and the escalation chain -------------------------------------------------


async def sla_policies(session: AsyncSession, factory_id: int) -> dict[str, lifecycle.SlaPolicy]:
    """Every severity's policy: the factory's row, else lifecycle.DEFAULT_SLA."""
    policies = dict(lifecycle.DEFAULT_SLA)
    rows = await session.scalars(
        select(AlertSlaPolicy).where(AlertSlaPolicy.factory_id == factory_id)
    )
    for row in rows:
        policies[row.severity] = lifecycle.SlaPolicy(row.ack_s, row.resolve_s, row.remind_every_s)
    return policies


async def sla_policy(session: AsyncSession, factory_id: int, severity: str) -> lifecycle.SlaPolicy:
    return await session.run_sync(lambda sync: sla_policy_sync(sync, factory_id, severity))


def sla_policy_sync(session: Session, factory_id: int, severity: str) -> lifecycle.SlaPolicy:
    row = session.get(AlertSlaPolicy, (factory_id, severity))
    if row is not None:
        return lifecycle.SlaPolicy(row.ack_s, row.resolve_s, row.remind_every_s)
    return lifecycle.DEFAULT_SLA.get(severity, lifecycle.SlaPolicy(None, None))


async def chain_levels(session: AsyncSession, factory_id: int) -> list[EscalationLevel]:
    rows = await session.scalars(
        select(EscalationLevel)
        .where(EscalationLevel.factory_id == factory_id)
        .order_by(EscalationLevel.level)
    )
    return list(rows.all())


async def level_users(session: AsyncSession, factory_id: int, level: EscalationLevel) -> list[int]:
    """The active users a level reaches now: its listed users plus its roles' holders."""
    if not level.user_ids and not level.roles:
        return []
    rows = await session.scalars(
        select(User.id)
        .where(
            User.factory_id == factory_id,
            User.is_active,
            or_(User.id.in_(level.user_ids or []), User.role.in_(level.roles or [])),
        )
        .order_by(User.id)
    )
    return list(rows.all())


async def escalate_alert(
    session: AsyncSession,
    alert: Alert,
    levels: Sequence[EscalationLevel],
    at: dt.datetime,
    *,
    actor_id: int | None,
    data: dict[str, Any],
) -> AlertChange:
    """Move the alert one level up the chain (or stay at the top, re-notifying it)."""
    by_number = {lv.level: lv for lv in levels}
    before = alert.escalation_level
    target = before + 1 if before + 1 in by_number else before
    level = by_number.get(target)
    recipients = await level_users(session, alert.factory_id, level) if level else []
    alert.escalation_level = target
    alert.last_escalated_at = at
    add_timeline(
        session,
        alert,
        "escalated",
        at,
        actor_id,
        {**data, "from_level": before, "level": target, "recipients": recipients},
    )
    return alert_change(alert, "escalated", at, actor_id=actor_id, recipients=recipients)


def schedule_sla(alert: Alert, remind_every_s: int | None, now: dt.datetime) -> None:
    """Set when the SLA sweeper must next look at the alert."""
    clock = lifecycle.clock_at(
        alert.ack_due_at,
        alert.resolve_due_at,
        remind_every_s,
        alert.status,
        alert.acknowledged_at,
        now,
        alert.last_reminder_at,
    )
    alert.next_sla_check_at = clock.next_check


def start_sla(alert: Alert, policy: lifecycle.SlaPolicy, at: dt.datetime) -> None:
    alert.ack_due_at, alert.resolve_due_at = lifecycle.due_times(policy, at)
    alert.ack_breach_handled = False
    alert.resolve_breach_handled = False
    alert.last_reminder_at = None
    schedule_sla(alert, policy.remind_every_s, at)


# --- the engine's entry points -------------------------------------------------------------


async def raise_alert(session: AsyncSession, **kwargs: Any) -> AlertChange:
    """`raise_alert_sync` on an async session (same arguments). Does not commit."""
    return await session.run_sync(lambda sync: raise_alert_sync(sync, **kwargs))


def raise_alert_sync(
    session: Session,
    *,
    factory_id: int,
    rule_id: int,
    device_id: int,
    severity: str,
    title: str,
    message: str,
    facts: list[dict[str, Any]],
    snapshot: dict[str, Any],
    at: dt.datetime,
    received_ms: int | None = None,
) -> AlertChange:
    """Open the (rule, device)'s alert, or bump the open one. Does not commit.

    The unique `open_key` makes "one open alert" hold under concurrency: if another
    transaction opened it first, our insert fails and we bump theirs instead.
    Synchronous, so the rule engine can run its whole alert transaction in one hop
    to the database (Database.run_write); `raise_alert` is the async form.
    """
    key = open_key(rule_id, device_id)
    sqlite = session.get_bind().dialect.name == "sqlite"
    open_alert_id = select(Alert.id).where(Alert.open_key == key, Alert.factory_id == factory_id)
    for attempt in range(3):
        if sqlite and session.scalar(open_alert_id) is None:
            # SQLite holds its one write lock from BEGIN to commit, so nobody opens this
            # alert in between: go straight to the insert, without the ORM's UPDATE ...
            # RETURNING (the costliest statement of the transaction that raises it).
            bumped = None
        else:
            bumped = session.scalar(
                update(Alert)
                .where(Alert.open_key == key, Alert.factory_id == factory_id)
                .values(
                    occurrences=Alert.occurrences + 1,
                    last_seen_at=case((Alert.last_seen_at < at, at), else_=Alert.last_seen_at),
                    updated_at=utcnow(),
                )
                .returning(Alert)
                .execution_options(populate_existing=True, synchronize_session=False)
            )
        if bumped is not None:
            add_timeline(
                session,
                bumped,
                "repeated",
                at,
                data={"occurrences": bumped.occurrences, "message": message, "facts": facts},
            )
            return alert_change(bumped, "repeated", at, received_ms=received_ms)
        policy = sla_policy_sync(session, factory_id, severity)
        alert = Alert(
            factory_id=factory_id,
            rule_id=rule_id,
            device_id=device_id,
            open_key=key,
            severity=severity,
            status=lifecycle.TRIGGERED,
            title=title[:300],
            message=message,
            facts=facts,
            snapshot=snapshot,
            occurrences=1,
            triggered_at=at,
            last_seen_at=at,
            escalation_level=0,
        )
        start_sla(alert, policy, at)
        if sqlite:
            # One writer at a time, from the UPDATE above to the commit: nobody can
            # open this alert in between, and a savepoint would cost two more trips.
            session.add(alert)
            session.flush()
            add_timeline(session, alert, "created", at, data={"message": message})
            return alert_change(alert, "created", at, received_ms=received_ms)
        try:
            with session.begin_nested():
                session.add(alert)
                session.flush()
        except IntegrityError:
            if attempt == 2:
                raise
            continue  # opened meanwhile by another transaction: bump that one
        add_timeline(session, alert, "created", at, data={"message": message})
        return alert_change(alert, "created", at, received_ms=received_ms)
    raise AssertionError("unreachable")  # pragma: no cover


async def clear_alert(session: AsyncSession, **kwargs: Any) -> AlertChange | None:
    """`clear_alert_sync` on an async session (same arguments). Does not commit."""
    return await session.run_sync(lambda sync: clear_alert_sync(sync, **kwargs))


def clear_alert_sync(
    session: Session,
    *,
    factory_id: int,
    rule_id: int,
    device_id: int,
    at: dt.datetime,
    message: str,
) -> AlertChange | None:
    """The condition cleared: resolve the open alert (no actor). None if none is open."""
    alert = session.scalar(
        select(Alert)
        .where(Alert.open_key == open_key(rule_id, device_id), Alert.factory_id == factory_id)
        .with_for_update()
    )
    if alert is None:
        return None
    alert.status = lifecycle.next_state(alert.status, "resolve")
    _close(alert, at, None, None)
    add_timeline(session, alert, "auto-resolved", at, data={"message": message})
    return alert_change(alert, "resolved", at)


def _close(alert: Alert, at: dt.datetime, user_id: int | None, note: str | None) -> None:
    alert.resolved_at = at
    alert.resolved_by = user_id
    alert.resolution_note = note
    alert.open_key = None
    alert.next_sla_check_at = None


# --- reading -------------------------------------------------------------------------------


def sla_out(alert: Alert, now: dt.datetime) -> SlaOut:
    ack_done = alert.acknowledged_at or alert.resolved_at

    def breached(due: dt.datetime | None, done: dt.datetime | None) -> bool:
        if due is None:
            return False
        return done > due if done is not None else now >= due

    def remaining(due: dt.datetime | None, done: dt.datetime | None) -> float | None:
        if due is None or done is not None:
            return None
        return round((due - now).total_seconds(), 3)

    return SlaOut(
        ack_due_at=alert.ack_due_at,
        resolve_due_at=alert.resolve_due_at,
        ack_breached=breached(alert.ack_due_at, ack_done),
        resolve_breached=breached(alert.resolve_due_at, alert.resolved_at),
        ack_remaining_s=remaining(alert.ack_due_at, ack_done),
        resolve_remaining_s=remaining(alert.resolve_due_at, alert.resolved_at),
        next_check_at=alert.next_sla_check_at,
    )


def _fields(alert: Alert) -> dict[str, Any]:
    return {
        "id": alert.id,
        "rule_id": alert.rule_id,
        "device_id": alert.device_id,
        "severity": alert.severity,
        "status": alert.status,
        "title": alert.title,
        "message": alert.message,
        "facts": alert.facts or [],
        "snapshot": alert.snapshot or {},
        "occurrences": alert.occurrences,
        "triggered_at": alert.triggered_at,
        "last_seen_at": alert.last_seen_at,
        "acknowledged_at": alert.acknowledged_at,
        "acknowledged_by": alert.acknowledged_by,
        "resolved_at": alert.resolved_at,
        "resolved_by": alert.resolved_by,
        "resolution_note": alert.resolution_note,
        "assigned_to": alert.assigned_to,
        "escalation_level": alert.escalation_level,
        "last_escalated_at": alert.last_escalated_at,
        "last_reminder_at": alert.last_reminder_at,
    }


def _with_names() -> Any:
    return (
        select(Alert, Rule.name, Device.device_key, Device.name)
        .outerjoin(Rule, Rule.id == Alert.rule_id)
        .outerjoin(Device, Device.id == Alert.device_id)
    )


def _out(row: Any, now: dt.datetime) -> AlertOut:
    alert, rule_name, device_key, device_name = row
    return AlertOut(
        **_fields(alert),
        rule_name=rule_name,
        device_key=device_key,
        device_name=device_name,
        sla=sla_out(alert, now),
    )


async def _alert(
    session: AsyncSession, factory_id: int, alert_id: int, *, lock: bool = False
) -> Alert:
    stmt = select(Alert).where(Alert.id == alert_id, Alert.factory_id == factory_id)
    if lock:
        stmt = stmt.with_for_update()
    alert = await session.scalar(stmt)
    if alert is None:
        raise NotFound(f"no alert {alert_id}", code="alert_not_found")
    return alert


def _entry(event: AlertEvent, email: str | None) -> TimelineEntry:
    return TimelineEntry(
        id=event.id,
        kind=event.kind,
        actor_id=event.actor_id,
        actor_email=email,
        at=event.at,
        data=event.data or {},
    )


def _timeline_query(factory_id: int, alert_id: int) -> Any:
    return (
        select(AlertEvent, User.email)
        .outerjoin(User, User.id == AlertEvent.actor_id)
        .where(AlertEvent.alert_id == alert_id, AlertEvent.factory_id == factory_id)
    )


async def get_alert(session: AsyncSession, factory_id: int, alert_id: int) -> AlertDetail:
    row = (
        await session.execute(
            _with_names().where(Alert.id == alert_id, Alert.factory_id == factory_id)
        )
    ).first()
    if row is None:
        raise NotFound(f"no alert {alert_id}", code="alert_not_found")
    latest = (
        await session.execute(
            _timeline_query(factory_id, alert_id)
            .order_by(AlertEvent.id.desc())
            .limit(DETAIL_TIMELINE)
        )
    ).all()
    out = _out(row, utcnow())
    return AlertDetail(
        **out.model_dump(), timeline=[_entry(e, email) for e, email in reversed(latest)]
    )


async def timeline(
    session: AsyncSession, factory_id: int, alert_id: int, params: PageParams
) -> tuple[list[TimelineEntry], int]:
    await _alert(session, factory_id, alert_id)
    rows, total = await paginate(
        session,
        _timeline_query(factory_id, alert_id),
        params,
        [AlertEvent.id.asc()],
        rows=True,
    )
    return [_entry(e, email) for e, email in rows], total


_severity_rank = case(SEVERITY_RANK, value=Alert.severity, else_=0)
ALERT_SORTS: dict[str, Sortable] = {
    "triggered_at": Alert.triggered_at,
    "last_seen_at": Alert.last_seen_at,
    "severity": _severity_rank,
    "status": Alert.status,
    "occurrences": Alert.occurrences,
    "escalation_level": Alert.escalation_level,
    "id": Alert.id,
}


def _filtered(
    stmt: Any,
    factory_id: int,
    *,
    severity: Sequence[str] = (),
    status: Sequence[str] = (),
    device_id: int | None = None,
    rule_id: int | None = None,
    assigned_to: int | None = None,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
) -> Any:
    stmt = stmt.where(Alert.factory_id == factory_id)
    if severity:
        stmt = stmt.where(Alert.severity.in_(severity))
    if status:
        stmt = stmt.where(Alert.status.in_(status))
    if device_id is not None:
        stmt = stmt.where(Alert.device_id == device_id)
    if rule_id is not None:
        stmt = stmt.where(Alert.rule_id == rule_id)
    if assigned_to is not None:
        stmt = stmt.where(Alert.assigned_to == assigned_to)
    if start is not None:
        stmt = stmt.where(Alert.triggered_at >= start)
    if end is not None:
        stmt = stmt.where(Alert.triggered_at < end)
    return stmt


async def list_alerts(
    session: AsyncSession,
    factory_id: int,
    params: PageParams,
    *,
    sort: str | None = None,
    **filters: Any,
) -> tuple[list[AlertOut], int]:
    stmt = _filtered(_with_names(), factory_id, **filters)
    rows, total = await paginate(
        session,
        stmt,
        params,
        parse_sort(sort, ALERT_SORTS, "-triggered_at"),
        Alert.id,
        rows=True,
    )
    now = utcnow()
    return [_out(r, now) for r in rows], total


async def find_alert(
    session: AsyncSession, factory_id: int, alert_id: int, **filters: Any
) -> AlertOut | None:
    """One alert as a list row (no timeline), or None when this factory has no such
    alert or it does not match `filters` (the UI re-renders one row of a filtered feed)."""
    stmt = _filtered(_with_names().where(Alert.id == alert_id), factory_id, **filters)
    row = (await session.execute(stmt)).first()
    return _out(row, utcnow()) if row is not None else None


async def counts(session: AsyncSession, factory_id: int, **filters: Any) -> AlertCounts:
    stmt = _filtered(
        select(Alert.severity, Alert.status, func.count()).group_by(Alert.severity, Alert.status),
        factory_id,
        **filters,
    )
    by_severity = dict.fromkeys(SEVERITIES, 0)
    by_status = dict.fromkeys(lifecycle.STATES, 0)
    open_by_severity = dict.fromkeys(SEVERITIES, 0)
    for severity, status, n in (await session.execute(stmt)).all():
        by_severity[severity] = by_severity.get(severity, 0) + n
        by_status[status] = by_status.get(status, 0) + n
        if status != lifecycle.RESOLVED:
            open_by_severity[severity] = open_by_severity.get(severity, 0) + n
    return AlertCounts(
        total=sum(by_status.values()),
        open=sum(open_by_severity.values()),
        by_severity=by_severity,
        by_status=by_status,
        open_by_severity=open_by_severity,
    )


OPEN_STATES = (lifecycle.TRIGGERED, lifecycle.ACKNOWLEDGED)


async def open_counts_by_device(
    session: AsyncSession, factory_id: int
) -> dict[int, dict[str, int]]:
    """Open alerts (triggered or acknowledged) per device and severity: one GROUP BY,
    for dashboards ranking machines. Alerts without a device are left out. (Core
    rows: thousands of them, without the ORM's per-row work.)"""
    conn = await session.connection()
    rows = await conn.execute(
        select(Alert.device_id, Alert.severity, func.count())
        .where(
            Alert.factory_id == factory_id,
            Alert.status.in_(OPEN_STATES),
            Alert.device_id.is_not(None),
        )
        .group_by(Alert.device_id, Alert.severity)
    )
    out: dict[int, dict[str, int]] = {}
    for device_id, severity, n in rows.all():
        if device_id is not None:
            out.setdefault(device_id, {})[severity] = n
    return out


async def latest_alerts(session: AsyncSession, factory_id: int, limit: int = 10) -> list[AlertOut]:
    """The most recently triggered alerts, newest first (no total: a dashboard's feed)."""
    rows = (
        await session.execute(
            _with_names()
            .where(Alert.factory_id == factory_id)
            .order_by(Alert.triggered_at.desc(), Alert.id.desc())
            .limit(limit)
        )
    ).all()
    now = utcnow()
    return [_out(r, now) for r in rows]


# --- actions -------------------------------------------------------------------------------


def _transition(alert: Alert, action: str) -> str:
    try:
        return lifecycle.next_state(alert.status, action)
    except lifecycle.TransitionError as exc:
        raise Conflict(
            f"{exc}; allowed from: {', '.join(lifecycle.ALLOWED[action])}",
            code="invalid_transition",
            action=action,
            alert_status=alert.status,
        ) from exc


async def _finish(
    session: AsyncSession,
    bus: Bus,
    actor: Actor,
    alert: Alert,
    action: str,
    before: dict[str, Any],
    change: AlertChange,
) -> AlertDetail:
    record(
        session, actor, f"alert.{action}", "alert", alert.id, before=before, after=snapshot(alert)
    )
    await session.commit()
    await publish(bus, [change])
    return await get_alert(session, actor.factory_id, alert.id)


def _note(data: dict[str, Any], key: str, value: str | None) -> dict[str, Any]:
    return {**data, key: value} if value is not None else data


async def acknowledge(
    session: AsyncSession, bus: Bus, actor: Actor, alert_id: int, note: str | None
) -> AlertDetail:
    alert = await _alert(session, actor.factory_id, alert_id, lock=True)
    before = snapshot(alert)
    now = utcnow()
    alert.status = _transition(alert, "acknowledge")
    alert.acknowledged_at = now
    alert.acknowledged_by = actor.user_id
    policy = await sla_policy(session, alert.factory_id, alert.severity)
    schedule_sla(alert, policy.remind_every_s, now)
    add_timeline(session, alert, "acknowledged", now, actor.user_id, _note({}, "note", note))
    change = alert_change(alert, "acknowledged", now, actor_id=actor.user_id)
    return await _finish(session, bus, actor, alert, "acknowledge", before, change)


async def assign(
    session: AsyncSession,
    bus: Bus,
    actor: Actor,
    alert_id: int,
    user_id: int | None,
    note: str | None,
) -> AlertDetail:
    alert = await _alert(session, actor.factory_id, alert_id, lock=True)
    _transition(alert, "assign")
    if user_id is not None:
        found = await session.scalar(
            select(User.id).where(
                User.id == user_id, User.factory_id == actor.factory_id, User.is_active
            )
        )
        if found is None:
            raise InvalidInput(("user_id",), f"no active user {user_id} in this factory")
    before = snapshot(alert)
    now = utcnow()
    previous = alert.assigned_to
    alert.assigned_to = user_id
    add_timeline(
        session,
        alert,
        "assigned",
        now,
        actor.user_id,
        _note({"user_id": user_id, "previous": previous}, "note", note),
    )
    change = alert_change(
        alert,
        "assigned",
        now,
        actor_id=actor.user_id,
        recipients=[user_id] if user_id is not None else [],
    )
    return await _finish(session, bus, actor, alert, "assign", before, change)


async def resolve(
    session: AsyncSession, bus: Bus, actor: Actor, alert_id: int, note: str | None
) -> AlertDetail:
    alert = await _alert(session, actor.factory_id, alert_id, lock=True)
    before = snapshot(alert)
    now = utcnow()
    alert.status = _transition(alert, "resolve")
    _close(alert, now, actor.user_id, note)
    add_timeline(session, alert, "resolved", now, actor.user_id, _note({}, "note", note))
    change = alert_change(alert, "resolved", now, actor_id=actor.user_id)
    return await _finish(session, bus, actor, alert, "resolve", before, change)


async def reopen(
    session: AsyncSession, bus: Bus, actor: Actor, alert_id: int, reason: str | None
) -> AlertDetail:
    alert = await _alert(session, actor.factory_id, alert_id, lock=True)
    status = _transition(alert, "reopen")
    key = (
        open_key(alert.rule_id, alert.device_id)
        if alert.rule_id is not None and alert.device_id is not None
        else None
    )
    if key is not None:
        other = await session.scalar(select(Alert.id).where(Alert.open_key == key))
        if other is not None:
            raise Conflict(
                f"alert {other} is already open for the same rule and device",
                code="alert_already_open",
                open_alert_id=other,
            )
    before = snapshot(alert)
    now = utcnow()
    alert.status = status
    alert.open_key = key
    alert.acknowledged_at = alert.acknowledged_by = None
    alert.resolved_at = alert.resolved_by = None
    alert.resolution_note = None
    alert.escalation_level = 0
    alert.last_escalated_at = None
    # A fresh SLA from now: the reopened problem gets the full time again.
    start_sla(alert, await sla_policy(session, alert.factory_id, alert.severity), now)
    add_timeline(session, alert, "reopened", now, actor.user_id, _note({}, "reason", reason))
    change = alert_change(alert, "reopened", now, actor_id=actor.user_id)
    try:
        await session.flush()
    except IntegrityError as exc:  # opened by the engine between our check and write
        await session.rollback()
        raise Conflict(
            "another alert is already open for the same rule and device",
            code="alert_already_open",
        ) from exc
    return await _finish(session, bus, actor, alert, "reopen", before, change)


async def comment(
    session: AsyncSession, bus: Bus, actor: Actor, alert_id: int, text: str
) -> TimelineEntry:
    alert = await _alert(session, actor.factory_id, alert_id, lock=True)
    _transition(alert, "comment")
    now = utcnow()
    entry = add_timeline(session, alert, "commented", now, actor.user_id, {"text": text})
    await session.flush()
    record(session, actor, "alert.comment", "alert", alert.id, after={"text": text})
    change = alert_change(alert, "commented", now, actor_id=actor.user_id)
    await session.commit()
    await publish(bus, [change])
    return _entry(entry, actor.email)


async def escalate(
    session: AsyncSession, bus: Bus, actor: Actor, alert_id: int, reason: str | None
) -> AlertDetail:
    alert = await _alert(session, actor.factory_id, alert_id, lock=True)
    _transition(alert, "escalate")
    levels = await chain_levels(session, actor.factory_id)
    target = alert.escalation_level + 1
    if not any(lv.level == target for lv in levels):
        detail = (
            "no escalation chain is configured (PUT /api/v1/alerts/escalation-chain)"
            if not levels
            else f"already at the last escalation level ({alert.escalation_level})"
        )
        raise Conflict(detail, code="escalation_chain_end")
    before = snapshot(alert)
    now = utcnow()
    change = await escalate_alert(
        session,
        alert,
        levels,
        now,
        actor_id=actor.user_id,
        data=_note({"manual": True}, "reason", reason),
    )
    return await _finish(session, bus, actor, alert, "escalate", before, change)


# --- configuration -------------------------------------------------------------------------


async def get_sla(session: AsyncSession, factory_id: int) -> list[SlaPolicyOut]:
    rows = {
        r.severity: r
        for r in await session.scalars(
            select(AlertSlaPolicy).where(AlertSlaPolicy.factory_id == factory_id)
        )
    }
    out = []
    for severity in SEVERITIES:
        row = rows.get(severity)
        if row is not None:
            out.append(
                SlaPolicyOut(
                    severity=severity,
                    ack_s=row.ack_s,
                    resolve_s=row.resolve_s,
                    remind_every_s=row.remind_every_s,
                    source="factory",
                )
            )
        else:
            default = lifecycle.DEFAULT_SLA[severity]
            out.append(
                SlaPolicyOut(
                    severity=severity,
                    ack_s=default.ack_s,
                    resolve_s=default.resolve_s,
                    remind_every_s=default.remind_every_s,
                    source="default",
                )
            )
    return out


async def put_sla(session: AsyncSession, actor: Actor, body: SlaConfigBody) -> list[SlaPolicyOut]:
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, policy in enumerate(body.policies):
        if policy.severity.value in seen:
            problems.append((f"policies[{i}].severity", f"'{policy.severity}' is listed twice"))
        seen.add(policy.severity.value)
        if (
            policy.ack_s is not None
            and policy.resolve_s is not None
            and policy.ack_s > policy.resolve_s
        ):
            problems.append((f"policies[{i}].ack_s", "must not exceed resolve_s"))
    if problems:
        raise invalid_body(problems)
    before = {
        p.severity: p.model_dump(exclude={"severity"})
        for p in await get_sla(session, actor.factory_id)
    }
    await session.execute(
        delete(AlertSlaPolicy).where(AlertSlaPolicy.factory_id == actor.factory_id)
    )
    for policy in body.policies:
        session.add(
            AlertSlaPolicy(
                factory_id=actor.factory_id,
                severity=policy.severity.value,
                ack_s=policy.ack_s,
                resolve_s=policy.resolve_s,
                remind_every_s=policy.remind_every_s,
            )
        )
    await session.flush()
    out = await get_sla(session, actor.factory_id)
    after = {p.severity: p.model_dump(exclude={"severity"}) for p in out}
    record(
        session,
        actor,
        "alert_sla.update",
        "alert_sla",
        actor.factory_id,
        before=before,
        after=after,
    )
    await session.commit()
    return out


async def get_chain(session: AsyncSession, factory_id: int) -> EscalationChainOut:
    levels = await chain_levels(session, factory_id)
    return EscalationChainOut(
        levels=[
            EscalationLevelOut(
                level=lv.level,
                user_ids=list(lv.user_ids or []),
                roles=list(lv.roles or []),
                users=await level_users(session, factory_id, lv),
            )
            for lv in levels
        ]
    )


async def put_chain(
    session: AsyncSession, actor: Actor, body: EscalationChainBody
) -> EscalationChainOut:
    wanted = {u for level in body.levels for u in level.user_ids}
    known = (
        set(
            (
                await session.scalars(
                    select(User.id).where(User.factory_id == actor.factory_id, User.id.in_(wanted))
                )
            ).all()
        )
        if wanted
        else set()
    )
    problems: list[tuple[str, str]] = []
    for i, level in enumerate(body.levels):
        if not level.user_ids and not level.roles:
            problems.append((f"levels[{i}]", "a level needs at least one user or role"))
        for j, user_id in enumerate(level.user_ids):
            if user_id not in known:
                problems.append((f"levels[{i}].user_ids[{j}]", f"no user {user_id}"))
    if problems:
        raise invalid_body(problems)
    before = (await get_chain(session, actor.factory_id)).model_dump()
    await session.execute(
        delete(EscalationLevel).where(EscalationLevel.factory_id == actor.factory_id)
    )
    for number, level in enumerate(body.levels, start=1):
        session.add(
            EscalationLevel(
                factory_id=actor.factory_id,
                level=number,
                user_ids=list(dict.fromkeys(level.user_ids)),
                roles=[r.value for r in dict.fromkeys(level.roles)],
            )
        )
    await session.flush()
    out = await get_chain(session, actor.factory_id)
    record(
        session,
        actor,
        "escalation_chain.update",
        "escalation_chain",
        actor.factory_id,
        before=before,
        after=out.model_dump(),
    )
    await session.commit()
    return out


# --- open alerts per device (machines list, machine health) -------------------------------

_OPEN = (lifecycle.TRIGGERED, lifecycle.ACKNOWLEDGED)


def open_alerts_select(factory_id: int) -> Any:
    """A GROUP BY select, one row per device with open alerts: device_id, a count per
    severity (columns named after SEVERITIES), `open` and `worst` (SEVERITY_RANK of
    the worst). Join it as a subquery to sort devices by their alerts or health."""
    per_severity = [func.sum(case((Alert.severity == s, 1), else_=0)).label(s) for s in SEVERITIES]
    return (
        select(
            Alert.device_id.label("device_id"),
            *per_severity,
            func.count().label("open"),
            func.max(_severity_rank).label("worst"),
        )
        .where(
            Alert.factory_id == factory_id,
            Alert.status.in_(_OPEN),
            Alert.device_id.is_not(None),
        )
        .group_by(Alert.device_id)
    )


async def open_counts_for_devices(
    session: AsyncSession, factory_id: int, device_ids: Sequence[int]
) -> dict[int, dict[str, int]]:
    """Open alerts of these devices by severity, in one GROUP BY query; devices
    without open alerts are left out."""
    if not device_ids:
        return {}
    rows = await session.execute(
        select(Alert.device_id, Alert.severity, func.count())
        .where(
            Alert.factory_id == factory_id,
            Alert.status.in_(_OPEN),
            Alert.device_id.in_(list(device_ids)),
        )
        .group_by(Alert.device_id, Alert.severity)
    )
    found: dict[int, dict[str, int]] = {}
    for device_id, severity, n in rows.all():
        if device_id is not None:
            found.setdefault(device_id, {})[severity] = int(n)
    return found
