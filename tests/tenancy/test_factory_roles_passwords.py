"""Current factory settings, the roles/permissions catalogue, own-password change,
the CLI's reset_password, and docs/security.md staying in step with the code."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from plantwatch.app import Container
from plantwatch.core.errors import InvalidInput, NotFound
from plantwatch.tenancy import service
from plantwatch.tenancy.models import AuditEntry, Factory
from plantwatch.tenancy.permissions import (
    PERMISSIONS,
    ROLE_PERMISSIONS,
    Role,
    permissions_table_markdown,
    roles_table_markdown,
)
from tests.conftest import PASSWORD, LoggedIn, LoginAs, assert_problem

SECURITY_DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"


# --- factory ---------------------------------------------------------------------------


async def test_get_and_patch_factory(
    client: httpx.AsyncClient, admin_a: LoggedIn, login_as: LoginAs, factory_a: Factory
) -> None:
    viewer = await login_as(factory_a, "viewer")
    shown = await client.get("/api/v1/factory", headers=viewer.headers)
    assert shown.status_code == 200
    assert shown.json()["data"] | {"created_at": None, "updated_at": None} == {
        "id": factory_a.id,
        "name": "Acme Precision",
        "slug": "acme",
        "timezone": "UTC",
        "auto_register_devices": False,
        "offline_after_s": 300,
        "created_at": None,
        "updated_at": None,
    }
    changed = await client.patch(
        "/api/v1/factory",
        json={"name": "Acme Precision Ltd", "timezone": "Europe/Berlin"},
        headers=admin_a.headers,
    )
    assert changed.status_code == 200
    assert changed.json()["data"]["timezone"] == "Europe/Berlin"
    # The tokens carry the tenant by id; renaming changes nothing for sessions.
    me = await client.get("/api/v1/auth/me", headers=viewer.headers)
    assert me.json()["data"]["factory"]["name"] == "Acme Precision Ltd"

    for body, path in [
        ({"timezone": "Mars/Olympus_Mons"}, "body.timezone"),
        ({"timezone": "../../etc/passwd"}, "body.timezone"),
        ({"name": ""}, "body.name"),
        ({"name": None}, "body.name"),
        ({"name": "n" * 201}, "body.name"),
        ({"slug": "other"}, "body.slug"),  # the login handle is not editable
    ]:
        response = await client.patch("/api/v1/factory", json=body, headers=admin_a.headers)
        assert [e["path"] for e in assert_problem(response, 422)["errors"]] == [path]
    assert_problem(
        await client.patch("/api/v1/factory", json={"name": "X"}, headers=viewer.headers),
        403,
        "permission_denied",
    )
    final = await client.get("/api/v1/factory", headers=admin_a.headers)
    assert final.json()["data"]["name"] == "Acme Precision Ltd"


# --- roles and permissions -------------------------------------------------------------


async def test_roles_and_permissions_catalogue(
    client: httpx.AsyncClient, login_as: LoginAs, factory_a: Factory
) -> None:
    technician = await login_as(factory_a, "technician")  # any logged-in user may read these
    roles = (await client.get("/api/v1/roles", headers=technician.headers)).json()["data"]
    assert [r["name"] for r in roles] == [r.value for r in Role]
    for entry in roles:
        assert set(entry["permissions"]) == ROLE_PERMISSIONS[Role(entry["name"])]
        assert entry["description"]
    perms = (await client.get("/api/v1/permissions", headers=technician.headers)).json()["data"]
    assert {p["name"]: p["description"] for p in perms} == PERMISSIONS
    assert_problem(await client.get("/api/v1/roles"), 401)
    assert_problem(await client.get("/api/v1/permissions"), 401)


def test_role_table_invariants() -> None:
    # Pure data checks: every role's set names real permissions; the top role has all.
    for role, perms in ROLE_PERMISSIONS.items():
        assert perms <= set(PERMISSIONS), role
    assert ROLE_PERMISSIONS[Role.SUPER_ADMIN] == frozenset(PERMISSIONS)
    # User management and the audit trail's owner stay with the super admin by default.
    managers = [r for r, p in ROLE_PERMISSIONS.items() if "users:manage" in p]
    assert managers == [Role.SUPER_ADMIN]


def test_security_doc_matches_permissions() -> None:
    """docs/security.md embeds the tables `python -m plantwatch.tenancy.permissions` prints."""
    doc = SECURITY_DOC.read_text()
    assert permissions_table_markdown() in doc, "regenerate the permissions table in the doc"
    assert roles_table_markdown() in doc, "regenerate the roles table in the doc"


# --- own password ----------------------------------------------------------------------


async def test_change_password_ends_other_sessions(
    client: httpx.AsyncClient, login_as: LoginAs, factory_a: Factory
) -> None:
    first = await login_as(factory_a, "technician")
    second = await client.post(
        "/api/v1/auth/login",
        json={"factory_slug": "acme", "email": first.email, "password": PASSWORD},
    )
    other = {"Authorization": f"Bearer {second.json()['access_token']}"}
    assert (await client.get("/api/v1/auth/me", headers=other)).status_code == 200

    wrong = await client.post(
        "/api/v1/auth/password",
        json={"current_password": "not-my-password", "new_password": "a-new-passphrase"},
        headers=first.headers,
    )
    body = assert_problem(wrong, 422, "invalid_current_password")
    assert body["errors"][0]["path"] == "body.current_password"
    same = await client.post(
        "/api/v1/auth/password",
        json={"current_password": PASSWORD, "new_password": PASSWORD},
        headers=first.headers,
    )
    assert assert_problem(same, 422)["errors"][0]["path"] == "body.new_password"
    short = await client.post(
        "/api/v1/auth/password",
        json={"current_password": PASSWORD, "new_password": "short"},
        headers=first.headers,
    )
    assert assert_problem(short, 422)["errors"][0]["path"] == "body.new_password"

    ok = await client.post(
        "/api/v1/auth/password",
        json={"current_password": PASSWORD, "new_password": "a-new-passphrase"},
        headers=first.headers,
    )
    assert ok.status_code == 204
    assert (await client.get("/api/v1/auth/me", headers=first.headers)).status_code == 200
    assert_problem(await client.get("/api/v1/auth/me", headers=other), 401, "session_revoked")
    assert_problem(
        await client.post(
            "/api/v1/auth/refresh", json={"refresh_token": second.json()["refresh_token"]}
        ),
        401,
    )
    old = await client.post(
        "/api/v1/auth/login",
        json={"factory_slug": "acme", "email": first.email, "password": PASSWORD},
    )
    assert_problem(old, 401)
    new = await client.post(
        "/api/v1/auth/login",
        json={"factory_slug": "acme", "email": first.email, "password": "a-new-passphrase"},
    )
    assert new.status_code == 200
    assert_problem(await client.post("/api/v1/auth/password", json={}), 401)


async def test_guessing_current_password_is_throttled(
    client: httpx.AsyncClient, login_as: LoginAs, factory_a: Factory
) -> None:
    user = await login_as(factory_a, "viewer")
    guess = {"current_password": "guess-guess", "new_password": "a-new-passphrase"}
    for _ in range(5):
        response = await client.post("/api/v1/auth/password", json=guess, headers=user.headers)
        assert_problem(response, 422, "invalid_current_password")
    throttled = await client.post("/api/v1/auth/password", json=guess, headers=user.headers)
    assert_problem(throttled, 429, "login_throttled")
    assert int(throttled.headers["Retry-After"]) > 0
    # Even the right password now waits, here and at the login form.
    right = {**guess, "current_password": PASSWORD}
    assert_problem(
        await client.post("/api/v1/auth/password", json=right, headers=user.headers), 429
    )
    login = await client.post(
        "/api/v1/auth/login",
        json={"factory_slug": "acme", "email": user.email, "password": PASSWORD},
    )
    assert_problem(login, 429)


# --- CLI service: reset_password -------------------------------------------------------


async def test_reset_password_service(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    async with container.db.session() as session:
        user = await service.reset_password(
            session, admin_a.factory_id, admin_a.email.upper(), "reset-by-cli-1"
        )
        await session.commit()
    assert user.id == admin_a.user_id
    assert_problem(await client.get("/api/v1/auth/me", headers=admin_a.headers), 401)
    login = await client.post(
        "/api/v1/auth/login",
        json={"factory_slug": "acme", "email": admin_a.email, "password": "reset-by-cli-1"},
    )
    assert login.status_code == 200
    async with container.db.session() as session:
        entry = await session.scalar(
            select(AuditEntry).where(AuditEntry.action == "user.password_reset")
        )
        assert entry is not None
        assert (entry.actor, entry.user_id, entry.entity_id) == ("system", None, str(user.id))
        with pytest.raises(NotFound):
            await service.reset_password(session, admin_a.factory_id, "ghost@acme.example", "x" * 9)
        with pytest.raises(InvalidInput):
            await service.reset_password(session, admin_a.factory_id, admin_a.email, "short")


async def test_reset_password_activates_a_pending_invitee(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    invited = await client.post(
        "/api/v1/users/invite",
        json={"email": "late@acme.example", "role": "viewer"},
        headers=admin_a.headers,
    )
    token = invited.json()["data"]["invite_token"]
    async with container.db.session() as session:
        await service.reset_password(
            session, admin_a.factory_id, "late@acme.example", "set-by-cli-1"
        )
        await session.commit()
    # The outstanding invite can no longer overwrite the password.
    response = await client.post(
        "/api/v1/users/accept-invite", json={"token": token, "password": "attacker-pass"}
    )
    assert_problem(response, 410, "invite_revoked")
    login = await client.post(
        "/api/v1/auth/login",
        json={"factory_slug": "acme", "email": "late@acme.example", "password": "set-by-cli-1"},
    )
    assert login.status_code == 200
