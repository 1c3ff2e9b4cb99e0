"""Invites: create, accept once, expire, re-invite, and pending users cannot log in."""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from sqlalchemy import select, update

from plantwatch.app import Container
from plantwatch.tenancy.models import Invite
from plantwatch.tenancy.tokens import token_digest
from tests.conftest import LoggedIn, assert_problem

INVITE = "/api/v1/users/invite"
ACCEPT = "/api/v1/users/accept-invite"
NEW_PASSWORD = "my-own-passphrase"


async def invite(
    client: httpx.AsyncClient, admin: LoggedIn, email: str = "new@acme.example", **fields: Any
) -> dict[str, Any]:
    body = {"email": email, "role": "technician", **fields}
    response = await client.post(INVITE, json=body, headers=admin.headers)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def test_invite_accept_logs_in(
    client: httpx.AsyncClient, admin_a: LoggedIn, container: Container
) -> None:
    data = await invite(client, admin_a, full_name="New Hire", permissions=["reports:generate"])
    user = data["user"]
    assert user["pending_invite"] is True and user["role"] == "technician"
    assert user["permissions"] == ["reports:generate"]
    token = data["invite_token"]
    assert token.startswith("pwi_") and len(token) > 40
    url = urlsplit(data["accept_url"])
    assert (url.scheme, url.netloc, url.path) == ("http", "testserver", "/accept-invite")
    assert parse_qs(url.query)["token"] == [token]
    expires = dt.datetime.fromisoformat(data["expires_at"])
    ttl = container.settings.invite_ttl_s
    assert abs((expires - dt.datetime.now(dt.UTC)).total_seconds() - ttl) < 60

    # Only the digest is stored.
    async with container.db.session() as session:
        stored = (await session.scalars(select(Invite))).all()
    assert [i.token_hash for i in stored] == [token_digest(token)]
    assert all(token not in (i.token_hash or "") for i in stored)

    accepted = await client.post(
        ACCEPT, json={"token": token, "password": NEW_PASSWORD, "full_name": "Ngoc New"}
    )
    assert accepted.status_code == 200, accepted.text
    pair = accepted.json()
    assert pair["token_type"] == "bearer" and pair["refresh_token"].startswith("pwr_")
    assert pair["user"]["id"] == user["id"]
    assert pair["user"]["pending_invite"] is False
    assert pair["user"]["full_name"] == "Ngoc New"
    me = await client.get(
        "/api/v1/auth/me", headers={"Authorization": f"Bearer {pair['access_token']}"}
    )
    assert me.status_code == 200 and me.json()["data"]["user"]["email"] == "new@acme.example"
    # The refresh token of that session works like any other.
    refreshed = await client.post(
        "/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]}
    )
    assert refreshed.status_code == 200
    # And the password works at the login form.
    login = await client.post(
        "/api/v1/auth/login",
        json={"factory_slug": "acme", "email": "new@acme.example", "password": NEW_PASSWORD},
    )
    assert login.status_code == 200


async def test_public_url_builds_accept_link(
    client: httpx.AsyncClient, admin_a: LoggedIn, container: Container
) -> None:
    container.settings.public_url = "https://plant.example.com/"
    data = await invite(client, admin_a)
    assert data["accept_url"].startswith("https://plant.example.com/accept-invite?token=pwi_")


async def test_invite_is_single_use(client: httpx.AsyncClient, admin_a: LoggedIn) -> None:
    token = (await invite(client, admin_a))["invite_token"]
    first = await client.post(ACCEPT, json={"token": token, "password": NEW_PASSWORD})
    assert first.status_code == 200
    second = await client.post(ACCEPT, json={"token": token, "password": "attacker-password"})
    assert_problem(second, 410, "invite_used")
    # The second attempt did not change the password.
    login = await client.post(
        "/api/v1/auth/login",
        json={"factory_slug": "acme", "email": "new@acme.example", "password": "attacker-password"},
    )
    assert_problem(login, 401)


