"""Alert state machine and SLA clocks, without a database."""

from __future__ import annotations

import datetime as dt

import pytest

from plantwatch.alerts.lifecycle import (
    ACKNOWLEDGED,
    RESOLVED,
    TRIGGERED,
    SlaPolicy,
    TransitionError,
    next_state,
    reminder_due,
    sla_clock,
)

T0 = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.UTC)
MIN = dt.timedelta(minutes=1)


def test_transitions() -> None:
    assert next_state(TRIGGERED, "acknowledge") == ACKNOWLEDGED
    assert next_state(ACKNOWLEDGED, "resolve") == RESOLVED
    assert next_state(TRIGGERED, "resolve") == RESOLVED
    assert next_state(ACKNOWLEDGED, "assign") == ACKNOWLEDGED
    assert next_state(RESOLVED, "comment") == RESOLVED
    assert next_state(RESOLVED, "reopen") == TRIGGERED
    for state, action in [
        (ACKNOWLEDGED, "acknowledge"),
        (RESOLVED, "resolve"),
        (RESOLVED, "assign"),
        (RESOLVED, "escalate"),
        (TRIGGERED, "reopen"),
    ]:
        with pytest.raises(TransitionError):
            next_state(state, action)


def test_ack_breach_reminders_and_resolve_deadline() -> None:
    policy = SlaPolicy(ack_s=15 * 60, resolve_s=60 * 60, remind_every_s=10 * 60)
    early = sla_clock(policy, TRIGGERED, T0, None, T0 + 5 * MIN)
    assert not early.ack_breached and early.next_check == T0 + 15 * MIN
    late = sla_clock(policy, TRIGGERED, T0, None, T0 + 16 * MIN)
    assert late.ack_breached and late.reasons == ["not acknowledged in time"]
    assert reminder_due(policy, late, T0 + 16 * MIN, None)
    reminded = sla_clock(policy, TRIGGERED, T0, None, T0 + 17 * MIN, T0 + 16 * MIN)
    assert reminded.next_check == T0 + 26 * MIN
    assert not reminder_due(policy, reminded, T0 + 20 * MIN, T0 + 16 * MIN)
    assert reminder_due(policy, reminded, T0 + 26 * MIN, T0 + 16 * MIN)
    acked = sla_clock(policy, ACKNOWLEDGED, T0, T0 + 20 * MIN, T0 + 30 * MIN)
    assert not acked.ack_breached and acked.next_check == T0 + 60 * MIN
    overdue = sla_clock(policy, ACKNOWLEDGED, T0, T0 + 20 * MIN, T0 + 61 * MIN)
    assert overdue.resolve_breached and overdue.next_check is None
    done = sla_clock(policy, RESOLVED, T0, T0 + 20 * MIN, T0 + 90 * MIN)
    assert not done.resolve_breached and done.next_check is None


def test_no_targets_means_no_clock() -> None:
    clock = sla_clock(SlaPolicy(None, None), TRIGGERED, T0, None, T0 + 1000 * MIN)
    assert clock == sla_clock(SlaPolicy(None, None), TRIGGERED, T0, None, T0)
    assert clock.next_check is None and not clock.ack_breached
