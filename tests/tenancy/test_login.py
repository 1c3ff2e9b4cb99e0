"""Login, refresh rotation, logout and /auth/me through the HTTP API."""

from __future__ import annotations

import httpx

from plantwatch.tenancy.models import Factory
from tests.conftest import PASSWORD, LoggedIn, LoginAs, assert_problem


async def test_login_returns_tokens_and_user(client: httpx.AsyncClient, admin_a: LoggedIn) -> None:
    response = await client.get("/api/v1/auth/me", headers=admin_a.headers)
    assert response.status_code == 200
    data = response.json()["data"]
    assert data["user"]["email"] == admin_a.email
    assert data["factory"]["slug"] == "acme"
    assert "users:manage" in data["user"]["effective_permissions"]
    assert "password_hash" not in data["user"]


async def test_login_by_factory_id(
    client: httpx.AsyncClient, factory_a: Factory, admin_a: LoggedIn
) -> None:
    response = await client.post(
        "/api/v1/auth/login",
        json={"factory_id": factory_a.id, "email": admin_a.email, "password": PASSWORD},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert 15 * 60 <= body["expires_in"] <= 30 * 60
    assert body["user"]["id"] == admin_a.user_id


async def test_wrong_password_is_401(client: httpx.AsyncClient, admin_a: LoggedIn) -> None:
    response = await client.post(
        "/api/v1/auth/login",
        json={"factory_slug": "acme", "email": admin_a.email, "password": "nope-nope"},
    )
    assert_problem(response, 401, "invalid_credentials")


async def test_same_email_other_factory_cannot_log_in_here(
    client: httpx.AsyncClient, factory_b: Factory, admin_a: LoggedIn
) -> None:
    response = await client.post(
        "/api/v1/auth/login",
        json={"factory_slug": factory_b.slug, "email": admin_a.email, "password": PASSWORD},
    )
    assert_problem(response, 401, "invalid_credentials")


async def test_refresh_rotates_and_reuse_revokes_family(
    client: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    first = await client.post("/api/v1/auth/refresh", json={"refresh_token": admin_a.refresh_token})
    assert first.status_code == 200
    rotated = first.json()
    assert rotated["refresh_token"] != admin_a.refresh_token
    # Replaying the spent token revokes the whole family, including the new pair.
    replay = await client.post(
        "/api/v1/auth/refresh", json={"refresh_token": admin_a.refresh_token}
    )
    assert_problem(replay, 401, "refresh_reused")
    again = await client.post(
        "/api/v1/auth/refresh", json={"refresh_token": rotated["refresh_token"]}
    )
    assert_problem(again, 401, "session_revoked")
    me = await client.get(
        "/api/v1/auth/me", headers={"Authorization": f"Bearer {rotated['access_token']}"}
    )
    assert_problem(me, 401, "session_revoked")


async def test_logout_revokes_access_and_refresh(
    client: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    response = await client.post("/api/v1/auth/logout", headers=admin_a.headers)
    assert response.status_code == 204
    assert_problem(await client.get("/api/v1/auth/me", headers=admin_a.headers), 401)
    assert_problem(
        await client.post("/api/v1/auth/refresh", json={"refresh_token": admin_a.refresh_token}),
        401,
    )


async def test_throttle_after_repeated_failures(
    client: httpx.AsyncClient, login_as: LoginAs, factory_a: Factory
) -> None:
    user = await login_as(factory_a, "viewer")
    bad = {"factory_slug": "acme", "email": user.email, "password": "wrong-password"}
    for _ in range(5):
        assert (await client.post("/api/v1/auth/login", json=bad)).status_code == 401
    throttled = await client.post("/api/v1/auth/login", json=bad)
    body = assert_problem(throttled, 429, "login_throttled")
    assert int(throttled.headers["Retry-After"]) > 0
    assert body["retry_after"] > 0
    # Even the right password waits until the window passes.
    good = {**bad, "password": PASSWORD}
    assert_problem(await client.post("/api/v1/auth/login", json=good), 429)
