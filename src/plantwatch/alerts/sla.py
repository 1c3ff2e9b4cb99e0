"""The SLA sweeper: breaches found on time, not on the next event.

Every open alert stores `next_sla_check_at`, the next moment its SLA can change
(a deadline, or the next reminder). The scheduler calls `sweep_sla` every
second; it looks only at alerts whose moment has come, so an idle factory costs
one indexed query. Each deadline is acted on once (`*_breach_handled`): an
acknowledge or resolve breach escalates one level along the factory's chain;
while the alert stays unacknowledged past its deadline, a reminder repeats every
`remind_every_s` (the first one interval after the deadline: the escalation
itself is the first re-notification).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from plantwatch.alerts import lifecycle
from plantwatch.alerts.models import Alert, EscalationLevel
from plantwatch.alerts.service import (
    AlertChange,
    add_timeline,
    alert_change,
    chain_levels,
    escalate_alert,
    iso,
    level_users,
    publish,
    sla_policies,
)
from plantwatch.core.bus import Bus
from plantwatch.core.db import Database, utcnow

BATCH = 200
MAX_BATCHES = 50


async def sweep_sla(db: Database, bus: Bus, now: dt.datetime | None = None) -> list[AlertChange]:
    """Apply every SLA deadline and reminder due at `now`; publish after each commit."""
    now = now or utcnow()
    done: list[AlertChange] = []
    for _ in range(MAX_BATCHES):
        changes, seen = await _sweep_batch(db, now)
        await publish(bus, changes)
        done.extend(changes)
        if seen < BATCH:
            break
    return done


async def _sweep_batch(db: Database, now: dt.datetime) -> tuple[list[AlertChange], int]:
    changes: list[AlertChange] = []
    async with db.session() as session:
        alerts = (
            await session.scalars(
                select(Alert)
                .where(Alert.next_sla_check_at <= now, Alert.status != lifecycle.RESOLVED)
                .order_by(Alert.next_sla_check_at, Alert.id)
                .limit(BATCH)
                # PostgreSQL: an alert a user is acting on right now is skipped; its
                # check time is unchanged, so the next sweep takes it. (SQLite: no-op.)
                .with_for_update(skip_locked=True)
            )
        ).all()
        if not alerts:
            return [], 0
        policies: dict[int, dict[str, lifecycle.SlaPolicy]] = {}
        chains: dict[int, list[EscalationLevel]] = {}
        for alert in alerts:
            fid = alert.factory_id
            if fid not in policies:
                policies[fid] = await sla_policies(session, fid)
                chains[fid] = await chain_levels(session, fid)
            policy = policies[fid].get(alert.severity, lifecycle.SlaPolicy(None, None))
            changes.extend(await _check(session, alert, policy, chains[fid], now))
        await session.commit()
    return changes, len(alerts)


async def _check(
    session: AsyncSession,
    alert: Alert,
    policy: lifecycle.SlaPolicy,
    chain: list[EscalationLevel],
    now: dt.datetime,
) -> list[AlertChange]:
    out: list[AlertChange] = []
    clock = lifecycle.clock_at(
        alert.ack_due_at,
        alert.resolve_due_at,
        policy.remind_every_s,
        alert.status,
        alert.acknowledged_at,
        now,
        alert.last_reminder_at,
    )
    escalated_for_ack = False
    if clock.ack_breached and not alert.ack_breach_handled:
        alert.ack_breach_handled = True
        escalated_for_ack = True
        assert alert.ack_due_at is not None
        out.append(
            await escalate_alert(
                session,
                alert,
                chain,
                now,
                actor_id=None,
                data={
                    "reason": "not acknowledged in time",
                    "deadline": "acknowledge",
                    "due_at": iso(alert.ack_due_at),
                },
            )
        )
    if clock.resolve_breached and not alert.resolve_breach_handled:
        alert.resolve_breach_handled = True
        assert alert.resolve_due_at is not None
        out.append(
            await escalate_alert(
                session,
                alert,
                chain,
                now,
                actor_id=None,
                data={
                    "reason": "not resolved in time",
                    "deadline": "resolve",
                    "due_at": iso(alert.resolve_due_at),
                },
            )
        )
    # Reminders count from the deadline, then from the last reminder.
    since = alert.last_reminder_at or alert.ack_due_at
    if lifecycle.reminder_due(policy, clock, now, since):
        alert.last_reminder_at = now
        if not escalated_for_ack:
            # (A late sweep that escalates now does not also remind now.)
            by_number = {lv.level: lv for lv in chain}
            level = by_number.get(alert.escalation_level)
            recipients = await level_users(session, alert.factory_id, level) if level else []
            assert alert.ack_due_at is not None
            add_timeline(
                session,
                alert,
                "reminder",
                now,
                data={
                    "level": alert.escalation_level,
                    "recipients": recipients,
                    "overdue_s": round((now - alert.ack_due_at).total_seconds(), 3),
                },
            )
            out.append(alert_change(alert, "reminder", now, recipients=recipients))
    after = lifecycle.clock_at(
        alert.ack_due_at,
        alert.resolve_due_at,
        policy.remind_every_s,
        alert.status,
        alert.acknowledged_at,
        now,
        alert.last_reminder_at,
    )
    next_check = after.next_check
    if next_check is not None and next_check <= now:
        # Never schedule into the past: it would be swept again in the same pass.
        next_check = now + dt.timedelta(seconds=1)
    alert.next_sla_check_at = next_check
    return out
