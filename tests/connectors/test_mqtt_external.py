"""Ingest from an external broker (Mosquitto at PLANTWATCH_TEST_MQTT_URL; skipped
without it): shared subscriptions, and PUBACK only after commit.

Each test uses a factory slug of its own and subscribes only to that factory's
topics, so runs sharing the broker never see each other's messages."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson

from plantwatch.app import Container
from plantwatch.connectors import mqtt
from plantwatch.connectors.mqtt import MqttUrl, telemetry_topic
from plantwatch.connectors.mqtt_load import publish_messages, telemetry_messages
from tests.conftest import LoginAs, MakeFactory
from tests.connectors.conftest import (
    SubscriberFactory,
    dead_letters,
    eventually,
    stored_points,
)
from tests.telemetry.conftest import KeyedDevice, keyed_device, now_ms


async def _factory_device(
    make_factory: MakeFactory, login_as: LoginAs, client: httpx.AsyncClient, key: str = "M01"
) -> tuple[str, KeyedDevice]:
    slug = f"mq-{uuid.uuid4().hex[:10]}"
    owner = await login_as(await make_factory(slug))
    return slug, await keyed_device(client, owner, key)


async def _publish(url: MqttUrl, messages: list[tuple[str, bytes]]) -> None:
    stats = await publish_messages(
        url.host, url.port, messages, username=url.username, password=url.password, window=200
    )
    assert stats.acked == len(messages)


async def test_shared_subscription_workers_split_the_load_and_store_everything_once(
    subscribers: SubscriberFactory,
    external_url: MqttUrl,
    make_factory: MakeFactory,
    login_as: LoginAs,
    client: httpx.AsyncClient,
    container: Container,
) -> None:
    slug, device = await _factory_device(make_factory, login_as, client)
    own_topics = f"factories/{slug}/devices/+/telemetry"
    first = await subscribers(topic_filter=own_topics, max_in_flight=50)
    second = await subscribers(topic_filter=own_topics, max_in_flight=50)
    assert first.subscription == second.subscription
    assert first.subscription.startswith("$share/")
    acked_before = mqtt.ACKED.labels("external")._value.get()

    topic = telemetry_topic(slug, device.device_key)
    await _publish(external_url, list(telemetry_messages([topic], 400, metrics=5)))

    async def all_stored() -> bool:
        return await stored_points(container, device.id) == 2000

    await eventually(all_stored)
    assert first.messages > 0 and second.messages > 0  # the group split the messages
    assert first.messages + second.messages == 400  # each delivered to one worker only
    assert mqtt.ACKED.labels("external")._value.get() - acked_before == 400
    assert await dead_letters(client, device.owner) == []


async def test_an_unknown_device_on_the_external_broker_is_dead_lettered(
    subscribers: SubscriberFactory,
    external_url: MqttUrl,
    make_factory: MakeFactory,
    login_as: LoginAs,
    client: httpx.AsyncClient,
) -> None:
    slug, device = await _factory_device(make_factory, login_as, client)
    await subscribers(topic_filter=f"factories/{slug}/devices/+/telemetry")
    body = orjson.dumps({"ts": now_ms(), "values": {"a": 1}})
    await _publish(external_url, [(telemetry_topic(slug, "GHOST"), body)])

    async def dead_lettered() -> bool:
        return len(await dead_letters(client, device.owner)) == 1

    await eventually(dead_lettered)
    (dead,) = await dead_letters(client, device.owner)
    assert (dead["reason"], dead["device_key"], dead["source"]) == (
        "unknown_device",
        "GHOST",
        "mqtt",
    )


async def test_a_message_whose_commit_failed_is_not_acked_and_is_redelivered(
    subscribers: SubscriberFactory,
    external_url: MqttUrl,
    make_factory: MakeFactory,
    login_as: LoginAs,
    client: httpx.AsyncClient,
    container: Container,
) -> None:
    slug, device = await _factory_device(make_factory, login_as, client)
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
    try:
        subscriber = await subscribers(topic_filter=f"factories/{slug}/devices/+/telemetry")
        not_acked_before = mqtt.NOT_ACKED.labels("external")._value.get()
        body = orjson.dumps({"ts": now_ms() - 1000, "values": {"temp": 21.5, "rpm": 900}})
        await _publish(external_url, [(telemetry_topic(slug, device.device_key), body)])

        async def stored() -> bool:
            return await stored_points(container, device.id) == 2

        await eventually(stored)
        # The first delivery failed and was never acked; the broker sent it again on the
        # resumed session, and only that second delivery stored it.
        assert failures == 1
        assert mqtt.NOT_ACKED.labels("external")._value.get() - not_acked_before == 1
        assert subscriber.messages == 2
        assert subscriber.connections == 2
    finally:
        pipeline._flush = real_flush  # type: ignore[method-assign]
