"""The `ingest` role as `plantwatch up` / `run ingest` drive it: port 0 gives a real
port, health is reported, stop is clean; a bad broker URL is a configuration error."""

from __future__ import annotations

import asyncio
import re
import socket
from typing import Any

import click
import httpx
import orjson
import pytest
from pydantic import SecretStr

from plantwatch.app import Container
from plantwatch.cli import ROLES, RoleContext
from plantwatch.connectors.mqtt import mqtt_health, telemetry_topic
from plantwatch.connectors.mqtt_load import publish_messages
from tests.connectors.conftest import stored_points
from tests.telemetry.conftest import KeyedDevice, now_ms


async def test_the_ingest_role_runs_the_embedded_broker_on_a_free_port(
    app: Any, client: httpx.AsyncClient, container: Container, device_a: KeyedDevice
) -> None:
    container.settings.mqtt_port = 0
    role = ROLES["ingest"](RoleContext(container, "127.0.0.1", 0))
    await role.start()
    try:
        (label, address), *_ = role.endpoints()
        found = re.match(r"mqtt://127\.0\.0\.1:(\d+) ", address)
        assert label == "MQTT" and found and int(found.group(1)) > 0
        health = (await client.get("/health")).json()
        assert health["checks"]["mqtt"]["status"] == "ok", health
        assert health["checks"]["mqtt"]["url"] == found.group(0).strip()
        body = orjson.dumps({"ts": now_ms(), "values": {"temp": 20.0}})
        stats = await publish_messages(
            "127.0.0.1",
            int(found.group(1)),
            [(telemetry_topic("acme", "M01"), body)],
            username="M01",
            password=device_a.key,
        )
        assert stats.acked == 1
        assert await stored_points(container, device_a.id) == 1
    finally:
        role.request_stop()
        await asyncio.wait_for(role.wait(), 10)
    assert mqtt_health() is None


async def test_a_bad_broker_url_is_a_configuration_error(container: Container) -> None:
    container.settings.mqtt_url = SecretStr("http://not-mqtt")
    with pytest.raises(click.ClickException, match="PLANTWATCH_MQTT_URL"):
        ROLES["ingest"](RoleContext(container, "127.0.0.1", 0))


async def test_a_taken_default_port_falls_back_but_a_configured_one_fails(
    app: Any, container: Container
) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        # As if `taken` were the default (1883 with a Mosquitto already on it):
        # not in model_fields_set, so nobody asked for it.
        container.settings.__dict__["mqtt_port"] = taken
        assert "mqtt_port" not in container.settings.model_fields_set
        role = ROLES["ingest"](RoleContext(container, "127.0.0.1", 0))
        await role.start()
        try:
            found = re.search(r"mqtt://127\.0\.0\.1:(\d+) ", role.endpoints()[0][1])
            assert found and int(found.group(1)) not in (0, taken)
        finally:
            role.request_stop()
            await asyncio.wait_for(role.wait(), 10)
        container.settings.mqtt_port = taken  # now asked for explicitly: no silent change
        explicit = ROLES["ingest"](RoleContext(container, "127.0.0.1", 0))
        with pytest.raises(click.ClickException, match="cannot listen for MQTT"):
            await explicit.start()
