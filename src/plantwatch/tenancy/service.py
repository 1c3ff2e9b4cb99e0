"""Tenancy logic: factories, users, login with rotating refresh tokens, throttling."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

from sqlalchemy import Select, delete, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from plantwatch.core.config import Settings
from plantwatch.core.db import utcnow
from plantwatch.core.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    Problem,
    TooManyRequests,
    Unauthorized,
)
from plantwatch.core.listing import like_pattern, paginate, parse_sort
from plantwatch.core.schemas import PageParams
from plantwatch.tenancy import audit
from plantwatch.tenancy.models import (
    AuditEntry,
    AuthSession,
    Factory,
    Invite,
    LoginFailure,
    RefreshToken,
    User,
)
from plantwatch.tenancy.permissions import (
    PERMISSIONS,
    ROLE_DESCRIPTIONS,
    ROLE_PERMISSIONS,
    Role,
    can_assign_role,
    effective_permissions,
    escalation,
)
from plantwatch.tenancy.schemas import (
    AcceptInvite,
    FactoryCreate,
    FactoryUpdate,
    LoginRequest,
    PasswordChange,
    PermissionOut,
    RoleOut,
    TokenPair,
    UserCreate,
    UserInvite,
    UserOut,
    UserUpdate,
)
from plantwatch.tenancy.tokens import (
    encode_access_token,
    hash_password,
    new_opaque_token,
    password_needs_rehash,
    token_digest,
    verify_password,
)

REFRESH_PREFIX = "pwr_"
INVITE_PREFIX = "pwi_"
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 256


@dataclass(frozen=True)
class SystemActor:
    """The actor recorded for changes made outside a request (CLI, demo seeding)."""

    factory_id: int
    email: str = "system"
    user_id: int | None = None
    request_id: str | None = None
    ip: str | None = None


class Manager(audit.Actor, Protocol):
    """A caller allowed to change users: who they are plus what they may hand out.

    `tenancy.auth.Principal` is one; services never take the tenant from anywhere else.
    """

    @property
    def role(self) -> str: ...
    @property
    def permissions(self) -> frozenset[str]: ...


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
    """Insert a factory (recorded in its own audit log). Flushes, doesn't commit."""
    factory = Factory(name=data.name, slug=data.slug, timezone=data.timezone)
    session.add(factory)
    try:
        await session.flush()
    except IntegrityError as exc:
        await session.rollback()
        raise Conflict(f"a factory with slug '{data.slug}' exists", code="factory_exists") from exc
    audit.record(
        session,
        SystemActor(factory.id),
        "factory.create",
        "factory",
        factory.id,
        after=audit.snapshot(factory),
    )
    return factory


async def factory_by_slug(session: AsyncSession, slug: str) -> Factory:
    factory = await session.scalar(select(Factory).where(Factory.slug == slug))
    if factory is None:
        raise NotFound(f"no factory '{slug}'", code="factory_not_found")
    return factory


async def list_factories(session: AsyncSession) -> list[Factory]:
    return list((await session.scalars(select(Factory).order_by(Factory.name))).all())


async def get_factory(session: AsyncSession, factory_id: int) -> Factory:
    factory = await session.get(Factory, factory_id)
    if factory is None:
        raise NotFound("no such factory", code="factory_not_found")
    return factory


