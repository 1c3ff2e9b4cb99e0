"""Alert lifecycle and SLA clocks. Pure: no I/O.

States: triggered -> acknowledged -> resolved (resolving straight from
triggered is allowed: the condition cleared, or someone fixed it at once).
Assigning, commenting and escalating do not change the state. Every action
becomes an immutable timeline entry, written by the service.

SLA per severity: time to acknowledge and time to resolve. A breach is a
deadline passing, found by the scheduler on time (not on the next event); it
escalates one level along the factory's chain, re-notifies, and repeats a
reminder every `remind_every` until the alert is acknowledged.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

TRIGGERED = "triggered"
ACKNOWLEDGED = "acknowledged"
RESOLVED = "resolved"
STATES = (TRIGGERED, ACKNOWLEDGED, RESOLVED)

# action -> states it may be taken from
ALLOWED: dict[str, tuple[str, ...]] = {
    "acknowledge": (TRIGGERED,),
    "resolve": (TRIGGERED, ACKNOWLEDGED),
    "assign": (TRIGGERED, ACKNOWLEDGED),
    "comment": STATES,
    "escalate": (TRIGGERED, ACKNOWLEDGED),
    "reopen": (RESOLVED,),
}
AFTER: dict[str, str] = {"acknowledge": ACKNOWLEDGED, "resolve": RESOLVED, "reopen": TRIGGERED}


class TransitionError(ValueError):
    def __init__(self, action: str, state: str) -> None:
        super().__init__(f"cannot {action} an alert that is {state}")
        self.action = action
        self.state = state


def next_state(state: str, action: str) -> str:
    """The state after `action`, or TransitionError if it is not allowed from `state`."""
    if state not in ALLOWED.get(action, ()):
        raise TransitionError(action, state)
    return AFTER.get(action, state)


@dataclass(frozen=True)
class SlaPolicy:
    """Per severity: seconds to acknowledge and to resolve (None = no target)."""

    ack_s: int | None
    resolve_s: int | None
    remind_every_s: int | None = None


DEFAULT_SLA: dict[str, SlaPolicy] = {
    "critical": SlaPolicy(ack_s=15 * 60, resolve_s=4 * 3600, remind_every_s=15 * 60),
    "high": SlaPolicy(ack_s=60 * 60, resolve_s=24 * 3600, remind_every_s=60 * 60),
    "medium": SlaPolicy(ack_s=4 * 3600, resolve_s=3 * 86400, remind_every_s=None),
    "low": SlaPolicy(ack_s=None, resolve_s=7 * 86400, remind_every_s=None),
}


@dataclass
class SlaClock:
    """What the SLA says about one alert at one moment."""

    ack_due: dt.datetime | None
    resolve_due: dt.datetime | None
    ack_breached: bool
    resolve_breached: bool
    # When the scheduler must look at this alert again (None: never).
    next_check: dt.datetime | None
    reasons: list[str] = field(default_factory=list)


def sla_clock(
    policy: SlaPolicy,
    state: str,
    triggered_at: dt.datetime,
    acknowledged_at: dt.datetime | None,
    now: dt.datetime,
    last_reminder_at: dt.datetime | None = None,
) -> SlaClock:
    ack_due, resolve_due = due_times(policy, triggered_at)
    return clock_at(
        ack_due, resolve_due, policy.remind_every_s, state, acknowledged_at, now, last_reminder_at
    )


def due_times(
    policy: SlaPolicy, started_at: dt.datetime
) -> tuple[dt.datetime | None, dt.datetime | None]:
    """The deadlines an alert gets when its SLA starts (when it opens or is reopened)."""
    ack_due = started_at + dt.timedelta(seconds=policy.ack_s) if policy.ack_s else None
    resolve_due = started_at + dt.timedelta(seconds=policy.resolve_s) if policy.resolve_s else None
    return ack_due, resolve_due


def clock_at(
    ack_due: dt.datetime | None,
    resolve_due: dt.datetime | None,
    remind_every_s: int | None,
    state: str,
    acknowledged_at: dt.datetime | None,
    now: dt.datetime,
    last_reminder_at: dt.datetime | None = None,
) -> SlaClock:
    """The clock for deadlines fixed earlier (alerts store theirs when the SLA starts,
    so a later policy change does not move an open alert's deadlines)."""
    if state == RESOLVED:
        return SlaClock(ack_due, resolve_due, False, False, None)
    acked = state == ACKNOWLEDGED or acknowledged_at is not None
    ack_breached = bool(ack_due and not acked and now >= ack_due)
    resolve_breached = bool(resolve_due and now >= resolve_due)
    reasons = []
    if ack_breached:
        reasons.append("not acknowledged in time")
    if resolve_breached:
        reasons.append("not resolved in time")
    upcoming = [d for d in (None if acked else ack_due, resolve_due) if d and d > now]
    if ack_breached and remind_every_s:
        base = last_reminder_at or ack_due
        assert base is not None
        upcoming.append(max(base + dt.timedelta(seconds=remind_every_s), now))
    return SlaClock(
        ack_due,
        resolve_due,
        ack_breached,
        resolve_breached,
        min(upcoming) if upcoming else None,
        reasons,
    )


def reminder_due(
    policy: SlaPolicy, clock: SlaClock, now: dt.datetime, last_reminder_at: dt.datetime | None
) -> bool:
    """Unacknowledged past its deadline, and the reminder interval has passed."""
    if not clock.ack_breached or not policy.remind_every_s:
        return False
    if last_reminder_at is None:
        return True
    return now - last_reminder_at >= dt.timedelta(seconds=policy.remind_every_s)
