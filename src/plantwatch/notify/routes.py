"""Notifications API: channels (+ test), the caller's preferences, the delivery log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from pydantic import AwareDatetime
from sqlalchemy.ext.asyncio import AsyncSession

from plantwatch.core.config import Settings
from plantwatch.core.schemas import (
    MAX_DB_ID,
    QUERY_TEXT,
    Item,
    Page,
    PageParams,
    PathId,
    page_params,
)
from plantwatch.notify import service
from plantwatch.notify.schemas import (
    ChannelBody,
    ChannelKind,
    ChannelOut,
    ChannelTest,
    ChannelTestResult,
    ChannelUpdate,
    DeliveryOut,
    DeliveryStatus,
    PreferencesBody,
    PreferencesOut,
)
from plantwatch.tenancy.auth import Principal, container, db_session, require

router = APIRouter(prefix="/api/v1/notifications", tags=["notifications"])
Session = Annotated[AsyncSession, Depends(db_session)]
Reader = Annotated[Principal, Depends(require("alerts:read"))]
Manager = Annotated[Principal, Depends(require("alerts:manage"))]
Paging = Annotated[PageParams, Depends(page_params)]
OptionalId = Annotated[int | None, Query(ge=1, le=MAX_DB_ID)]


def _settings(request: Request) -> Settings:
    return container(request).settings


AppSettings = Annotated[Settings, Depends(_settings)]


@router.get("/channels", summary="List notification channels (secrets masked)")
async def list_channels(
    principal: Reader,
    session: Session,
    params: Paging,
    kind: ChannelKind | None = None,
    is_active: bool | None = None,
    search: Annotated[str | None, Query(max_length=200, pattern=QUERY_TEXT)] = None,
    sort: Annotated[str | None, Query(max_length=100, pattern=QUERY_TEXT)] = None,
) -> Page[ChannelOut]:
    rows, total = await service.list_channels(
        session,
        principal.factory_id,
        params,
        kind=kind.value if kind else None,
        is_active=is_active,
        search=search,
        sort=sort,
    )
    return Page.of(rows, total, params)


@router.post("/channels", status_code=201, summary="Create a channel (config checked per kind)")
async def create_channel(
    body: ChannelBody, principal: Manager, session: Session
) -> Item[ChannelOut]:
    return Item(data=await service.create_channel(session, principal, body))


@router.get("/channels/{channel_id}", summary="One channel (secrets masked)")
async def get_channel(channel_id: PathId, principal: Reader, session: Session) -> Item[ChannelOut]:
    return Item(data=await service.get_channel(session, principal.factory_id, channel_id))


@router.patch("/channels/{channel_id}", summary="Change a channel (config is merged)")
async def update_channel(
    channel_id: PathId, body: ChannelUpdate, principal: Manager, session: Session
) -> Item[ChannelOut]:
    return Item(data=await service.update_channel(session, principal, channel_id, body))


@router.delete("/channels/{channel_id}", status_code=204, summary="Delete a channel")
async def delete_channel(channel_id: PathId, principal: Manager, session: Session) -> Response:
    await service.delete_channel(session, principal, channel_id)
    return Response(status_code=204)


@router.post("/channels/{channel_id}/test", summary="Send a test message now; the outcome")
async def test_channel(
    channel_id: PathId,
    principal: Manager,
    session: Session,
    settings: AppSettings,
    body: Annotated[ChannelTest | None, Body()] = None,
) -> Item[ChannelTestResult]:
    result = await service.test_channel(
        session, settings, principal, channel_id, body.to if body else None
    )
    return Item(data=result)


@router.get("/preferences", summary="The caller's notification preferences")
async def get_preferences(
    principal: Reader, session: Session, settings: AppSettings
) -> Item[PreferencesOut]:
    return Item(data=await service.get_preferences(session, settings, principal))


@router.put("/preferences", summary="Set the caller's notification preferences")
async def put_preferences(
    body: PreferencesBody, principal: Reader, session: Session, settings: AppSettings
) -> Item[PreferencesOut]:
    return Item(data=await service.put_preferences(session, settings, principal, body))


@router.get("/deliveries", summary="The delivery log: every message and its attempts")
async def list_deliveries(
    principal: Reader,
    session: Session,
    params: Paging,
    status: DeliveryStatus | None = None,
    channel_id: OptionalId = None,
    alert_id: OptionalId = None,
    user_id: OptionalId = None,
    event: Annotated[str | None, Query(max_length=32, pattern=r"^[a-z_]+$")] = None,
    since: Annotated[AwareDatetime | None, Query(description="Created at or after")] = None,
    until: Annotated[AwareDatetime | None, Query(description="Created before")] = None,
    sort: Annotated[str | None, Query(max_length=100, pattern=QUERY_TEXT)] = None,
) -> Page[DeliveryOut]:
    rows, total = await service.list_deliveries(
        session,
        principal.factory_id,
        params,
        status=status.value if status else None,
        channel_id=channel_id,
        alert_id=alert_id,
        user_id=user_id,
        event=event,
        since=since,
        until=until,
        sort=sort,
    )
    return Page.of(rows, total, params)


@router.get("/deliveries/{delivery_id}", summary="One delivery with its attempts")
async def get_delivery(
    delivery_id: PathId, principal: Reader, session: Session
) -> Item[DeliveryOut]:
    return Item(data=await service.get_delivery(session, principal.factory_id, delivery_id))


@router.post("/deliveries/{delivery_id}/retry", summary="Send a failed or dead delivery again")
async def retry_delivery(
    delivery_id: PathId, principal: Manager, session: Session, settings: AppSettings
) -> Item[DeliveryOut]:
    return Item(data=await service.retry_delivery(session, settings, principal, delivery_id))
