"""Tenancy logic: factories, users, login with rotating refresh tokens, throttling."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from plantwatch.core.config import Settings
from plantwatch.core.db import utcnow
from plantwatch.core.errors import Conflict, NotFound, TooManyRequests, Unauthorized
from plantwatch.tenancy import audit
from plantwatch.tenancy.models import AuthSession, Factory, LoginFailure, RefreshToken, User
from plantwatch.tenancy.permissions import effective_permissions
from plantwatch.tenancy.schemas import FactoryCreate, LoginRequest, TokenPair, UserOut
from plantwatch.tenancy.tokens import (
    encode_access_token,
    hash_password,
    new_opaque_token,
    password_needs_rehash,
    token_digest,
    verify_password,
)

REFRESH_PREFIX = "pwr_"


@dataclass(frozen=True)
class SystemActor:
    """The actor recorded for changes made outside a request (CLI, demo seeding)."""

    factory_id: int
    email: str = "system"
    user_id: int | None = None
    request_id: str | None = None
    ip: str | None = None


@dataclass(frozen=True)
class ClientInfo:
    ip: str
    user_agent: str | None
    request_id: str | None


def user_out(user: User, *, pending_invite: bool = False) -> UserOut:
    out = UserOut.model_validate(user)
    out.effective_permissions = sorted(effective_permissions(user.role, user.permissions or ()))
    out.pending_invite = pending_invite or user.password_hash is None
    return out


# --- factories --------------------------------------------------------------


async def create_factory(session: AsyncSession, data: FactoryCreate) -> Factory:
    factory = Factory(name=data.name, slug=data.slug, timezone=data.timezone)
    session.add(factory)
    try:
        await session.flush()
    except IntegrityError as exc:
        await session.rollback()
        raise Conflict(f"a factory with slug '{data.slug}' exists", code="factory_exists") from exc
    return factory


async def factory_by_slug(session: AsyncSession, slug: str) -> Factory:
    factory = await session.scalar(select(Factory).where(Factory.slug == slug))
    if factory is None:
        raise NotFound(f"no factory '{slug}'", code="factory_not_found")
    return factory


async def list_factories(session: AsyncSession) -> list[Factory]:
    return list((await session.scalars(select(Factory).order_by(Factory.name))).all())


# --- users ------------------------------------------------------------------


async def add_user(
    session: AsyncSession,
    factory_id: int,
    *,
    email: str,
    role: str,
    password: str | None,
    full_name: str | None = None,
    phone: str | None = None,
    grants: list[str] | None = None,
) -> User:
    """Insert a user (password None = invited, not yet accepted). Flushes, doesn't commit."""
    email = email.strip().lower()
    exists = await session.scalar(
        select(User.id).where(User.factory_id == factory_id, User.email == email)
    )
    if exists is not None:
        raise Conflict(f"a user with email '{email}' exists in this factory", code="user_exists")
    user = User(
        factory_id=factory_id,
        email=email,
        role=role,
        full_name=full_name,
        phone=phone,
        permissions=grants or [],
        password_hash=hash_password(password) if password is not None else None,
        is_active=True,
    )
    session.add(user)
    await session.flush()
    return user


# --- login, refresh, logout -------------------------------------------------


def _account_key(data: LoginRequest) -> str:
    factory = data.factory_slug if data.factory_slug is not None else f"#{data.factory_id}"
    return f"{factory}:{data.email.strip().lower()}"


async def _check_throttle(
    session: AsyncSession, settings: Settings, account: str, ip: str, now: dt.datetime
) -> None:
    since = now - dt.timedelta(seconds=settings.login_failure_window_s)
    for column, value, limit in (
        (LoginFailure.account, account, settings.login_max_failures_per_account),
        (LoginFailure.ip, ip, settings.login_max_failures_per_ip),
    ):
        count, oldest = (
            await session.execute(
                select(func.count(), func.min(LoginFailure.at)).where(
                    column == value, LoginFailure.at > since
                )
            )
        ).one()
        if count >= limit:
            retry_after = max(
                1,
                math.ceil(settings.login_failure_window_s - (now - oldest).total_seconds()),
            )
            raise TooManyRequests(
                "Too many failed logins; try again later",
                code="login_throttled",
                headers={"Retry-After": str(retry_after)},
                retry_after=retry_after,
            )


