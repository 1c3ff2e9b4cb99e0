"""The embedded broker end to end: real MQTT clients (aiomqtt/paho and a raw one)
against amqtt on a free port, ingesting into the test database."""

from __future__ import annotations

import uuid
from typing import Any

import aiomqtt
import httpx
import orjson
import pytest

from plantwatch.app import Container
from plantwatch.connectors import mqtt
from plantwatch.connectors.mqtt import INTERNAL_USERNAME, internal_password, telemetry_topic
from plantwatch.connectors.mqtt_broker import EmbeddedBroker
from plantwatch.connectors.mqtt_load import PublishError, publish_messages, telemetry_messages
from tests.conftest import LoggedIn
from tests.connectors.conftest import dead_letters, rows, stored_points
from tests.telemetry.conftest import KeyedDevice, keyed_device, now_ms


def device_client(
    broker: EmbeddedBroker, username: str | None, password: str | None, timeout: float = 5
) -> Any:
    return aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        username=username,
        password=password,
        identifier=f"test-{uuid.uuid4().hex[:8]}",
        timeout=timeout,
    )


def internal_client(broker: EmbeddedBroker, container: Container) -> Any:
    return device_client(broker, INTERNAL_USERNAME, internal_password(container.secret))


def payload(ts: int, **values: float) -> bytes:
    return orjson.dumps({"ts": ts, "values": values})


