"""Sites > areas > lines and the asset tree, through the HTTP API."""

from __future__ import annotations

import httpx

from plantwatch.app import Container
from tests.assets.conftest import (
    Plant,
    audit_actions,
    audit_rows,
    build_plant,
    get_data,
    get_page,
    post,
)
from tests.conftest import LoggedIn, assert_problem


async def test_site_round_trip_with_audit(
    client: httpx.AsyncClient, admin_a: LoggedIn, container: Container
) -> None:
    site = await post(
        client, admin_a, "/api/v1/sites", {"name": "Plant North", "address": "1 Mill Road"}
    )
    assert site["name"] == "Plant North"
    assert site["address"] == "1 Mill Road"
    assert "factory_id" not in site
    url = f"/api/v1/sites/{site['id']}"
    assert (await get_data(client, admin_a, url)) == site

    response = await client.patch(url, json={"address": None}, headers=admin_a.headers)
    assert response.status_code == 200, response.text
    assert response.json()["data"]["address"] is None
    assert response.json()["data"]["name"] == "Plant North"

    response = await client.delete(url, headers=admin_a.headers)
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(await client.get(url, headers=admin_a.headers), 404, "site_not_found")

    rows = await audit_rows(container, admin_a.factory_id)
    site_rows = [r for r in rows if r.entity_type == "site"]
    assert [r.action for r in site_rows] == ["site.create", "site.update", "site.delete"]
    assert all(r.entity_id == str(site["id"]) and r.actor == admin_a.email for r in site_rows)
    assert site_rows[1].before == {"address": "1 Mill Road"}
    assert site_rows[1].after == {"address": None}
    assert site_rows[2].before is not None and site_rows[2].before["name"] == "Plant North"