async def update_factory(session: AsyncSession, actor: audit.Actor, data: FactoryUpdate) -> Factory:
    """Change the caller's factory settings; the slug is its login handle and stays."""
    factory = await get_factory(session, actor.factory_id)
    before = audit.snapshot(factory)
    for field, value in data.model_dump(exclude_unset=True).items():
        setattr(factory, field, value)
    await session.flush()
    after = audit.snapshot(factory)
    if _changed(before, after):
        audit.record(
            session, actor, "factory.update", "factory", factory.id, before=before, after=after
        )
    await session.commit()
    return factory


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
    actor: audit.Actor | None = None,
    audit_action: str = "user.create",
) -> User:
    """Insert a user (password None = invited, not yet accepted). Flushes, doesn't commit.

    No permission checks: callers are the CLI, demo seeding and `create_user` /
    `invite_user` below, which check first. The change is audited, by `actor`
    or else by the system.
    """
    email = email.strip().lower()
    if role not in {r.value for r in Role}:
        raise InvalidInput(["role"], f"unknown role '{role}'")
    unknown = sorted({g for g in grants or () if g not in PERMISSIONS})
    if unknown:
        raise InvalidInput(["permissions"], f"unknown permissions: {', '.join(unknown)}")
    if password is not None:
        _check_password_length(password, "password")
    exists = await session.scalar(
        select(User.id).where(User.factory_id == factory_id, User.email == email)
    )
    if exists is not None:
        raise _user_exists(email)
    user = User(
        factory_id=factory_id,
        email=email,
        role=role,
        full_name=full_name,
        phone=phone,
        permissions=sorted(set(grants or [])),
        password_hash=hash_password(password) if password is not None else None,
        is_active=True,
    )
    session.add(user)
    try:
        await session.flush()
    except IntegrityError as exc:  # a concurrent insert of the same email won the race
        await session.rollback()
        raise _user_exists(email) from exc
    audit.record(
        session,
        actor or SystemActor(factory_id),
        audit_action,
        "user",
        user.id,
        after=audit.snapshot(user),
    )
    return user


def _user_exists(email: str) -> Conflict:
    return Conflict(f"a user with email '{email}' exists in this factory", code="user_exists")


def _check_password_length(password: str, field: str) -> None:
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise InvalidInput(
            [field],
            f"password must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters",
        )


def _changed(before: dict[str, object], after: dict[str, object]) -> bool:
    return any(
        before.get(k) != after.get(k) for k in before.keys() | after.keys() if k != "updated_at"
    )


async def get_user(
    session: AsyncSession, factory_id: int, user_id: int, *, for_update: bool = False
) -> User:
    """A user of this factory; any other factory's user is simply not found (404)."""
    stmt = select(User).where(User.id == user_id, User.factory_id == factory_id)
    if for_update:
        stmt = stmt.with_for_update()
    user = await session.scalar(stmt)
    if user is None:
        raise NotFound("no such user", code="user_not_found")
    return user


@dataclass(frozen=True)
class UserFilters:
    role: str | None = None
    is_active: bool | None = None
    pending: bool | None = None
    search: str | None = None


USER_SORTS = {
    "id": User.__table__.c.id,
    "email": User.__table__.c.email,
    "full_name": User.__table__.c.full_name,
    "role": User.__table__.c.role,
    "created_at": User.__table__.c.created_at,
    "last_login_at": User.__table__.c.last_login_at,
}


async def list_users(
    session: AsyncSession,
    factory_id: int,
    filters: UserFilters,
    params: PageParams,
    sort: str | None = None,
) -> tuple[Sequence[User], int]:
    order = parse_sort(sort, USER_SORTS, "email")
    stmt: Select[User] = select(User).where(User.factory_id == factory_id)
    if filters.role is not None:
        stmt = stmt.where(User.role == filters.role)
    if filters.is_active is not None:
        stmt = stmt.where(User.is_active.is_(filters.is_active))
    if filters.pending is not None:
        stmt = stmt.where(
            User.password_hash.is_(None) if filters.pending else User.password_hash.is_not(None)
        )
    if filters.search:
        pattern = like_pattern(filters.search)
        stmt = stmt.where(
            or_(
                func.lower(User.email).like(pattern, escape="\\"),
                func.lower(User.full_name).like(pattern, escape="\\"),
            )
        )
    return await paginate(session, stmt, params, order, tiebreak=User.__table__.c.id.asc())


