"""User management through the HTTP API: list, create, update, deactivate, and the
rules that guard them (super admins, escalation, sessions ending at once)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from sqlalchemy import select, update

from plantwatch.app import Container
from plantwatch.core.errors import Conflict
from plantwatch.tenancy import service
from plantwatch.tenancy.auth import Principal
from plantwatch.tenancy.models import Factory, User
from plantwatch.tenancy.permissions import ROLE_PERMISSIONS, Role
from plantwatch.tenancy.schemas import UserUpdate
from tests.conftest import PASSWORD, LoggedIn, LoginAs, assert_problem

USERS = "/api/v1/users"


async def create(client: httpx.AsyncClient, admin: LoggedIn, **fields: Any) -> dict[str, Any]:
    body = {"password": "s3cret-enough", "role": "viewer", **fields}
    response = await client.post(USERS, json=body, headers=admin.headers)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def login(client: httpx.AsyncClient, slug: str, email: str, password: str) -> httpx.Response:
    return await client.post(
        "/api/v1/auth/login",
        json={"factory_slug": slug, "email": email, "password": password},
    )


async def test_create_get_and_log_in(client: httpx.AsyncClient, admin_a: LoggedIn) -> None:
    user = await create(
        client,
        admin_a,
        email="Mai.Tran@Acme.example",
        full_name="Mai Tran",
        phone="+84 901 234 567",
        role="technician",
        permissions=["reports:generate", "reports:generate"],
    )
    assert user["email"] == "mai.tran@acme.example"
    assert user["factory_id"] == admin_a.factory_id
    assert user["permissions"] == ["reports:generate"]
    assert "reports:generate" in user["effective_permissions"]
    assert "workorders:write" in user["effective_permissions"]
    assert user["pending_invite"] is False
    assert "password" not in user and "password_hash" not in user

    fetched = await client.get(f"{USERS}/{user['id']}", headers=admin_a.headers)
    assert fetched.status_code == 200
    assert fetched.json()["data"] == user

    response = await login(client, "acme", "mai.tran@acme.example", "s3cret-enough")
    assert response.status_code == 200
    assert response.json()["user"]["role"] == "technician"


async def test_duplicate_email_is_409(client: httpx.AsyncClient, admin_a: LoggedIn) -> None:
    await create(client, admin_a, email="dup@acme.example")
    again = await client.post(
        USERS,
        json={"email": "DUP@acme.example", "password": "another-one", "role": "viewer"},
        headers=admin_a.headers,
    )
    assert_problem(again, 409, "user_exists")


async def test_list_filters_search_sort_and_pages(
    client: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    await create(client, admin_a, email="anna@acme.example", full_name="Anna Berg")
    await create(client, admin_a, email="bob@acme.example", full_name="Bob 100%_Sure")
    tech = await create(client, admin_a, email="carl@acme.example", role="technician")
    await client.delete(f"{USERS}/{tech['id']}", headers=admin_a.headers)
    await client.post(
        f"{USERS}/invite",
        json={"email": "dora@acme.example", "role": "viewer"},
        headers=admin_a.headers,
    )

    async def emails(**params: Any) -> list[str]:
        response = await client.get(USERS, params=params, headers=admin_a.headers)
        assert response.status_code == 200, response.text
        return [u["email"] for u in response.json()["data"]]

    everyone = await emails()
    assert everyone == sorted(everyone) and len(everyone) == 5  # default sort: email
    assert await emails(role="viewer") == [
        "anna@acme.example",
        "bob@acme.example",
        "dora@acme.example",
    ]
    assert await emails(is_active="false") == ["carl@acme.example"]
    assert await emails(pending="true") == ["dora@acme.example"]
    assert await emails(search="BERG") == ["anna@acme.example"]
    # LIKE wildcards in the search are literal.
    assert await emails(search="100%_") == ["bob@acme.example"]
    assert await emails(search="%") == ["bob@acme.example"]
    assert await emails(sort="-email") == sorted(everyone, reverse=True)

    page = await client.get(USERS, params={"per_page": 2, "page": 2}, headers=admin_a.headers)
    body = page.json()
    assert body["meta"] == {"page": 2, "per_page": 2, "total": 5}
    assert [u["email"] for u in body["data"]] == everyone[2:4]

    assert_problem(
        await client.get(USERS, params={"sort": "password_hash"}, headers=admin_a.headers),
        422,
        "validation_error",
    )
    bad_role = await client.get(USERS, params={"role": "god"}, headers=admin_a.headers)
    assert assert_problem(bad_role, 422)["errors"][0]["path"] == "query.role"
    nul = await client.get(USERS, params={"search": "a\x00b"}, headers=admin_a.headers)
    assert assert_problem(nul, 422)["errors"][0]["path"] == "query.search"


async def test_patch_details_role_grants(client: httpx.AsyncClient, admin_a: LoggedIn) -> None:
    user = await create(client, admin_a, email="pat@acme.example", full_name="Pat", phone="+1 555")
    response = await client.patch(
        f"{USERS}/{user['id']}",
        json={"full_name": "Pat Smith", "phone": None, "role": "technician"},
        headers=admin_a.headers,
    )
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert (data["full_name"], data["phone"], data["role"]) == ("Pat Smith", None, "technician")

    grants = await client.patch(
        f"{USERS}/{user['id']}",
        json={"permissions": ["analytics:run"]},
        headers=admin_a.headers,
    )
    assert grants.json()["data"]["permissions"] == ["analytics:run"]
    assert grants.json()["data"]["full_name"] == "Pat Smith"  # omitted fields stay

    unknown = await client.patch(
        f"{USERS}/{user['id']}",
        json={"permissions": ["analytics:run", "root:everything"]},
        headers=admin_a.headers,
    )
    errors = assert_problem(unknown, 422, "validation_error")["errors"]
    assert errors[0]["path"] == "body.permissions[1]"
    null_role = await client.patch(
        f"{USERS}/{user['id']}", json={"role": None}, headers=admin_a.headers
    )
    assert assert_problem(null_role, 422)["errors"][0]["path"] == "body.role"

    again = await client.get(f"{USERS}/{user['id']}", headers=admin_a.headers)
    assert again.json()["data"]["permissions"] == ["analytics:run"]
    assert again.json()["data"]["role"] == "technician"


async def test_missing_user_is_404(client: httpx.AsyncClient, admin_a: LoggedIn) -> None:
    for method, path in [
        ("GET", f"{USERS}/999999"),
        ("PATCH", f"{USERS}/999999"),
        ("DELETE", f"{USERS}/999999"),
        ("POST", f"{USERS}/999999/invite"),
    ]:
        response = await client.request(
            method, path, json={} if method == "PATCH" else None, headers=admin_a.headers
        )
        assert_problem(response, 404, "user_not_found")
    # Ids beyond BIGINT are a validation error, not a database error.
    huge = await client.get(f"{USERS}/{2**64}", headers=admin_a.headers)
    assert assert_problem(huge, 422)["errors"][0]["path"] == "path.user_id"


async def test_only_super_admin_makes_super_admins(
    client: httpx.AsyncClient, login_as: LoginAs, factory_a: Factory, admin_a: LoggedIn
) -> None:
    # A factory manager who was granted user management...
    manager = await login_as(factory_a, "factory_manager", grants=["users:manage"])
    created = await client.post(
        USERS,
        json={"email": "boss@acme.example", "password": "s3cret-enough", "role": "super_admin"},
        headers=manager.headers,
    )
    assert_problem(created, 403, "super_admin_required")
    viewer = await create(client, manager, email="v@acme.example")
    promote = await client.patch(
        f"{USERS}/{viewer['id']}", json={"role": "super_admin"}, headers=manager.headers
    )
    assert_problem(promote, 403, "super_admin_required")
    # ...cannot touch a super admin either.
    for response in [
        await client.patch(
            f"{USERS}/{admin_a.user_id}", json={"full_name": "X"}, headers=manager.headers
        ),
        await client.patch(
            f"{USERS}/{admin_a.user_id}", json={"role": "viewer"}, headers=manager.headers
        ),
        await client.delete(f"{USERS}/{admin_a.user_id}", headers=manager.headers),
    ]:
        assert_problem(response, 403, "super_admin_required")
    # A super admin can.
    ok = await client.patch(
        f"{USERS}/{viewer['id']}", json={"role": "super_admin"}, headers=admin_a.headers
    )
    assert ok.status_code == 200 and ok.json()["data"]["role"] == "super_admin"


async def test_no_handing_out_permissions_one_lacks(
    client: httpx.AsyncClient, login_as: LoginAs, factory_a: Factory
) -> None:
    manager = await login_as(factory_a, "factory_manager", grants=["users:manage"])
    # factory_manager lacks commands:execute and devices:keys (maintenance_engineer has them).
    grant = await client.post(
        USERS,
        json={
            "email": "x@acme.example",
            "password": "s3cret-enough",
            "role": "viewer",
            "permissions": ["commands:execute"],
        },
        headers=manager.headers,
    )
    body = assert_problem(grant, 403, "permission_escalation")
    assert body["permissions"] == ["commands:execute"]
    role = await client.post(
        USERS,
        json={
            "email": "y@acme.example",
            "password": "s3cret-enough",
            "role": "maintenance_engineer",
        },
        headers=manager.headers,
    )
    assert set(assert_problem(role, 403, "permission_escalation")["permissions"]) >= {
        "commands:execute",
        "devices:keys",
    }
    # Nor to oneself.
    me = await client.patch(
        f"{USERS}/{manager.user_id}",
        json={"permissions": ["users:manage", "commands:execute"]},
        headers=manager.headers,
    )
    assert_problem(me, 403, "permission_escalation")
    # What the manager holds, they may pass on.
    fine = await client.post(
        USERS,
        json={
            "email": "z@acme.example",
            "password": "s3cret-enough",
            "role": "viewer",
            "permissions": ["alerts:respond"],
        },
        headers=manager.headers,
    )
    assert fine.status_code == 201, fine.text
    listing = await client.get(USERS, headers=manager.headers)
    assert {u["email"] for u in listing.json()["data"]} == {manager.email, "z@acme.example"}


async def test_last_super_admin_is_protected(
    client: httpx.AsyncClient, login_as: LoginAs, factory_a: Factory, admin_a: LoggedIn
) -> None:
    demote = await client.patch(
        f"{USERS}/{admin_a.user_id}", json={"role": "viewer"}, headers=admin_a.headers
    )
    assert_problem(demote, 409, "last_super_admin")
    deactivate = await client.delete(f"{USERS}/{admin_a.user_id}", headers=admin_a.headers)
    assert_problem(deactivate, 409, "last_super_admin")
    via_patch = await client.patch(
        f"{USERS}/{admin_a.user_id}", json={"is_active": False}, headers=admin_a.headers
    )
    assert_problem(via_patch, 409, "last_super_admin")
    # A pending (invited) super admin does not count: they cannot log in yet.
    invited = await client.post(
        f"{USERS}/invite",
        json={"email": "next@acme.example", "role": "super_admin"},
        headers=admin_a.headers,
    )
    assert invited.status_code == 201
    assert_problem(
        await client.delete(f"{USERS}/{admin_a.user_id}", headers=admin_a.headers),
        409,
        "last_super_admin",
    )
    # With a second active super admin, the first may step down.
    second = await login_as(factory_a, "super_admin")
    stepped = await client.patch(
        f"{USERS}/{admin_a.user_id}", json={"role": "factory_manager"}, headers=second.headers
    )
    assert stepped.status_code == 200
    assert_problem(
        await client.delete(f"{USERS}/{second.user_id}", headers=second.headers),
        409,
        "last_super_admin",
    )
    # Nothing changed by the refused calls.
    me = await client.get("/api/v1/auth/me", headers=second.headers)
    assert me.json()["data"]["user"]["role"] == "super_admin"


async def test_role_change_applies_on_next_request(
    client: httpx.AsyncClient, login_as: LoginAs, factory_a: Factory, admin_a: LoggedIn
) -> None:
    viewer = await login_as(factory_a, "viewer")
    assert_problem(await client.get(USERS, headers=viewer.headers), 403, "permission_denied")
    # Promotion: the same token gains the permission on its next request.
    up = await client.patch(
        f"{USERS}/{viewer.user_id}", json={"role": "factory_manager"}, headers=admin_a.headers
    )
    assert up.status_code == 200
    assert (await client.get(USERS, headers=viewer.headers)).status_code == 200
    # Demotion: losing a permission ends the user's sessions at once.
    down = await client.patch(
        f"{USERS}/{viewer.user_id}", json={"role": "viewer"}, headers=admin_a.headers
    )
    assert down.status_code == 200
    assert_problem(await client.get(USERS, headers=viewer.headers), 401, "session_revoked")
    refreshed = await client.post(
        "/api/v1/auth/refresh", json={"refresh_token": viewer.refresh_token}
    )
    assert_problem(refreshed, 401)
    # Logging in again gives the new role.
    again = await login(client, "acme", viewer.email, PASSWORD)
    assert again.json()["user"]["role"] == "viewer"
    token = again.json()["access_token"]
    assert_problem(
        await client.get(USERS, headers={"Authorization": f"Bearer {token}"}),
        403,
        "permission_denied",
    )


async def test_removing_a_grant_applies_at_once(
    client: httpx.AsyncClient, login_as: LoginAs, factory_a: Factory, admin_a: LoggedIn
) -> None:
    viewer = await login_as(factory_a, "viewer", grants=["users:read"])
    assert (await client.get(USERS, headers=viewer.headers)).status_code == 200
    await client.patch(
        f"{USERS}/{viewer.user_id}", json={"permissions": []}, headers=admin_a.headers
    )
    assert_problem(await client.get(USERS, headers=viewer.headers), 401)


async def test_deactivated_user_is_locked_out_at_once(
    client: httpx.AsyncClient, login_as: LoginAs, factory_a: Factory, admin_a: LoggedIn
) -> None:
    tech = await login_as(factory_a, "technician")
    assert (await client.get("/api/v1/auth/me", headers=tech.headers)).status_code == 200
    response = await client.delete(f"{USERS}/{tech.user_id}", headers=admin_a.headers)
    assert response.status_code == 204 and response.content == b""
    assert_problem(await client.get("/api/v1/auth/me", headers=tech.headers), 401)
    assert_problem(
        await client.post("/api/v1/auth/refresh", json={"refresh_token": tech.refresh_token}),
        401,
    )
    assert_problem(await login(client, "acme", tech.email, PASSWORD), 401, "invalid_credentials")
    shown = await client.get(f"{USERS}/{tech.user_id}", headers=admin_a.headers)
    assert shown.json()["data"]["is_active"] is False
    # Deactivating again is harmless; reactivating lets them log in (old sessions stay ended).
    assert (
        await client.delete(f"{USERS}/{tech.user_id}", headers=admin_a.headers)
    ).status_code == 204
    back = await client.patch(
        f"{USERS}/{tech.user_id}", json={"is_active": True}, headers=admin_a.headers
    )
    assert back.json()["data"]["is_active"] is True
    assert_problem(await client.get("/api/v1/auth/me", headers=tech.headers), 401)
    assert (await login(client, "acme", tech.email, PASSWORD)).status_code == 200


async def test_users_read_without_manage(
    client: httpx.AsyncClient, login_as: LoginAs, factory_a: Factory, admin_a: LoggedIn
) -> None:
    manager = await login_as(factory_a, "factory_manager")
    listing = await client.get(USERS, headers=manager.headers)
    assert listing.status_code == 200
    one = await client.get(f"{USERS}/{admin_a.user_id}", headers=manager.headers)
    assert one.status_code == 200
    for response in [
        await client.post(
            USERS,
            json={"email": "q@acme.example", "password": "s3cret-enough", "role": "viewer"},
            headers=manager.headers,
        ),
        await client.patch(f"{USERS}/{admin_a.user_id}", json={}, headers=manager.headers),
        await client.delete(f"{USERS}/{admin_a.user_id}", headers=manager.headers),
        await client.post(
            f"{USERS}/invite",
            json={"email": "q@acme.example", "role": "viewer"},
            headers=manager.headers,
        ),
    ]:
        assert assert_problem(response, 403, "permission_denied")["permission"] == "users:manage"


async def test_concurrent_demotions_keep_one_super_admin(
    container: Container, login_as: LoginAs, factory_a: Factory, admin_a: LoggedIn
) -> None:
    """Two super admins demoting each other at the same moment: exactly one wins.

    Called through the service with two sessions so the statements really
    interleave (each await is a database round trip).
    """
    second = await login_as(factory_a, "super_admin")

    def principal(user: LoggedIn) -> Principal:
        return Principal(
            user_id=user.user_id,
            factory_id=factory_a.id,
            factory_slug=factory_a.slug,
            factory_timezone="UTC",
            email=user.email,
            role="super_admin",
            permissions=ROLE_PERMISSIONS[Role.SUPER_ADMIN],
            session_id=0,
        )

    async def demote(actor: LoggedIn, target: LoggedIn) -> str:
        async with container.db.session() as session:
            try:
                await service.update_user(
                    session, principal(actor), target.user_id, UserUpdate(role=Role.VIEWER)
                )
            except Conflict as exc:
                return exc.code
            return "ok"

    for _ in range(3):
        outcomes = await asyncio.gather(demote(admin_a, second), demote(second, admin_a))
        assert sorted(outcomes) == ["last_super_admin", "ok"]
        async with container.db.session() as session:
            roles = (
                await session.scalars(select(User.role).where(User.factory_id == factory_a.id))
            ).all()
            assert sorted(roles) == ["super_admin", "viewer"]
            # Restore both for the next round.
            await session.execute(
                update(User)
                .where(User.id.in_([admin_a.user_id, second.user_id]))
                .values(role="super_admin")
            )
            await session.commit()
