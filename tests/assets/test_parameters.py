"""Device parameters: predefinition, limits and their order, through the HTTP API."""

from __future__ import annotations

from typing import Any

import httpx

from plantwatch.app import Container
from tests.assets.conftest import Plant, audit_rows, get_data, get_page, post
from tests.conftest import LoggedIn, assert_problem


async def test_parameter_round_trip(
    client: httpx.AsyncClient, admin_a: LoggedIn, plant_a: Plant, container: Container
) -> None:
    base = f"/api/v1/devices/{plant_a.device['id']}/parameters"
    body = {
        "key": "spindle_temp",
        "display_name": "Spindle temperature",
        "unit": "°C",
        "data_type": "float",
        "is_kpi": True,
        "warning_high": 70,
        "critical_high": 85.5,
    }
    temp = await post(client, admin_a, base, body)
    for key, value in body.items():
        assert temp[key] == value, key
    assert temp["device_id"] == plant_a.device["id"]
    assert temp["warning_low"] is None and temp["critical_low"] is None
    flow = await post(client, admin_a, base, {"key": "coolant.flow", "unit": "l/min"})
    assert (flow["data_type"], flow["is_kpi"]) == ("float", False)
    await post(client, admin_a, base, {"key": "door_open", "data_type": "bool"})

    page = await get_page(client, admin_a, base)
    assert [p["key"] for p in page["data"]] == ["coolant.flow", "door_open", "spindle_temp"]
    assert page["meta"]["total"] == 3
    page = await get_page(client, admin_a, base, is_kpi="true")
    assert [p["key"] for p in page["data"]] == ["spindle_temp"]
    page = await get_page(client, admin_a, base, search="TEMPERATURE")
    assert [p["key"] for p in page["data"]] == ["spindle_temp"]
    page = await get_page(client, admin_a, base, sort="-key", per_page=1)
    assert [p["key"] for p in page["data"]] == ["spindle_temp"]
    assert page["meta"] == {"page": 1, "per_page": 1, "total": 3}

    url = f"{base}/{temp['id']}"
    assert await get_data(client, admin_a, url) == temp
    response = await client.patch(
        url,
        json={"display_name": "Spindle", "warning_low": 5, "critical_high": None},
        headers=admin_a.headers,
    )
    assert response.status_code == 200, response.text
    changed = response.json()["data"]
    assert (changed["display_name"], changed["warning_low"], changed["critical_high"]) == (
        "Spindle",
        5,
        None,
    )
    assert changed["warning_high"] == 70 and changed["unit"] == "°C"

    assert (await client.delete(url, headers=admin_a.headers)).status_code == 204
    assert_problem(await client.get(url, headers=admin_a.headers), 404, "parameter_not_found")
    assert (await get_page(client, admin_a, base))["meta"]["total"] == 2

    actions = [
        r.action
        for r in await audit_rows(container, admin_a.factory_id)
        if r.entity_type == "device_parameter"
    ]
    assert actions == [
        "parameter.create",
        "parameter.create",
        "parameter.create",
        "parameter.update",
        "parameter.delete",
    ]


async def test_duplicate_key_and_immutable_key(
    client: httpx.AsyncClient, admin_a: LoggedIn, plant_a: Plant
) -> None:
    base = f"/api/v1/devices/{plant_a.device['id']}/parameters"
    temp = await post(client, admin_a, base, {"key": "temp"})
    assert_problem(
        await client.post(base, json={"key": "temp"}, headers=admin_a.headers),
        409,
        "parameter_exists",
    )
    other = await post(client, admin_a, "/api/v1/devices", {"device_key": "M02", "name": "M2"})
    await post(client, admin_a, f"/api/v1/devices/{other['id']}/parameters", {"key": "temp"})
    # The key names the series; it cannot be renamed.
    rename = await client.patch(
        f"{base}/{temp['id']}", json={"key": "temperature"}, headers=admin_a.headers
    )
    assert assert_problem(rename, 422)["errors"][0]["path"] == "body.key"


async def test_limits_must_be_ordered(
    client: httpx.AsyncClient, admin_a: LoggedIn, plant_a: Plant
) -> None:
    base = f"/api/v1/devices/{plant_a.device['id']}/parameters"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"warning_low": 10, "warning_high": 10}, "body.warning_high"),
        ({"warning_low": 20, "warning_high": 10}, "body.warning_high"),
        ({"critical_low": 6, "warning_low": 5}, "body.warning_low"),
        ({"warning_high": 90, "critical_high": 80}, "body.critical_high"),
        ({"critical_low": 100, "critical_high": 100}, "body.critical_high"),
        ({"critical_low": 50, "warning_high": 40}, "body.warning_high"),
        ({"data_type": "string", "warning_high": 1}, "body.warning_high"),
        ({"data_type": "bool", "critical_low": 0}, "body.critical_low"),
        ({"data_type": "complex"}, "body.data_type"),
        ({"warning_low": "low"}, "body.warning_low"),
        ({"key": "bad key"}, "body.key"),
        ({"key": "k" * 101}, "body.key"),
        ({"unit": "u" * 33}, "body.unit"),
        ({"display_name": "d" * 201}, "body.display_name"),
    ]
    for extra, path in bad:
        body = {"key": "temp", **extra}
        response = await client.post(base, json=body, headers=admin_a.headers)
        problem = assert_problem(response, 422, "validation_error")
        assert [e["path"] for e in problem["errors"]] == [path], (body, problem)
    nan = await client.post(
        base,
        content=b'{"key": "temp", "warning_high": NaN}',
        headers={**admin_a.headers, "content-type": "application/json"},
    )
    assert assert_problem(nan, 422)["errors"][0]["path"] == "body.warning_high"
    assert (await get_page(client, admin_a, base))["meta"]["total"] == 0

    # Equal limits are fine where the order allows it.
    good = await post(
        client,
        admin_a,
        base,
        {
            "key": "temp",
            "critical_low": 0,
            "warning_low": 0,
            "warning_high": 80,
            "critical_high": 80,
        },
    )
    url = f"{base}/{good['id']}"
    # A PATCH is checked against the stored limits it leaves alone.
    for body, path in [
        ({"warning_low": 90}, "body.warning_low"),
        ({"critical_high": 70}, "body.critical_high"),
        ({"data_type": "string"}, "body.data_type"),
    ]:
        response = await client.patch(url, json=body, headers=admin_a.headers)
        problem = assert_problem(response, 422, "validation_error")
        assert [e["path"] for e in problem["errors"]] == [path], body
    assert await get_data(client, admin_a, url) == good
    response = await client.patch(
        url,
        json={
            "data_type": "string",
            "critical_low": None,
            "warning_low": None,
            "warning_high": None,
            "critical_high": None,
        },
        headers=admin_a.headers,
    )
    assert response.status_code == 200 and response.json()["data"]["data_type"] == "string"
