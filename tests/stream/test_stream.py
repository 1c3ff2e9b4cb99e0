"""GET /api/v1/stream end to end, over real HTTP (uvicorn): live events, resume
without loss, tenant and permission filtering, auth, KPI values, reset, shutdown."""

from __future__ import annotations

import asyncio
import datetime as dt

import httpx
from sqlalchemy import select, text, update
from tests.conftest import LoggedIn, LoginAs
from tests.stream.conftest import Server, alert_payload, device_payload, recorded
from tests.telemetry.conftest import keyed_device, now_ms

from plantwatch.app import Container
from plantwatch.scheduler import jobs_for, run_job
from plantwatch.stream.models import StreamEvent
from plantwatch.stream.service import append_events, append_rows, event_row
from plantwatch.tenancy import tokens
from plantwatch.tenancy.models import Factory, User


async def test_alert_and_device_events_are_pushed_as_they_happen(
    server: Server, container: Container, admin_a: LoggedIn
) -> None:
    # Only the recorder's in-process wake-up can deliver within the test: no polling.
    container.stream.hub.poll_s = 60
    async with server.stream(headers=admin_a.headers) as sse:
        headers = sse.response.headers
        assert headers["content-type"].startswith("text/event-stream")
        assert headers["cache-control"] == "no-cache"
        assert headers["x-accel-buffering"] == "no"
        await container.bus.publish("alert.created", alert_payload(admin_a.factory_id, 11))
        await container.bus.publish("device.offline", device_payload(admin_a.factory_id, 5))
        alert, device = await sse.events(2)
    assert alert.event == "alert"
    assert device.event == "device"
    assert alert.id is not None and device.id is not None
    assert int(device.id) > int(alert.id)
    body = alert.json
    assert body["subject"] == "alert.created"
    assert body["event"] == "created"
    assert body["alert_id"] == 11
    assert body["message"] == "spindle_temp 82.5 > 80 for 5m"
    assert "recipients" not in body  # who gets notified is not for screens
    assert body["recorded_at"]
    assert device.json["subject"] == "device.offline"
    assert device.json["event"] == "offline"
    assert device.json["device_id"] == 5
    # Durable: both are in the log under the ids the client saw.
    async with container.db.engine.connect() as conn:
        rows = (await conn.execute(select(StreamEvent.id, StreamEvent.kind))).all()
    assert [(r[0], r[1]) for r in rows] == [
        (int(alert.id), "alert.created"),
        (int(device.id), "device.offline"),
    ]