def _check_assignment(
    actor: Manager,
    user: User | None,
    role: str,
    grants: Sequence[str],
    *,
    active: bool = True,
) -> None:
    """403 unless `actor` may change `user` (None: a new user) to this role and these grants.

    Only a super admin touches a super admin, and nobody hands out a
    permission they lack themselves (deactivated users hold none).
    """
    if user is not None and not can_assign_role(actor.role, user.role):
        raise Forbidden("Only a super admin may change a super admin", code="super_admin_required")
    if (user is None or role != user.role) and not can_assign_role(actor.role, role):
        raise Forbidden(
            "Only a super admin may make someone a super admin", code="super_admin_required"
        )
    before = (
        effective_permissions(user.role, user.permissions or ())
        if user is not None and user.is_active
        else frozenset()
    )
    after = effective_permissions(role, grants) if active else frozenset()
    beyond = escalation(actor.permissions, before, after)
    if beyond:
        raise Forbidden(
            f"You cannot hand out permissions you do not hold: {', '.join(beyond)}",
            code="permission_escalation",
            permissions=beyond,
        )


async def _serialise_access_changes(session: AsyncSession, factory_id: int) -> None:
    """Take the factory's write lock before reading what a role change depends on.

    Without it, two super admins demoting each other at the same moment could
    both see "another super admin exists" and both succeed. A no-op UPDATE of
    the factory row is the one statement that locks on both backends:
    PostgreSQL takes a row lock (FOR NO KEY UPDATE strength, so inserts that
    reference the factory are not blocked), and SQLite, whose driver reads
    outside a transaction until the first write, takes its database write lock
    so the reads that follow see the latest commit. It also fixes the lock
    order (factory, then users), so concurrent changes wait instead of
    deadlocking.
    """
    await session.execute(
        text("UPDATE factories SET name = name WHERE id = :factory_id"),
        {"factory_id": factory_id},
    )


async def _ensure_another_super_admin(session: AsyncSession, factory_id: int, user_id: int) -> None:
    """409 if `user_id` is the factory's last active super admin (who could log in).

    Callers hold `_serialise_access_changes`, so the answer stays true until they commit.
    """
    ids = (
        await session.scalars(
            select(User.id).where(
                User.factory_id == factory_id,
                User.role == Role.SUPER_ADMIN.value,
                User.is_active.is_(True),
                User.password_hash.is_not(None),
            )
        )
    ).all()
    if not set(ids) - {user_id}:
        raise Conflict(
            "This is the factory's last active super admin; promote another user first",
            code="last_super_admin",
        )


async def _revoke_open_invites(session: AsyncSession, user_id: int, now: dt.datetime) -> None:
    await session.execute(
        update(Invite)
        .where(
            Invite.user_id == user_id,
            Invite.accepted_at.is_(None),
            Invite.revoked_at.is_(None),
        )
        .values(revoked_at=now)
    )


async def create_user(session: AsyncSession, actor: Manager, data: UserCreate) -> User:
    """Create a user with a password, in the actor's factory. Commits."""
    _check_assignment(actor, None, data.role.value, data.permissions)
    user = await add_user(
        session,
        actor.factory_id,
        email=data.email,
        role=data.role.value,
        password=data.password,
        full_name=data.full_name,
        phone=data.phone,
        grants=data.permissions,
        actor=actor,
    )
    await session.commit()
    return user


async def update_user(
    session: AsyncSession, actor: Manager, user_id: int, data: UserUpdate
) -> User:
    """PATCH a user. Losing any permission (or deactivation) ends their sessions at once;
    gaining some applies on their next request, as every request reloads role and grants.
    """
    await _serialise_access_changes(session, actor.factory_id)
    user = await get_user(session, actor.factory_id, user_id, for_update=True)
    given = data.model_fields_set
    new_role = data.role.value if data.role is not None else user.role
    new_grants = list(data.permissions) if data.permissions is not None else list(user.permissions)
    new_active = data.is_active if data.is_active is not None else user.is_active
    _check_assignment(actor, user, new_role, new_grants, active=new_active)
    losing_admin = user.role == Role.SUPER_ADMIN.value and (
        new_role != Role.SUPER_ADMIN.value or not new_active
    )
    if losing_admin and user.is_active and user.password_hash is not None:
        await _ensure_another_super_admin(session, actor.factory_id, user.id)

    before = audit.snapshot(user)
    old_permissions = (
        effective_permissions(user.role, user.permissions or ()) if user.is_active else frozenset()
    )
    if "full_name" in given:
        user.full_name = data.full_name
    if "phone" in given:
        user.phone = data.phone
    user.role = new_role
    user.permissions = new_grants
    user.is_active = new_active
    now = utcnow()
    if not new_active:
        await revoke_user_sessions(session, user.id, "deactivated")
        await _revoke_open_invites(session, user.id, now)
    elif old_permissions - effective_permissions(new_role, new_grants):
        await revoke_user_sessions(session, user.id, "permissions_changed")
    await session.flush()
    after = audit.snapshot(user)
    if _changed(before, after):
        action = "user.deactivate" if before["is_active"] and not new_active else "user.update"
        audit.record(session, actor, action, "user", user.id, before=before, after=after)
    await session.commit()
    return user


