"""Rules API: CRUD, toggle, validate, backtest (saved or unsaved rules)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession

from plantwatch.core.schemas import QUERY_TEXT, Item, Page, PageParams, PathId, page_params
from plantwatch.rules import service
from plantwatch.rules.schemas import (
    BacktestOut,
    BacktestRequest,
    RuleBody,
    RuleOut,
    RuleUpdate,
    Severity,
    UnsavedBacktest,
    ValidateOut,
)
from plantwatch.tenancy.auth import Principal, container, db_session, require

router = APIRouter(prefix="/api/v1", tags=["rules"])
Session = Annotated[AsyncSession, Depends(db_session)]
Reader = Annotated[Principal, Depends(require("rules:read"))]
Writer = Annotated[Principal, Depends(require("rules:write"))]
Paging = Annotated[PageParams, Depends(page_params)]


@router.get("/rules", summary="List alert rules")
async def list_rules(
    principal: Reader,
    session: Session,
    params: Paging,
    search: Annotated[str | None, Query(max_length=200, pattern=QUERY_TEXT)] = None,
    is_active: bool | None = None,
    severity: Severity | None = None,
    device_id: Annotated[
        int | None, Query(ge=1, description="Rules that cover this device")
    ] = None,
    sort: Annotated[str | None, Query(max_length=100, pattern=QUERY_TEXT)] = None,
) -> Page[RuleOut]:
    rows, total = await service.list_rules(
        session,
        principal.factory_id,
        params,
        search=search,
        is_active=is_active,
        severity=severity.value if severity else None,
        device_id=device_id,
        sort=sort,
    )
    return Page.of(rows, total, params)


@router.post("/rules", status_code=201, summary="Create a rule (422 names each bad node)")
async def create_rule(
    request: Request, body: RuleBody, principal: Writer, session: Session
) -> Item[RuleOut]:
    rule = await service.create_rule(session, principal, body)
    await service.publish_changed(container(request).bus, principal.factory_id, rule.id)
    return Item(data=rule)


@router.post("/rules/validate", summary="Check a rule without saving it")
async def validate_rule(body: RuleBody, principal: Writer, session: Session) -> Item[ValidateOut]:
    return Item(data=await service.validate_body(session, principal.factory_id, body))


@router.post("/rules/backtest", summary="When would this unsaved rule have fired?")
async def backtest_unsaved(
    body: UnsavedBacktest, principal: Writer, session: Session
) -> Item[BacktestOut]:
    result = await service.backtest(
        session, principal.factory_id, body.rule, body.start, body.end, body.device_ids
    )
    return Item(data=result)


@router.get("/rules/{rule_id}", summary="One rule")
async def get_rule(rule_id: PathId, principal: Reader, session: Session) -> Item[RuleOut]:
    return Item(data=await service.get_rule(session, principal.factory_id, rule_id))


@router.patch("/rules/{rule_id}", summary="Change a rule")
async def update_rule(
    request: Request, rule_id: PathId, body: RuleUpdate, principal: Writer, session: Session
) -> Item[RuleOut]:
    rule = await service.update_rule(session, principal, rule_id, body)
    await service.publish_changed(container(request).bus, principal.factory_id, rule_id)
    return Item(data=rule)


@router.delete("/rules/{rule_id}", status_code=204, summary="Delete a rule")
async def delete_rule(
    request: Request, rule_id: PathId, principal: Writer, session: Session
) -> Response:
    await service.delete_rule(session, principal, rule_id)
    await service.publish_changed(container(request).bus, principal.factory_id, rule_id)
    return Response(status_code=204)


@router.post("/rules/{rule_id}/toggle", summary="Switch a rule on or off")
async def toggle_rule(
    request: Request, rule_id: PathId, principal: Writer, session: Session
) -> Item[RuleOut]:
    current = await service.get_rule(session, principal.factory_id, rule_id)
    rule = await service.set_active(session, principal, rule_id, not current.is_active)
    if rule.version != current.version:
        await service.publish_changed(container(request).bus, principal.factory_id, rule_id)
    return Item(data=rule)


@router.post("/rules/{rule_id}/backtest", summary="When would this rule have fired?")
async def backtest_saved(
    rule_id: PathId, body: BacktestRequest, principal: Writer, session: Session
) -> Item[BacktestOut]:
    rule = await service.body_of(session, principal.factory_id, rule_id)
    result = await service.backtest(
        session, principal.factory_id, rule, body.start, body.end, body.device_ids
    )
    return Item(data=result)
