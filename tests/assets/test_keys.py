"""Device credentials and device authentication (X-Device-Key, /device/me)."""

from __future__ import annotations

import hashlib

import httpx
from sqlalchemy import select, text, update

from plantwatch.app import Container
from plantwatch.assets.models import DeviceKey
from plantwatch.tenancy.models import Factory
from tests.assets.conftest import Plant, audit_rows, get_page, post
from tests.conftest import LoggedIn, LoginAs, assert_problem


async def test_key_is_shown_once_and_hashed_at_rest(
    client: httpx.AsyncClient, admin_a: LoggedIn, plant_a: Plant, container: Container
) -> None:
    base = f"/api/v1/devices/{plant_a.device['id']}/keys"
    issued = await post(client, admin_a, base, {"name": "PLC gateway"})
    assert set(issued) == {"id", "key", "prefix", "name", "created_at"}
    key = issued["key"]
    assert key.startswith("pwd_") and len(key) >= 40
    assert key.startswith(issued["prefix"]) and len(issued["prefix"]) < len(key) // 2
    assert issued["name"] == "PLC gateway"
    unnamed = await client.post(base, headers=admin_a.headers)  # the body is optional
    assert unnamed.status_code == 201 and unnamed.json()["data"]["name"] is None
    assert unnamed.json()["data"]["key"] != key

    listing = await get_page(client, admin_a, base)
    assert listing["meta"]["total"] == 2
    assert all("key" not in k and "key_hash" not in k for k in listing["data"])
    assert listing["data"][1]["id"] == issued["id"]  # newest first
    assert listing["data"][1]["prefix"] == issued["prefix"]
    assert listing["data"][1]["revoked_at"] is None

    async with container.db.session() as session:
        stored = await session.scalar(select(DeviceKey).where(DeviceKey.id == issued["id"]))
        assert stored is not None
        assert stored.key_hash == hashlib.sha256(key.encode()).hexdigest()
        # Nowhere in the row, nor in the audit log, is the key itself.
        raw_rows = (await session.execute(text("SELECT * FROM device_keys"))).all()
        audit = (await session.execute(text("SELECT * FROM audit_log"))).all()
    for row in [*raw_rows, *audit]:
        assert all(key not in str(value) for value in row), row

    created = [
        r for r in await audit_rows(container, admin_a.factory_id) if r.entity_type == "device_key"
    ]
    assert [r.action for r in created] == ["device_key.create", "device_key.create"]
    assert created[0].after is not None and "key_hash" not in created[0].after


async def test_device_me_and_revocation(
    client: httpx.AsyncClient, admin_a: LoggedIn, plant_a: Plant, container: Container
) -> None:
    base = f"/api/v1/devices/{plant_a.device['id']}/keys"
    issued = await post(client, admin_a, base)
    headers = {"X-Device-Key": issued["key"]}

    me = await client.get("/api/v1/device/me", headers=headers)
    assert me.status_code == 200, me.text
    data = me.json()["data"]
    assert data["device"]["id"] == plant_a.device["id"]
    assert data["device"]["line_name"] == "Line 1"
    assert data["factory"] == {"id": admin_a.factory_id, "slug": "acme", "name": "Acme Precision"}
    assert data["mqtt_topic"] == "factories/acme/devices/M01/telemetry"
    listing = await get_page(client, admin_a, base)
    assert listing["data"][0]["last_used_at"] is not None

    # A user token is not a device key, and the device key is not a user token.
    assert_problem(
        await client.get("/api/v1/device/me", headers=admin_a.headers), 401, "device_key_invalid"
    )
    assert_problem(
        await client.get("/api/v1/devices", headers={"Authorization": f"Bearer {issued['key']}"}),
        401,
    )
    for bad in ("", "pwd_nope", issued["key"] + "x", "x" * 500):
        response = await client.get("/api/v1/device/me", headers={"X-Device-Key": bad})
        problem = assert_problem(response, 401, "device_key_invalid")
        assert "pwd_" not in problem["detail"]

    revoked = await client.delete(f"{base}/{issued['id']}", headers=admin_a.headers)
    assert revoked.status_code == 204
    assert_problem(
        await client.get("/api/v1/device/me", headers=headers), 401, "device_key_invalid"
    )
    # Revoking again is a no-op; an unknown key id is 404.
    assert (
        await client.delete(f"{base}/{issued['id']}", headers=admin_a.headers)
    ).status_code == 204
    assert_problem(
        await client.delete(f"{base}/999999", headers=admin_a.headers), 404, "device_key_not_found"
    )
    listing = await get_page(client, admin_a, base)
    assert listing["data"][0]["revoked_at"] is not None

    actions = [
        r.action
        for r in await audit_rows(container, admin_a.factory_id)
        if r.entity_type == "device_key"
    ]
    assert actions == ["device_key.create", "device_key.revoke"]


