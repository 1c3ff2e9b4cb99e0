"""Devices: CRUD, listing, validation, decommission and purge, through the HTTP API."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
from sqlalchemy import func, select, update

from plantwatch.app import Container
from plantwatch.assets.models import Device, DeviceKey, DeviceParameter, device_group_members
from tests.assets.conftest import Plant, audit_actions, audit_rows, get_data, get_page, post
from tests.conftest import LoggedIn, assert_problem


async def test_device_round_trip(
    client: httpx.AsyncClient, admin_a: LoggedIn, plant_a: Plant, container: Container
) -> None:
    body = {
        "device_key": "press-07.a:1",
        "name": "Hydraulic Press 7",
        "kind": "press",
        "manufacturer": "Schuler",
        "model": "MSD 400",
        "serial_number": "SN-0042",
        "location": "Bay 3",
        "line_id": plant_a.line["id"],
        "criticality": "high",
        "metadata": {"install_year": 2019, "tags": ["hydraulic"], "nested": {"a": None}},
    }
    device = await post(client, admin_a, "/api/v1/devices", body)
    for key, value in body.items():
        assert device[key] == value, key
    assert device["is_active"] is True
    assert device["status"] == "unknown"  # connectivity: ingest keeps it
    assert device["last_seen"] is None
    assert (device["line_name"], device["area_name"], device["site_name"]) == (
        "Line 1",
        "Machining",
        "Plant North",
    )
    assert (device["area_id"], device["site_id"]) == (plant_a.area["id"], plant_a.site["id"])
    url = f"/api/v1/devices/{device['id']}"
    assert await get_data(client, admin_a, url) == device

    response = await client.patch(
        url,
        json={"name": "Press 7", "line_id": None, "criticality": "critical", "metadata": {}},
        headers=admin_a.headers,
    )
    assert response.status_code == 200, response.text
    changed = response.json()["data"]
    assert changed["name"] == "Press 7"
    assert changed["criticality"] == "critical"
    assert changed["metadata"] == {}
    assert changed["line_id"] is None and changed["site_name"] is None
    assert changed["manufacturer"] == "Schuler"
    assert await get_data(client, admin_a, url) == changed

    rows = [r for r in await audit_rows(container, admin_a.factory_id) if r.entity_type == "device"]
    assert [r.action for r in rows] == ["device.create", "device.create", "device.update"]
    assert rows[-1].entity_id == str(device["id"])
    assert rows[-1].before is not None and rows[-1].after is not None
    assert rows[-1].before["name"] == "Hydraulic Press 7"
    assert rows[-1].after["name"] == "Press 7"
    assert "manufacturer" not in rows[-1].after  # only what changed


async def test_last_seen_and_status_are_read_only(
    client: httpx.AsyncClient, plant_a: Plant
) -> None:
    for field, value in (("last_seen", "2026-01-01T00:00:00Z"), ("status", "online")):
        response = await client.patch(
            f"/api/v1/devices/{plant_a.device['id']}",
            json={field: value},
            headers=plant_a.owner.headers,
        )
        problem = assert_problem(response, 422)
        assert problem["errors"][0]["path"] == f"body.{field}"


async def _seed_devices(
    client: httpx.AsyncClient, user: LoggedIn, plant: Plant, container: Container
) -> dict[str, dict[str, Any]]:
    other_line = await post(
        client, user, "/api/v1/lines", {"area_id": plant.area["id"], "name": "Line 2"}
    )
    south = await post(client, user, "/api/v1/sites", {"name": "South"})
    south_area = await post(client, user, "/api/v1/areas", {"site_id": south["id"], "name": "Pack"})
    south_line = await post(
        client, user, "/api/v1/lines", {"area_id": south_area["id"], "name": "Line 9"}
    )
    specs = [
        ("P-100", "Press", "press", "Schuler", "MSD", "SN-A1", other_line["id"], "critical"),
        ("P-200", "press two", "press", "Aida", "NS2", "sn-b2", south_line["id"], "low"),
        ("C-300", "Conveyor", "conveyor", "Interroll", "RM 8", "X%1", south_line["id"], "high"),
        ("R_400", "Robot", "robot", "FANUC", "M-20", "X_2", None, "medium"),
    ]
    devices = {"M01": plant.device}
    for key, name, kind, manufacturer, model, serial, line_id, criticality in specs:
        devices[key] = await post(
            client,
            user,
            "/api/v1/devices",
            {
                "device_key": key,
                "name": name,
                "kind": kind,
                "manufacturer": manufacturer,
                "model": model,
                "serial_number": serial,
                "line_id": line_id,
                "criticality": criticality,
            },
        )
    # Telemetry sets last_seen and status; here we set them directly.
    async with container.db.session() as session:
        for key, minutes in (("P-100", 5), ("C-300", 1)):
            await session.execute(
                update(Device)
                .where(Device.id == devices[key]["id"])
                .values(
                    last_seen=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=minutes),
                    status="online" if key == "C-300" else "offline",
                )
            )
        await session.commit()
    response = await client.delete(
        f"/api/v1/devices/{devices['R_400']['id']}", headers=user.headers
    )
    assert response.status_code == 204
    devices["south"] = south
    devices["other_line"] = other_line
    return devices


async def test_device_filters_search_sort_and_paging(
    client: httpx.AsyncClient, admin_a: LoggedIn, plant_a: Plant, container: Container
) -> None:
    d = await _seed_devices(client, admin_a, plant_a, container)

    async def keys(**params: Any) -> list[str]:
        page = await get_page(client, admin_a, "/api/v1/devices", **params)
        assert page["meta"]["total"] == len(page["data"]) or "per_page" in params
        return [x["device_key"] for x in page["data"]]

    # By name, case-insensitively.
    assert await keys() == ["M01", "C-300", "P-100", "P-200", "R_400"]
    assert await keys(search="PRESS") == ["P-100", "P-200"]
    assert await keys(search="sn-") == ["P-100", "P-200"]  # serial, case-insensitive
    assert await keys(search="fanuc") == ["R_400"]  # manufacturer
    assert await keys(search="rm 8") == ["C-300"]  # model
    assert await keys(search="r_4") == ["R_400"]  # device_key
    # LIKE wildcards in the search text are literal.
    assert await keys(search="%") == ["C-300"]
    assert await keys(search="_") == ["R_400"]
    assert await keys(line_id=plant_a.line["id"]) == ["M01"]
    assert await keys(area_id=plant_a.area["id"]) == ["M01", "P-100"]
    assert await keys(site_id=d["south"]["id"]) == ["C-300", "P-200"]
    assert await keys(kind="press") == ["P-100", "P-200"]
    assert await keys(criticality="high") == ["C-300"]
    assert await keys(is_active="false") == ["R_400"]
    assert await keys(status="online") == ["C-300"]
    assert await keys(status="unknown") == ["M01", "P-200", "R_400"]
    assert await keys(is_active="true", kind="press", search="two") == ["P-200"]
    assert await keys(sort="-criticality,name") == ["P-100", "C-300", "M01", "R_400", "P-200"]
    assert await keys(sort="criticality,-name") == ["P-200", "R_400", "M01", "C-300", "P-100"]
    # Never-seen devices sort last in either direction, on every backend.
    assert (await keys(sort="-last_seen"))[:2] == ["C-300", "P-100"]
    assert (await keys(sort="last_seen"))[:2] == ["P-100", "C-300"]
    assert await keys(sort="device_key") == ["C-300", "M01", "P-100", "P-200", "R_400"]
    assert await keys(sort="-kind,device_key") == [
        "R_400",
        "P-100",
        "P-200",
        "C-300",
        "M01",
    ]

    page = await get_page(client, admin_a, "/api/v1/devices", sort="device_key", per_page=2, page=2)
    assert [x["device_key"] for x in page["data"]] == ["P-100", "P-200"]
    assert page["meta"] == {"page": 2, "per_page": 2, "total": 5}
    page = await get_page(client, admin_a, "/api/v1/devices", per_page=2, page=9)
    assert page["data"] == [] and page["meta"]["total"] == 5

    for params, path in [
        ({"sort": "secret"}, "query.sort"),
        ({"criticality": "urgent"}, "query.criticality"),
        ({"status": "sleepy"}, "query.status"),
        ({"line_id": "x"}, "query.line_id"),
        ({"per_page": 501}, "query.per_page"),
        ({"search": "s" * 201}, "query.search"),
        ({"search": "nul\x00"}, "query.search"),
    ]:
        response = await client.get("/api/v1/devices", params=params, headers=admin_a.headers)
        problem = assert_problem(response, 422, "validation_error")
        assert problem["errors"][0]["path"] == path


async def test_duplicate_device_key(
    client: httpx.AsyncClient, admin_a: LoggedIn, admin_b: LoggedIn, plant_a: Plant
) -> None:
    response = await client.post(
        "/api/v1/devices", json={"device_key": "M01", "name": "twin"}, headers=admin_a.headers
    )
    assert_problem(response, 409, "device_key_exists")
    other = await post(client, admin_a, "/api/v1/devices", {"device_key": "M02", "name": "M2"})
    rename = await client.patch(
        f"/api/v1/devices/{other['id']}", json={"device_key": "M01"}, headers=admin_a.headers
    )
    assert_problem(rename, 409, "device_key_exists")
    # Keys are unique per factory only.
    await post(client, admin_b, "/api/v1/devices", {"device_key": "M01", "name": "B's M01"})
    assert (await get_page(client, admin_a, "/api/v1/devices"))["meta"]["total"] == 2


async def test_invalid_device_bodies_write_nothing(
    client: httpx.AsyncClient, admin_a: LoggedIn, container: Container
) -> None:
    ok = {"device_key": "M01", "name": "Mill"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({**ok, "colour": "red"}, "body.colour"),
        ({**ok, "name": 42}, "body.name"),
        ({**ok, "name": "n" * 201}, "body.name"),
        ({**ok, "manufacturer": "m" * 201}, "body.manufacturer"),
        ({**ok, "location": "l" * 301}, "body.location"),
        ({**ok, "kind": "k" * 65}, "body.kind"),
        ({**ok, "device_key": "k" * 101}, "body.device_key"),
        ({**ok, "device_key": ""}, "body.device_key"),
        ({**ok, "device_key": "line/1"}, "body.device_key"),
        ({**ok, "device_key": "m+"}, "body.device_key"),
        ({**ok, "device_key": "m#"}, "body.device_key"),
        ({**ok, "device_key": "-m01"}, "body.device_key"),
        ({**ok, "device_key": "m 01"}, "body.device_key"),
        ({**ok, "criticality": "urgent"}, "body.criticality"),
        ({**ok, "is_active": "maybe"}, "body.is_active"),
        ({**ok, "line_id": "first"}, "body.line_id"),
        ({**ok, "line_id": 0}, "body.line_id"),
        ({**ok, "line_id": 4242}, "body.line_id"),
        ({**ok, "metadata": [1, 2]}, "body.metadata"),
        ({**ok, "metadata": {f"k{i}": i for i in range(65)}}, "body.metadata"),
        ({**ok, "metadata": {"blob": "x" * 17_000}}, "body.metadata"),
        ({**ok, "metadata": {"a": "nul\x00"}}, "body.metadata"),
        ({"name": "no key"}, "body.device_key"),
    ]
    for body, path in cases:
        response = await client.post("/api/v1/devices", json=body, headers=admin_a.headers)
        problem = assert_problem(response, 422, "validation_error")
        assert path in [e["path"] for e in problem["errors"]], (body, problem)
    assert (await get_page(client, admin_a, "/api/v1/devices"))["meta"]["total"] == 0
    assert await audit_actions(container, admin_a.factory_id) == []

    # The largest metadata allowed is accepted.
    big = {f"k{i:02}": "v" * 200 for i in range(64)}
    await post(client, admin_a, "/api/v1/devices", {**ok, "metadata": big})


async def test_invalid_patch_changes_nothing(
    client: httpx.AsyncClient, admin_a: LoggedIn, admin_b: LoggedIn, plant_a: Plant
) -> None:
    b_plant_line = await post(client, admin_b, "/api/v1/sites", {"name": "B"})
    b_area = await post(
        client, admin_b, "/api/v1/areas", {"site_id": b_plant_line["id"], "name": "B"}
    )
    b_line = await post(client, admin_b, "/api/v1/lines", {"area_id": b_area["id"], "name": "B"})
    url = f"/api/v1/devices/{plant_a.device['id']}"
    for body, path in [
        ({"name": "ok", "line_id": b_line["id"]}, "body.line_id"),
        ({"name": "ok", "criticality": None}, "body.criticality"),
        ({"name": None}, "body.name"),
        ({"name": "ok", "is_active": None}, "body.is_active"),
        ({"name": "ok", "factory": 2}, "body.factory"),
    ]:
        response = await client.patch(url, json=body, headers=admin_a.headers)
        problem = assert_problem(response, 422, "validation_error")
        assert [e["path"] for e in problem["errors"]] == [path], body
    assert await get_data(client, admin_a, url) == plant_a.device


async def test_factory_id_in_body_is_ignored(
    client: httpx.AsyncClient, admin_a: LoggedIn, admin_b: LoggedIn
) -> None:
    device = await post(
        client,
        admin_a,
        "/api/v1/devices",
        {"device_key": "M09", "name": "Mine", "factory_id": admin_b.factory_id},
    )
    assert (await get_page(client, admin_b, "/api/v1/devices"))["meta"]["total"] == 0
    assert_problem(
        await client.get(f"/api/v1/devices/{device['id']}", headers=admin_b.headers), 404
    )
    assert (await get_data(client, admin_a, f"/api/v1/devices/{device['id']}"))["name"] == "Mine"
    site = await post(
        client, admin_a, "/api/v1/sites", {"name": "S", "factory_id": admin_b.factory_id}
    )
    assert (await get_page(client, admin_b, "/api/v1/sites"))["meta"]["total"] == 0
    assert (await get_data(client, admin_a, f"/api/v1/sites/{site['id']}"))["name"] == "S"


async def test_decommission_revokes_keys_and_patch_re_enables(
    client: httpx.AsyncClient, admin_a: LoggedIn, plant_a: Plant, container: Container
) -> None:
    url = f"/api/v1/devices/{plant_a.device['id']}"
    key = (await post(client, admin_a, f"{url}/keys", {"name": "plc"}))["key"]
    assert (await client.get("/api/v1/device/me", headers={"X-Device-Key": key})).status_code == 200

    assert (await client.delete(url, headers=admin_a.headers)).status_code == 204
    device = await get_data(client, admin_a, url)
    assert device["is_active"] is False
    keys = await get_page(client, admin_a, f"{url}/keys")
    assert keys["data"][0]["revoked_at"] is not None
    assert_problem(
        await client.get("/api/v1/device/me", headers={"X-Device-Key": key}),
        401,
        "device_key_invalid",
    )
    assert_problem(
        await client.post(f"{url}/keys", headers=admin_a.headers), 409, "device_inactive"
    )
    # Decommissioning again is harmless.
    assert (await client.delete(url, headers=admin_a.headers)).status_code == 204

    response = await client.patch(url, json={"is_active": True}, headers=admin_a.headers)
    assert response.status_code == 200 and response.json()["data"]["is_active"] is True
    # Old keys stay revoked; a new one works.
    assert_problem(await client.get("/api/v1/device/me", headers={"X-Device-Key": key}), 401)
    new_key = (await post(client, admin_a, f"{url}/keys"))["key"]
    me = await client.get("/api/v1/device/me", headers={"X-Device-Key": new_key})
    assert me.status_code == 200

    # The repeated decommission changed nothing, so it left no audit row.
    assert (await audit_actions(container, admin_a.factory_id))[3:] == [
        "device.create",
        "device_key.create",
        "device.delete",
        "device.update",
        "device_key.create",
    ]
    delete_rows = [
        r for r in await audit_rows(container, admin_a.factory_id) if r.action == "device.delete"
    ]
    assert delete_rows[0].before == {"is_active": True, "keys_revoked": None}
    assert delete_rows[0].after == {"is_active": False, "keys_revoked": 1}


async def test_purge_deletes_device_and_what_it_owns(
    client: httpx.AsyncClient, admin_a: LoggedIn, plant_a: Plant, container: Container
) -> None:
    device_id = plant_a.device["id"]
    url = f"/api/v1/devices/{device_id}"
    await post(client, admin_a, f"{url}/keys")
    await post(client, admin_a, f"{url}/parameters", {"key": "temp"})
    group = await post(client, admin_a, "/api/v1/groups", {"name": "G"})
    put = await client.put(
        f"/api/v1/groups/{group['id']}/devices",
        json={"device_ids": [device_id]},
        headers=admin_a.headers,
    )
    assert put.status_code == 200

    response = await client.delete(url, params={"purge": "true"}, headers=admin_a.headers)
    assert response.status_code == 204
    assert_problem(await client.get(url, headers=admin_a.headers), 404, "device_not_found")
    assert (await get_data(client, admin_a, f"/api/v1/groups/{group['id']}"))["device_count"] == 0
    # The line can go now.
    line_url = f"/api/v1/lines/{plant_a.line['id']}"
    assert (await client.delete(line_url, headers=admin_a.headers)).status_code == 204
    async with container.db.session() as session:
        for table_count in (
            select(func.count()).select_from(DeviceKey),
            select(func.count()).select_from(DeviceParameter),
            select(func.count()).select_from(device_group_members),
        ):
            assert await session.scalar(table_count) == 0
    purge = [
        r for r in await audit_rows(container, admin_a.factory_id) if r.action == "device.purge"
    ]
    assert len(purge) == 1
    assert purge[0].before is not None and purge[0].before["device_key"] == "M01"
