"""Tenant isolation: another factory's objects answer 404 everywhere and never list."""

from __future__ import annotations

from typing import Any

import httpx

from tests.assets.conftest import Plant, build_plant, get_data, get_page, post
from tests.conftest import LoggedIn, assert_problem


async def _full_plant(client: httpx.AsyncClient, plant: Plant) -> dict[str, Any]:
    user = plant.owner
    device_id = plant.device["id"]
    group = await post(client, user, "/api/v1/groups", {"name": "Presses"})
    put = await client.put(
        f"/api/v1/groups/{group['id']}/devices",
        json={"device_ids": [device_id]},
        headers=user.headers,
    )
    assert put.status_code == 200
    parameter = await post(client, user, f"/api/v1/devices/{device_id}/parameters", {"key": "temp"})
    key = await post(client, user, f"/api/v1/devices/{device_id}/keys")
    return {"group": group, "parameter": parameter, "key": key}


async def test_every_endpoint_answers_404_for_another_factorys_object(
    client: httpx.AsyncClient, admin_a: LoggedIn, admin_b: LoggedIn, plant_a: Plant
) -> None:
    extra = await _full_plant(client, plant_a)
    b_plant = await build_plant(client, admin_b, tag="-b")
    site, area, line, device = (
        plant_a.site["id"],
        plant_a.area["id"],
        plant_a.line["id"],
        plant_a.device["id"],
    )
    group, parameter, key = extra["group"]["id"], extra["parameter"]["id"], extra["key"]["id"]
    b_device = b_plant.device["id"]
    requests: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", f"/api/v1/sites/{site}", None),
        ("PATCH", f"/api/v1/sites/{site}", {"name": "stolen"}),
        ("DELETE", f"/api/v1/sites/{site}", None),
        ("GET", f"/api/v1/areas/{area}", None),
        ("PATCH", f"/api/v1/areas/{area}", {"name": "stolen"}),
        ("DELETE", f"/api/v1/areas/{area}", None),
        ("GET", f"/api/v1/lines/{line}", None),
        ("PATCH", f"/api/v1/lines/{line}", {"name": "stolen"}),
        ("DELETE", f"/api/v1/lines/{line}", None),
        ("GET", f"/api/v1/devices/{device}", None),
        ("PATCH", f"/api/v1/devices/{device}", {"name": "stolen"}),
        ("DELETE", f"/api/v1/devices/{device}", None),
        ("DELETE", f"/api/v1/devices/{device}?purge=true", None),
        ("GET", f"/api/v1/groups/{group}", None),
        ("PATCH", f"/api/v1/groups/{group}", {"name": "stolen"}),
        ("DELETE", f"/api/v1/groups/{group}", None),
        ("GET", f"/api/v1/groups/{group}/devices", None),
        ("PUT", f"/api/v1/groups/{group}/devices", {"device_ids": [b_device]}),
        ("POST", f"/api/v1/groups/{group}/devices", {"device_ids": [b_device]}),
        ("DELETE", f"/api/v1/groups/{group}/devices/{device}", None),
        ("GET", f"/api/v1/devices/{device}/parameters", None),
        ("POST", f"/api/v1/devices/{device}/parameters", {"key": "x"}),
        ("GET", f"/api/v1/devices/{device}/parameters/{parameter}", None),
        ("PATCH", f"/api/v1/devices/{device}/parameters/{parameter}", {"unit": "K"}),
        ("DELETE", f"/api/v1/devices/{device}/parameters/{parameter}", None),
        # B's own device with A's parameter / key ids is no way in either.
        ("GET", f"/api/v1/devices/{b_device}/parameters/{parameter}", None),
        ("PATCH", f"/api/v1/devices/{b_device}/parameters/{parameter}", {"unit": "K"}),
        ("DELETE", f"/api/v1/devices/{b_device}/keys/{key}", None),
        ("GET", f"/api/v1/devices/{device}/keys", None),
        ("POST", f"/api/v1/devices/{device}/keys", {"name": "x"}),
        ("DELETE", f"/api/v1/devices/{device}/keys/{key}", None),
    ]
    for method, url, body in requests:
        response = await client.request(method, url, json=body, headers=admin_b.headers)
        assert response.status_code == 404, (method, url, response.text)
        assert_problem(response, 404)

    # Nothing of A's changed.
    h = admin_a.headers
    assert await get_data(client, admin_a, f"/api/v1/devices/{device}") == plant_a.device
    assert await get_data(client, admin_a, f"/api/v1/sites/{site}") == plant_a.site
    assert await get_data(client, admin_a, f"/api/v1/areas/{area}") == plant_a.area
    assert await get_data(client, admin_a, f"/api/v1/lines/{line}") == plant_a.line
    assert (await get_data(client, admin_a, f"/api/v1/groups/{group}"))["device_count"] == 1
    params = await get_page(client, admin_a, f"/api/v1/devices/{device}/parameters")
    assert [p["key"] for p in params["data"]] == ["temp"] and params["data"][0]["unit"] is None
    keys = await get_page(client, admin_a, f"/api/v1/devices/{device}/keys")
    assert keys["meta"]["total"] == 1 and keys["data"][0]["revoked_at"] is None
    me = await client.get("/api/v1/device/me", headers={"X-Device-Key": extra["key"]["key"]})
    assert me.status_code == 200 and me.json()["data"]["factory"]["slug"] == "acme"
    assert (await client.get(f"/api/v1/devices/{b_device}", headers=h)).status_code == 404