async def login(
    session: AsyncSession,
    settings: Settings,
    secret: str,
    data: LoginRequest,
    client: ClientInfo,
) -> TokenPair:
    now = utcnow()
    account = _account_key(data)
    await _check_throttle(session, settings, account, client.ip, now)

    factory_clause = (
        Factory.slug == data.factory_slug
        if data.factory_slug is not None
        else Factory.id == data.factory_id
    )
    row = (
        await session.execute(
            select(User, Factory)
            .join(Factory, Factory.id == User.factory_id)
            .where(factory_clause, User.email == data.email.strip().lower())
        )
    ).first()
    user, factory = (row[0], row[1]) if row else (None, None)
    # verify_password runs even for unknown accounts, so timing doesn't reveal which exist.
    ok = verify_password(user.password_hash if user else None, data.password)
    if not ok or user is None or factory is None or not user.is_active:
        session.add(LoginFailure(account=account, ip=client.ip, at=now))
        if factory is not None and user is not None:
            audit.record(
                session,
                SystemActor(
                    factory.id, email=user.email, ip=client.ip, request_id=client.request_id
                ),
                "auth.login_failed",
                "user",
                user.id,
            )
        await session.commit()
        raise Unauthorized("Invalid credentials", code="invalid_credentials")

    assert user.password_hash is not None
    if password_needs_rehash(user.password_hash):
        user.password_hash = hash_password(data.password)
    user.last_login_at = now
    await session.execute(delete(LoginFailure).where(LoginFailure.account == account))
    auth_session = AuthSession(
        factory_id=factory.id,
        user_id=user.id,
        created_at=now,
        last_used_at=now,
        expires_at=now + dt.timedelta(seconds=settings.refresh_token_ttl_s),
        ip=client.ip,
        user_agent=(client.user_agent or "")[:300] or None,
    )
    session.add(auth_session)
    await session.flush()
    refresh = _issue_refresh(session, auth_session, settings, now)
    audit.record(
        session,
        SystemActor(
            factory.id,
            email=user.email,
            user_id=user.id,
            ip=client.ip,
            request_id=client.request_id,
        ),
        "auth.login",
        "user",
        user.id,
    )
    await session.commit()
    return _token_pair(settings, secret, user, factory, auth_session, refresh, now)


def _issue_refresh(
    session: AsyncSession, auth_session: AuthSession, settings: Settings, now: dt.datetime
) -> str:
    token = new_opaque_token(REFRESH_PREFIX)
    session.add(
        RefreshToken(
            session_id=auth_session.id,
            token_hash=token_digest(token),
            created_at=now,
            expires_at=now + dt.timedelta(seconds=settings.refresh_token_ttl_s),
        )
    )
    return token


def _token_pair(
    settings: Settings,
    secret: str,
    user: User,
    factory: Factory,
    auth_session: AuthSession,
    refresh: str,
    now: dt.datetime,
) -> TokenPair:
    access = encode_access_token(
        secret,
        user_id=user.id,
        factory_id=factory.id,
        factory_slug=factory.slug,
        session_id=auth_session.id,
        role=user.role,
        ttl_s=settings.access_token_ttl_s,
        now=now,
    )
    return TokenPair(
        access_token=access,
        refresh_token=refresh,
        expires_in=settings.access_token_ttl_s,
        user=user_out(user),
    )


async def refresh(session: AsyncSession, settings: Settings, secret: str, token: str) -> TokenPair:
    """Rotate: spend this refresh token, issue a new pair in the same family.

    Presenting a token that was already spent means it leaked (or a client raced);
    either way the whole family is revoked and the user must log in again.
    """
    now = utcnow()
    row = (
        await session.execute(
            select(RefreshToken, AuthSession, User, Factory)
            .join(AuthSession, AuthSession.id == RefreshToken.session_id)
            .join(User, User.id == AuthSession.user_id)
            .join(Factory, Factory.id == User.factory_id)
            .where(RefreshToken.token_hash == token_digest(token))
        )
    ).first()
    if row is None:
        raise Unauthorized("Invalid refresh token", code="refresh_invalid")
    stored, auth_session, user, factory = row
    if stored.used_at is not None:
        if auth_session.revoked_at is None:
            auth_session.revoked_at = now
            auth_session.revoke_reason = "refresh_reuse"
            audit.record(
                session,
                SystemActor(factory.id, email=user.email, user_id=user.id),
                "auth.refresh_reuse",
                "session",
                auth_session.id,
            )
            await session.commit()
        raise Unauthorized("Refresh token already used; session revoked", code="refresh_reused")
    if (
        auth_session.revoked_at is not None
        or stored.expires_at <= now
        or auth_session.expires_at <= now
    ):
        raise Unauthorized("Session has ended; log in again", code="session_revoked")
    if not user.is_active:
        raise Unauthorized("Account is deactivated", code="account_inactive")
    # Conditional update: of two concurrent refreshes with one token, only one wins.
    spent = await session.execute(
        update(RefreshToken)
        .where(RefreshToken.id == stored.id, RefreshToken.used_at.is_(None))
        .values(used_at=now)
    )
    if spent.rowcount != 1:  # type: ignore[attr-defined]
        await session.rollback()
        raise Unauthorized("Refresh token already used; session revoked", code="refresh_reused")
    auth_session.last_used_at = now
    new_refresh = _issue_refresh(session, auth_session, settings, now)
    await session.commit()
    return _token_pair(settings, secret, user, factory, auth_session, new_refresh, now)


async def logout(session: AsyncSession, session_id: int, actor: audit.Actor) -> None:
    await session.execute(
        update(AuthSession)
        .where(AuthSession.id == session_id, AuthSession.revoked_at.is_(None))
        .values(revoked_at=utcnow(), revoke_reason="logout")
    )
    audit.record(session, actor, "auth.logout", "session", session_id)
    await session.commit()


async def revoke_user_sessions(session: AsyncSession, user_id: int, reason: str) -> None:
    await session.execute(
        update(AuthSession)
        .where(AuthSession.user_id == user_id, AuthSession.revoked_at.is_(None))
        .values(revoked_at=utcnow(), revoke_reason=reason)
    )
