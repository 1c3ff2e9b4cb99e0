"""Tenancy API: factories, auth (login/refresh/logout/me)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession

from plantwatch.core.errors import NotFound
from plantwatch.core.schemas import Item
from plantwatch.tenancy import service
from plantwatch.tenancy.auth import (
    Principal,
    client_ip,
    container,
    current_principal,
    db_session,
)
from plantwatch.tenancy.models import Factory, User
from plantwatch.tenancy.schemas import (
    FactoryOut,
    FactoryPublic,
    LoginRequest,
    MeOut,
    RefreshRequest,
    TokenPair,
)

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
