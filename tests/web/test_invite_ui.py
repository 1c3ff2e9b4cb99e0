"""The invite page: /accept-invite?token=... sets the password and logs the invitee in."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from plantwatch.app import Container
from plantwatch.tenancy.models import Invite
from tests.conftest import LoggedIn

NEW_PASSWORD = "my-own-passphrase"
EMAIL = "invitee@acme.example"


@pytest.fixture
async def visitor(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A browser with no session: keeps the cookies it is given, follows nothing."""
    transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 40002))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def invite(client: httpx.AsyncClient, admin: LoggedIn, **fields: Any) -> dict[str, Any]:
    body = {"email": EMAIL, "role": "technician", **fields}
    response = await client.post("/api/v1/users/invite", json=body, headers=admin.headers)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


def cookies_set(response: httpx.Response) -> list[str]:
    return response.headers.get_list("set-cookie")


async def still_pending(client: httpx.AsyncClient, admin: LoggedIn, user_id: int) -> bool:
    response = await client.get(f"/api/v1/users/{user_id}", headers=admin.headers)
    assert response.status_code == 200, response.text
    return bool(response.json()["data"]["pending_invite"])


async def test_accept_invite_sets_password_and_logs_in(
    client: httpx.AsyncClient, visitor: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    data = await invite(client, admin_a)
    token = data["invite_token"]
    accept_path = data["accept_url"].removeprefix("http://testserver")

    page = await visitor.get(accept_path)
    assert page.status_code == 200
    assert "login-card" in page.text
    assert f'name="token" value="{token}"' in page.text
    assert 'name="password"' in page.text and 'name="password_confirm"' in page.text
    assert 'minlength="8"' in page.text and "8 to 256 characters" in page.text
    assert 'name="full_name"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]

    response = await visitor.post(
        "/accept-invite",
        data={
            "token": token,
            "full_name": "Ngoc New",
            "password": NEW_PASSWORD,
            "password_confirm": NEW_PASSWORD,
        },
    )
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/"
    cookies = cookies_set(response)
    access = next(c for c in cookies if c.startswith("pw_access="))
    assert "HttpOnly" in access and "SameSite=lax" in access
    assert any(c.startswith("pw_refresh=") for c in cookies)
    assert any(c.startswith("pw_csrf=") for c in cookies)

    # The browser now carries the session: the dashboard opens as the invitee.
    home = await visitor.get("/")
    assert home.status_code == 200, home.text
    assert EMAIL in home.text
    me = await visitor.get("/api/v1/auth/me")
    assert me.status_code == 200
    assert me.json()["data"]["user"]["email"] == EMAIL
    assert me.json()["data"]["user"]["full_name"] == "Ngoc New"

    # The chosen password works at the login form too; the user is no longer pending.
    login = await client.post(
        "/login",
        data={"factory_slug": "acme", "email": EMAIL, "password": NEW_PASSWORD, "next": "/"},
    )
    assert login.status_code == 303
    assert not await still_pending(client, admin_a, data["user"]["id"])


async def test_a_used_link_shows_an_error_and_sets_nothing(
    client: httpx.AsyncClient, visitor: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    token = (await invite(client, admin_a))["invite_token"]
    form = {"token": token, "password": NEW_PASSWORD, "password_confirm": NEW_PASSWORD}
    first = await client.post("/accept-invite", data=form)
    assert first.status_code == 303

    other = "attacker-password"
    second = await visitor.post(
        "/accept-invite", data={"token": token, "password": other, "password_confirm": other}
    )
    assert second.status_code == 400
    assert "already been used" in second.text
    assert "Ask your plantwatch administrator for a new invite link" in second.text
    assert 'href="/login"' in second.text
    assert 'name="password"' not in second.text  # no form for a dead link
    assert cookies_set(second) == []
    # The password did not change.
    login = await visitor.post(
        "/login", data={"factory_slug": "acme", "email": EMAIL, "password": other, "next": "/"}
    )
    assert login.status_code == 401


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("pwi_" + "x" * 43, "This invite link is not valid"),
        ("abc", "This invite link is not valid"),
        ("pwi_" + "y" * 300, "This invite link is not valid"),
        ("", "This invite link is not valid"),
    ],
)
async def test_a_garbage_link_shows_an_error(
    visitor: httpx.AsyncClient, factory_a: Any, token: str, message: str
) -> None:
    response = await visitor.post(
        "/accept-invite",
        data={"token": token, "password": NEW_PASSWORD, "password_confirm": NEW_PASSWORD},
    )
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/html")
    assert message in response.text
    assert cookies_set(response) == []


async def test_opening_the_page_without_a_token_says_the_link_is_incomplete(
    visitor: httpx.AsyncClient,
) -> None:
    response = await visitor.get("/accept-invite")
    assert response.status_code == 400
    assert "This invite link is not valid" in response.text
    assert 'name="password"' not in response.text


async def test_an_expired_link_shows_an_error(
    client: httpx.AsyncClient,
    visitor: httpx.AsyncClient,
    admin_a: LoggedIn,
    container: Container,
) -> None:
    data = await invite(client, admin_a)
    async with container.db.session() as session:
        await session.execute(
            update(Invite).values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
        await session.commit()
    response = await visitor.post(
        "/accept-invite",
        data={
            "token": data["invite_token"],
            "password": NEW_PASSWORD,
            "password_confirm": NEW_PASSWORD,
        },
    )
    assert response.status_code == 400
    assert "This invite has expired; ask for a new one" in response.text
    assert cookies_set(response) == []
    assert await still_pending(client, admin_a, data["user"]["id"])


async def test_mismatched_confirmation_shows_the_form_again(
    client: httpx.AsyncClient, visitor: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    data = await invite(client, admin_a)
    token = data["invite_token"]
    response = await visitor.post(
        "/accept-invite",
        data={
            "token": token,
            "full_name": "Ngoc <New>",
            "password": NEW_PASSWORD,
            "password_confirm": NEW_PASSWORD + "x",
        },
    )
    assert response.status_code == 422
    assert "The two passwords do not match" in response.text
    # The form again, with the link and the name kept (escaped), passwords not echoed.
    assert f'name="token" value="{token}"' in response.text
    assert 'value="Ngoc &lt;New&gt;"' in response.text
    assert NEW_PASSWORD not in response.text
    assert cookies_set(response) == []
    assert await still_pending(client, admin_a, data["user"]["id"])

    # Nothing was spent: the same link still works.
    ok = await visitor.post(
        "/accept-invite",
        data={"token": token, "password": NEW_PASSWORD, "password_confirm": NEW_PASSWORD},
    )
    assert ok.status_code == 303


async def test_a_short_password_is_refused_with_the_rule(
    client: httpx.AsyncClient, visitor: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    data = await invite(client, admin_a)
    response = await visitor.post(
        "/accept-invite",
        data={"token": data["invite_token"], "password": "short", "password_confirm": "short"},
    )
    assert response.status_code == 422
    assert "Choose a password of 8 to 256 characters" in response.text
    assert 'name="password"' in response.text
    assert cookies_set(response) == []
    assert await still_pending(client, admin_a, data["user"]["id"])
