"""The daily digest (content, timing in the factory's timezone, once per day) and the
`jobs` role end to end: an alert raised and published on the bus reaches a peer."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from zoneinfo import ZoneInfo

import httpx
from sqlalchemy import select

from plantwatch.alerts import service as alerts
from plantwatch.app import Container
from plantwatch.cli import RoleContext
from plantwatch.notify.digest import digest_moment, queue_digests
from plantwatch.notify.models import NotificationDelivery
from plantwatch.notify.render import Renderer
from plantwatch.notify.role import JobsRole
from plantwatch.notify.worker import DeliveryWorker
from plantwatch.rules.models import Rule
from plantwatch.scheduler import jobs_for
from tests.conftest import LoggedIn, LoginAs, MakeFactory
from tests.notify.conftest import Clock, channel_configs, create_channel
from tests.notify.peers import HttpPeer, SmtpPeer

BERLIN = ZoneInfo("Europe/Berlin")
FACTS = [{"parameter": "spindle_temp", "value": 82.5, "text": "spindle_temp 82.5 > 80 for 5m"}]


async def make_rule(container: Container, factory_id: int, notify: list[int] | None = None) -> int:
    async with container.db.session() as session:
        rule = Rule(
            factory_id=factory_id,
            name=f"Rule {uuid.uuid4().hex[:6]}",
            conditions={"parameter": "spindle_temp", "operator": "gt", "threshold": 80},
            severity="high",
            actions={"alert": True, "event": True, "notify": notify or []},
        )
        session.add(rule)
        await session.commit()
        return rule.id


async def make_device(client: httpx.AsyncClient, owner: LoggedIn, key: str) -> int:
    created = await client.post(
        "/api/v1/devices", json={"device_key": key, "name": f"Press {key}"}, headers=owner.headers
    )
    assert created.status_code == 201, created.text
    device_id: int = created.json()["data"]["id"]
    return device_id


async def raise_alert(
    container: Container,
    factory_id: int,
    rule_id: int,
    device_id: int,
    *,
    severity: str,
    title: str,
    at: dt.datetime,
) -> alerts.AlertChange:
    async with container.db.session() as session:
        change = await alerts.raise_alert(
            session,
            factory_id=factory_id,
            rule_id=rule_id,
            device_id=device_id,
            severity=severity,
            title=title,
            message=f"{title}: spindle_temp 82.5 > 80 for 5m",
            facts=FACTS,
            snapshot={"spindle_temp": 82.5},
            at=at,
        )
        await session.commit()
    return change


def local(year: int, month: int, day: int, hour: int, minute: int) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, tzinfo=BERLIN).astimezone(dt.UTC)


async def test_daily_digest_content_timing_and_once_per_day(
    client: httpx.AsyncClient,
    container: Container,
    make_factory: MakeFactory,
    login_as: LoginAs,
    smtp_peer: SmtpPeer,
    worker: DeliveryWorker,
    renderer: Renderer,
    clock: Clock,
) -> None:
    berlin = await make_factory("berlin", "Berlin Works", timezone="Europe/Berlin")
    reader = await login_as(berlin, "maintenance_manager", email="reader@berlin.example")
    other = await login_as(berlin, "technician", email="other@berlin.example")
    saved = await client.put(
        "/api/v1/notifications/preferences",
        json={"digest": True, "digest_hour": 7, "channels": [{"kind": "email"}]},
        headers=reader.headers,
    )
    assert saved.status_code == 200, saved.text
    await client.put(
        "/api/v1/notifications/preferences", json={"digest": False}, headers=other.headers
    )
    device = await make_device(client, reader, "P1")
    rules = [await make_rule(container, berlin.id) for _ in range(3)]
    await raise_alert(
        container,
        berlin.id,
        rules[0],
        device,
        severity="high",
        title="Hydraulic pressure low",
        at=local(2026, 1, 14, 10, 0),
    )
    await raise_alert(
        container,
        berlin.id,
        rules[1],
        device,
        severity="critical",
        title="Spindle overheat",
        at=local(2026, 1, 15, 5, 0),
    )
    await raise_alert(  # the day before the digest's window
        container,
        berlin.id,
        rules[2],
        device,
        severity="low",
        title="Old news",
        at=local(2026, 1, 13, 12, 0),
    )
    async with container.db.session() as session:
        await alerts.clear_alert(
            session,
            factory_id=berlin.id,
            rule_id=rules[0],
            device_id=device,
            at=local(2026, 1, 14, 11, 0),
            message="pressure back to normal",
        )
        await session.commit()

    settings = container.settings
    # 06:59 local: the latest digest moment is yesterday's; 07:10: today's.
    assert digest_moment(local(2026, 1, 15, 6, 59), "Europe/Berlin", 7).day == 14
    clock.now = local(2026, 1, 15, 7, 10)
    assert await queue_digests(container.db, settings, renderer, clock.now) == 1
    assert await queue_digests(container.db, settings, renderer, clock.now) == 0  # once a day
    async with container.db.session() as session:
        row = await session.scalar(
            select(NotificationDelivery).where(NotificationDelivery.event == "digest")
        )
    assert row is not None and row.user_id == reader.user_id
    assert row.recipient == "reader@berlin.example"
    assert row.payload["counts"] == {"critical": 1, "high": 1, "medium": 0, "low": 0}
    assert row.payload["open_count"] == 2  # Spindle overheat and Old news

    await worker.run_once()
    [mail] = smtp_peer.mails
    assert mail.rcpt_tos == ["reader@berlin.example"]
    assert mail.subject == "plantwatch daily digest, Berlin Works, 2026-01-15: 2 alerts"
    text = mail.text()
    assert "from 2026-01-14 07:00 to 2026-01-15 07:00 (Europe/Berlin)" in text
    assert "- critical: 1" in text and "- high: 1" in text and "low:" not in text
    # Most severe first, with the local time and the state now.
    assert text.index("Spindle overheat") < text.index("Hydraulic pressure low")
    assert "[HIGH] Hydraulic pressure low on Press P1, 2026-01-14 10:00, resolved" in text
    assert "Old news" not in text
    assert "2 alerts are open now." in text

    # The next day: no new alert, but two still open, so a digest still goes.
    clock.now = local(2026, 1, 16, 7, 5)
    assert await queue_digests(container.db, settings, renderer, clock.now) == 1
    await worker.run_once()
    assert smtp_peer.mails[-1].subject.endswith("2026-01-16: 0 alerts")
    assert all(m.rcpt_tos == ["reader@berlin.example"] for m in smtp_peer.mails)

    # Once nothing happened and nothing is open, there is nothing to tell.
    async with container.db.session() as session:
        for rule_id in rules[1:]:
            await alerts.clear_alert(
                session,
                factory_id=berlin.id,
                rule_id=rule_id,
                device_id=device,
                at=local(2026, 1, 16, 8, 0),
                message="cleared",
            )
        await session.commit()
    clock.now = local(2026, 1, 18, 7, 5)
    assert await queue_digests(container.db, settings, renderer, clock.now) == 0


def test_the_scheduler_runs_the_digest(container: Container) -> None:
    assert "notify_digest" in {job.name for job in jobs_for(container)}


async def test_jobs_role_delivers_what_the_bus_carries(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    container: Container,
    http_peer: HttpPeer,
) -> None:
    slack = await create_channel(client, admin_a, "slack", channel_configs(http_peer)["slack"])
    rule_id = await make_rule(container, admin_a.factory_id, [slack["id"]])
    device = await make_device(client, admin_a, "M7")
    role = JobsRole(RoleContext(container, "127.0.0.1", 0))
    await role.start()
    try:
        change = await raise_alert(
            container,
            admin_a.factory_id,
            rule_id,
            device,
            severity="critical",
            title="Spindle overheat",
            at=dt.datetime.now(dt.UTC),
        )
        await alerts.publish(container.bus, [change])
        for _ in range(200):
            if http_peer.ok("/slack/"):
                break
            await asyncio.sleep(0.025)
    finally:
        role.request_stop()
        await role.wait()
    [received] = http_peer.ok("/slack/")
    message = received.json()
    assert message["text"] == "[CRITICAL] Spindle overheat on Press M7"
    # The facts that made the rule fire travel with the message.
    assert "spindle_temp 82.5 > 80 for 5m" in message["blocks"][1]["text"]["text"]
    async with container.db.session() as session:
        rows = (await session.scalars(select(NotificationDelivery))).all()
    assert [(r.event, r.status, r.alert_id) for r in rows] == [
        ("created", "sent", change.payload["alert_id"])
    ]