async def deactivate_user(session: AsyncSession, actor: Manager, user_id: int) -> None:
    """DELETE: users are deactivated, never removed (the audit log keeps pointing at them)."""
    await update_user(session, actor, user_id, UserUpdate(is_active=False))


# --- invites ----------------------------------------------------------------


@dataclass(frozen=True)
class IssuedInvite:
    user: User
    token: str
    expires_at: dt.datetime


def accept_url(base_url: str, token: str) -> str:
    """Where the invitee sets a password: the UI page that posts to /users/accept-invite."""
    return f"{base_url.rstrip('/')}/accept-invite?token={quote(token, safe='')}"


def _new_invite(
    session: AsyncSession, settings: Settings, user: User, invited_by: int | None, now: dt.datetime
) -> IssuedInvite:
    token = new_opaque_token(INVITE_PREFIX)
    expires_at = now + dt.timedelta(seconds=settings.invite_ttl_s)
    session.add(
        Invite(
            factory_id=user.factory_id,
            user_id=user.id,
            token_hash=token_digest(token),  # the token itself is shown once, never stored
            invited_by=invited_by,
            created_at=now,
            expires_at=expires_at,
        )
    )
    return IssuedInvite(user=user, token=token, expires_at=expires_at)


async def invite_user(
    session: AsyncSession, actor: Manager, settings: Settings, data: UserInvite
) -> IssuedInvite:
    """Create a user without a password and an invite to set one. Commits.

    The caller delivers the token (the API returns it; e-mail delivery comes
    with the notifications domain).
    """
    _check_assignment(actor, None, data.role.value, data.permissions)
    user = await add_user(
        session,
        actor.factory_id,
        email=data.email,
        role=data.role.value,
        password=None,
        full_name=data.full_name,
        phone=data.phone,
        grants=data.permissions,
        actor=actor,
        audit_action="user.invite",
    )
    issued = _new_invite(session, settings, user, actor.user_id, utcnow())
    await session.commit()
    return issued


async def reinvite_user(
    session: AsyncSession, actor: Manager, settings: Settings, user_id: int
) -> IssuedInvite:
    """A fresh invite for a user who has not accepted yet; earlier tokens stop working."""
    await _serialise_access_changes(session, actor.factory_id)  # one open invite at a time
    user = await get_user(session, actor.factory_id, user_id, for_update=True)
    _check_assignment(actor, user, user.role, user.permissions or [])
    if user.password_hash is not None:
        raise Conflict("This user has already set a password", code="user_not_pending")
    if not user.is_active:
        raise Conflict("This user is deactivated; reactivate them first", code="user_inactive")
    now = utcnow()
    await _revoke_open_invites(session, user.id, now)
    issued = _new_invite(session, settings, user, actor.user_id, now)
    audit.record(session, actor, "user.reinvite", "user", user.id)
    await session.commit()
    return issued


