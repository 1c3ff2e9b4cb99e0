"""The audit log: what each mutation records, filters, order, and tz-aware ranges."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx

from plantwatch.tenancy.models import Factory
from tests.conftest import LoggedIn, LoginAs, assert_problem

AUDIT = "/api/v1/audit"


async def entries(
    client: httpx.AsyncClient, admin: LoggedIn, **params: Any
) -> list[dict[str, Any]]:
    response = await client.get(AUDIT, params={"per_page": 500, **params}, headers=admin.headers)
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


async def test_user_lifecycle_is_audited_with_diffs(
    client: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    created = await client.post(
        "/api/v1/users",
        json={"email": "w@acme.example", "password": "s3cret-enough", "role": "viewer"},
        headers=admin_a.headers,
    )
    uid = created.json()["data"]["id"]
    await client.patch(
        f"/api/v1/users/{uid}",
        json={"role": "technician", "full_name": "Wen"},
        headers=admin_a.headers,
    )
    await client.patch(f"/api/v1/users/{uid}", json={}, headers=admin_a.headers)  # no change
    await client.delete(f"/api/v1/users/{uid}", headers=admin_a.headers)

    log = await entries(client, admin_a, entity_type="user", entity_id=str(uid))
    assert [e["action"] for e in log] == ["user.deactivate", "user.update", "user.create"]
    deactivate, update, create = log
    assert create["before"] is None
    assert create["after"]["email"] == "w@acme.example" and create["after"]["role"] == "viewer"
    assert "password_hash" not in create["after"]
    # Updates keep only what changed.
    assert update["before"] == {"role": "viewer", "full_name": None}
    assert update["after"] == {"role": "technician", "full_name": "Wen"}
    assert deactivate["before"] == {"is_active": True}
    assert deactivate["after"] == {"is_active": False}
    for entry in log:
        assert entry["user_id"] == admin_a.user_id
        assert entry["actor"] == admin_a.email
        assert entry["ip"] == "203.0.113.7"
        assert entry["request_id"]


async def test_newest_first_filters_and_paging(
    client: httpx.AsyncClient, admin_a: LoggedIn, login_as: LoginAs, factory_a: Factory
) -> None:
    manager = await login_as(factory_a, "factory_manager")
    await client.patch("/api/v1/factory", json={"name": "Acme Two"}, headers=manager.headers)
    await client.patch(
        "/api/v1/factory", json={"timezone": "Asia/Ho_Chi_Minh"}, headers=admin_a.headers
    )

    log = await entries(client, admin_a)
    stamps = [e["at"] for e in log]
    assert stamps == sorted(stamps, reverse=True)
    assert log[0]["action"] == "factory.update" and log[0]["after"] == {
        "timezone": "Asia/Ho_Chi_Minh"
    }

    by_manager = await entries(client, admin_a, user_id=manager.user_id)
    assert by_manager and all(e["user_id"] == manager.user_id for e in by_manager)
    assert {e["action"] for e in by_manager} == {"auth.login", "factory.update"}
    updates = await entries(client, admin_a, action="factory.update")
    assert [e["after"] for e in updates] == [{"timezone": "Asia/Ho_Chi_Minh"}, {"name": "Acme Two"}]
    factory_log = await entries(client, admin_a, entity_type="factory")
    assert [e["action"] for e in factory_log] == [
        "factory.update",
        "factory.update",
        "factory.create",
    ]

    page = await client.get(AUDIT, params={"per_page": 2, "page": 1}, headers=admin_a.headers)
    body = page.json()
    assert body["meta"]["total"] == len(log) and body["meta"]["per_page"] == 2
    assert [e["id"] for e in body["data"]] == [e["id"] for e in log[:2]]


async def test_time_range(client: httpx.AsyncClient, admin_a: LoggedIn) -> None:
    log = await entries(client, admin_a)
    newest = dt.datetime.fromisoformat(log[0]["at"])
    future = (newest + dt.timedelta(hours=1)).isoformat()
    assert await entries(client, admin_a, start=future) == []
    everything = await entries(client, admin_a, start="2000-01-01T00:00:00Z", end=future)
    assert len(everything) == len(log)
    # Offsets are honoured: the same instant written in another zone.
    in_hanoi = (newest + dt.timedelta(seconds=1)).astimezone(dt.timezone(dt.timedelta(hours=7)))
    assert len(await entries(client, admin_a, end=in_hanoi.isoformat())) == len(log)
    assert await entries(client, admin_a, end="2000-01-01T07:00:00+07:00") == []


async def test_naive_and_bad_ranges_are_422(client: httpx.AsyncClient, admin_a: LoggedIn) -> None:
    for params, path in [
        ({"start": "2026-01-01T00:00:00"}, "query.start"),
        ({"end": "2026-01-01T00:00:00"}, "query.end"),
        ({"start": "yesterday"}, "query.start"),
        ({"start": "2026-02-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"}, "query.end"),
        ({"user_id": "abc"}, "query.user_id"),
        ({"user_id": str(2**64)}, "query.user_id"),
        ({"action": "x" * 65}, "query.action"),
        ({"entity_id": "1\x00"}, "query.entity_id"),
    ]:
        response = await client.get(AUDIT, params=params, headers=admin_a.headers)
        errors = assert_problem(response, 422, "validation_error")["errors"]
        assert [e["path"] for e in errors] == [path], params


async def test_failed_mutation_writes_no_audit(
    client: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    before = await entries(client, admin_a)
    refused = await client.patch(
        f"/api/v1/users/{admin_a.user_id}", json={"role": "viewer"}, headers=admin_a.headers
    )
    assert_problem(refused, 409, "last_super_admin")
    duplicate = await client.post(
        "/api/v1/users",
        json={"email": admin_a.email, "password": "s3cret-enough", "role": "viewer"},
        headers=admin_a.headers,
    )
    assert_problem(duplicate, 409)
    assert await entries(client, admin_a) == before


async def test_audit_needs_permission(
    client: httpx.AsyncClient, login_as: LoginAs, factory_a: Factory
) -> None:
    engineer = await login_as(factory_a, "maintenance_engineer")
    body = assert_problem(await client.get(AUDIT, headers=engineer.headers), 403)
    assert body["permission"] == "audit:read"
    manager = await login_as(factory_a, "factory_manager")
    assert (await client.get(AUDIT, headers=manager.headers)).status_code == 200