async def test_reconnect_with_last_event_id_resumes_without_loss_or_duplicates(
    server: Server, container: Container, admin_a: LoggedIn, admin_b: LoggedIn
) -> None:
    fa, fb = admin_a.factory_id, admin_b.factory_id
    async with server.stream(headers=admin_a.headers) as sse:
        await container.bus.publish("alert.created", alert_payload(fa, 1))
        await container.bus.publish("alert.acknowledged", alert_payload(fa, 1, "acknowledged"))
        seen = await sse.events(2)
    last = seen[-1].id
    assert last is not None
    # Missed while disconnected (with another factory's in between).
    await container.bus.publish("alert.created", alert_payload(fa, 2))
    await container.bus.publish("alert.created", alert_payload(fb, 99))
    await container.bus.publish("device.offline", device_payload(fa, 3))
    await container.bus.publish("alert.resolved", alert_payload(fa, 1, "resolved"))
    await recorded(container, 6)
    async with server.stream(headers={**admin_a.headers, "Last-Event-ID": last}) as sse:
        missed = await sse.events(3)
        await container.bus.publish("alert.created", alert_payload(fa, 4))
        live = await sse.next()
        await sse.nothing_for(0.3)
    # Exactly factory A's events stored after `last`, in log order. (Alert and device
    # events travel on different bus subjects, so their mutual order is the log's.)
    async with container.db.engine.connect() as conn:
        stored = (
            await conn.execute(
                select(StreamEvent.id, StreamEvent.kind)
                .where(StreamEvent.factory_id == fa, StreamEvent.id > int(last))
                .order_by(StreamEvent.id)
                .limit(3)
            )
        ).all()
    assert [(int(e.id or 0), e.json["subject"]) for e in missed] == [tuple(r) for r in stored]
    assert sorted(e.json["subject"] for e in missed) == [
        "alert.created",
        "alert.resolved",
        "device.offline",
    ]
    ids = [int(e.id or 0) for e in [*seen, *missed, live]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert live.json["alert_id"] == 4
    # A new EventSource can't set the header: ?last_event_id= does the same, and the
    # header (what EventSource sends when it reconnects) wins over the URL.
    async with server.stream(
        headers=admin_a.headers, params={"last_event_id": missed[1].id}
    ) as sse:
        again = await sse.events(2)
    assert [e.id for e in again] == [missed[2].id, live.id]
    async with server.stream(
        headers={**admin_a.headers, "Last-Event-ID": missed[2].id or ""},
        params={"last_event_id": seen[0].id},
    ) as sse:
        assert (await sse.next()).id == live.id


async def test_backfill_from_the_table_when_the_hub_no_longer_holds_the_gap(
    server: Server, container: Container, admin_a: LoggedIn
) -> None:
    hub = container.stream.hub
    hub.size = 5  # the hub keeps ~5-10 events: resuming from further back reads the table
    fa = admin_a.factory_id
    async with server.stream(headers=admin_a.headers) as sse:
        await container.bus.publish("alert.created", alert_payload(fa, 0))
        first = await sse.next()
        for i in range(1, 41):
            await container.bus.publish("alert.repeated", alert_payload(fa, i, "repeated"))
        got = await sse.events(40)
        assert [e.json["alert_id"] for e in got] == list(range(1, 41))
        assert hub.floor > int(first.id or 0)
    async with server.stream(headers={**admin_a.headers, "Last-Event-ID": first.id or ""}) as sse:
        again = await sse.events(40)
        await sse.nothing_for(0.2)
    assert [e.id for e in again] == [e.id for e in got]


async def test_factory_b_never_sees_factory_a(
    server: Server, container: Container, admin_a: LoggedIn, admin_b: LoggedIn
) -> None:
    async with (
        server.stream(headers=admin_a.headers) as sse_a,
        server.stream(headers=admin_b.headers) as sse_b,
    ):
        await container.bus.publish("alert.created", alert_payload(admin_a.factory_id, 1))
        await container.bus.publish("device.online", device_payload(admin_a.factory_id, 1))
        await container.bus.publish("alert.created", alert_payload(admin_b.factory_id, 2))
        b_event = await sse_b.next()
        a_events = await sse_a.events(2)
        await sse_b.nothing_for(0.3)
        await sse_a.nothing_for(0.1)
    assert b_event.json["alert_id"] == 2 and b_event.json["factory_id"] == admin_b.factory_id
    assert {e.json["factory_id"] for e in a_events} == {admin_a.factory_id}
    # Resuming from an id of A's does not hand B anything of A's either.
    async with server.stream(headers={**admin_b.headers, "Last-Event-ID": "0"}) as sse_b:
        only = await sse_b.next()
        await sse_b.nothing_for(0.3)
    assert only.id == b_event.id


async def test_events_need_their_permission(
    server: Server,
    container: Container,
    login_as: LoginAs,
    factory_a: Factory,
    admin_a: LoggedIn,
) -> None:
    # Every role reads alerts; a user whose role is gone (say, dropped in an upgrade)
    # keeps only their grants: here assets:read, so device events but no alerts.
    user = await login_as(factory_a, "viewer")
    async with container.db.session() as session:
        await session.execute(
            update(User)
            .where(User.id == user.user_id)
            .values(role="legacy_operator", permissions=["assets:read"])
        )
        await session.commit()
    fa = factory_a.id
    async with server.stream(headers=user.headers) as sse:
        await container.bus.publish("alert.created", alert_payload(fa, 1))
        await container.bus.publish("device.offline", device_payload(fa, 2))
        only = await sse.next()
        await sse.nothing_for(0.3)
    assert only.event == "device"
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        response = await client.get(
            "/api/v1/stream", params={"types": "alert"}, headers=user.headers
        )
        assert response.status_code == 403
        assert response.json()["permission"] == "alerts:read"
        bad = await client.get(
            "/api/v1/stream", params={"types": "alert,weather"}, headers=admin_a.headers
        )
        assert bad.status_code == 422
        assert bad.json()["errors"][0]["path"] == "query.types"
    # A permission taken away mid-stream applies at the next check.
    container.stream.revalidate_s = 0.2
    viewer = await login_as(factory_a, "viewer")
    async with server.stream(headers=viewer.headers, params={"types": "alert"}) as sse:
        await container.bus.publish("alert.created", alert_payload(fa, 3))
        assert (await sse.next()).json["alert_id"] == 3
        async with container.db.session() as session:
            await session.execute(
                update(User).where(User.id == viewer.user_id).values(role="legacy_operator")
            )
            await session.commit()
        await asyncio.sleep(0.5)
        await container.bus.publish("alert.created", alert_payload(fa, 4))
        await sse.nothing_for(0.5)


async def test_authentication(
    server: Server, container: Container, admin_a: LoggedIn, client: httpx.AsyncClient
) -> None:
    claims = tokens.decode_access_token(container.secret, admin_a.access_token)

    def token(ttl_s: int, issued: dt.datetime) -> str:
        return tokens.encode_access_token(
            container.secret,
            user_id=claims.user_id,
            factory_id=claims.factory_id,
            factory_slug=admin_a.factory_slug,
            session_id=claims.session_id,
            role=claims.role,
            ttl_s=ttl_s,
            now=issued,
        )

    now = dt.datetime.now(dt.UTC)
    expired = token(60, now - dt.timedelta(hours=1))
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        for headers, params, code in [
            ({}, {}, "token_missing"),
            ({"Authorization": "Bearer not-a-token"}, {}, "token_invalid"),
            ({"Authorization": f"Bearer {expired}"}, {}, "token_invalid"),
            ({}, {"access_token": expired}, "token_invalid"),
            ({}, {"access_token": admin_a.access_token + "x"}, "token_invalid"),
        ]:
            response = await http.get("/api/v1/stream", headers=headers, params=params)
            assert response.status_code == 401, (headers, params)
            assert response.json()["code"] == code
    # The token in the URL, as a browser's EventSource must send it.
    async with server.stream(params={"access_token": admin_a.access_token}) as sse:
        await container.bus.publish("alert.created", alert_payload(admin_a.factory_id, 1))
        assert (await sse.next()).json["alert_id"] == 1
    # A stream ends (with `close`) when its token expires or its login ends.
    container.stream.revalidate_s = 0.2
    short = token(60, now - dt.timedelta(seconds=57))
    async with server.stream(headers={"Authorization": f"Bearer {short}"}) as sse:
        closed = await sse.next(wait_s=5)
        assert closed.event == "close"
        assert closed.json == {"reason": "token_invalid"}
        assert await sse.block() is None
    async with server.stream(headers=admin_a.headers) as sse:
        logout = await client.post("/api/v1/auth/logout", headers=admin_a.headers)
        assert logout.status_code == 204
        closed = await sse.next(wait_s=5)
        assert (closed.event, closed.json) == ("close", {"reason": "session_revoked"})
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        revoked = await http.get("/api/v1/stream", headers=admin_a.headers)
        assert revoked.status_code == 401


async def test_kpi_values_after_http_ingest_only_changes_throttled(
    server: Server, container: Container, client: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    container.stream.kpi_interval_s = 0.2
    device = await keyed_device(client, admin_a)
    other = await keyed_device(client, admin_a, "M02")
    ts = now_ms()
    posted = await client.post(
        "/api/v1/ingest",
        json={"ts": ts, "values": {"spindle_temp": 61.5, "rpm": 1200}},
        headers=device.headers,
    )
    assert posted.status_code == 200, posted.text
    async with server.stream(headers=admin_a.headers, params={"types": "kpi"}) as sse:
        first = await sse.next()
        assert first.event == "kpi" and first.id is None  # ephemeral: not resumable
        values = {v["key"]: v for v in first.json["values"]}
        assert set(values) == {"spindle_temp", "rpm"}
        assert values["spindle_temp"]["value"] == 61.5
        assert values["spindle_temp"]["device_id"] == device.id
        assert values["spindle_temp"]["device_key"] == "M01"
        assert first.json["more"] is False
        # Only what changed since the last send.
        posted = await client.post(
            "/api/v1/ingest",
            json={"ts": ts + 1000, "values": {"spindle_temp": 64.0}},
            headers=device.headers,
        )
        assert posted.status_code == 200
        changed = await sse.next()
        assert [(v["key"], v["value"]) for v in changed.json["values"]] == [("spindle_temp", 64.0)]
        await sse.nothing_for(0.5)  # nothing changed: no kpi events
    # ?device= narrows KPI values to some devices.
    async with server.stream(
        headers=admin_a.headers, params=[("types", "kpi"), ("device", other.id)]
    ) as sse:
        posted = await client.post(
            "/api/v1/ingest", json={"ts": ts, "values": {"flow": 3.5}}, headers=other.headers
        )
        assert posted.status_code == 200
        event = await sse.next()
        assert {v["device_id"] for v in event.json["values"]} == {other.id}
    # A hundred dashboards of one factory share one reader.
    async with (
        server.stream(headers=admin_a.headers, params={"types": "kpi"}) as one,
        server.stream(headers=admin_a.headers, params={"types": "kpi"}) as two,
    ):
        await one.next()
        await two.next()
        assert list(container.stream.feeds) == [admin_a.factory_id]


async def test_kpi_payload_is_capped_and_the_rest_follows(
    server: Server, container: Container, client: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    container.stream.kpi_interval_s = 0.2
    container.stream.kpi_max_items = 3
    device = await keyed_device(client, admin_a)
    metrics = {f"m{i}": float(i) for i in range(7)}
    posted = await client.post(
        "/api/v1/ingest", json={"ts": now_ms(), "values": metrics}, headers=device.headers
    )
    assert posted.status_code == 200
    async with server.stream(headers=admin_a.headers, params={"types": "kpi"}) as sse:
        batches = await sse.events(3)
    assert [len(b.json["values"]) for b in batches] == [3, 3, 1]
    assert [b.json["more"] for b in batches] == [True, True, False]
    assert sorted(v["key"] for b in batches for v in b.json["values"]) == sorted(metrics)


async def test_reset_when_the_id_is_older_than_retention(
    server: Server, container: Container, admin_a: LoggedIn
) -> None:
    fa = admin_a.factory_id
    for i in range(5):
        await container.bus.publish("alert.created", alert_payload(fa, i))
    await recorded(container, 5)
    async with container.db.engine.begin() as conn:
        ids = list((await conn.scalars(select(StreamEvent.id).order_by(StreamEvent.id))).all())
        old = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
        await conn.execute(
            update(StreamEvent).where(StreamEvent.id <= ids[3]).values(created_at=old)
        )
    # The scheduler's job applies retention (24 h) and always keeps the newest row.
    [job] = [j for j in jobs_for(container) if j.name == "stream_retention"]
    assert await run_job(job) == 4
    container.stream.max_rows = 1
    assert await container.stream.purge() == 0  # the newest row stays
    async with server.stream(headers={**admin_a.headers, "Last-Event-ID": str(ids[0])}) as sse:
        reset = await sse.next()
        assert reset.event == "reset"
        assert reset.json["reason"] == "expired"
        assert reset.id == str(ids[4])  # a reconnect after the reload resumes from here
        await container.bus.publish("alert.created", alert_payload(fa, 9))
        assert (await sse.next()).json["alert_id"] == 9
    # The last id still held (or the one just before it) resumes normally.
    async with server.stream(headers={**admin_a.headers, "Last-Event-ID": str(ids[3])}) as sse:
        assert (await sse.next()).id == str(ids[4])
    for bad, reason in [("abc", "invalid"), (str(ids[4] + 1000), "unknown")]:
        async with server.stream(headers={**admin_a.headers, "Last-Event-ID": bad}) as sse:
            reset = await sse.next()
            assert (reset.event, reset.json["reason"]) == ("reset", reason)


async def test_events_of_other_processes_arrive_in_order_without_gaps(
    server: Server, container: Container, admin_a: LoggedIn
) -> None:
    """A second Container on the same database stands for another process (a rules
    or ingest worker): its recorder writes to the one log, our hub polls it."""
    container.stream.hub.poll_s = 0.1
    other = Container.build(container.settings)
    await other.start()
    try:
        fa = admin_a.factory_id
        async with server.stream(headers=admin_a.headers) as sse:
            await other.bus.publish("alert.created", alert_payload(fa, 1))
            assert (await sse.next()).json["alert_id"] == 1
            # Both processes append at once; the stream still gets every event once, in id order.
            for i in range(2, 102):
                bus = container.bus if i % 2 else other.bus
                await bus.publish("alert.repeated", alert_payload(fa, i, "repeated"))
            got = await sse.events(100, wait_s=10)
            await sse.nothing_for(0.3)
        assert sorted(e.json["alert_id"] for e in got) == list(range(2, 102))
        ids = [int(e.id or 0) for e in got]
        assert ids == sorted(ids) and len(set(ids)) == 100
    finally:
        await other.close()


async def test_disconnect_and_shutdown_end_streams_cleanly(
    server: Server, container: Container, admin_a: LoggedIn
) -> None:
    service = container.stream
    async with server.stream(headers=admin_a.headers) as sse:
        await container.bus.publish("device.online", device_payload(admin_a.factory_id, 1))
        await sse.next()
        assert len(service.connections) == 1 and service.feeds
    for _ in range(100):  # the client went away: the server notices and lets go
        if not service.connections and not service.feeds:
            break
        await asyncio.sleep(0.02)
    assert not service.connections and not service.feeds
    assert not list(service.hub.listeners())
    # Stopping the api role ends open streams at once (no graceful-timeout cancel:
    # the body ends cleanly), and the server stops.
    async with server.stream(headers=admin_a.headers) as sse:
        server.role.request_stop()
        assert await sse.block(wait_s=3) is None
    await asyncio.wait_for(server.role.wait(), 3)


async def test_heartbeat_comments_keep_idle_streams_open(
    server: Server, container: Container, admin_a: LoggedIn
) -> None:
    container.stream.heartbeat_s = 0.2
    async with server.stream(headers=admin_a.headers) as sse:
        for _ in range(2):
            block = await sse.block(wait_s=2)
            assert block is not None and block.comments == ["ping"] and not block.data


async def test_log_rows_die_with_their_factory(container: Container, admin_a: LoggedIn) -> None:
    await container.stream.start()
    await container.bus.publish("alert.created", alert_payload(admin_a.factory_id, 1))
    await recorded(container, 1)
    async with container.db.engine.begin() as conn:
        await conn.execute(text("DELETE FROM factories WHERE id = :f"), {"f": admin_a.factory_id})
    await recorded(container, 0)


async def test_a_reader_never_sees_a_later_id_before_an_earlier_one(
    container: Container, admin_a: LoggedIn
) -> None:
    """The property resume relies on: while one append is uncommitted, a concurrent
    one (another process) waits, so committed ids only ever extend a prefix."""
    fa = admin_a.factory_id
    now = dt.datetime.now(dt.UTC)
    engine = container.db.engine
    async with engine.connect() as first:
        await first.begin()
        await append_rows(first, [event_row("alert.created", alert_payload(fa, 1), now)])
        second = asyncio.create_task(
            append_events(engine, [event_row("alert.created", alert_payload(fa, 2), now)])
        )
        await asyncio.sleep(0.3)
        assert not second.done()
        async with engine.connect() as reader:
            assert (await reader.scalars(select(StreamEvent.id))).all() == []
        await first.commit()
    await asyncio.wait_for(second, 10)
    async with engine.connect() as reader:
        rows = (await reader.execute(select(StreamEvent.id, StreamEvent.payload))).all()
    rows = sorted(rows)
    assert [r[1]["alert_id"] for r in rows] == [1, 2]
