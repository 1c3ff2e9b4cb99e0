"""Tenancy API: factories, auth, users and invites, roles, audit log.

Routes parse, call the service and shape the response; the tenant is always
`principal.factory_id`, never a value from the request.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import AwareDatetime
from sqlalchemy.ext.asyncio import AsyncSession

from plantwatch.core.errors import NotFound
from plantwatch.core.schemas import (
    MAX_DB_ID,
    QUERY_TEXT,
    Item,
    Page,
    PageParams,
    PathId,
    page_params,
)
from plantwatch.tenancy import service
from plantwatch.tenancy.auth import (
    Principal,
    client_ip,
    container,
    current_principal,
    db_session,
    require,
)
from plantwatch.tenancy.models import Factory, User
from plantwatch.tenancy.permissions import Role
from plantwatch.tenancy.schemas import (
    AcceptInvite,
    AuditOut,
    FactoryOut,
    FactoryPublic,
    FactoryUpdate,
    InviteOut,
    LoginRequest,
    MeOut,
    PasswordChange,
    PermissionOut,
    RefreshRequest,
    RoleOut,
    TokenPair,
    UserCreate,
    UserInvite,
    UserOut,
    UserUpdate,
)

UserId = PathId

router = APIRouter(prefix="/api/v1")


def client_info(request: Request) -> service.ClientInfo:
    return service.ClientInfo(
        ip=client_ip(request),
        user_agent=request.headers.get("user-agent"),
        request_id=getattr(request.state, "request_id", None),
    )


@router.get("/factories", tags=["auth"], summary="Factories to choose from at login (public)")
async def list_factories(session: AsyncSession = Depends(db_session)) -> Item[list[FactoryPublic]]:
    rows = await service.list_factories(session)
    return Item(data=[FactoryPublic.model_validate(f) for f in rows])


@router.post("/auth/login", tags=["auth"], response_model=TokenPair)
async def login(
    body: LoginRequest, request: Request, session: AsyncSession = Depends(db_session)
) -> TokenPair:
    c = container(request)
    return await service.login(session, c.settings, c.secret, body, client_info(request))


@router.post("/auth/refresh", tags=["auth"], response_model=TokenPair)
async def refresh(
    body: RefreshRequest, request: Request, session: AsyncSession = Depends(db_session)
) -> TokenPair:
    c = container(request)
    return await service.refresh(session, c.settings, c.secret, body.refresh_token)


@router.post("/auth/logout", tags=["auth"], status_code=204)
async def logout(
    principal: Principal = Depends(current_principal),
    session: AsyncSession = Depends(db_session),
) -> Response:
    await service.logout(session, principal.session_id, principal)
    return Response(status_code=204)


@router.get("/auth/me", tags=["auth"])
async def me(
    principal: Principal = Depends(current_principal),
    session: AsyncSession = Depends(db_session),
) -> Item[MeOut]:
    user = await session.get(User, principal.user_id)
    factory = await session.get(Factory, principal.factory_id)
    if user is None or factory is None:
        raise NotFound()
    return Item(data=MeOut(user=service.user_out(user), factory=FactoryOut.model_validate(factory)))


# --- passwords ----------------------------------------------------------------


@router.post(
    "/auth/password",
    tags=["auth"],
    status_code=204,
    summary="Change your own password; your other sessions end",
)
async def change_password(
    body: PasswordChange,
    request: Request,
    principal: Principal = Depends(current_principal),
    session: AsyncSession = Depends(db_session),
) -> Response:
    await service.change_password(
        session,
        container(request).settings,
        principal,
        principal.session_id,
        principal.factory_slug,
        body,
    )
    return Response(status_code=204)


# --- current factory ------------------------------------------------------------


@router.get("/factory", tags=["factory"], summary="The caller's factory")
async def get_factory(
    principal: Principal = Depends(require("factory:read")),
    session: AsyncSession = Depends(db_session),
) -> Item[FactoryOut]:
    factory = await service.get_factory(session, principal.factory_id)
    return Item(data=FactoryOut.model_validate(factory))


@router.patch("/factory", tags=["factory"], summary="Change the caller's factory")
async def update_factory(
    body: FactoryUpdate,
    principal: Principal = Depends(require("factory:manage")),
    session: AsyncSession = Depends(db_session),
) -> Item[FactoryOut]:
    factory = await service.update_factory(session, principal, body)
    return Item(data=FactoryOut.model_validate(factory))


# --- roles and permissions --------------------------------------------------------


@router.get("/roles", tags=["users"], summary="Roles and the permissions each carries")
async def list_roles(_: Principal = Depends(current_principal)) -> Item[list[RoleOut]]:
    return Item(data=service.list_roles())


@router.get("/permissions", tags=["users"], summary="Every permission and what it allows")
async def list_permissions(
    _: Principal = Depends(current_principal),
) -> Item[list[PermissionOut]]:
    return Item(data=service.list_permissions())


# --- users ------------------------------------------------------------------------


@router.get("/users", tags=["users"], summary="Users of the caller's factory")
async def list_users(
    principal: Principal = Depends(require("users:read")),
    session: AsyncSession = Depends(db_session),
    paging: PageParams = Depends(page_params),
    role: Role | None = Query(None, description="Only users with this role"),
    is_active: bool | None = Query(None, description="Active (true) or deactivated (false)"),
    pending: bool | None = Query(None, description="Invited and not yet accepted"),
    search: str | None = Query(
        None, max_length=200, pattern=QUERY_TEXT, description="Part of the e-mail or name"
    ),
    sort: str | None = Query(
        None,
        max_length=200,
        description="Comma-separated fields, `-` for descending: " + ", ".join(service.USER_SORTS),
    ),
) -> Page[UserOut]:
    filters = service.UserFilters(
        role=role.value if role is not None else None,
        is_active=is_active,
        pending=pending,
        search=search,
    )
    rows, total = await service.list_users(session, principal.factory_id, filters, paging, sort)
    return Page.of([service.user_out(u) for u in rows], total, paging)


@router.post("/users", tags=["users"], status_code=201, summary="Create a user with a password")
async def create_user(
    body: UserCreate,
    principal: Principal = Depends(require("users:manage")),
    session: AsyncSession = Depends(db_session),
) -> Item[UserOut]:
    user = await service.create_user(session, principal, body)
    return Item(data=service.user_out(user))


@router.post(
    "/users/invite",
    tags=["users"],
    status_code=201,
    summary="Invite a user: they set their own password through the returned link",
)
async def invite_user(
    body: UserInvite,
    request: Request,
    principal: Principal = Depends(require("users:manage")),
    session: AsyncSession = Depends(db_session),
) -> Item[InviteOut]:
    issued = await service.invite_user(session, principal, container(request).settings, body)
    return Item(data=_invite_out(request, issued))


@router.post(
    "/users/accept-invite",
    tags=["users"],
    response_model=TokenPair,
    summary="Accept an invite (public): set a password and log in",
)
async def accept_invite(
    body: AcceptInvite, request: Request, session: AsyncSession = Depends(db_session)
) -> TokenPair:
    c = container(request)
    return await service.accept_invite(session, c.settings, c.secret, body, client_info(request))


@router.get("/users/{user_id}", tags=["users"], summary="One user")
async def get_user(
    user_id: UserId,
    principal: Principal = Depends(require("users:read")),
    session: AsyncSession = Depends(db_session),
) -> Item[UserOut]:
    user = await service.get_user(session, principal.factory_id, user_id)
    return Item(data=service.user_out(user))


@router.patch("/users/{user_id}", tags=["users"], summary="Change a user's details or access")
async def update_user(
    user_id: UserId,
    body: UserUpdate,
    principal: Principal = Depends(require("users:manage")),
    session: AsyncSession = Depends(db_session),
) -> Item[UserOut]:
    user = await service.update_user(session, principal, user_id, body)
    return Item(data=service.user_out(user))


@router.delete(
    "/users/{user_id}",
    tags=["users"],
    status_code=204,
    summary="Deactivate a user and end their sessions",
)
async def deactivate_user(
    user_id: UserId,
    principal: Principal = Depends(require("users:manage")),
    session: AsyncSession = Depends(db_session),
) -> Response:
    await service.deactivate_user(session, principal, user_id)
    return Response(status_code=204)


@router.post(
    "/users/{user_id}/invite",
    tags=["users"],
    status_code=201,
    summary="Re-invite a pending user: a fresh link; earlier links stop working",
)
async def reinvite_user(
    user_id: UserId,
    request: Request,
    principal: Principal = Depends(require("users:manage")),
    session: AsyncSession = Depends(db_session),
) -> Item[InviteOut]:
    issued = await service.reinvite_user(session, principal, container(request).settings, user_id)
    return Item(data=_invite_out(request, issued))


def _invite_out(request: Request, issued: service.IssuedInvite) -> InviteOut:
    base = container(request).settings.public_url or str(request.base_url)
    return InviteOut(
        user=service.user_out(issued.user),
        invite_token=issued.token,
        expires_at=issued.expires_at,
        accept_url=service.accept_url(base, issued.token),
    )


# --- audit ------------------------------------------------------------------------


@router.get("/audit", tags=["audit"], summary="The factory's audit log, newest first")
async def list_audit(
    principal: Principal = Depends(require("audit:read")),
    session: AsyncSession = Depends(db_session),
    paging: PageParams = Depends(page_params),
    user_id: int | None = Query(None, ge=1, le=MAX_DB_ID, description="Who acted"),
    entity_type: str | None = Query(None, max_length=64, pattern=QUERY_TEXT),
    entity_id: str | None = Query(None, max_length=64, pattern=QUERY_TEXT),
    action: str | None = Query(None, max_length=64, pattern=QUERY_TEXT),
    start: AwareDatetime | None = Query(None, description="From (inclusive), ISO-8601 with offset"),
    end: AwareDatetime | None = Query(None, description="Until (exclusive), ISO-8601 with offset"),
) -> Page[AuditOut]:
    filters = service.AuditFilters(
        user_id=user_id,
        entity_type=entity_type,
        entity_id=entity_id,
        action=action,
        start=start,
        end=end,
    )
    rows, total = await service.list_audit(session, principal.factory_id, filters, paging)
    return Page.of([AuditOut.model_validate(r) for r in rows], total, paging)