async def accept_invite(
    session: AsyncSession,
    settings: Settings,
    secret: str,
    data: AcceptInvite,
    client: ClientInfo,
) -> TokenPair:
    """Spend an invite: set the password (and name), then log the user in."""
    now = utcnow()
    row = (
        await session.execute(
            select(Invite, User, Factory)
            .join(User, User.id == Invite.user_id)
            .join(Factory, Factory.id == User.factory_id)
            .where(Invite.token_hash == token_digest(data.token))
        )
    ).first()
    if row is None:
        raise Problem("This invite link is not valid", code="invite_invalid", status=400)
    invite, user, factory = row
    if invite.accepted_at is not None:
        raise Problem("This invite has already been used", code="invite_used", status=410)
    if invite.revoked_at is not None or not user.is_active:
        raise Problem(
            "This invite was replaced or withdrawn; ask for a new one",
            code="invite_revoked",
            status=410,
        )
    if invite.expires_at <= now:
        raise Problem(
            "This invite has expired; ask for a new one", code="invite_expired", status=410
        )
    # Conditional update: of two concurrent acceptances only one spends the invite.
    spent = await session.execute(
        update(Invite)
        .where(Invite.id == invite.id, Invite.accepted_at.is_(None), Invite.revoked_at.is_(None))
        .values(accepted_at=now)
    )
    if spent.rowcount != 1:  # type: ignore[attr-defined]
        await session.rollback()
        raise Problem("This invite has already been used", code="invite_used", status=410)
    before = audit.snapshot(user)
    user.password_hash = hash_password(data.password)
    if data.full_name is not None:
        user.full_name = data.full_name
    await _revoke_open_invites(session, user.id, now)
    await session.flush()
    actor = SystemActor(
        factory.id, email=user.email, user_id=user.id, ip=client.ip, request_id=client.request_id
    )
    audit.record(
        session,
        actor,
        "user.invite_accepted",
        "user",
        user.id,
        before=before,
        after=audit.snapshot(user),
    )
    auth_session, refresh_token = await _open_session(session, settings, user, factory, client, now)
    await session.commit()
    return _token_pair(settings, secret, user, factory, auth_session, refresh_token, now)


# --- passwords --------------------------------------------------------------


async def change_password(
    session: AsyncSession,
    settings: Settings,
    actor: audit.Actor,
    session_id: int,
    factory_slug: str,
    data: PasswordChange,
) -> None:
    """Change one's own password; every other session of the user ends.

    Wrong current passwords count as failed logins, so a stolen access token
    cannot be used to guess the password faster than the login form allows.
    """
    assert actor.user_id is not None
    now = utcnow()
    account = f"{factory_slug}:{actor.email}"
    ip = actor.ip or "unknown"
    await _check_throttle(session, settings, account, ip, now)
    user = await get_user(session, actor.factory_id, actor.user_id, for_update=True)
    if not verify_password(user.password_hash, data.current_password):
        session.add(LoginFailure(account=account, ip=ip, at=now))
        audit.record(session, actor, "user.password_change_failed", "user", user.id)
        await session.commit()
        raise InvalidInput(
            ["current_password"], "The current password is wrong", code="invalid_current_password"
        )
    if data.new_password == data.current_password:
        raise InvalidInput(["new_password"], "The new password must differ from the current one")
    user.password_hash = hash_password(data.new_password)
    await session.execute(
        update(AuthSession)
        .where(
            AuthSession.user_id == user.id,
            AuthSession.id != session_id,
            AuthSession.revoked_at.is_(None),
        )
        .values(revoked_at=now, revoke_reason="password_changed")
    )
    audit.record(session, actor, "user.password_change", "user", user.id)
    await session.commit()


async def reset_password(
    session: AsyncSession,
    factory_id: int,
    email: str,
    new_password: str,
    *,
    actor: audit.Actor | None = None,
) -> User:
    """Set a user's password outside the API (CLI `admin reset-password`). Flushes, doesn't commit.

    Ends all the user's sessions and any pending invite (a pending user can log
    in from now on). Audited as the system unless an actor is given.
    """
    _check_password_length(new_password, "new_password")
    user = await session.scalar(
        select(User)
        .where(User.factory_id == factory_id, User.email == email.strip().lower())
        .with_for_update()
    )
    if user is None:
        raise NotFound(f"no user '{email}' in this factory", code="user_not_found")
    now = utcnow()
    user.password_hash = hash_password(new_password)
    await revoke_user_sessions(session, user.id, "password_reset")
    await _revoke_open_invites(session, user.id, now)
    audit.record(session, actor or SystemActor(factory_id), "user.password_reset", "user", user.id)
    await session.flush()
    return user


