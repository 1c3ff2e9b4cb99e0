"""Dispatch and delivery against real peers: every transport, retries with backoff,
a failing peer that blocks nobody, nothing sent twice, safe claims by several
workers, crash recovery, quiet hours, minimum severity and directed events."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import re
import time
import uuid
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from sqlalchemy import select

from plantwatch.app import Container
from plantwatch.notify import channels
from plantwatch.notify.dispatch import Dispatcher, quiet_until
from plantwatch.notify.models import NotificationDelivery
from plantwatch.notify.render import Renderer
from plantwatch.notify.worker import LOST_MESSAGE, DeliveryWorker, backoff_s
from plantwatch.rules.models import Rule
from plantwatch.tenancy import service as tenancy_service
from plantwatch.tenancy.models import Factory
from tests.conftest import LoggedIn, LoginAs, MakeFactory, assert_problem
from tests.notify.conftest import HOOK_SECRET, Clock, channel_configs, create_channel
from tests.notify.peers import HttpPeer, SmtpPeer, free_port

URL = "/api/v1/notifications"


async def make_rule(container: Container, factory_id: int, notify: list[int]) -> int:
    async with container.db.session() as session:
        rule = Rule(
            factory_id=factory_id,
            name=f"Spindle overheat {uuid.uuid4().hex[:4]}",
            conditions={"parameter": "spindle_temp", "operator": "gt", "threshold": 80},
            severity="high",
            actions={"alert": True, "event": True, "notify": notify},
        )
        session.add(rule)
        await session.commit()
        return rule.id


def event(factory_id: int, **overrides: Any) -> dict[str, Any]:
    """An `alert.<event>` payload as the alerts domain publishes it."""
    payload: dict[str, Any] = {
        "event": "created",
        "factory_id": factory_id,
        "alert_id": 41,
        "rule_id": None,
        "device_id": None,
        "severity": "high",
        "status": "triggered",
        "title": "Spindle overheat",
        "message": "spindle_temp 82.5 > 80 for 5m",
        "occurrences": 1,
        "escalation_level": 0,
        "assigned_to": None,
        "actor_id": None,
        "at": "2026-02-19T10:30:00Z",
        "received_ms": None,
        "recipients": [],
    }
    payload.update(overrides)
    return payload


async def deliveries(container: Container, **where: Any) -> list[NotificationDelivery]:
    async with container.db.session() as session:
        stmt = select(NotificationDelivery).order_by(NotificationDelivery.id)
        for key, value in where.items():
            stmt = stmt.where(getattr(NotificationDelivery, key) == value)
        return list((await session.scalars(stmt)).all())


async def test_every_transport_delivers_once_and_never_twice(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    container: Container,
    http_peer: HttpPeer,
    smtp_peer: SmtpPeer,
    dispatcher: Dispatcher,
    worker: DeliveryWorker,
) -> None:
    configs = channel_configs(http_peer, "all")
    ids = {k: (await create_channel(client, admin_a, k, c))["id"] for k, c in configs.items()}
    rule_id = await make_rule(container, admin_a.factory_id, list(ids.values()))
    payload = event(admin_a.factory_id, rule_id=rule_id, alert_id=7)
    queued = await dispatcher.dispatch(payload)
    # Two e-mail recipients, one SMS number, one WhatsApp number, three endpoints.
    assert len(queued) == 7
    assert await worker.run_once() == 7
    rows = await deliveries(container)
    assert {r.status for r in rows} == {"sent"}, [(r.kind, r.last_error) for r in rows]
    assert all(r.attempts == 1 and len(r.attempt_log) == 1 for r in rows)

    mails = smtp_peer.mails
    assert sorted(m.rcpt_tos[0] for m in mails) == ["lead@plant.example", "ops@plant.example"]
    mail = mails[0]
    assert mail.subject == "[HIGH] Spindle overheat"
    assert mail.message["From"] == "alerts@plant.example"
    text = mail.text()
    assert "spindle_temp 82.5 > 80 for 5m" in text
    assert "Open: https://plantwatch.example/alerts/7" in text
    html = mail.html()
    assert html is not None and "spindle_temp 82.5 &gt; 80 for 5m" in html

    slack = http_peer.ok("/slack/")[0].json()
    assert slack["text"] == "[HIGH] Spindle overheat"
    assert slack["blocks"][0] == {
        "type": "header",
        "text": {"type": "plain_text", "text": "[HIGH] Spindle overheat"},
    }
    teams = http_peer.ok("/teams/")[0].json()
    assert teams["attachments"][0]["content"]["type"] == "AdaptiveCard"

    hook = http_peer.ok("/hook/all")[0]
    body = hook.json()
    assert body["event"] == "alert.created" and body["data"]["alert_id"] == 7
    webhook_row = next(r for r in rows if r.kind == "webhook")
    assert hook.headers["X-Plantwatch-Delivery"] == str(webhook_row.id)
    # Verify as a receiver would: HMAC over "<timestamp>.<raw body>".
    signed = f"{hook.headers['X-Plantwatch-Timestamp']}.".encode() + hook.body
    mac = hmac.new(HOOK_SECRET.encode(), signed, hashlib.sha256).hexdigest()
    assert hook.headers["X-Plantwatch-Signature"] == f"sha256={mac}"

    twilio = http_peer.ok("/2010-04-01/")
    assert sorted(r.form["To"][0] for r in twilio) == [
        "+4915112345678",
        "whatsapp:+4917612345678",
    ]
    assert all(r.form["Body"][0].startswith("[HIGH] Spindle overheat") for r in twilio)

    # Nothing is sent twice: not by another worker pass, not by a redelivered event.
    assert await worker.run_once() == 0
    assert await dispatcher.dispatch(payload) == []
    assert await worker.run_once() == 0
    assert len(smtp_peer.mails) == 2 and len(http_peer.requests) == 5
    # Each delivery is logged with its attempts, and filters work.
    listed = await client.get(
        f"{URL}/deliveries",
        params={"status": "sent", "channel_id": ids["webhook"], "alert_id": 7},
        headers=admin_a.headers,
    )
    data = listed.json()["data"]
    assert [d["kind"] for d in data] == ["webhook"]
    assert data[0]["attempt_log"][0]["ok"] is True
    resend = await client.post(f"{URL}/deliveries/{data[0]['id']}/retry", headers=admin_a.headers)
    assert_problem(resend, 409, "delivery_sent")


async def test_a_failing_peer_is_retried_with_backoff_and_blocks_nobody(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    container: Container,
    http_peer: HttpPeer,
    smtp_peer: SmtpPeer,
    dispatcher: Dispatcher,
    worker: DeliveryWorker,
    clock: Clock,
) -> None:
    configs = channel_configs(http_peer, "flaky")
    hook = await create_channel(client, admin_a, "webhook", configs["webhook"])
    mail = await create_channel(client, admin_a, "email", {"recipients": ["ops@plant.example"]})
    slack = await create_channel(client, admin_a, "slack", configs["slack"])
    rule_id = await make_rule(container, admin_a.factory_id, [hook["id"], mail["id"], slack["id"]])
    http_peer.fail_next["/hook/flaky"] = 2  # HTTP 500, twice
    smtp_peer.handler.refuse_next = 1  # 451 at DATA, once
    await dispatcher.dispatch(event(admin_a.factory_id, rule_id=rule_id))

    await worker.run_once()
    by_kind = {r.kind: r for r in await deliveries(container)}
    assert by_kind["slack"].status == "sent"  # not held up by the two failing peers
    for kind in ("webhook", "email"):
        row = by_kind[kind]
        assert row.status == "failed" and row.attempts == 1
        # Backoff: base 10 s, attempt 1, jitter 0.5 -> 7.5 s.
        assert row.next_attempt_at == clock.now + dt.timedelta(seconds=7.5)
    assert "HTTP 500" in (by_kind["webhook"].last_error or "")
    assert "451" in (by_kind["email"].last_error or "")

    assert await worker.run_once() == 0  # nothing is due before its backoff
    clock.advance(seconds=8)
    await worker.run_once()
    by_kind = {r.kind: r for r in await deliveries(container)}
    assert by_kind["email"].status == "sent" and by_kind["email"].attempts == 2
    assert by_kind["webhook"].status == "failed" and by_kind["webhook"].attempts == 2
    assert by_kind["webhook"].next_attempt_at == clock.now + dt.timedelta(seconds=15)
    clock.advance(seconds=16)
    await worker.run_once()
    row = {r.kind: r for r in await deliveries(container)}["webhook"]
    assert row.status == "sent" and row.attempts == 3
    assert [a["ok"] for a in row.attempt_log] == [False, False, True]
    assert len(http_peer.ok("/slack/")) == 1 and len(http_peer.ok("/hook/flaky")) == 1
    assert len(smtp_peer.mails) == 1


async def test_dead_after_max_attempts_or_a_permanent_error_then_retry_by_hand(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    container: Container,
    http_peer: HttpPeer,
    dispatcher: Dispatcher,
    worker: DeliveryWorker,
    clock: Clock,
) -> None:
    configs = channel_configs(http_peer, "down")
    hook = await create_channel(client, admin_a, "webhook", configs["webhook"])
    gone = await create_channel(
        client,
        admin_a,
        "webhook",
        {"url": f"{http_peer.url}/hook/unknown", "secret": HOOK_SECRET},
    )
    rule_id = await make_rule(container, admin_a.factory_id, [hook["id"], gone["id"]])
    http_peer.fail_next["/hook/down"] = 1000
    await dispatcher.dispatch(event(admin_a.factory_id, rule_id=rule_id))
    for _ in range(6):
        await worker.run_once()
        clock.advance(hours=1)
    rows = {r.channel_id: r for r in await deliveries(container)}
    assert rows[hook["id"]].status == "dead" and rows[hook["id"]].attempts == 4  # max_attempts
    # A 404 is the request's own fault: no retries.
    assert rows[gone["id"]].status == "dead" and rows[gone["id"]].attempts == 1
    assert "HTTP 404" in (rows[gone["id"]].last_error or "")

    http_peer.fail_next["/hook/down"] = 0
    retried = await client.post(
        f"{URL}/deliveries/{rows[hook['id']].id}/retry", headers=admin_a.headers
    )
    assert retried.status_code == 200, retried.text
    assert retried.json()["data"]["status"] == "pending"
    assert retried.json()["data"]["max_attempts"] == 8
    clock.now = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    await worker.run_once()
    row = {r.channel_id: r for r in await deliveries(container)}[hook["id"]]
    assert row.status == "sent" and row.attempts == 5 and len(row.attempt_log) == 5
    assert_problem(
        await client.post(f"{URL}/deliveries/{row.id}/retry", headers=admin_a.headers),
        409,
        "delivery_sent",
    )


async def test_smtp_down_is_retried_and_others_go_on(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    container: Container,
    http_peer: HttpPeer,
    smtp_peer: SmtpPeer,
    dispatcher: Dispatcher,
    worker: DeliveryWorker,
    renderer: Renderer,
    clock: Clock,
) -> None:
    mail = await create_channel(client, admin_a, "email", {"recipients": ["ops@plant.example"]})
    slack = await create_channel(client, admin_a, "slack", channel_configs(http_peer)["slack"])
    rule_id = await make_rule(container, admin_a.factory_id, [mail["id"], slack["id"]])
    await dispatcher.dispatch(event(admin_a.factory_id, rule_id=rule_id))
    # Nothing listens on this port: connection refused.
    down = container.settings.model_copy(update={"smtp_port": free_port()})
    broken = DeliveryWorker(container.db, down, renderer, clock=clock, rng=lambda: 0.5)
    try:
        await broken.run_once()
    finally:
        await broken.close()
    by_kind = {r.kind: r for r in await deliveries(container)}
    assert by_kind["slack"].status == "sent"
    assert by_kind["email"].status == "failed"
    assert "SMTP" in (by_kind["email"].last_error or "")
    clock.advance(seconds=10)
    await worker.run_once()  # the server is back (the right port)
    assert {r.status for r in await deliveries(container)} == {"sent"}
    assert len(smtp_peer.mails) == 1


async def test_several_workers_never_claim_the_same_delivery(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    container: Container,
    smtp_peer: SmtpPeer,
    dispatcher: Dispatcher,
    renderer: Renderer,
    clock: Clock,
) -> None:
    recipients = [f"op{i}@plant.example" for i in range(30)]
    mail = await create_channel(client, admin_a, "email", {"recipients": recipients})
    rule_id = await make_rule(container, admin_a.factory_id, [mail["id"]])
    assert len(await dispatcher.dispatch(event(admin_a.factory_id, rule_id=rule_id))) == 30
    workers = [
        DeliveryWorker(container.db, container.settings, renderer, clock=clock) for _ in range(3)
    ]
    try:
        claims = await asyncio.gather(*(w.claim(20) for w in workers))
        claimed = [i for batch in claims for i in batch]
        assert len(claimed) == len(set(claimed)) == 30
        await asyncio.gather(
            *(w.process(i) for w, batch in zip(workers, claims, strict=True) for i in batch)
        )
        assert sum(await asyncio.gather(*(w.run_once() for w in workers))) == 0
    finally:
        for w in workers:
            await w.close()
    assert sorted(m.rcpt_tos[0] for m in smtp_peer.mails) == sorted(recipients)


async def test_a_send_lost_in_a_crash_is_retried_after_its_lease(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    container: Container,
    http_peer: HttpPeer,
    dispatcher: Dispatcher,
    worker: DeliveryWorker,
    clock: Clock,
) -> None:
    slack = await create_channel(client, admin_a, "slack", channel_configs(http_peer)["slack"])
    rule_id = await make_rule(container, admin_a.factory_id, [slack["id"]])
    await dispatcher.dispatch(event(admin_a.factory_id, rule_id=rule_id))
    assert len(await worker.claim(10)) == 1  # ... and the worker dies before sending
    assert await worker.run_once() == 0  # still leased: nobody else takes it
    clock.advance(seconds=worker.lease.total_seconds() + 1)
    assert await worker.run_once() == 1
    [row] = await deliveries(container)
    assert row.status == "sent" and row.attempts == 2
    assert [a.get("error") for a in row.attempt_log] == [LOST_MESSAGE, None]
    assert len(http_peer.ok("/slack/")) == 1


async def test_users_quiet_hours_min_severity_and_directed_events(
    client: httpx.AsyncClient,
    container: Container,
    make_factory: MakeFactory,
    login_as: LoginAs,
    http_peer: HttpPeer,
    smtp_peer: SmtpPeer,
    dispatcher: Dispatcher,
    worker: DeliveryWorker,
    clock: Clock,
) -> None:
    berlin = await make_factory("berlin", "Berlin Works", timezone="Europe/Berlin")
    admin = await login_as(berlin, "super_admin", email="admin@berlin.example")
    night = await login_as(berlin, "technician", email="night@berlin.example")
    picky = await login_as(berlin, "maintenance_manager", email="picky@berlin.example")
    off = await login_as(berlin, "technician", email="off@berlin.example")
    silent = await login_as(berlin, "technician", email="silent@berlin.example")  # no prefs
    await create_channel(client, admin, "sms", channel_configs(http_peer)["sms"])
    prefs = [
        (
            night,
            {
                "min_severity": "low",
                "quiet_hours": {"start": "22:00", "end": "06:00"},
                "channels": [{"kind": "email"}, {"kind": "sms", "phone": "+4915199999999"}],
            },
        ),
        (
            picky,
            {"min_severity": "high", "channels": [{"kind": "email", "address": "p@x.example"}]},
        ),
        (off, {"enabled": False, "min_severity": "low"}),
    ]
    for user, body in prefs:
        saved = await client.put(f"{URL}/preferences", json=body, headers=user.headers)
        assert saved.status_code == 200, saved.text
    berlin_tz = ZoneInfo("Europe/Berlin")
    clock.now = dt.datetime(2026, 1, 15, 23, 30, tzinfo=berlin_tz).astimezone(dt.UTC)

    # medium, created: only `night` opted in that low, and it is quiet for them.
    await dispatcher.dispatch(event(berlin.id, alert_id=1, severity="medium"))
    rows = await deliveries(container)
    assert {(r.user_id, r.kind, r.recipient) for r in rows} == {
        (night.user_id, "email", "night@berlin.example"),
        (night.user_id, "sms", "+4915199999999"),
    }
    morning = dt.datetime(2026, 1, 16, 6, 0, tzinfo=berlin_tz).astimezone(dt.UTC)
    assert {r.next_attempt_at for r in rows} == {morning}
    assert await worker.run_once() == 0
    assert smtp_peer.mails == []

    # critical: quiet hours do not hold it back; `picky` wants high and above.
    await dispatcher.dispatch(event(berlin.id, alert_id=2, severity="critical"))
    await worker.run_once()
    assert sorted(a for m in smtp_peer.mails for a in m.rcpt_tos) == [
        "night@berlin.example",
        "p@x.example",
    ]
    sms = http_peer.ok("/2010-04-01/")
    assert [r.form["To"] for r in sms] == [["+4915199999999"]]
    assert sms[0].form["From"] == ["+15005550006"]  # the factory's SMS channel carries it

    # escalated, medium: the level's users are told whatever their minimum severity,
    # a user without preferences by e-mail, nobody who switched notifications off.
    await dispatcher.dispatch(
        event(
            berlin.id,
            alert_id=1,
            event="escalated",
            severity="medium",
            escalation_level=1,
            at="2026-01-15T22:30:00Z",
            recipients=[picky.user_id, silent.user_id, off.user_id],
        )
    )
    await worker.run_once()
    escalated = [m for m in smtp_peer.mails if m.subject.startswith("[ESCALATED L1]")]
    assert sorted(m.rcpt_tos[0] for m in escalated) == ["p@x.example", "silent@berlin.example"]
    # Assigning an alert to yourself tells nobody.
    assert (
        await dispatcher.dispatch(
            event(
                berlin.id,
                event="assigned",
                actor_id=picky.user_id,
                assigned_to=picky.user_id,
                recipients=[picky.user_id],
            )
        )
        == []
    )

    clock.now = morning + dt.timedelta(seconds=30)
    await worker.run_once()
    held = [r for r in await deliveries(container, alert_id=1) if r.user_id == night.user_id]
    assert {r.status for r in held} == {"sent"}
    assert len(http_peer.ok("/2010-04-01/")) == 2


def test_quiet_hours_and_backoff_arithmetic() -> None:
    tz = ZoneInfo("Europe/Berlin")
    # The night the clocks go forward (02:00 -> 03:00): 06:00 CEST is 04:00 UTC.
    now = dt.datetime(2026, 3, 28, 23, 0, tzinfo=tz)
    until = quiet_until("22:00", "06:00", now, tz)
    assert until == dt.datetime(2026, 3, 29, 4, 0, tzinfo=dt.UTC)
    assert quiet_until("22:00", "06:00", dt.datetime(2026, 3, 29, 7, 0, tzinfo=tz), tz) is None
    assert quiet_until("12:00", "13:00", dt.datetime(2026, 3, 29, 12, 59, tzinfo=tz), tz) == (
        dt.datetime(2026, 3, 29, 13, 0, tzinfo=tz)
    )
    assert [backoff_s(n, 10, 60, lambda: 1.0) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]
    assert backoff_s(1, 10, 60, lambda: 0.0) == 5


async def test_deleting_a_channel_ends_what_waits_for_it(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    container: Container,
    http_peer: HttpPeer,
    dispatcher: Dispatcher,
    worker: DeliveryWorker,
) -> None:
    slack = await create_channel(client, admin_a, "slack", channel_configs(http_peer)["slack"])
    rule_id = await make_rule(container, admin_a.factory_id, [slack["id"]])
    await dispatcher.dispatch(event(admin_a.factory_id, rule_id=rule_id))
    await client.delete(f"{URL}/channels/{slack['id']}", headers=admin_a.headers)
    assert await worker.run_once() == 0
    [row] = await deliveries(container)
    assert row.status == "dead" and row.last_error == "its channel was deleted"
    assert http_peer.requests == []


async def test_inactive_users_and_other_factories_are_never_targets(
    container: Container,
    factory_a: Factory,
    factory_b: Factory,
    dispatcher: Dispatcher,
) -> None:
    async with container.db.session() as session:
        theirs = await tenancy_service.add_user(
            session, factory_b.id, email="b@b.example", role="technician", password="x" * 12
        )
        await session.commit()
    # A recipient id from another factory is ignored.
    queued = await dispatcher.dispatch(
        event(factory_a.id, event="escalated", recipients=[theirs.id], escalation_level=1)
    )
    assert queued == []


async def test_one_address_hears_an_event_once(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    container: Container,
    dispatcher: Dispatcher,
) -> None:
    """A rule's e-mail channel and a user's own preferences naming the same address."""
    mail = await create_channel(
        client, admin_a, "email", {"recipients": ["ops@plant.example", "lead@plant.example"]}
    )
    saved = await client.put(
        f"{URL}/preferences",
        json={
            "min_severity": "low",
            "channels": [{"kind": "email", "address": "ops@plant.example"}],
        },
        headers=admin_a.headers,
    )
    assert saved.status_code == 200, saved.text
    rule_id = await make_rule(container, admin_a.factory_id, [mail["id"]])
    await dispatcher.dispatch(event(admin_a.factory_id, rule_id=rule_id))
    rows = await deliveries(container)
    assert sorted(r.recipient or "" for r in rows) == ["lead@plant.example", "ops@plant.example"]


async def test_the_running_worker_is_not_held_up_by_a_slow_peer(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    container: Container,
    http_peer: HttpPeer,
    renderer: Renderer,
) -> None:
    configs = channel_configs(http_peer, "slow")
    hook = await create_channel(client, admin_a, "webhook", configs["webhook"])
    slack = await create_channel(client, admin_a, "slack", configs["slack"])
    rule_id = await make_rule(container, admin_a.factory_id, [hook["id"], slack["id"]])
    http_peer.delay_s["/hook/slow"] = 1.5
    worker = DeliveryWorker(container.db, container.settings, renderer)
    dispatcher = Dispatcher(container.db, container.settings, renderer, on_queued=worker.wake)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        await dispatcher.dispatch(event(admin_a.factory_id, rule_id=rule_id))
        for _ in range(100):
            if http_peer.ok("/slack/"):
                break
            await asyncio.sleep(0.01)
        # Slack went while the webhook's peer is still thinking.
        status = {r.kind: r.status for r in await deliveries(container)}
        assert http_peer.ok("/slack/") and status["webhook"] == "sending"
    finally:
        stop.set()
        await running  # lets the send in flight finish
        await worker.close()
    assert {r.status for r in await deliveries(container)} == {"sent"}


def documented_verify() -> Any:
    docs = Path(__file__).resolve().parents[2] / "docs" / "notifications.md"
    [snippet] = re.findall(r"```python\n(.*?)```", docs.read_text(), flags=re.S)
    namespace: dict[str, Any] = {}
    exec(snippet, namespace)  # noqa: S102 (our own documentation)
    return namespace["verify"]


async def test_the_documented_signature_check_accepts_ours_and_nothing_else(
    http_peer: HttpPeer, container: Container
) -> None:
    """Runs the verification snippet of docs/notifications.md against a real request."""
    verify = documented_verify()

    http_peer.webhook_secrets["/hook/docs"] = HOOK_SECRET
    message = channels.Message(event="created", subject="s", body="b", short="s")
    async with channels.http_client(container.settings) as client:
        await channels.send_webhook(client, f"{http_peer.url}/hook/docs", HOOK_SECRET, message)
    [request] = http_peer.ok("/hook/docs")
    headers = request.headers
    assert verify(HOOK_SECRET, headers, request.body)
    assert channels.verify(
        HOOK_SECRET,
        headers["X-Plantwatch-Timestamp"],
        request.body,
        headers["X-Plantwatch-Signature"],
        now=time.time(),
    )
    assert not verify("another-secret-0000", headers, request.body)
    assert not verify(HOOK_SECRET, headers, request.body + b" ")
    stale = {**headers, "X-Plantwatch-Timestamp": str(int(time.time()) - 3600)}
    assert not verify(HOOK_SECRET, stale, request.body)