async def test_suspended_device_is_refused_until_re_enabled(
    client: httpx.AsyncClient, admin_a: LoggedIn, plant_a: Plant
) -> None:
    url = f"/api/v1/devices/{plant_a.device['id']}"
    key = (await post(client, admin_a, f"{url}/keys"))["key"]
    headers = {"X-Device-Key": key}
    await client.patch(url, json={"is_active": False}, headers=admin_a.headers)
    assert_problem(
        await client.get("/api/v1/device/me", headers=headers), 401, "device_key_invalid"
    )
    # A PATCH suspends without revoking: re-enabling brings the same key back.
    await client.patch(url, json={"is_active": True}, headers=admin_a.headers)
    assert (await client.get("/api/v1/device/me", headers=headers)).status_code == 200


async def test_last_used_at_is_refreshed_only_when_stale(
    client: httpx.AsyncClient, admin_a: LoggedIn, plant_a: Plant, container: Container
) -> None:
    base = f"/api/v1/devices/{plant_a.device['id']}/keys"
    issued = await post(client, admin_a, base)
    headers = {"X-Device-Key": issued["key"]}
    assert (await client.get("/api/v1/device/me", headers=headers)).status_code == 200
    first = (await get_page(client, admin_a, base))["data"][0]["last_used_at"]
    assert (await client.get("/api/v1/device/me", headers=headers)).status_code == 200
    assert (await get_page(client, admin_a, base))["data"][0]["last_used_at"] == first

    async with container.db.session() as session:
        stored = await session.scalar(select(DeviceKey))
        assert stored is not None and stored.last_used_at is not None
        await session.execute(
            update(DeviceKey).values(last_used_at=stored.last_used_at.replace(year=2020))
        )
        await session.commit()
    assert (await client.get("/api/v1/device/me", headers=headers)).status_code == 200
    refreshed = (await get_page(client, admin_a, base))["data"][0]["last_used_at"]
    assert refreshed >= first


async def test_key_permissions(
    client: httpx.AsyncClient,
    login_as: LoginAs,
    factory_a: Factory,
    admin_a: LoggedIn,
    plant_a: Plant,
) -> None:
    base = f"/api/v1/devices/{plant_a.device['id']}/keys"
    issued = await post(client, admin_a, base)
    for role in ("technician", "viewer", "maintenance_manager"):
        user = await login_as(factory_a, role)
        for method, url in [
            ("POST", base),
            ("GET", base),
            ("DELETE", f"{base}/{issued['id']}"),
        ]:
            response = await client.request(method, url, headers=user.headers)
            problem = assert_problem(response, 403, "permission_denied")
            assert problem["permission"] == "devices:keys", (role, method)
    engineer = await login_as(factory_a, "maintenance_engineer")
    response = await client.post(base, json={"name": "eng"}, headers=engineer.headers)
    assert response.status_code == 201
    assert (await get_page(client, admin_a, base))["meta"]["total"] == 2
