"""HTTP ingest end to end: a device posts, the points are durable and visible,
bad input becomes dead letters with reasons, and replay recovers it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from plantwatch.app import Container
from plantwatch.tenancy.models import Factory
from tests.conftest import LoggedIn, LoginAs, assert_problem
from tests.telemetry.conftest import KeyedDevice, keyed_device, now_ms


async def _rows(container: Container, sql: str) -> list[Any]:
    async with container.db.engine.connect() as conn:
        return [tuple(r) for r in await conn.execute(text(sql))]


async def _dead_letters(
    client: httpx.AsyncClient, user: LoggedIn, **params: Any
) -> list[dict[str, Any]]:
    response = await client.get("/api/v1/dead-letters", params=params, headers=user.headers)
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


async def test_post_stores_points_discovers_parameters_and_marks_online(
    client: httpx.AsyncClient, container: Container, device_a: KeyedDevice
) -> None:
    ts = now_ms()
    body = [
        {"ts": ts - 1000, "values": {"spindle_temp": 61.5, "running": True, "mode": "AUTO"}},
        {"timestamp": "2026-02-19T10:30:00Z", "metrics": {"spindle_temp": 1}},
        {"ts": ts, "values": {"spindle_temp": 62.0, "cycles": 1200}},
    ]
    response = await client.post("/api/v1/ingest", json=body, headers=device_a.headers)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "accepted": 5,
        "rejected": 1,
        "rejects": [
            {"reason": "timestamp_out_of_range", "detail": response.json()["rejects"][0]["detail"]}
        ],
    }
    raw = await _rows(container, "SELECT count(*) FROM telemetry_raw")
    assert raw == [(4,)]  # spindle_temp x2, running, cycles; "mode" is a state
    params = await client.get(
        f"/api/v1/devices/{device_a.id}/parameters", headers=device_a.owner.headers
    )
    kinds = {p["key"]: p["data_type"] for p in params.json()["data"]}
    assert kinds == {"spindle_temp": "float", "running": "bool", "mode": "string", "cycles": "int"}
    device = await client.get(f"/api/v1/devices/{device_a.id}", headers=device_a.owner.headers)
    assert device.json()["data"]["status"] == "online"
    assert device.json()["data"]["last_seen"] is not None
    latest = await _rows(container, "SELECT value, text FROM series_latest ORDER BY series_id")
    assert (62.0, None) in latest and (None, "AUTO") in latest
    dead = await _dead_letters(client, device_a.owner)
    assert [d["reason"] for d in dead] == ["timestamp_out_of_range"]
    assert json.loads(dead[0]["payload"])["metrics"] == {"spindle_temp": 1}


async def test_the_same_point_twice_is_stored_once(
    client: httpx.AsyncClient, container: Container, device_a: KeyedDevice
) -> None:
    body = {"ts": now_ms(), "values": {"a": 1.0, "b": 2.0}}
    for _ in range(3):
        response = await client.post("/api/v1/ingest", json=body, headers=device_a.headers)
        assert response.status_code == 200
    assert await _rows(container, "SELECT count(*) FROM telemetry_raw") == [(2,)]
    assert await _rows(container, "SELECT sum(cnt) FROM telemetry_1m") == [(2,)]


async def test_concurrent_posts_are_all_durable(
    client: httpx.AsyncClient, container: Container, device_a: KeyedDevice
) -> None:
    base = now_ms() - 60_000
    bodies = [
        [{"ts": base + i * 100 + j, "values": {"x": float(j)}} for j in range(50)]
        for i in range(20)
    ]
    responses = await asyncio.gather(
        *(client.post("/api/v1/ingest", json=b, headers=device_a.headers) for b in bodies)
    )
    assert all(r.status_code == 200 and r.json()["accepted"] == 50 for r in responses)
    assert await _rows(container, "SELECT count(*) FROM telemetry_raw") == [(1000,)]


async def test_whole_message_rejects_are_problems_and_dead_letters(
    client: httpx.AsyncClient, container: Container, device_a: KeyedDevice
) -> None:
    bad_json = await client.post(
        "/api/v1/ingest",
        content=b"{nope",
        headers={**device_a.headers, "content-type": "application/json"},
    )
    assert_problem(bad_json, 422, "invalid_json")
    too_big = (
        b'{"values": {"a": 1}, "pad": "'
        + b"x" * (container.settings.ingest_max_payload_bytes)
        + b'"}'
    )
    response = await client.post("/api/v1/ingest", content=too_big, headers=device_a.headers)
    assert_problem(response, 413, "payload_too_large")
    dead = await _dead_letters(client, device_a.owner)
    assert sorted(d["reason"] for d in dead) == ["invalid_json", "payload_too_large"]
    assert all(d["device_key"] == "M01" and d["source"] == "http" for d in dead)


async def test_unknown_or_revoked_keys_are_refused(
    client: httpx.AsyncClient, container: Container, device_a: KeyedDevice
) -> None:
    body = {"values": {"a": 1}}
    assert_problem(await client.post("/api/v1/ingest", json=body), 401, "device_key_invalid")
    assert_problem(
        await client.post("/api/v1/ingest", json=body, headers={"X-Device-Key": "pwd_nope"}),
        401,
        "device_key_invalid",
    )
    keys = await client.get(f"/api/v1/devices/{device_a.id}/keys", headers=device_a.owner.headers)
    key_id = keys.json()["data"][0]["id"]
    revoked = await client.delete(
        f"/api/v1/devices/{device_a.id}/keys/{key_id}", headers=device_a.owner.headers
    )
    assert revoked.status_code == 204
    container.devices.invalidate()  # the cache holds a key for up to ttl_s
    response = await client.post("/api/v1/ingest", json=body, headers=device_a.headers)
    assert_problem(response, 401, "device_key_invalid")


async def test_key_of_one_device_cannot_send_for_another(
    client: httpx.AsyncClient, device_a: KeyedDevice
) -> None:
    await keyed_device(client, device_a.owner, "M02")
    response = await client.post(
        "/api/v1/devices/M02/telemetry", json={"values": {"a": 1}}, headers=device_a.headers
    )
    assert_problem(response, 403, "device_mismatch")
    own = await client.post(
        "/api/v1/devices/M01/telemetry", json={"values": {"a": 1}}, headers=device_a.headers
    )
    assert own.status_code == 200 and own.json()["accepted"] == 1
    dead = await _dead_letters(client, device_a.owner, reason="device_mismatch")
    assert len(dead) == 1


async def test_replay_after_registering_the_device(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn, factory_a: Factory
) -> None:
    payload = json.dumps({"ts": now_ms(), "values": {"flow": 12.5}}).encode()
    await container.pipeline.dead_letter(
        factory_id=factory_a.id,
        source="mqtt",
        raw=payload,
        reason="unknown_device",
        detail="no device 'P7'",
        topic="factories/acme/devices/P7/telemetry",
        device_key="P7",
    )
    dead = await _dead_letters(client, admin_a, reason="unknown_device")
    first = await client.post(
        "/api/v1/dead-letters/replay", json={"ids": [dead[0]["id"]]}, headers=admin_a.headers
    )
    assert first.json()["data"][0]["status"] == "unresolved"
    await keyed_device(client, admin_a, "P7")
    second = await client.post(
        "/api/v1/dead-letters/replay", json={"ids": [dead[0]["id"]]}, headers=admin_a.headers
    )
    assert second.status_code == 200, second.text
    assert second.json()["data"][0] == {
        "id": dead[0]["id"],
        "status": "stored",
        "accepted": 1,
        "detail": "stored 1 values",
    }
    assert await _rows(container, "SELECT value FROM telemetry_raw") == [(12.5,)]
    shown = await client.get(f"/api/v1/dead-letters/{dead[0]['id']}", headers=admin_a.headers)
    assert shown.json()["data"]["replayed_at"] is not None
    summary = await client.get("/api/v1/dead-letters/summary", headers=admin_a.headers)
    assert summary.json()["data"]["open_by_reason"] == {}


@pytest.mark.parametrize(("source", "age_days"), [("mqtt", 10), ("import", 400)])
async def test_replay_days_later_judges_timestamps_as_when_received(
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    factory_a: Factory,
    source: str,
    age_days: int,
) -> None:
    """A live payload fixed ten days later is judged against when it arrived (the live
    limit is 7 days of past), and an imported row of any age replays as an import."""
    import datetime as dt

    day_ms = 86_400_000
    received = now_ms() - 10 * day_ms  # arrived ten days ago, with a fresh timestamp
    point_ts = (received if source == "mqtt" else now_ms() - age_days * day_ms) - 1000
    payload = json.dumps({"ts": point_ts, "values": {"flow": 3.5}}).encode()
    await container.pipeline.dead_letter(
        factory_id=factory_a.id,
        source=source,
        raw=payload,
        reason="unknown_device",
        detail="no device 'P8'",
        topic=None,
        device_key="P8",
    )
    async with container.db.engine.begin() as conn:
        await conn.execute(
            text("UPDATE dead_letters SET received_at = :at"),
            {"at": dt.datetime.fromtimestamp(received / 1000, dt.UTC)},
        )
    await keyed_device(client, admin_a, "P8")
    [letter] = await _dead_letters(client, admin_a, reason="unknown_device")
    replayed = await client.post(
        "/api/v1/dead-letters/replay", json={"ids": [letter["id"]]}, headers=admin_a.headers
    )
    assert replayed.json()["data"][0]["status"] == "stored", replayed.text
    assert await _rows(container, "SELECT ts, value FROM telemetry_raw") == [(point_ts, 3.5)]


async def test_dead_letters_are_tenant_scoped_and_replay_needs_permission(
    client: httpx.AsyncClient,
    device_a: KeyedDevice,
    admin_b: LoggedIn,
    login_as: LoginAs,
    factory_a: Factory,
) -> None:
    await client.post("/api/v1/ingest", content=b"junk", headers=device_a.headers)
    [letter] = await _dead_letters(client, device_a.owner)
    assert await _dead_letters(client, admin_b) == []
    assert_problem(
        await client.get(f"/api/v1/dead-letters/{letter['id']}", headers=admin_b.headers), 404
    )
    assert_problem(
        await client.post(
            "/api/v1/dead-letters/replay", json={"ids": [letter["id"]]}, headers=admin_b.headers
        ),
        404,
    )
    viewer = await login_as(factory_a, "viewer")
    assert len(await _dead_letters(client, viewer)) == 1
    body = assert_problem(
        await client.post(
            "/api/v1/dead-letters/replay", json={"ids": [letter["id"]]}, headers=viewer.headers
        ),
        403,
    )
    assert body["permission"] == "telemetry:write"


async def test_offline_after_silence_and_online_again(
    client: httpx.AsyncClient, container: Container, device_a: KeyedDevice
) -> None:
    import datetime as dt

    from plantwatch.telemetry.service import sweep_offline

    events: list[tuple[str, dict[str, Any]]] = []

    async def collect(subject: str, payload: dict[str, Any]) -> None:
        events.append((subject, payload))

    container.bus.subscribe("device.*", collect)
    await client.post("/api/v1/ingest", json={"values": {"a": 1}}, headers=device_a.headers)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=301)
    assert await sweep_offline(container.db, container.bus, container.pipeline, later) == [
        device_a.id
    ]
    assert await sweep_offline(container.db, container.bus, container.pipeline, later) == []
    device = await client.get(f"/api/v1/devices/{device_a.id}", headers=device_a.owner.headers)
    assert device.json()["data"]["status"] == "offline"
    await client.post("/api/v1/ingest", json={"values": {"a": 2}}, headers=device_a.headers)
    await container.bus.drain()  # type: ignore[attr-defined]
    assert [s for s, _ in events] == ["device.online", "device.offline", "device.online"]
    assert all(p["device_id"] == device_a.id for _, p in events)


async def test_committed_telemetry_is_published_on_the_device_partition(
    client: httpx.AsyncClient, container: Container, device_a: KeyedDevice
) -> None:
    """Rules read telemetry from the bus: every accepted point, after its commit, on
    `telemetry.<partition of the device>`; rejected points are not published."""
    from plantwatch.telemetry.pipeline import telemetry_partition

    events: list[tuple[str, dict[str, Any]]] = []

    async def collect(subject: str, payload: dict[str, Any]) -> None:
        events.append((subject, payload))

    container.bus.subscribe("telemetry.>", collect)
    body = [
        {"ts": 1_000, "values": {"temp": 81.5, "bad": "nan?"}},
        {"ts": 2_000, "values": {"temp": 82.0, "mode": "RUN"}},
    ]
    now_ms = int(__import__("time").time() * 1000)
    for entry in body:
        entry["ts"] = now_ms - 5_000 + int(entry["ts"])  # type: ignore[call-overload]
    response = await client.post("/api/v1/ingest", json=body, headers=device_a.headers)
    assert response.status_code == 200, response.text
    await container.bus.drain()  # type: ignore[attr-defined]
    assert [s for s, _ in events] == [f"telemetry.{telemetry_partition(device_a.id)}"]
    (item,) = events[0][1]["items"]
    assert item["device_id"] == device_a.id and item["device_key"] == device_a.device_key
    stamps, values = item["columns"]["temp"]
    assert list(values) == [81.5, 82.0] and len(stamps) == 2
    assert item["states"]["mode"][1] == "RUN"
    assert "bad" not in item["columns"]


async def test_a_nul_in_a_rejected_metric_name_is_dead_lettered_not_an_error(
    client: httpx.AsyncClient, device_a: KeyedDevice
) -> None:
    """The reject's detail quotes the metric name; a NUL in it (PostgreSQL text cannot
    hold one) is escaped, so the dead letter is stored and the good point too."""
    response = await client.post(
        "/api/v1/ingest",
        content=b'{"values": {"\\u0000": null, "ok": 1}}',
        headers=device_a.headers,
    )
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 1
    [letter] = await _dead_letters(client, device_a.owner)
    assert "\x00" not in letter["detail"] and "\\x00" in letter["detail"]
