"""The browser's session: login form, cookies, refresh, CSRF, return to the page."""

from __future__ import annotations

from typing import Any

import httpx

from plantwatch.tenancy.models import Factory
from tests.conftest import PASSWORD, LoggedIn, LoginAs
from tests.web.conftest import CSRF, AsBrowser


async def test_login_form_sets_cookies_and_returns_to_the_page(
    client: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    page = await client.get("/login", params={"next": "/machines?q=lathe"})
    assert page.status_code == 200
    assert 'name="next" value="/machines?q=lathe"' in page.text
    assert "Acme Precision" in page.text

    response = await client.post(
        "/login",
        data={
            "factory_slug": admin_a.factory_slug,
            "email": admin_a.email,
            "password": PASSWORD,
            "next": "/machines?q=lathe",
        },
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/machines?q=lathe"
    cookies = response.headers.get_list("set-cookie")
    access = next(c for c in cookies if c.startswith("pw_access="))
    assert "HttpOnly" in access and "SameSite=lax" in access
    assert any(c.startswith("pw_csrf=") and "HttpOnly" not in c for c in cookies)


async def test_wrong_password_shows_an_error_and_keeps_the_email(
    client: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    response = await client.post(
        "/login",
        data={"factory_slug": "acme", "email": admin_a.email, "password": "nope", "next": "/"},
    )
    assert response.status_code == 401
    assert "Wrong email or password" in response.text
    assert f'value="{admin_a.email}"' in response.text
    assert "pw_access" not in response.headers.get("set-cookie", "")


async def test_next_never_leaves_the_site(client: httpx.AsyncClient, admin_a: LoggedIn) -> None:
    for evil in ("https://evil.example/", "//evil.example/x", "javascript:alert(1)"):
        response = await client.post(
            "/login",
            data={
                "factory_slug": "acme",
                "email": admin_a.email,
                "password": PASSWORD,
                "next": evil,
            },
        )
        assert response.headers["location"] == "/", evil


async def test_a_page_without_a_session_sends_to_login_with_the_page(
    client: httpx.AsyncClient, factory_a: Factory
) -> None:
    response = await client.get("/", params={"x": "1"})
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2F%3Fx%3D1"
    # htmx asks for a fragment: a full navigation to login, back to the browser's page.
    response = await client.get(
        "/", headers={"HX-Request": "true", "HX-Current-URL": "http://testserver/rules?page=2"}
    )
    assert response.status_code == 401
    assert response.headers["HX-Redirect"] == "/login?next=%2Frules%3Fpage%3D2"


async def test_an_expired_access_token_is_refreshed_on_the_same_url(
    as_browser: AsBrowser, admin_a: LoggedIn
) -> None:
    browser = await as_browser(admin_a)
    browser.cookies.set("pw_access", "expired-or-garbage")
    response = await browser.get("/", params={"tab": "2"})
    assert response.status_code == 303
    assert response.headers["location"] == "/?tab=2"
    new_access = response.cookies.get("pw_access")
    assert new_access and new_access != admin_a.access_token
    # The spent refresh token cannot be used again (rotation).
    assert response.cookies.get("pw_refresh") != admin_a.refresh_token
    followed = await browser.get("/", params={"tab": "2"})
    assert followed.status_code == 200, followed.text


async def test_the_api_takes_the_cookie_and_demands_csrf_for_changes(
    as_browser: AsBrowser, admin_a: LoggedIn
) -> None:
    browser = await as_browser(admin_a)
    me = await browser.get("/api/v1/auth/me")
    assert me.status_code == 200
    assert me.json()["data"]["user"]["email"] == admin_a.email
    body = {"name": "Lathe 9", "device_key": "lathe-9"}
    no_csrf = await browser.post("/api/v1/devices", json=body, headers={"X-CSRF-Token": ""})
    assert no_csrf.status_code == 403
    assert no_csrf.json()["code"] == "csrf_failed"
    wrong = await browser.post("/api/v1/devices", json=body, headers={"X-CSRF-Token": "x"})
    assert wrong.status_code == 403
    ok = await browser.post("/api/v1/devices", json=body, headers={"X-CSRF-Token": CSRF})
    assert ok.status_code == 201, ok.text


async def test_session_refresh_endpoint_and_logout(
    as_browser: AsBrowser, login_as: LoginAs, factory_a: Factory
) -> None:
    who = await login_as(factory_a, "viewer")
    browser = await as_browser(who)
    refreshed = await browser.post("/session/refresh")
    assert refreshed.status_code == 204
    assert refreshed.cookies.get("pw_access")
    # A plain form post carries the CSRF token in the form (no header).
    fresh = await as_browser(who)
    out = await fresh.post("/logout", data={"csrf": CSRF}, headers={"X-CSRF-Token": ""})
    assert out.status_code == 303 and out.headers["location"] == "/login"
    # The login session is revoked server-side, not only forgotten by the browser.
    gone = await browser.get(
        "/api/v1/auth/me", headers={"Authorization": f"Bearer {who.access_token}"}
    )
    assert gone.status_code == 401


async def test_pages_send_a_content_security_policy_without_inline_script(
    as_browser: AsBrowser, admin_a: LoggedIn
) -> None:
    browser = await as_browser(admin_a)
    page: Any = await browser.get("/")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("style-src")[0]
    assert "<script>" not in page.text


async def test_two_tabs_refreshing_at_once_stay_logged_in_but_a_late_replay_does_not(
    as_browser: AsBrowser, login_as: LoginAs, factory_a: Factory, client: httpx.AsyncClient
) -> None:
    who = await login_as(factory_a, "viewer")
    tab_a, tab_b = await as_browser(who), await as_browser(who)
    first = await tab_a.post("/session/refresh")
    second = await tab_b.post("/session/refresh")  # same spent cookie, a moment later
    assert first.status_code == 204 and second.status_code == 204
    assert first.cookies.get("pw_refresh") != second.cookies.get("pw_refresh")
    # The API's own refresh keeps strict rotation: a replay revokes the login.
    replay = await client.post("/api/v1/auth/refresh", json={"refresh_token": who.refresh_token})
    assert replay.status_code == 401
    assert replay.json()["code"] == "refresh_reused"
