"""Helpers for the assets tests: a small plant built through the API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from plantwatch.app import Container
from plantwatch.tenancy.models import AuditEntry
from tests.conftest import LoggedIn


async def post(
    client: httpx.AsyncClient, user: LoggedIn, url: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """POST that must succeed with 201; the created object's `data`."""
    response = await client.post(url, json=body, headers=user.headers)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def get_data(client: httpx.AsyncClient, user: LoggedIn, url: str, **params: Any) -> Any:
    response = await client.get(url, params=params, headers=user.headers)
    assert response.status_code == 200, response.text
    return response.json()["data"]


async def get_page(
    client: httpx.AsyncClient, user: LoggedIn, url: str, **params: Any
) -> dict[str, Any]:
    response = await client.get(url, params=params, headers=user.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"data", "meta"}
    return body


@dataclass
class Plant:
    """One site > area > line with one device on the line, owned by `owner`."""

    owner: LoggedIn
    site: dict[str, Any]
    area: dict[str, Any]
    line: dict[str, Any]
    device: dict[str, Any]


async def build_plant(client: httpx.AsyncClient, user: LoggedIn, tag: str = "") -> Plant:
    site = await post(client, user, "/api/v1/sites", {"name": f"Plant North{tag}"})
    area = await post(client, user, "/api/v1/areas", {"site_id": site["id"], "name": "Machining"})
    line = await post(client, user, "/api/v1/lines", {"area_id": area["id"], "name": "Line 1"})
    device = await post(
        client,
        user,
        "/api/v1/devices",
        {"device_key": f"M01{tag}", "name": "CNC Mill A", "line_id": line["id"]},
    )
    return Plant(owner=user, site=site, area=area, line=line, device=device)


@pytest.fixture
async def plant_a(client: httpx.AsyncClient, admin_a: LoggedIn) -> Plant:
    return await build_plant(client, admin_a)


ASSET_ENTITIES = frozenset(
    {"site", "area", "line", "device", "device_group", "device_parameter", "device_key"}
)


async def audit_rows(container: Container, factory_id: int) -> list[AuditEntry]:
    async with container.db.session() as session:
        rows = await session.scalars(
            select(AuditEntry).where(AuditEntry.factory_id == factory_id).order_by(AuditEntry.id)
        )
        return list(rows.all())


async def audit_actions(container: Container, factory_id: int) -> list[str]:
    """The factory's audit actions on asset entities, in order."""
    return [
        row.action
        for row in await audit_rows(container, factory_id)
        if row.entity_type in ASSET_ENTITIES
    ]
