"""Tenants never see each other; bad input is a clear 422 that writes nothing."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from plantwatch.tenancy.models import Factory
from tests.conftest import LoggedIn, LoginAs, assert_problem

USERS = "/api/v1/users"


async def user_count(client: httpx.AsyncClient, admin: LoggedIn) -> int:
    response = await client.get(USERS, headers=admin.headers)
    assert response.status_code == 200
    total: int = response.json()["meta"]["total"]
    return total


async def audit_count(client: httpx.AsyncClient, admin: LoggedIn) -> int:
    response = await client.get("/api/v1/audit", headers=admin.headers)
    assert response.status_code == 200
    total: int = response.json()["meta"]["total"]
    return total


async def test_other_factorys_user_is_404_everywhere(
    client: httpx.AsyncClient, admin_a: LoggedIn, admin_b: LoggedIn
) -> None:
    invited = await client.post(
        f"{USERS}/invite",
        json={"email": "p@acme.example", "role": "viewer"},
        headers=admin_a.headers,
    )
    pending_a = invited.json()["data"]["user"]["id"]
    for target in (admin_a.user_id, pending_a):
        for method, path, body in [
            ("GET", f"{USERS}/{target}", None),
            ("PATCH", f"{USERS}/{target}", {"role": "viewer"}),
            ("PATCH", f"{USERS}/{target}", {}),
            ("DELETE", f"{USERS}/{target}", None),
            ("POST", f"{USERS}/{target}/invite", None),
        ]:
            response = await client.request(method, path, json=body, headers=admin_b.headers)
            # Same answer as an id that exists nowhere: no hint that it exists elsewhere.
            assert_problem(response, 404, "user_not_found")
    # Nothing happened to A's users.
    me = await client.get("/api/v1/auth/me", headers=admin_a.headers)
    assert me.json()["data"]["user"]["role"] == "super_admin"
    still = await client.get(f"{USERS}/{pending_a}", headers=admin_a.headers)
    assert still.json()["data"]["is_active"] is True


async def test_lists_and_audit_stay_in_their_factory(
    client: httpx.AsyncClient, admin_a: LoggedIn, admin_b: LoggedIn
) -> None:
    await client.post(
        USERS,
        json={"email": "only-a@acme.example", "password": "s3cret-enough", "role": "viewer"},
        headers=admin_a.headers,
    )
    b_users = await client.get(USERS, params={"search": "acme"}, headers=admin_b.headers)
    assert b_users.json()["data"] == []
    b_all = await client.get(USERS, headers=admin_b.headers)
    assert [u["email"] for u in b_all.json()["data"]] == [admin_b.email]
    assert all(u["factory_id"] == admin_b.factory_id for u in b_all.json()["data"])

    b_audit = (await client.get("/api/v1/audit", headers=admin_b.headers)).json()["data"]
    assert b_audit and all(e["actor"] != admin_a.email for e in b_audit)
    assert not any(e["actor"] == "only-a@acme.example" for e in b_audit)
    by_a = await client.get(
        "/api/v1/audit", params={"user_id": admin_a.user_id}, headers=admin_b.headers
    )
    assert by_a.json()["data"] == []
    a_audit = (await client.get("/api/v1/audit", headers=admin_a.headers)).json()["data"]
    assert any(e["action"] == "user.create" and e["actor"] == admin_a.email for e in a_audit)

    # Each sees its own factory.
    assert (await client.get("/api/v1/factory", headers=admin_b.headers)).json()["data"][
        "slug"
    ] == "globex"


async def test_factory_id_in_body_is_ignored(
    client: httpx.AsyncClient, admin_a: LoggedIn, admin_b: LoggedIn
) -> None:
    response = await client.post(
        USERS,
        json={
            "email": "planted@globex.example",
            "password": "s3cret-enough",
            "role": "viewer",
            "factory_id": admin_a.factory_id,
        },
        headers=admin_b.headers,
    )
    assert response.status_code == 201
    assert response.json()["data"]["factory_id"] == admin_b.factory_id
    invite = await client.post(
        f"{USERS}/invite",
        json={"email": "i@globex.example", "role": "viewer", "factory_id": admin_a.factory_id},
        headers=admin_b.headers,
    )
    assert invite.json()["data"]["user"]["factory_id"] == admin_b.factory_id
    patched = await client.patch(
        "/api/v1/factory",
        json={"name": "Globex Renamed", "factory_id": admin_a.factory_id},
        headers=admin_b.headers,
    )
    assert patched.json()["data"]["id"] == admin_b.factory_id
    a_factory = await client.get("/api/v1/factory", headers=admin_a.headers)
    assert a_factory.json()["data"]["name"] == "Acme Precision"
    assert await user_count(client, admin_a) == 1


BAD_CREATES: list[tuple[dict[str, Any], set[str]]] = [
    (
        {"email": "a@acme.example", "password": "s3cret-enough", "role": "viewer", "admin": True},
        {"body.admin"},
    ),
    ({"email": "a@acme.example", "password": 12345678, "role": "viewer"}, {"body.password"}),
    ({"email": "a@acme.example", "password": "s3cret-enough", "role": 3}, {"body.role"}),
    ({"email": "a@acme.example", "password": "s3cret-enough", "role": "owner"}, {"body.role"}),
    (
        {
            "email": "a@acme.example",
            "password": "s3cret-enough",
            "role": "viewer",
            "full_name": "x" * 10_000,
        },
        {"body.full_name"},
    ),
    (
        {
            "email": "a@acme.example",
            "password": "s3cret-enough",
            "role": "viewer",
            "full_name": "Robert\x00'); DROP TABLE users;--",
        },
        {"body.full_name"},
    ),
    ({"email": "not an email", "password": "s3cret-enough", "role": "viewer"}, {"body.email"}),
    (
        {"email": "a@" + "x" * 300 + ".example", "password": "s3cret-enough", "role": "viewer"},
        {"body.email"},
    ),
    ({"email": "a@acme.example", "password": "short", "role": "viewer"}, {"body.password"}),
    ({"email": "a@acme.example", "password": "p" * 257, "role": "viewer"}, {"body.password"}),
    (
        {
            "email": "a@acme.example",
            "password": "s3cret-enough",
            "role": "viewer",
            "phone": "call me maybe",
        },
        {"body.phone"},
    ),
    (
        {
            "email": "a@acme.example",
            "password": "s3cret-enough",
            "role": "viewer",
            "permissions": "users:manage",
        },
        {"body.permissions"},
    ),
    (
        {
            "email": "a@acme.example",
            "password": "s3cret-enough",
            "role": "viewer",
            "permissions": ["users:read", "users:*"],
        },
        {"body.permissions[1]"},
    ),
    ({"password": "s3cret-enough", "role": "viewer"}, {"body.email"}),
    (
        {
            "email": "a@acme.example",
            "password": "s3cret-enough",
            "role": "viewer",
            "is_active": "yes",
        },
        {"body.is_active"},
    ),
]


@pytest.mark.parametrize(("body", "paths"), BAD_CREATES)
async def test_bad_create_is_422_and_writes_nothing(
    client: httpx.AsyncClient, admin_a: LoggedIn, body: dict[str, Any], paths: set[str]
) -> None:
    users_before = await user_count(client, admin_a)
    audit_before = await audit_count(client, admin_a)
    response = await client.post(USERS, json=body, headers=admin_a.headers)
    problem = assert_problem(response, 422, "validation_error")
    assert {e["path"] for e in problem["errors"]} == paths
    assert "s3cret-enough" not in response.text  # inputs are not echoed back
    assert await user_count(client, admin_a) == users_before
    assert await audit_count(client, admin_a) == audit_before


async def test_bad_patch_is_422_and_changes_nothing(
    client: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    target = f"{USERS}/{admin_a.user_id}"
    before = (await client.get(target, headers=admin_a.headers)).json()["data"]
    for body, path in [
        ({"full_name": "y" * 10_000}, "body.full_name"),
        ({"email": "new@acme.example"}, "body.email"),  # e-mail is not editable
        ({"password_hash": "x"}, "body.password_hash"),
        ({"is_active": None}, "body.is_active"),
        ({"permissions": None}, "body.permissions"),
        ({"role": "root"}, "body.role"),
    ]:
        response = await client.patch(target, json=body, headers=admin_a.headers)
        errors = assert_problem(response, 422, "validation_error")["errors"]
        assert [e["path"] for e in errors] == [path]
    not_json = await client.patch(
        target,
        content=b"{not json",
        headers={**admin_a.headers, "content-type": "application/json"},
    )
    assert_problem(not_json, 422)
    after = (await client.get(target, headers=admin_a.headers)).json()["data"]
    assert after == before


async def test_missing_permission_is_403_naming_it(
    client: httpx.AsyncClient, admin_a: LoggedIn, login_as: LoginAs, factory_a: Factory
) -> None:
    viewer = await login_as(factory_a, "viewer")
    for method, path, permission in [
        ("POST", USERS, "users:manage"),
        ("GET", USERS, "users:read"),
        ("GET", "/api/v1/audit", "audit:read"),
        ("PATCH", "/api/v1/factory", "factory:manage"),
        ("POST", f"{USERS}/invite", "users:manage"),
    ]:
        # A body that would also fail validation: permission is checked first.
        response = await client.request(
            method, path, json={"junk": 1} if method != "GET" else None, headers=viewer.headers
        )
        body = assert_problem(response, 403, "permission_denied")
        assert body["permission"] == permission
        assert permission in body["detail"]
    assert await user_count(client, admin_a) == 2