def counter(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


async def test_qos1_points_are_in_the_database_when_the_puback_arrives(
    broker: EmbeddedBroker, container: Container, device_a: KeyedDevice
) -> None:
    topic = telemetry_topic("acme", device_a.device_key)
    acked_before = counter(mqtt.ACKED, "embedded")
    base = now_ms() - 10_000
    async with device_client(broker, device_a.device_key, device_a.key) as client:
        for i in range(5):
            # aiomqtt's publish returns when the PUBACK arrived; nothing else waits.
            await client.publish(topic, payload(base + i, temp=20.0 + i, rpm=1500), qos=1)
            assert await stored_points(container, device_a.id) == 2 * (i + 1)
    assert counter(mqtt.ACKED, "embedded") - acked_before == 5
    latest = await rows(container, "SELECT max(value) FROM series_latest")
    assert latest == [(1500.0,)]


async def test_many_messages_in_flight_are_committed_together_and_all_acked(
    broker: EmbeddedBroker, container: Container, device_a: KeyedDevice
) -> None:
    topic = telemetry_topic("acme", device_a.device_key)
    messages = list(telemetry_messages([topic], 600, metrics=10))
    stats = await publish_messages(
        "127.0.0.1",
        broker.port,
        messages,
        username=device_a.device_key,
        password=device_a.key,
        window=300,
    )
    assert stats.acked == 600
    # Every PUBACK came after its commit: all 6,000 points are there the moment the
    # last one arrived.
    assert await stored_points(container, device_a.id) == 6000


async def test_wrong_keys_and_anonymous_clients_are_refused(
    broker: EmbeddedBroker,
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    device_a: KeyedDevice,
) -> None:
    other = await keyed_device(client, admin_a, "M02")
    for username, password in [
        (None, None),  # anonymous
        (device_a.device_key, "not-a-key"),
        (device_a.device_key, other.key),  # a real key, but M02's
        ("M02", device_a.key),
        (INTERNAL_USERNAME, "guess"),
    ]:
        with pytest.raises(aiomqtt.MqttError):
            async with device_client(broker, username, password):
                pass
    # The raw client sees the CONNACK code: 4 = bad user name or password, 5 = not authorized.
    with pytest.raises(PublishError, match="bad user name or password"):
        await publish_messages("127.0.0.1", broker.port, [], username="M01", password="x")
    with pytest.raises(PublishError, match="not authorized"):
        await publish_messages("127.0.0.1", broker.port, [])
    # A revoked key stops working, also for a connection that is already open.
    keys = await client.get(f"/api/v1/devices/{other.id}/keys", headers=admin_a.headers)
    key_id = keys.json()["data"][0]["id"]
    async with device_client(broker, "M02", other.key, timeout=1) as m02:
        revoked = await client.delete(
            f"/api/v1/devices/{other.id}/keys/{key_id}", headers=admin_a.headers
        )
        assert revoked.status_code == 204
        container.devices.invalidate()
        with pytest.raises(aiomqtt.MqttError):
            await m02.publish(telemetry_topic("acme", "M02"), payload(now_ms(), a=1), qos=1)
    assert await stored_points(container, other.id) == 0


async def test_a_device_may_only_publish_and_subscribe_under_its_own_topics(
    broker: EmbeddedBroker,
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    device_a: KeyedDevice,
) -> None:
    other = await keyed_device(client, admin_a, "M02")
    async with (
        device_client(broker, device_a.device_key, device_a.key) as m01,
        device_client(broker, "M02", other.key) as m02,
    ):
        assert list(await m02.subscribe("factories/acme/devices/M02/#", qos=1)) == [1]
        for other_filter in ("factories/acme/devices/M02/#", "#", "factories/+/devices/+/#"):
            granted = await m01.subscribe(other_filter, qos=1)
            assert list(granted) == [0x80], other_filter  # refused: not its subtree
        # Publishing as M02 is acknowledged (MQTT 3.1.1 has no negative PUBACK) but
        # neither stored nor delivered: it becomes a device_mismatch dead letter.
        await m01.publish(telemetry_topic("acme", "M02"), payload(now_ms(), x=1), qos=1)
        await m01.publish("factories/acme/devices/M02/commands", b"stop", qos=1)
        await m01.publish(telemetry_topic("globex", "M01"), payload(now_ms(), x=1), qos=1)
        # Its own non-telemetry topics just pass through the broker.
        await m01.publish("factories/acme/devices/M01/status", b"running", qos=1)
        # M02's own message still reaches M02 (proving the subscription works).
        await m02.publish("factories/acme/devices/M02/status", b"mine", qos=1)
        received = await anext(m02.messages)
        assert received.payload == b"mine"
    assert await stored_points(container, other.id) == 0
    assert await stored_points(container, device_a.id) == 0
    dead = await dead_letters(client, admin_a, reason="device_mismatch")
    assert len(dead) == 3
    assert {d["device_key"] for d in dead} == {"M01"}
    assert {d["topic"] for d in dead} == {
        "factories/acme/devices/M02/telemetry",
        "factories/acme/devices/M02/commands",
        "factories/globex/devices/M01/telemetry",
    }


async def test_a_will_outside_the_devices_topics_is_refused(
    broker: EmbeddedBroker, device_a: KeyedDevice
) -> None:
    will = aiomqtt.Will("factories/acme/devices/M02/commands", b"spoofed", qos=1)
    client = aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        username=device_a.device_key,
        password=device_a.key,
        will=will,
        timeout=5,
    )
    with pytest.raises(aiomqtt.MqttError):
        async with client:
            pass