async def test_areas_and_lines_filters_search_sort_paging(
    client: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    north = await post(client, admin_a, "/api/v1/sites", {"name": "North"})
    south = await post(client, admin_a, "/api/v1/sites", {"name": "South"})
    areas = {}
    for site, name in [(north, "Machining"), (north, "Assembly"), (south, "Packing")]:
        areas[name] = await post(
            client, admin_a, "/api/v1/areas", {"site_id": site["id"], "name": name}
        )
    assert areas["Packing"]["site_name"] == "South"
    for area, name in [
        ("Machining", "Line 1"),
        ("Machining", "Line 2"),
        ("Assembly", "Line 3"),
        ("Packing", "Line 4"),
    ]:
        line = await post(
            client, admin_a, "/api/v1/lines", {"area_id": areas[area]["id"], "name": name}
        )
        assert line["area_name"] == area

    page = await get_page(client, admin_a, "/api/v1/areas", site_id=north["id"])
    assert [a["name"] for a in page["data"]] == ["Assembly", "Machining"]
    assert page["meta"] == {"page": 1, "per_page": 50, "total": 2}
    page = await get_page(client, admin_a, "/api/v1/areas", search="PACK")
    assert [a["name"] for a in page["data"]] == ["Packing"]
    page = await get_page(client, admin_a, "/api/v1/areas", sort="-name")
    assert [a["name"] for a in page["data"]] == ["Packing", "Machining", "Assembly"]

    page = await get_page(client, admin_a, "/api/v1/lines", site_id=north["id"])
    assert [x["name"] for x in page["data"]] == ["Line 1", "Line 2", "Line 3"]
    assert {x["site_name"] for x in page["data"]} == {"North"}
    page = await get_page(client, admin_a, "/api/v1/lines", area_id=areas["Machining"]["id"])
    assert [x["name"] for x in page["data"]] == ["Line 1", "Line 2"]
    page = await get_page(client, admin_a, "/api/v1/lines", sort="-name", per_page=3, page=2)
    assert [x["name"] for x in page["data"]] == ["Line 1"]
    assert page["meta"] == {"page": 2, "per_page": 3, "total": 4}
    page = await get_page(client, admin_a, "/api/v1/sites", search="sou")
    assert [x["name"] for x in page["data"]] == ["South"]

    bad_sort = await client.get("/api/v1/lines?sort=password", headers=admin_a.headers)
    body = assert_problem(bad_sort, 422, "validation_error")
    assert body["errors"][0]["path"] == "query.sort"


async def test_move_area_and_line(
    client: httpx.AsyncClient, admin_a: LoggedIn, plant_a: Plant
) -> None:
    other_site = await post(client, admin_a, "/api/v1/sites", {"name": "South"})
    response = await client.patch(
        f"/api/v1/areas/{plant_a.area['id']}",
        json={"site_id": other_site["id"], "name": "Machining 2"},
        headers=admin_a.headers,
    )
    assert response.status_code == 200, response.text
    assert response.json()["data"]["site_name"] == "South"
    line = await get_data(client, admin_a, f"/api/v1/lines/{plant_a.line['id']}")
    assert (line["site_id"], line["area_name"]) == (other_site["id"], "Machining 2")
    device = await get_data(client, admin_a, f"/api/v1/devices/{plant_a.device['id']}")
    assert device["site_name"] == "South"


async def test_delete_refuses_while_children_exist(
    client: httpx.AsyncClient, admin_a: LoggedIn, plant_a: Plant
) -> None:
    h = admin_a.headers
    site_url = f"/api/v1/sites/{plant_a.site['id']}"
    area_url = f"/api/v1/areas/{plant_a.area['id']}"
    line_url = f"/api/v1/lines/{plant_a.line['id']}"
    assert_problem(await client.delete(site_url, headers=h), 409, "site_has_areas")
    assert_problem(await client.delete(area_url, headers=h), 409, "area_has_lines")
    assert_problem(await client.delete(line_url, headers=h), 409, "line_has_devices")
    # A decommissioned device still sits on its line.
    device_url = f"/api/v1/devices/{plant_a.device['id']}"
    assert (await client.delete(device_url, headers=h)).status_code == 204
    assert_problem(await client.delete(line_url, headers=h), 409, "line_has_devices")

    moved = await client.patch(device_url, json={"line_id": None}, headers=h)
    assert moved.status_code == 200 and moved.json()["data"]["line_id"] is None
    for url in (line_url, area_url, site_url):
        assert (await client.delete(url, headers=h)).status_code == 204, url
        assert_problem(await client.get(url, headers=h), 404)
    assert (await get_page(client, admin_a, "/api/v1/sites"))["meta"]["total"] == 0


async def test_parent_must_be_in_callers_factory(
    client: httpx.AsyncClient, admin_a: LoggedIn, admin_b: LoggedIn, plant_a: Plant
) -> None:
    b_site = await post(client, admin_b, "/api/v1/sites", {"name": "B site"})
    b_area = await post(client, admin_b, "/api/v1/areas", {"site_id": b_site["id"], "name": "B"})

    cases = [
        ("post", "/api/v1/areas", {"site_id": b_site["id"], "name": "X"}, "body.site_id"),
        ("post", "/api/v1/areas", {"site_id": 999_999, "name": "X"}, "body.site_id"),
        ("post", "/api/v1/lines", {"area_id": b_area["id"], "name": "X"}, "body.area_id"),
        (
            "patch",
            f"/api/v1/areas/{plant_a.area['id']}",
            {"site_id": b_site["id"]},
            "body.site_id",
        ),
        (
            "patch",
            f"/api/v1/lines/{plant_a.line['id']}",
            {"area_id": b_area["id"]},
            "body.area_id",
        ),
    ]
    for method, url, body, path in cases:
        response = await client.request(method, url, json=body, headers=admin_a.headers)
        problem = assert_problem(response, 422, "validation_error")
        assert [e["path"] for e in problem["errors"]] == [path], (url, body)

    assert (await get_page(client, admin_a, "/api/v1/areas"))["meta"]["total"] == 1
    assert (await get_page(client, admin_a, "/api/v1/lines"))["meta"]["total"] == 1
    line = await get_data(client, admin_a, f"/api/v1/lines/{plant_a.line['id']}")
    assert line["area_id"] == plant_a.area["id"]


async def test_duplicate_names_conflict(
    client: httpx.AsyncClient, admin_a: LoggedIn, admin_b: LoggedIn, plant_a: Plant
) -> None:
    h = admin_a.headers
    dup_site = await client.post("/api/v1/sites", json={"name": "Plant North"}, headers=h)
    assert_problem(dup_site, 409, "site_exists")
    dup_area = await client.post(
        "/api/v1/areas", json={"site_id": plant_a.site["id"], "name": "Machining"}, headers=h
    )
    assert_problem(dup_area, 409, "area_exists")
    dup_line = await client.post(
        "/api/v1/lines", json={"area_id": plant_a.area["id"], "name": "Line 1"}, headers=h
    )
    assert_problem(dup_line, 409, "line_exists")
    other = await post(client, admin_a, "/api/v1/sites", {"name": "South"})
    rename = await client.patch(
        f"/api/v1/sites/{other['id']}", json={"name": "Plant North"}, headers=h
    )
    assert_problem(rename, 409, "site_exists")
    # Names are per factory: B may use the same ones.
    await post(client, admin_b, "/api/v1/sites", {"name": "Plant North"})


async def test_invalid_hierarchy_bodies_write_nothing(
    client: httpx.AsyncClient, admin_a: LoggedIn, container: Container
) -> None:
    cases: list[tuple[str, dict[str, object], str]] = [
        ("/api/v1/sites", {"name": "x" * 201}, "body.name"),
        ("/api/v1/sites", {"name": "   "}, "body.name"),
        ("/api/v1/sites", {"name": "ok", "colour": "red"}, "body.colour"),
        ("/api/v1/sites", {"name": "ok", "address": "a" * 501}, "body.address"),
        ("/api/v1/sites", {"name": "nul\x00"}, "body.name"),
        ("/api/v1/areas", {"site_id": "one", "name": "x"}, "body.site_id"),
        ("/api/v1/areas", {"name": "x"}, "body.site_id"),
        ("/api/v1/lines", {"area_id": 2**70, "name": "x"}, "body.area_id"),
    ]
    for url, body, path in cases:
        response = await client.post(url, json=body, headers=admin_a.headers)
        problem = assert_problem(response, 422, "validation_error")
        assert path in [e["path"] for e in problem["errors"]], (body, problem)
    for url in ("/api/v1/sites", "/api/v1/areas", "/api/v1/lines"):
        assert (await get_page(client, admin_a, url))["meta"]["total"] == 0
    assert await audit_actions(container, admin_a.factory_id) == []

    site = await post(client, admin_a, "/api/v1/sites", {"name": "North"})
    null_name = await client.patch(
        f"/api/v1/sites/{site['id']}", json={"name": None}, headers=admin_a.headers
    )
    problem = assert_problem(null_name, 422)
    assert problem["errors"][0]["path"] == "body.name"
    huge_id = await client.get(f"/api/v1/sites/{2**70}", headers=admin_a.headers)
    assert_problem(huge_id, 422)


async def test_asset_tree_counts(
    client: httpx.AsyncClient, admin_a: LoggedIn, admin_b: LoggedIn, plant_a: Plant
) -> None:
    line2 = await post(
        client, admin_a, "/api/v1/lines", {"area_id": plant_a.area["id"], "name": "Line 2"}
    )
    await post(
        client, admin_a, "/api/v1/areas", {"site_id": plant_a.site["id"], "name": "Assembly"}
    )
    await post(client, admin_a, "/api/v1/sites", {"name": "South"})
    devices = {}
    for key, line_id in [
        ("M02", plant_a.line["id"]),
        ("M03", line2["id"]),
        ("M04", None),
        ("M05", None),
    ]:
        devices[key] = await post(
            client, admin_a, "/api/v1/devices", {"device_key": key, "name": key, "line_id": line_id}
        )
    # Decommissioned devices are counted, but not as active.
    for key in ("M02", "M05"):
        response = await client.delete(
            f"/api/v1/devices/{devices[key]['id']}", headers=admin_a.headers
        )
        assert response.status_code == 204
    await build_plant(client, admin_b)  # B's rows must not show up in A's tree

    tree = await get_data(client, admin_a, "/api/v1/asset-tree")
    assert tree["unassigned"] == {"device_count": 2, "active_device_count": 1}
    assert [s["name"] for s in tree["sites"]] == ["Plant North", "South"]
    north, south = tree["sites"]
    assert (north["device_count"], north["active_device_count"]) == (3, 2)
    assert south == {
        "id": south["id"],
        "name": "South",
        "device_count": 0,
        "active_device_count": 0,
        "areas": [],
    }
    assert [a["name"] for a in north["areas"]] == ["Assembly", "Machining"]
    assembly, machining = north["areas"]
    assert assembly["lines"] == [] and assembly["device_count"] == 0
    assert machining["lines"] == [
        {"id": plant_a.line["id"], "name": "Line 1", "device_count": 2, "active_device_count": 1},
        {"id": line2["id"], "name": "Line 2", "device_count": 1, "active_device_count": 1},
    ]

    tree_b = await get_data(client, admin_b, "/api/v1/asset-tree")
    assert [s["name"] for s in tree_b["sites"]] == ["Plant North"]
    assert tree_b["sites"][0]["device_count"] == 1
    assert tree_b["unassigned"]["device_count"] == 0
