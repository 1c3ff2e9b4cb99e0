"""The SLA sweeper with an injected clock: breaches found on time without any new
event, escalation along the chain, reminders at the interval until acknowledged,
and nothing fired twice for one deadline."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
from sqlalchemy import select

from plantwatch.alerts.models import Alert
from plantwatch.alerts.sla import sweep_sla
from plantwatch.app import Container
from plantwatch.core.db import utcnow
from plantwatch.scheduler import jobs_for, run_job
from plantwatch.tenancy.models import Factory
from tests.alerts.conftest import Recorder, Target, make_target, raise_alert
from tests.conftest import LoggedIn, LoginAs

API = "/api/v1/alerts"
S = dt.timedelta(seconds=1)


async def configure(
    client: httpx.AsyncClient,
    admin: LoggedIn,
    levels: list[dict[str, Any]],
    ack_s: int = 60,
    resolve_s: int = 600,
    remind_every_s: int | None = 120,
) -> None:
    sla = await client.put(
        f"{API}/sla",
        json={
            "policies": [
                {
                    "severity": "critical",
                    "ack_s": ack_s,
                    "resolve_s": resolve_s,
                    "remind_every_s": remind_every_s,
                }
            ]
        },
        headers=admin.headers,
    )
    assert sla.status_code == 200, sla.text
    chain = await client.put(
        f"{API}/escalation-chain", json={"levels": levels}, headers=admin.headers
    )
    assert chain.status_code == 200, chain.text


async def alert_row(container: Container, alert_id: int) -> Alert:
    async with container.db.session() as session:
        alert = await session.get(Alert, alert_id)
        assert alert is not None
        return alert


async def sweep(container: Container, now: dt.datetime) -> list[tuple[str, dict[str, Any]]]:
    changes = await sweep_sla(container.db, container.bus, now)
    return [(c.subject, c.payload) for c in changes]


async def test_breaches_escalate_and_reminders_repeat_until_acknowledged(
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    login_as: LoginAs,
    factory_a: Factory,
) -> None:
    tech = await login_as(factory_a, "technician")
    manager = await login_as(factory_a, "maintenance_manager")
    await configure(
        client, admin_a, [{"user_ids": [tech.user_id]}, {"roles": ["maintenance_manager"]}]
    )
    recorder = Recorder(container)
    target = await make_target(client, container, admin_a)
    t0 = utcnow()
    alert_id = (await raise_alert(container, target, at=t0)).payload["alert_id"]
    assert (await alert_row(container, alert_id)).next_sla_check_at == t0 + 60 * S

    # Before the deadline: nothing, and no new event is needed to find the breach.
    assert await sweep(container, t0 + 59 * S) == []
    breach = await sweep(container, t0 + 60 * S)
    assert [s for s, _ in breach] == ["alert.escalated"]
    assert breach[0][1]["escalation_level"] == 1
    assert breach[0][1]["recipients"] == [tech.user_id]
    assert breach[0][1]["actor_id"] is None
    # The same deadline never fires twice, however often the sweeper runs.
    for seconds in (60, 61, 90, 179):
        assert await sweep(container, t0 + seconds * S) == []
    row = await alert_row(container, alert_id)
    assert row.next_sla_check_at == t0 + 180 * S  # deadline + remind_every

    # Reminders repeat at the interval, to the current level.
    first = await sweep(container, t0 + 180 * S)
    assert [s for s, _ in first] == ["alert.reminder"]
    assert first[0][1]["recipients"] == [tech.user_id]
    assert await sweep(container, t0 + 200 * S) == []
    assert [s for s, _ in await sweep(container, t0 + 300 * S)] == ["alert.reminder"]
    assert await sweep(container, t0 + 419 * S) == []

    # Acknowledging stops them; the resolve deadline still escalates, once.
    acked = await client.post(f"{API}/{alert_id}/acknowledge", headers=tech.headers)
    assert acked.status_code == 200, acked.text
    next_check = acked.json()["data"]["sla"]["next_check_at"]
    assert dt.datetime.fromisoformat(next_check) == t0 + 600 * S  # only the resolve deadline
    assert await sweep(container, t0 + 420 * S) == []
    assert await sweep(container, t0 + 540 * S) == []
    late = await sweep(container, t0 + 600 * S)
    assert [s for s, _ in late] == ["alert.escalated"]
    assert late[0][1]["escalation_level"] == 2
    assert late[0][1]["recipients"] == [manager.user_id]
    assert await sweep(container, t0 + 3600 * S) == []
    row = await alert_row(container, alert_id)
    assert row.next_sla_check_at is None

    detail = (await client.get(f"{API}/{alert_id}", headers=admin_a.headers)).json()["data"]
    kinds = [e["kind"] for e in detail["timeline"]]
    assert kinds == ["created", "escalated", "reminder", "reminder", "acknowledged", "escalated"]
    escalations = [e["data"] for e in detail["timeline"] if e["kind"] == "escalated"]
    assert [(d["deadline"], d["from_level"], d["level"]) for d in escalations] == [
        ("acknowledge", 0, 1),
        ("resolve", 1, 2),
    ]
    # Every sweep event went out on the bus.
    events = await recorder.drained()
    assert [s for s, _ in events] == [
        "alert.created",
        "alert.escalated",
        "alert.reminder",
        "alert.reminder",
        "alert.acknowledged",
        "alert.escalated",
    ]


async def test_a_late_sweep_fires_each_deadline_once_and_stays_at_the_top(
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
) -> None:
    await configure(client, admin_a, [{"user_ids": [admin_a.user_id]}])
    recorder = Recorder(container, "alert.escalated")
    target = await make_target(client, container, admin_a)
    t0 = utcnow()
    alert_id = (await raise_alert(container, target, at=t0)).payload["alert_id"]
    # The sweeper was down for hours: both deadlines passed, many reminder intervals too.
    late = t0 + 10_000 * S
    changes = await sweep(container, late)
    assert [s for s, _ in changes] == ["alert.escalated", "alert.escalated"]
    # A one-level chain: the second breach re-notifies the top instead of climbing.
    assert [p["escalation_level"] for _, p in changes] == [1, 1]
    assert [p["recipients"] for _, p in changes] == [[admin_a.user_id], [admin_a.user_id]]
    assert len(await recorder.drained()) == 2 and all(recorder.committed)
    row = await alert_row(container, alert_id)
    assert row.last_reminder_at == late and row.next_sla_check_at == late + 120 * S
    assert await sweep(container, late + 119 * S) == []
    reminder = await sweep(container, late + 120 * S)
    assert [s for s, _ in reminder] == ["alert.reminder"]
    assert reminder[0][1]["recipients"] == [admin_a.user_id]


async def test_only_due_alerts_are_touched_and_resolved_ones_never(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    await configure(client, admin_a, [], remind_every_s=None)
    t0 = utcnow()
    due = await make_target(client, container, admin_a, "M01")
    later = await make_target(client, container, admin_a, "M02")
    done = await make_target(client, container, admin_a, "M03")
    due_id = (await raise_alert(container, due, at=t0)).payload["alert_id"]
    later_id = (await raise_alert(container, later, at=t0 + 3600 * S)).payload["alert_id"]
    done_id = (await raise_alert(container, done, at=t0)).payload["alert_id"]
    resolved = await client.post(f"{API}/{done_id}/resolve", headers=admin_a.headers)
    assert resolved.status_code == 200
    before = await alert_row(container, later_id)
    changes = await sweep(container, t0 + 61 * S)
    # No chain: the breach is still recorded and announced (level 0, nobody listed).
    assert [(s, p["alert_id"], p["recipients"]) for s, p in changes] == [
        ("alert.escalated", due_id, [])
    ]
    after = await alert_row(container, later_id)
    assert after.updated_at == before.updated_at and after.escalation_level == 0
    assert (await alert_row(container, done_id)).escalation_level == 0
    # No reminder policy: after the ack breach, the next look is the resolve deadline.
    assert (await alert_row(container, due_id)).next_sla_check_at == t0 + 600 * S


async def test_reopen_restarts_the_clock(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    await configure(client, admin_a, [{"user_ids": [admin_a.user_id]}])
    target = await make_target(client, container, admin_a)
    t0 = utcnow() - 3600 * S
    alert_id = (await raise_alert(container, target, at=t0)).payload["alert_id"]
    assert len(await sweep(container, utcnow())) == 2  # both deadlines long gone
    await client.post(f"{API}/{alert_id}/resolve", headers=admin_a.headers)
    reopened = await client.post(f"{API}/{alert_id}/reopen", headers=admin_a.headers)
    data = reopened.json()["data"]
    assert data["escalation_level"] == 0 and not data["sla"]["ack_breached"]
    row = await alert_row(container, alert_id)
    assert row.ack_due_at is not None and row.ack_due_at > utcnow()
    assert await sweep(container, utcnow()) == []
    again = await sweep(container, row.ack_due_at)
    assert [(s, p["escalation_level"]) for s, p in again] == [("alert.escalated", 1)]


async def test_the_scheduler_runs_the_sweep_every_second(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    jobs = {job.name: job for job in jobs_for(container)}
    assert jobs["alert_sla"].every_s == 1.0
    recorder = Recorder(container, "alert.escalated")
    target: Target = await make_target(client, container, admin_a)
    # Default critical SLA: 15 minutes to acknowledge; this one is 2 hours old.
    alert_id = (await raise_alert(container, target, at=utcnow() - dt.timedelta(hours=2))).payload[
        "alert_id"
    ]
    assert await run_job(jobs["alert_sla"]) == 1
    assert await run_job(jobs["alert_sla"]) == 0
    events = await recorder.drained()
    assert [p["alert_id"] for _, p in events] == [alert_id]
    async with container.db.session() as session:
        level = await session.scalar(select(Alert.escalation_level).where(Alert.id == alert_id))
    assert level == 0  # no chain configured: announced, nowhere to climb
