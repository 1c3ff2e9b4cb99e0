"""Request authentication: who is calling, in which factory, with which permissions.

Every tenant-scoped route depends on `require("perm")`, which yields a
`Principal`; services take `principal.factory_id` from it and nothing else.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from plantwatch.app import Container
from plantwatch.core.db import utcnow
from plantwatch.core.errors import Forbidden, Unauthorized
from plantwatch.tenancy.models import AuthSession, Factory, User
from plantwatch.tenancy.permissions import effective_permissions
from plantwatch.tenancy.tokens import InvalidToken, decode_access_token

bearer = HTTPBearer(auto_error=False, description="Access token from POST /api/v1/auth/login")

# The web UI's login (web/session.py) keeps the same access token in an HttpOnly
# cookie, so pages, their fetches and EventSource authenticate without JavaScript
# ever holding a token. A cookie is sent by the browser on its own, so a request
# that changes something must also echo the CSRF cookie in a header (double
# submit); a bearer token is never sent implicitly and needs no such check.
ACCESS_COOKIE = "pw_access"
REFRESH_COOKIE = "pw_refresh"
CSRF_COOKIE = "pw_csrf"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Principal:
    user_id: int
    factory_id: int
    factory_slug: str
    factory_timezone: str
    email: str
    role: str
    permissions: frozenset[str]
    session_id: int
    request_id: str | None = None
    ip: str | None = None

    def can(self, permission: str) -> bool:
        return permission in self.permissions


def container(request: Request) -> Container:
    value: Container = request.app.state.container
    return value


async def db_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with container(request).db.session() as session:
        yield session


def client_ip(request: Request) -> str:
    """The caller's address; X-Forwarded-For is believed only from configured proxies."""
    peer = request.client.host if request.client else "unknown"
    trusted = container(request).settings.trusted_proxies
    forwarded = request.headers.get("x-forwarded-for")
    if forwarded and peer in trusted:
        return forwarded.split(",")[0].strip()[:64]
    return peer[:64]


async def current_principal(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    session: AsyncSession = Depends(db_session),
) -> Principal:
    if credentials is not None and credentials.scheme.lower() == "bearer":
        token = credentials.credentials
    elif cookie := request.cookies.get(ACCESS_COOKIE):
        check_csrf(request)
        token = cookie
    else:
        raise Unauthorized("Missing bearer token", code="token_missing")
    return await principal_for_token(request, token, session)


def check_csrf(request: Request) -> None:
    """A cookie-authenticated request that changes something must echo the CSRF cookie."""
    if request.method in SAFE_METHODS:
        return
    expected = request.cookies.get(CSRF_COOKIE)
    given = request.headers.get(CSRF_HEADER)
    if not expected or not given or not secrets.compare_digest(expected, given):
        raise Forbidden(
            f"Missing or wrong {CSRF_HEADER} header for a cookie-authenticated request",
            code="csrf_failed",
        )


async def principal_for_token(request: Request, token: str, session: AsyncSession) -> Principal:
    """The caller behind an access token, checked against its login session."""
    try:
        claims = decode_access_token(container(request).secret, token)
    except InvalidToken as exc:
        raise Unauthorized("Invalid or expired token", code="token_invalid") from exc
    row = (
        await session.execute(
            select(User, Factory, AuthSession)
            .join(Factory, Factory.id == User.factory_id)
            .join(AuthSession, AuthSession.user_id == User.id)
            .where(
                User.id == claims.user_id,
                User.factory_id == claims.factory_id,
                AuthSession.id == claims.session_id,
            )
        )
    ).first()
    if row is None:
        raise Unauthorized("Invalid or expired token", code="token_invalid")
    user, factory, auth_session = row
    now = utcnow()
    if not user.is_active:
        raise Unauthorized("Account is deactivated", code="account_inactive")
    if auth_session.revoked_at is not None or auth_session.expires_at <= now:
        raise Unauthorized("Session has ended; log in again", code="session_revoked")
    principal = Principal(
        user_id=user.id,
        factory_id=factory.id,
        factory_slug=factory.slug,
        factory_timezone=factory.timezone,
        email=user.email,
        # Role and grants are read fresh, so a demotion applies to the next request.
        role=user.role,
        permissions=effective_permissions(user.role, user.permissions or ()),
        session_id=auth_session.id,
        request_id=getattr(request.state, "request_id", None),
        ip=client_ip(request),
    )
    request.state.principal = principal
    # End the lookup's transaction: on SQLite it holds the write lock, which the
    # handler must not keep while it awaits other work.
    await session.commit()
    return principal


def require(permission: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """Dependency: the caller, who must hold `permission` (403 naming it otherwise)."""

    async def dependency(principal: Principal = Depends(current_principal)) -> Principal:
        if not principal.can(permission):
            raise Forbidden(
                f"Missing permission '{permission}'",
                code="permission_denied",
                permission=permission,
            )
        return principal

    dependency.__name__ = f"require_{permission.replace(':', '_')}"
    return dependency