async def test_unknown_device_is_dead_lettered_then_replayed_after_registering(
    broker: EmbeddedBroker, client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    topic = telemetry_topic("acme", "NEW-1")
    async with internal_client(broker, container) as bridge:
        await bridge.publish(topic, payload(now_ms() - 1000, temp=41.5), qos=1)
        await bridge.publish(telemetry_topic("nope", "X"), payload(now_ms(), a=1), qos=1)
    dead = await dead_letters(client, admin_a)
    assert [(d["reason"], d["device_key"], d["source"], d["topic"]) for d in dead] == [
        ("unknown_device", "NEW-1", "mqtt", topic)
    ]
    unknown_factory = await rows(
        container, "SELECT reason FROM dead_letters WHERE factory_id IS NULL"
    )
    assert unknown_factory == [("unknown_factory",)]

    new = await keyed_device(client, admin_a, "NEW-1")
    replay = await client.post(
        "/api/v1/dead-letters/replay", json={"ids": [dead[0]["id"]]}, headers=admin_a.headers
    )
    assert replay.status_code == 200, replay.text
    assert replay.json()["data"][0]["status"] == "stored"
    assert await stored_points(container, new.id) == 1


async def test_unknown_devices_are_registered_when_the_factory_allows_it(
    broker: EmbeddedBroker, client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    changed = await client.patch(
        "/api/v1/factory", json={"auto_register_devices": True}, headers=admin_a.headers
    )
    assert changed.status_code == 200, changed.text
    container.devices.invalidate()
    async with internal_client(broker, container) as bridge:
        for i in range(3):
            await bridge.publish(
                telemetry_topic("acme", "AUTO-7"), payload(now_ms() - 100 + i, v=i), qos=1
            )
        await bridge.publish(telemetry_topic("acme", "bad key!"), payload(now_ms(), v=1), qos=1)
        await bridge.publish(telemetry_topic("acme", "NL\n"), payload(now_ms(), v=1), qos=1)
    devices = await client.get("/api/v1/devices", headers=admin_a.headers)
    auto = [d for d in devices.json()["data"] if d["device_key"] == "AUTO-7"]
    assert len(auto) == 1
    assert await stored_points(container, auto[0]["id"]) == 3
    dead = await dead_letters(client, admin_a)
    assert [d["reason"] for d in dead] == ["invalid_topic", "invalid_topic"]  # never registered


async def test_bad_payloads_and_inactive_devices_become_dead_letters(
    broker: EmbeddedBroker,
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    device_a: KeyedDevice,
) -> None:
    topic = telemetry_topic("acme", device_a.device_key)
    async with device_client(broker, device_a.device_key, device_a.key) as m01:
        await m01.publish(topic, b"{not json", qos=1)
        await m01.publish(topic, orjson.dumps({"values": {"ok": 1, "bad": "x" * 300}}), qos=1)
    reasons = sorted(d["reason"] for d in await dead_letters(client, admin_a))
    assert reasons == ["invalid_json", "string_too_long"]
    assert await stored_points(container, device_a.id) == 1

    gone = await client.patch(
        f"/api/v1/devices/{device_a.id}", json={"is_active": False}, headers=admin_a.headers
    )
    assert gone.status_code == 200, gone.text
    container.devices.invalidate()
    async with internal_client(broker, container) as bridge:
        await bridge.publish(topic, payload(now_ms(), ok=2), qos=1)
    reasons = sorted(d["reason"] for d in await dead_letters(client, admin_a))
    assert reasons == ["device_inactive", "invalid_json", "string_too_long"]


async def test_no_puback_when_the_commit_fails_and_the_resent_message_is_stored(
    broker: EmbeddedBroker, container: Container, device_a: KeyedDevice
) -> None:
    pipeline = container.pipeline
    real_flush = pipeline._flush
    failures = 0

    async def flaky_flush(jobs: Any) -> Any:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise OSError("database unavailable")
        return await real_flush(jobs)

    pipeline._flush = flaky_flush  # type: ignore[method-assign]
    not_acked_before = counter(mqtt.NOT_ACKED, "embedded")
    message = [(telemetry_topic("acme", "M01"), payload(now_ms() - 500, temp=21.0))]
    options: dict[str, Any] = {"username": "M01", "password": device_a.key, "timeout_s": 10}
    try:
        with pytest.raises(PublishError, match=r"closed the connection after 0/1 acks"):
            await publish_messages("127.0.0.1", broker.port, message, **options)
        assert failures == 1
        assert await stored_points(container, device_a.id) == 0
        assert counter(mqtt.NOT_ACKED, "embedded") - not_acked_before == 1
        # The device sends it again (as a real client does after reconnecting): stored.
        stats = await publish_messages("127.0.0.1", broker.port, message, **options)
        assert stats.acked == 1
        assert await stored_points(container, device_a.id) == 1
    finally:
        pipeline._flush = real_flush  # type: ignore[method-assign]