async def test_lists_never_show_another_factorys_rows(
    client: httpx.AsyncClient, admin_a: LoggedIn, admin_b: LoggedIn, plant_a: Plant
) -> None:
    extra_a = await _full_plant(client, plant_a)
    b_plant = await build_plant(client, admin_b, tag="-b")
    extra_b = await _full_plant(client, b_plant)

    def own_ids(plant: Plant, extra: dict[str, Any]) -> dict[str, list[int]]:
        device = plant.device["id"]
        return {
            "/api/v1/sites": [plant.site["id"]],
            "/api/v1/areas": [plant.area["id"]],
            "/api/v1/lines": [plant.line["id"]],
            "/api/v1/devices": [device],
            "/api/v1/groups": [extra["group"]["id"]],
            f"/api/v1/groups/{extra['group']['id']}/devices": [device],
            f"/api/v1/devices/{device}/parameters": [extra["parameter"]["id"]],
            f"/api/v1/devices/{device}/keys": [extra["key"]["id"]],
        }

    for user, expected in (
        (admin_a, own_ids(plant_a, extra_a)),
        (admin_b, own_ids(b_plant, extra_b)),
    ):
        for url, ids in expected.items():
            page = await get_page(client, user, url)
            assert [row["id"] for row in page["data"]] == ids, (user.factory_slug, url)
            assert page["meta"]["total"] == 1

    # B filtering by A's ids finds nothing.
    for name, value in {
        "site_id": plant_a.site["id"],
        "area_id": plant_a.area["id"],
        "line_id": plant_a.line["id"],
        "group_id": extra_a["group"]["id"],
    }.items():
        page = await get_page(client, admin_b, "/api/v1/devices", **{name: value})
        assert page["meta"]["total"] == 0, name
    page = await get_page(client, admin_b, "/api/v1/lines", site_id=plant_a.site["id"])
    assert page["meta"]["total"] == 0
    page = await get_page(client, admin_b, "/api/v1/lines", area_id=plant_a.area["id"])
    assert page["meta"]["total"] == 0
    page = await get_page(client, admin_b, "/api/v1/areas", site_id=plant_a.site["id"])
    assert page["meta"]["total"] == 0
    tree = await get_data(client, admin_b, "/api/v1/asset-tree")
    assert [s["id"] for s in tree["sites"]] == [b_plant.site["id"]]