# --- roles, permissions, audit ----------------------------------------------


def list_roles() -> list[RoleOut]:
    return [
        RoleOut(
            name=role.value,
            description=ROLE_DESCRIPTIONS[role],
            permissions=sorted(ROLE_PERMISSIONS[role]),
        )
        for role in Role
    ]


def list_permissions() -> list[PermissionOut]:
    return [PermissionOut(name=name, description=text) for name, text in PERMISSIONS.items()]


@dataclass(frozen=True)
class AuditFilters:
    user_id: int | None = None
    entity_type: str | None = None
    entity_id: str | None = None
    action: str | None = None
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    actor: str | None = None  # part of the actor's e-mail ("system" for background work)


async def list_audit(
    session: AsyncSession, factory_id: int, filters: AuditFilters, params: PageParams
) -> tuple[Sequence[AuditEntry], int]:
    """This factory's audit log, newest first; `start` inclusive, `end` exclusive."""
    if filters.start is not None and filters.end is not None and filters.start >= filters.end:
        raise Problem(
            "start must be before end",
            status=422,
            code="validation_error",
            errors=[{"path": "query.end", "message": "must be after start", "type": "value_error"}],
        )
    stmt: Select[AuditEntry] = select(AuditEntry).where(AuditEntry.factory_id == factory_id)
    if filters.user_id is not None:
        stmt = stmt.where(AuditEntry.user_id == filters.user_id)
    if filters.entity_type is not None:
        stmt = stmt.where(AuditEntry.entity_type == filters.entity_type)
    if filters.entity_id is not None:
        stmt = stmt.where(AuditEntry.entity_id == filters.entity_id)
    if filters.action is not None:
        stmt = stmt.where(AuditEntry.action == filters.action)
    if filters.actor:
        pattern = like_pattern(filters.actor)
        stmt = stmt.where(func.lower(AuditEntry.actor).like(pattern, escape="\\"))
    if filters.start is not None:
        stmt = stmt.where(AuditEntry.at >= filters.start)
    if filters.end is not None:
        stmt = stmt.where(AuditEntry.at < filters.end)
    table = AuditEntry.__table__.c
    return await paginate(session, stmt, params, [table.at.desc()], tiebreak=table.id.desc())


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
    await session.execute(delete(LoginFailure).where(LoginFailure.account == account))
    auth_session, refresh_token = await _open_session(session, settings, user, factory, client, now)
    await session.commit()
    return _token_pair(settings, secret, user, factory, auth_session, refresh_token, now)


async def _open_session(
    session: AsyncSession,
    settings: Settings,
    user: User,
    factory: Factory,
    client: ClientInfo,
    now: dt.datetime,
) -> tuple[AuthSession, str]:
    """Start a login session with its first refresh token; audited. The caller commits."""
    user.last_login_at = now
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
    refresh_token = _issue_refresh(session, auth_session, settings, now)
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
    return auth_session, refresh_token


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


async def refresh(
    session: AsyncSession,
    settings: Settings,
    secret: str,
    token: str,
    *,
    reuse_grace_s: float = 0,
) -> TokenPair:
    """Rotate: spend this refresh token, issue a new pair in the same family.

    Presenting a token that was already spent means it leaked (or a client raced);
    either way the whole family is revoked and the user must log in again. With
    `reuse_grace_s` (the web UI's cookie, shared by every tab of a browser, whose
    tabs may refresh in the same instant), a token spent less than that long ago
    gets another new pair instead.
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
    in_grace = stored.used_at is not None and (now - stored.used_at).total_seconds() < reuse_grace_s
    if stored.used_at is not None and not in_grace:
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
    if not in_grace:
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
