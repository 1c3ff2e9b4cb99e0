"""Telemetry test helpers: a registered device with a key, through the API."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import LoggedIn


@dataclass
class KeyedDevice:
    id: int
    device_key: str
    key: str
    owner: LoggedIn

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Device-Key": self.key}


async def keyed_device(
    client: httpx.AsyncClient, owner: LoggedIn, device_key: str = "M01", **fields: Any
) -> KeyedDevice:
    created = await client.post(
        "/api/v1/devices",
        json={"device_key": device_key, "name": f"Machine {device_key}", **fields},
        headers=owner.headers,
    )
    assert created.status_code == 201, created.text
    device_id = created.json()["data"]["id"]
    key = await client.post(f"/api/v1/devices/{device_id}/keys", headers=owner.headers)
    assert key.status_code == 201, key.text
    return KeyedDevice(device_id, device_key, key.json()["data"]["key"], owner)


@pytest.fixture
async def device_a(client: httpx.AsyncClient, admin_a: LoggedIn) -> KeyedDevice:
    return await keyed_device(client, admin_a)


def now_ms() -> int:
    return int(time.time() * 1000)
