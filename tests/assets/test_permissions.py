"""Who may do what: readers read, writers write, and the 403 names the permission."""

from __future__ import annotations

from typing import Any

import httpx

from plantwatch.tenancy.models import Factory
from tests.assets.conftest import Plant, get_page, post
from tests.conftest import LoggedIn, LoginAs, assert_problem


async def _mutations(client: httpx.AsyncClient, plant: Plant) -> list[tuple[str, str, Any]]:
    user = plant.owner
    device = plant.device["id"]
    group = await post(client, user, "/api/v1/groups", {"name": "G"})
    parameter = await post(client, user, f"/api/v1/devices/{device}/parameters", {"key": "t"})
    g, p = group["id"], parameter["id"]
    return [
        ("POST", "/api/v1/sites", {"name": "S2"}),
        ("PATCH", f"/api/v1/sites/{plant.site['id']}", {"name": "S3"}),
        ("DELETE", f"/api/v1/sites/{plant.site['id']}", None),
        ("POST", "/api/v1/areas", {"site_id": plant.site["id"], "name": "A2"}),
        ("PATCH", f"/api/v1/areas/{plant.area['id']}", {"name": "A3"}),
        ("DELETE", f"/api/v1/areas/{plant.area['id']}", None),
        ("POST", "/api/v1/lines", {"area_id": plant.area["id"], "name": "L2"}),
        ("PATCH", f"/api/v1/lines/{plant.line['id']}", {"name": "L3"}),
        ("DELETE", f"/api/v1/lines/{plant.line['id']}", None),
        ("POST", "/api/v1/devices", {"device_key": "X1", "name": "X"}),
        ("PATCH", f"/api/v1/devices/{device}", {"name": "Y"}),
        ("DELETE", f"/api/v1/devices/{device}", None),
        ("DELETE", f"/api/v1/devices/{device}?purge=true", None),
        ("POST", "/api/v1/groups", {"name": "G2"}),
        ("PATCH", f"/api/v1/groups/{g}", {"name": "G3"}),
        ("DELETE", f"/api/v1/groups/{g}", None),
        ("PUT", f"/api/v1/groups/{g}/devices", {"device_ids": [device]}),
        ("POST", f"/api/v1/groups/{g}/devices", {"device_ids": [device]}),
        ("DELETE", f"/api/v1/groups/{g}/devices/{device}", None),
        ("POST", f"/api/v1/devices/{device}/parameters", {"key": "u"}),
        ("PATCH", f"/api/v1/devices/{device}/parameters/{p}", {"unit": "K"}),
        ("DELETE", f"/api/v1/devices/{device}/parameters/{p}", None),
    ]


def _reads(plant: Plant) -> list[str]:
    device = plant.device["id"]
    return [
        "/api/v1/sites",
        f"/api/v1/sites/{plant.site['id']}",
        "/api/v1/areas",
        f"/api/v1/areas/{plant.area['id']}",
        "/api/v1/lines",
        f"/api/v1/lines/{plant.line['id']}",
        "/api/v1/asset-tree",
        "/api/v1/devices",
        f"/api/v1/devices/{device}",
        "/api/v1/groups",
        f"/api/v1/devices/{device}/parameters",
    ]


async def test_viewer_and_technician_read_but_cannot_write(
    client: httpx.AsyncClient, login_as: LoginAs, factory_a: Factory, plant_a: Plant
) -> None:
    mutations = await _mutations(client, plant_a)
    for role in ("viewer", "technician"):
        user = await login_as(factory_a, role)
        for url in _reads(plant_a):
            response = await client.get(url, headers=user.headers)
            assert response.status_code == 200, (role, url, response.text)
        for method, url, body in mutations:
            response = await client.request(method, url, json=body, headers=user.headers)
            problem = assert_problem(response, 403, "permission_denied")
            assert problem["permission"] == "assets:write", (role, method, url)
    # Nothing was changed by the refused calls.
    assert (await get_page(client, plant_a.owner, "/api/v1/sites"))["meta"]["total"] == 1
    devices = await get_page(client, plant_a.owner, "/api/v1/devices")
    assert devices["data"] == [plant_a.device]


async def test_manager_can_write_and_anonymous_cannot_read(
    client: httpx.AsyncClient, login_as: LoginAs, factory_a: Factory, plant_a: Plant
) -> None:
    manager = await login_as(factory_a, "maintenance_manager")
    response = await client.post(
        "/api/v1/devices", json={"device_key": "M2", "name": "M2"}, headers=manager.headers
    )
    assert response.status_code == 201
    for url in _reads(plant_a):
        assert_problem(await client.get(url), 401)


async def test_a_grant_gives_one_permission(
    client: httpx.AsyncClient, login_as: LoginAs, factory_a: Factory, plant_a: Plant
) -> None:
    user: LoggedIn = await login_as(factory_a, "viewer", grants=["devices:keys"])
    url = f"/api/v1/devices/{plant_a.device['id']}/keys"
    assert (await client.post(url, headers=user.headers)).status_code == 201
    response = await client.patch(
        f"/api/v1/devices/{plant_a.device['id']}", json={"name": "x"}, headers=user.headers
    )
    assert assert_problem(response, 403)["permission"] == "assets:write"
