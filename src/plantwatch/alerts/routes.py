"""Alerts API: list/filter, counts, detail with timeline and SLA clock, the lifecycle
actions, and the factory's SLA and escalation chain."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AwareDatetime
from sqlalchemy.ext.asyncio import AsyncSession

from plantwatch.alerts import service
from plantwatch.alerts.schemas import (
    AcknowledgeBody,
    AlertCounts,
    AlertDetail,
    AlertOut,
    AlertStatus,
    AssignBody,
    CommentBody,
    EscalateBody,
    EscalationChainBody,
    EscalationChainOut,
    ReopenBody,
    ResolveBody,
    Severity,
    SlaConfigBody,
    SlaPolicyOut,
    TimelineEntry,
)
from plantwatch.core.bus import Bus
from plantwatch.core.errors import Problem
from plantwatch.core.schemas import (
    MAX_DB_ID,
    QUERY_TEXT,
    Item,
    Page,
    PageParams,
    PathId,
    page_params,
)
from plantwatch.tenancy.auth import Principal, container, db_session, require

router = APIRouter(prefix="/api/v1", tags=["alerts"])
Session = Annotated[AsyncSession, Depends(db_session)]
Reader = Annotated[Principal, Depends(require("alerts:read"))]
Responder = Annotated[Principal, Depends(require("alerts:respond"))]
Manager = Annotated[Principal, Depends(require("alerts:manage"))]
Paging = Annotated[PageParams, Depends(page_params)]
QueryId = Annotated[int | None, Query(ge=1, le=MAX_DB_ID)]


def bus(request: Request) -> Bus:
    return container(request).bus


EventBus = Annotated[Bus, Depends(bus)]


def alert_filters(
    severity: Annotated[list[Severity] | None, Query(description="Repeat for several")] = None,
    status: Annotated[list[AlertStatus] | None, Query(description="Repeat for several")] = None,
    device_id: QueryId = None,
    rule_id: QueryId = None,
    assigned_to: QueryId = None,
    start: Annotated[
        AwareDatetime | None, Query(alias="from", description="triggered_at >= from")
    ] = None,
    end: Annotated[AwareDatetime | None, Query(alias="to", description="triggered_at < to")] = None,
) -> dict[str, Any]:
    if start is not None and end is not None and end <= start:
        raise Problem(
            "'to' must be after 'from'",
            status=422,
            code="validation_error",
            errors=[{"path": "query.to", "message": "must be after 'from'", "type": "value_error"}],
        )
    return {
        "severity": [s.value for s in severity or ()],
        "status": [s.value for s in status or ()],
        "device_id": device_id,
        "rule_id": rule_id,
        "assigned_to": assigned_to,
        "start": start.astimezone(dt.UTC) if start else None,
        "end": end.astimezone(dt.UTC) if end else None,
    }


Filters = Annotated[dict[str, Any], Depends(alert_filters)]


@router.get("/alerts", summary="List alerts (filter by severity, status, device, rule, time)")
async def list_alerts(
    principal: Reader,
    session: Session,
    params: Paging,
    filters: Filters,
    sort: Annotated[
        str | None,
        Query(
            max_length=100,
            pattern=QUERY_TEXT,
            description="e.g. -triggered_at (default), severity, -occurrences",
        ),
    ] = None,
) -> Page[AlertOut]:
    rows, total = await service.list_alerts(
        session, principal.factory_id, params, sort=sort, **filters
    )
    return Page.of(rows, total, params)


@router.get("/alerts/counts", summary="Alert counts by severity and status (dashboards)")
async def alert_counts(principal: Reader, session: Session, filters: Filters) -> Item[AlertCounts]:
    return Item(data=await service.counts(session, principal.factory_id, **filters))


@router.get("/alerts/sla", summary="The factory's SLA per severity")
async def get_sla(principal: Reader, session: Session) -> Item[list[SlaPolicyOut]]:
    return Item(data=await service.get_sla(session, principal.factory_id))


@router.put("/alerts/sla", summary="Set the factory's SLA (unlisted severities: defaults)")
async def put_sla(
    body: SlaConfigBody, principal: Manager, session: Session
) -> Item[list[SlaPolicyOut]]:
    return Item(data=await service.put_sla(session, principal, body))


@router.get("/alerts/escalation-chain", summary="The factory's escalation chain")
async def get_chain(principal: Reader, session: Session) -> Item[EscalationChainOut]:
    return Item(data=await service.get_chain(session, principal.factory_id))


@router.put("/alerts/escalation-chain", summary="Replace the escalation chain")
async def put_chain(
    body: EscalationChainBody, principal: Manager, session: Session
) -> Item[EscalationChainOut]:
    return Item(data=await service.put_chain(session, principal, body))


@router.get("/alerts/{alert_id}", summary="One alert, with its SLA clock and timeline")
async def get_alert(alert_id: PathId, principal: Reader, session: Session) -> Item[AlertDetail]:
    return Item(data=await service.get_alert(session, principal.factory_id, alert_id))


@router.get("/alerts/{alert_id}/timeline", summary="Who did what, oldest first")
async def alert_timeline(
    alert_id: PathId, principal: Reader, session: Session, params: Paging
) -> Page[TimelineEntry]:
    rows, total = await service.timeline(session, principal.factory_id, alert_id, params)
    return Page.of(rows, total, params)


@router.post("/alerts/{alert_id}/acknowledge", summary="Acknowledge (stops reminders)")
async def acknowledge(
    alert_id: PathId,
    principal: Responder,
    session: Session,
    events: EventBus,
    body: AcknowledgeBody | None = None,
) -> Item[AlertDetail]:
    note = body.note if body else None
    return Item(data=await service.acknowledge(session, events, principal, alert_id, note))


@router.post("/alerts/{alert_id}/assign", summary="Assign to a user of this factory")
async def assign(
    alert_id: PathId, body: AssignBody, principal: Responder, session: Session, events: EventBus
) -> Item[AlertDetail]:
    result = await service.assign(session, events, principal, alert_id, body.user_id, body.note)
    return Item(data=result)


@router.post("/alerts/{alert_id}/resolve", summary="Resolve, with an optional note")
async def resolve(
    alert_id: PathId,
    principal: Responder,
    session: Session,
    events: EventBus,
    body: ResolveBody | None = None,
) -> Item[AlertDetail]:
    note = body.note if body else None
    return Item(data=await service.resolve(session, events, principal, alert_id, note))


@router.post("/alerts/{alert_id}/reopen", summary="Reopen a resolved alert (fresh SLA)")
async def reopen(
    alert_id: PathId,
    principal: Responder,
    session: Session,
    events: EventBus,
    body: ReopenBody | None = None,
) -> Item[AlertDetail]:
    reason = body.reason if body else None
    return Item(data=await service.reopen(session, events, principal, alert_id, reason))


@router.post("/alerts/{alert_id}/comments", status_code=201, summary="Add a comment")
async def add_comment(
    alert_id: PathId, body: CommentBody, principal: Responder, session: Session, events: EventBus
) -> Item[TimelineEntry]:
    return Item(data=await service.comment(session, events, principal, alert_id, body.text))


@router.post("/alerts/{alert_id}/escalate", summary="Escalate one level up the chain")
async def escalate(
    alert_id: PathId,
    principal: Manager,
    session: Session,
    events: EventBus,
    body: EscalateBody | None = None,
) -> Item[AlertDetail]:
    reason = body.reason if body else None
    return Item(data=await service.escalate(session, events, principal, alert_id, reason))
