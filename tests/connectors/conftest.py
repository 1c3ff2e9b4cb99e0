"""MQTT test helpers: the embedded broker on a free port, an ingest subscriber on the
external broker named by PLANTWATCH_TEST_MQTT_URL, and row counting."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from plantwatch.app import Container
from plantwatch.connectors.mqtt import MqttIngest, MqttUrl
from plantwatch.connectors.mqtt_broker import EmbeddedBroker
from plantwatch.connectors.mqtt_client import IngestSubscriber
from tests.conftest import LoggedIn
from tests.telemetry.conftest import KeyedDevice, keyed_device

MQTT_URL = os.environ.get("PLANTWATCH_TEST_MQTT_URL")


async def rows(container: Container, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    async with container.db.engine.connect() as conn:
        return [tuple(r) for r in await conn.execute(text(sql), params)]


async def stored_points(container: Container, device_id: int) -> int:
    found = await rows(
        container,
        "SELECT count(*) FROM telemetry_raw r JOIN device_parameters p ON p.id = r.series_id "
        "WHERE p.device_id = :d",
        d=device_id,
    )
    return int(found[0][0])


async def dead_letters(
    client: httpx.AsyncClient, user: LoggedIn, **params: Any
) -> list[dict[str, Any]]:
    response = await client.get("/api/v1/dead-letters", params=params, headers=user.headers)
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float = 10.0) -> None:
    """Wait until `check()` is true (for effects that cross a broker)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not await check():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@pytest.fixture
async def device_a(client: httpx.AsyncClient, admin_a: LoggedIn) -> KeyedDevice:
    """Device M01 of factory `acme`, with a key."""
    return await keyed_device(client, admin_a)


@pytest.fixture
def mqtt_ingest(container: Container) -> MqttIngest:
    return MqttIngest(container.db, container.devices, container.pipeline)


@pytest.fixture
async def broker(app: Any, mqtt_ingest: MqttIngest) -> AsyncIterator[EmbeddedBroker]:
    """The embedded broker on 127.0.0.1 and a free port (the app started the pipeline)."""
    container: Container = app.state.container
    embedded = EmbeddedBroker(
        mqtt_ingest, container.devices, container.secret, host="127.0.0.1", port=0
    )
    await embedded.start()
    yield embedded
    await embedded.stop()


@pytest.fixture
def external_url() -> MqttUrl:
    if not MQTT_URL:
        pytest.skip("PLANTWATCH_TEST_MQTT_URL not set")
    return MqttUrl.parse(MQTT_URL)


SubscriberFactory = Callable[..., Awaitable[IngestSubscriber]]


@pytest.fixture
async def subscribers(
    app: Any, mqtt_ingest: MqttIngest, external_url: MqttUrl
) -> AsyncIterator[SubscriberFactory]:
    """Start ingest subscribers on the external broker; a share group of their own per
    test, so parallel runs on the same broker never take each other's messages."""
    running: list[tuple[IngestSubscriber, asyncio.Task[None]]] = []
    group = f"pwtest{uuid.uuid4().hex[:10]}"

    async def start(**options: Any) -> IngestSubscriber:
        options.setdefault("share_group", group)
        options.setdefault("client_id", f"pwtest-{uuid.uuid4().hex[:12]}")
        options.setdefault("session_expiry_s", 60)
        subscriber = IngestSubscriber(mqtt_ingest, external_url, **options)
        task = asyncio.create_task(subscriber.run())
        running.append((subscriber, task))
        await asyncio.wait_for(subscriber.connected.wait(), 10)
        return subscriber

    yield start
    for subscriber, _ in running:
        subscriber.stop()
    for _, task in running:
        await asyncio.wait_for(task, 15)
