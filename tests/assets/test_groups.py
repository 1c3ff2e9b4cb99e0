"""Device groups and their membership, through the HTTP API."""

from __future__ import annotations

from typing import Any

import httpx

from plantwatch.app import Container
from tests.assets.conftest import audit_rows, get_data, get_page, post
from tests.conftest import LoggedIn, assert_problem


async def _devices(client: httpx.AsyncClient, user: LoggedIn, *keys: str) -> list[dict[str, Any]]:
    return [
        await post(client, user, "/api/v1/devices", {"device_key": key, "name": f"Device {key}"})
        for key in keys
    ]


async def test_group_crud_and_member_counts(
    client: httpx.AsyncClient, admin_a: LoggedIn, container: Container
) -> None:
    d1, d2, d3 = await _devices(client, admin_a, "D1", "D2", "D3")
    presses = await post(
        client, admin_a, "/api/v1/groups", {"name": "Presses", "description": "All presses"}
    )
    assert presses["device_count"] == 0
    mills = await post(client, admin_a, "/api/v1/groups", {"name": "mills"})
    url = f"/api/v1/groups/{presses['id']}"

    response = await client.put(
        f"{url}/devices",
        json={"device_ids": [d1["id"], d2["id"], d1["id"]]},
        headers=admin_a.headers,
    )
    assert response.status_code == 200, response.text
    assert response.json()["data"]["device_count"] == 2

    page = await get_page(client, admin_a, "/api/v1/groups")
    assert [(g["name"], g["device_count"]) for g in page["data"]] == [
        ("mills", 0),
        ("Presses", 2),
    ]
    page = await get_page(client, admin_a, "/api/v1/groups", sort="-device_count")
    assert [g["name"] for g in page["data"]] == ["Presses", "mills"]
    page = await get_page(client, admin_a, "/api/v1/groups", search="all pre")
    assert [g["name"] for g in page["data"]] == ["Presses"]

    renamed = await client.patch(
        url, json={"name": "Press shop", "description": None}, headers=admin_a.headers
    )
    assert renamed.status_code == 200
    assert renamed.json()["data"] | {"updated_at": None} == {
        **presses,
        "name": "Press shop",
        "description": None,
        "device_count": 2,
        "updated_at": None,
    }
    assert_problem(
        await client.patch(
            f"/api/v1/groups/{mills['id']}", json={"name": "Press shop"}, headers=admin_a.headers
        ),
        409,
        "group_exists",
    )
    assert_problem(
        await client.post("/api/v1/groups", json={"name": "mills"}, headers=admin_a.headers),
        409,
        "group_exists",
    )

    # The devices list filters by group too.
    page = await get_page(client, admin_a, "/api/v1/devices", group_id=presses["id"])
    assert [d["device_key"] for d in page["data"]] == ["D1", "D2"]

    assert (await client.delete(url, headers=admin_a.headers)).status_code == 204
    assert_problem(await client.get(url, headers=admin_a.headers), 404, "group_not_found")
    # Deleting a group leaves its devices alone.
    assert (await get_data(client, admin_a, f"/api/v1/devices/{d3['id']}"))["is_active"]
    assert (await get_page(client, admin_a, "/api/v1/devices"))["meta"]["total"] == 3

    actions = [
        (r.action, r.before, r.after)
        for r in await audit_rows(container, admin_a.factory_id)
        if r.entity_type == "device_group"
    ]
    assert [a[0] for a in actions] == [
        "group.create",
        "group.create",
        "group.members_set",
        "group.update",
        "group.delete",
    ]
    assert actions[2][1:] == ({"device_ids": []}, {"device_ids": sorted([d1["id"], d2["id"]])})
    assert actions[4][1] is not None and actions[4][1]["device_ids"] == [d1["id"], d2["id"]]


async def test_membership_put_add_remove(
    client: httpx.AsyncClient, admin_a: LoggedIn, container: Container
) -> None:
    d1, d2, d3 = await _devices(client, admin_a, "D1", "D2", "D3")
    group = await post(client, admin_a, "/api/v1/groups", {"name": "G"})
    url = f"/api/v1/groups/{group['id']}/devices"
    h = admin_a.headers

    async def members() -> list[str]:
        page = await get_page(client, admin_a, url, sort="device_key")
        return [d["device_key"] for d in page["data"]]

    assert (await client.put(url, json={"device_ids": [d1["id"]]}, headers=h)).status_code == 200
    added = await client.post(url, json={"device_ids": [d1["id"], d3["id"]]}, headers=h)
    assert added.status_code == 200 and added.json()["data"]["device_count"] == 2
    assert await members() == ["D1", "D3"]
    page = await get_page(client, admin_a, url, search="d3")
    assert [d["device_key"] for d in page["data"]] == ["D3"]

    response = await client.put(url, json={"device_ids": [d2["id"]]}, headers=h)
    assert response.json()["data"]["device_count"] == 1
    assert await members() == ["D2"]

    removed = await client.delete(f"{url}/{d2['id']}", headers=h)
    assert removed.status_code == 204
    assert await members() == []
    assert_problem(await client.delete(f"{url}/{d2['id']}", headers=h), 404, "member_not_found")

    assert (await client.put(url, json={"device_ids": [d1["id"]]}, headers=h)).status_code == 200
    cleared = await client.put(url, json={"device_ids": []}, headers=h)
    assert cleared.json()["data"]["device_count"] == 0

    actions = [
        r.action
        for r in await audit_rows(container, admin_a.factory_id)
        if r.entity_type == "device_group"
    ]
    assert actions == [
        "group.create",
        "group.members_set",
        "group.members_add",
        "group.members_set",
        "group.members_remove",
        "group.members_set",
        "group.members_set",
    ]


async def test_members_must_be_own_devices(
    client: httpx.AsyncClient, admin_a: LoggedIn, admin_b: LoggedIn
) -> None:
    d1, d2 = await _devices(client, admin_a, "D1", "D2")
    (b_device,) = await _devices(client, admin_b, "B1")
    group = await post(client, admin_a, "/api/v1/groups", {"name": "G"})
    url = f"/api/v1/groups/{group['id']}/devices"
    h = admin_a.headers
    assert (await client.put(url, json={"device_ids": [d1["id"]]}, headers=h)).status_code == 200

    for method in ("PUT", "POST"):
        for ids, path in [
            ([d1["id"], d2["id"], b_device["id"]], "body.device_ids[2]"),
            ([999_999], "body.device_ids[0]"),
            ([d1["id"], "x"], "body.device_ids[1]"),
            ([0], "body.device_ids[0]"),
        ]:
            response = await client.request(method, url, json={"device_ids": ids}, headers=h)
            problem = assert_problem(response, 422, "validation_error")
            assert [e["path"] for e in problem["errors"]] == [path], (method, ids)
    too_many = await client.put(url, json={"device_ids": list(range(1, 1002))}, headers=h)
    assert assert_problem(too_many, 422)["errors"][0]["path"] == "body.device_ids"
    missing = await client.put(url, json={}, headers=h)
    assert assert_problem(missing, 422)["errors"][0]["path"] == "body.device_ids"

    page = await get_page(client, admin_a, url)
    assert [d["id"] for d in page["data"]] == [d1["id"]]
    # Another factory's device is not in the group whatever its id.
    assert_problem(await client.delete(f"{url}/{b_device['id']}", headers=h), 404)
    assert (await get_data(client, admin_a, f"/api/v1/groups/{group['id']}"))["device_count"] == 1