async def test_expired_invite(
    client: httpx.AsyncClient, admin_a: LoggedIn, container: Container
) -> None:
    data = await invite(client, admin_a)
    async with container.db.session() as session:
        await session.execute(
            update(Invite).values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
        await session.commit()
    response = await client.post(
        ACCEPT, json={"token": data["invite_token"], "password": NEW_PASSWORD}
    )
    assert_problem(response, 410, "invite_expired")
    # Still pending; a re-invite gives a working link.
    again = await client.post(f"/api/v1/users/{data['user']['id']}/invite", headers=admin_a.headers)
    assert again.status_code == 201
    ok = await client.post(
        ACCEPT, json={"token": again.json()["data"]["invite_token"], "password": NEW_PASSWORD}
    )
    assert ok.status_code == 200


async def test_unknown_and_malformed_tokens(client: httpx.AsyncClient) -> None:
    assert_problem(
        await client.post(ACCEPT, json={"token": "pwi_" + "x" * 43, "password": NEW_PASSWORD}),
        400,
        "invite_invalid",
    )
    short = await client.post(ACCEPT, json={"token": "abc", "password": NEW_PASSWORD})
    assert assert_problem(short, 422)["errors"][0]["path"] == "body.token"
    weak = await client.post(ACCEPT, json={"token": "pwi_" + "x" * 43, "password": "short"})
    assert assert_problem(weak, 422)["errors"][0]["path"] == "body.password"


async def test_pending_user_cannot_log_in(client: httpx.AsyncClient, admin_a: LoggedIn) -> None:
    await invite(client, admin_a)
    for password in ["", "anything-at-all", NEW_PASSWORD]:
        response = await client.post(
            "/api/v1/auth/login",
            json={"factory_slug": "acme", "email": "new@acme.example", "password": password},
        )
        assert response.status_code in (401, 422), response.text
        assert response.headers["content-type"].startswith("application/problem+json")


async def test_reinvite_revokes_the_old_token(client: httpx.AsyncClient, admin_a: LoggedIn) -> None:
    first = await invite(client, admin_a)
    user_id = first["user"]["id"]
    second = await client.post(f"/api/v1/users/{user_id}/invite", headers=admin_a.headers)
    assert second.status_code == 201
    new_token = second.json()["data"]["invite_token"]
    assert new_token != first["invite_token"]
    old = await client.post(ACCEPT, json={"token": first["invite_token"], "password": NEW_PASSWORD})
    assert_problem(old, 410, "invite_revoked")
    assert (
        await client.post(ACCEPT, json={"token": new_token, "password": NEW_PASSWORD})
    ).status_code == 200
    # Once accepted, there is nobody to re-invite.
    done = await client.post(f"/api/v1/users/{user_id}/invite", headers=admin_a.headers)
    assert_problem(done, 409, "user_not_pending")


async def test_deactivated_pending_user_cannot_accept(
    client: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    data = await invite(client, admin_a)
    deleted = await client.delete(f"/api/v1/users/{data['user']['id']}", headers=admin_a.headers)
    assert deleted.status_code == 204
    response = await client.post(
        ACCEPT, json={"token": data["invite_token"], "password": NEW_PASSWORD}
    )
    assert_problem(response, 410, "invite_revoked")
    reinvite = await client.post(
        f"/api/v1/users/{data['user']['id']}/invite", headers=admin_a.headers
    )
    assert_problem(reinvite, 409, "user_inactive")


async def test_invite_validation_and_duplicates(
    client: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    await invite(client, admin_a)
    assert_problem(
        await client.post(
            INVITE, json={"email": "NEW@acme.example", "role": "viewer"}, headers=admin_a.headers
        ),
        409,
        "user_exists",
    )
    bad = await client.post(
        INVITE,
        json={"email": "not-an-email", "role": "viewer", "password": "nope-nope"},
        headers=admin_a.headers,
    )
    paths = {e["path"] for e in assert_problem(bad, 422, "validation_error")["errors"]}
    assert paths == {"body.email", "body.password"}  # invites carry no password
