"""The browser's login: tokens in cookies, pages that send the visitor to log in.

The access and refresh tokens are the API's own (tenancy.service.login/refresh);
they live in HttpOnly cookies so no script can read them. `page_principal` is
the dependency of every page: with an expired access token but a live refresh
token it rotates the pair and sends the browser back to the same URL (303), so
a page is never lost to a token expiring; with no usable session it raises
`LoginRequired`, which answers with the login page's URL and the page to come
back to.
"""

from __future__ import annotations

import secrets
from urllib.parse import quote, urlsplit

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import RedirectResponse, Response

from plantwatch.core.config import Settings
from plantwatch.core.errors import Unauthorized
from plantwatch.tenancy import service as tenancy_service
from plantwatch.tenancy.auth import (
    ACCESS_COOKIE,
    CSRF_COOKIE,
    REFRESH_COOKIE,
    Principal,
    container,
    principal_for_token,
)
from plantwatch.tenancy.schemas import TokenPair

# Every tab of a browser shares the refresh cookie, and two may refresh in the same
# instant: within this many seconds a spent token gets a new pair, not a revoked login.
REFRESH_REUSE_GRACE_S = 10.0


class LoginRequired(Exception):
    """No usable session: the visitor must log in, then come back to `next_url`."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


class SessionRefreshed(Exception):
    """The token pair was rotated: redirect to the same URL with the new cookies."""

    def __init__(self, pair: TokenPair, url: str) -> None:
        super().__init__(url)
        self.pair = pair
        self.url = url


def safe_next(url: str | None) -> str:
    """A local path to return to after login; anything else (other hosts, //x) is "/"."""
    if not url:
        return "/"
    parts = urlsplit(url)
    if parts.scheme or parts.netloc or not parts.path.startswith("/") or url.startswith("//"):
        return "/"
    if parts.path.startswith(("/login", "/logout", "/session/")):
        return "/"
    return parts.path + (f"?{parts.query}" if parts.query else "")


def login_url(next_url: str) -> str:
    target = safe_next(next_url)
    return "/login" if target == "/" else f"/login?next={quote(target, safe='')}"


def _page_url(request: Request) -> str:
    """The page the visitor is on: for an htmx request that is the browser's URL."""
    current = request.headers.get("hx-current-url")
    if current:
        parts = urlsplit(current)
        return parts.path + (f"?{parts.query}" if parts.query else "")
    return request.url.path + (f"?{request.url.query}" if request.url.query else "")


def set_session_cookies(response: Response, settings: Settings, pair: TokenPair) -> None:
    secure = settings.cookie_secure
    response.set_cookie(
        ACCESS_COOKIE,
        pair.access_token,
        max_age=pair.expires_in,
        httponly=True,
        samesite="lax",
        secure=secure,
    )
    response.set_cookie(
        REFRESH_COOKIE,
        pair.refresh_token,
        max_age=settings.refresh_token_ttl_s,
        httponly=True,
        samesite="lax",
        secure=secure,
    )
    # Readable by the page's script, which echoes it in X-CSRF-Token (double submit).
    response.set_cookie(
        CSRF_COOKIE,
        secrets.token_urlsafe(24),
        max_age=settings.refresh_token_ttl_s,
        httponly=False,
        samesite="lax",
        secure=secure,
    )


def clear_session_cookies(response: Response) -> None:
    for name in (ACCESS_COOKIE, REFRESH_COOKIE, CSRF_COOKIE):
        response.delete_cookie(name)


async def refresh_pair(request: Request, session: AsyncSession) -> TokenPair | None:
    """Rotate the refresh cookie's token; None when there is none or it is spent."""
    token = request.cookies.get(REFRESH_COOKIE)
    if not token:
        return None
    c = container(request)
    try:
        return await tenancy_service.refresh(
            session, c.settings, c.secret, token, reuse_grace_s=REFRESH_REUSE_GRACE_S
        )
    except Unauthorized:
        return None


async def page_principal(request: Request) -> Principal:
    """Dependency of every page and fragment: the logged-in visitor."""
    async with container(request).db.session() as session:
        token = request.cookies.get(ACCESS_COOKIE)
        if token:
            try:
                return await principal_for_token(request, token, session)
            except Unauthorized:
                await session.rollback()
        pair = await refresh_pair(request, session)
    if pair is None:
        raise LoginRequired(_page_url(request))
    raise SessionRefreshed(pair, _page_url(request) if request.method == "GET" else "/")


def login_required_response(request: Request, exc: LoginRequired) -> Response:
    target = login_url(exc.next_url)
    if request.headers.get("hx-request"):
        # htmx swaps nothing on a 401 but follows HX-Redirect: a full navigation.
        return Response(status_code=401, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


def session_refreshed_response(request: Request, exc: SessionRefreshed) -> Response:
    # GET: the same URL again, now with fresh cookies (fetch/XHR follow it too).
    url = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    response: Response = RedirectResponse(url if request.method == "GET" else exc.url, 303)
    set_session_cookies(response, container(request).settings, exc.pair)
    return response
