"""Telemetry API: HTTP ingest and dead letters."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import AwareDatetime
from sqlalchemy.ext.asyncio import AsyncSession

from plantwatch.app import Container
from plantwatch.core.errors import Forbidden, Problem, Unauthorized
from plantwatch.core.jsonutil import dumps
from plantwatch.core.schemas import QUERY_TEXT, Item, Page, PageParams, PathId, page_params
from plantwatch.telemetry import payloads, service
from plantwatch.telemetry.pipeline import DeviceRef, IngestOutcome
from plantwatch.telemetry.schemas import (
    DeadLetterOut,
    DeadLetterSummary,
    IngestResult,
    ReplayOut,
    ReplayRequest,
)
from plantwatch.tenancy.auth import Principal, container, db_session, require

router = APIRouter(prefix="/api/v1")
Session = Annotated[AsyncSession, Depends(db_session)]
Paging = Annotated[PageParams, Depends(page_params)]
DEVICE_KEY_DOC = "A device key from POST /api/v1/devices/{id}/keys"
# Whole-message rejects answer with these statuses (the message is a dead letter either way).
_FATAL_STATUS = {payloads.PAYLOAD_TOO_LARGE: 413, payloads.TOO_MANY_ENTRIES: 413}


async def sending_device(
    request: Request,
    x_device_key: str | None = Header(None, alias="X-Device-Key", description=DEVICE_KEY_DOC),
) -> DeviceRef:
    device = await container(request).devices.by_key(x_device_key or "")
    if device is None:
        raise Unauthorized(
            "Missing, unknown or revoked device key",
            code="device_key_invalid",
            headers={"WWW-Authenticate": "DeviceKey"},
        )
    return device


async def _capped_body(request: Request, limit: int) -> tuple[bytes, bool]:
    """The body, read no further than `limit` + 1 bytes; (body, too_large)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return b"", True
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], True
        chunks.append(chunk)
    return b"".join(chunks), False


async def _ingest(request: Request, c: Container, device: DeviceRef) -> Response:
    limit = c.settings.ingest_max_payload_bytes
    body, too_large = await _capped_body(request, limit)
    if too_large:
        # Keep a bounded prefix so a person can see what was sent.
        await c.pipeline.dead_letter(
            factory_id=device.factory_id,
            source="http",
            raw=body[:65536],
            reason=payloads.PAYLOAD_TOO_LARGE,
            detail=f"body exceeds the limit of {limit} bytes",
            device_key=device.device_key,
            device_id=device.device_id,
        )
        raise Problem(
            f"body exceeds the limit of {limit} bytes", status=413, code=payloads.PAYLOAD_TOO_LARGE
        )
    outcome = await c.pipeline.ingest(device, body, source="http")
    return _result(outcome)


def _result(outcome: IngestOutcome) -> Response:
    if not outcome.accepted and len(outcome.rejects) == 1:
        only = outcome.rejects[0]
        if only.reason in (
            payloads.INVALID_JSON,
            payloads.INVALID_SHAPE,
            payloads.PAYLOAD_TOO_LARGE,
            payloads.TOO_MANY_ENTRIES,
        ):
            raise Problem(only.detail, status=_FATAL_STATUS.get(only.reason, 422), code=only.reason)
    # Serialised here (an IngestResult, as documented): the hot path skips the response
    # model's validation round.
    body = {
        "accepted": outcome.accepted,
        "rejected": len(outcome.rejects),
        "rejects": [{"reason": r.reason, "detail": r.detail} for r in outcome.rejects[:20]],
    }
    return Response(dumps(body), media_type="application/json")


@router.post(
    "/ingest",
    tags=["telemetry"],
    summary="Send telemetry as a device (X-Device-Key); one payload or a JSON array",
    response_model=IngestResult,
)
async def ingest(request: Request, device: DeviceRef = Depends(sending_device)) -> Response:
    return await _ingest(request, container(request), device)


@router.post(
    "/devices/{device_key}/telemetry",
    tags=["telemetry"],
    summary="Send telemetry for the device named in the path (must own the X-Device-Key)",
    response_model=IngestResult,
)
async def ingest_for_device(
    device_key: Annotated[str, Path(max_length=100)],
    request: Request,
    device: DeviceRef = Depends(sending_device),
) -> Response:
    c = container(request)
    if device_key != device.device_key:
        await c.pipeline.dead_letter(
            factory_id=device.factory_id,
            source="http",
            raw=b"",
            reason=service.DEVICE_MISMATCH,
            detail=f"key of device '{device.device_key}' used for device '{device_key[:100]}'",
            device_key=device.device_key,
            device_id=device.device_id,
        )
        raise Forbidden("This key belongs to another device", code=service.DEVICE_MISMATCH)
    return await _ingest(request, c, device)


# --- dead letters ---------------------------------------------------------------------


@router.get("/dead-letters", tags=["telemetry"], summary="Telemetry that could not be stored")
async def list_dead_letters(
    principal: Annotated[Principal, Depends(require("telemetry:read"))],
    session: Session,
    params: Paging,
    reason: Annotated[str | None, Query(max_length=48, pattern=QUERY_TEXT)] = None,
    device_id: Annotated[int | None, Query(ge=1)] = None,
    device_key: Annotated[str | None, Query(max_length=100, pattern=QUERY_TEXT)] = None,
    source: Annotated[str | None, Query(max_length=16, pattern=QUERY_TEXT)] = None,
    start: AwareDatetime | None = None,
    end: AwareDatetime | None = None,
    replayed: bool | None = None,
) -> Page[DeadLetterOut]:
    filters = service.DeadLetterFilters(reason, device_id, device_key, source, start, end, replayed)
    rows, total = await service.list_dead_letters(session, principal.factory_id, filters, params)
    return Page.of([DeadLetterOut.model_validate(r) for r in rows], total, params)


@router.get(
    "/dead-letters/summary", tags=["telemetry"], summary="Dead letters not yet replayed, by reason"
)
async def dead_letter_summary(
    principal: Annotated[Principal, Depends(require("telemetry:read"))], session: Session
) -> Item[DeadLetterSummary]:
    counts = await service.dead_letter_reasons(session, principal.factory_id)
    return Item(data=DeadLetterSummary(open_by_reason=counts))


@router.get("/dead-letters/{dead_letter_id}", tags=["telemetry"], summary="One dead letter")
async def get_dead_letter(
    dead_letter_id: PathId,
    principal: Annotated[Principal, Depends(require("telemetry:read"))],
    session: Session,
) -> Item[DeadLetterOut]:
    found = await service.get_dead_letter(session, principal.factory_id, dead_letter_id)
    return Item(data=DeadLetterOut.model_validate(found))


@router.post(
    "/dead-letters/replay",
    tags=["telemetry"],
    summary="Feed dead letters through ingest again after fixing their cause",
)
async def replay_dead_letters(
    body: ReplayRequest,
    request: Request,
    principal: Annotated[Principal, Depends(require("telemetry:write"))],
    session: Session,
) -> Item[list[ReplayOut]]:
    c = container(request)
    results = await service.replay(session, principal, body.ids, c.devices, c.pipeline)
    return Item(
        data=[
            ReplayOut(id=r.id, status=r.status, accepted=r.accepted, detail=r.detail)
            for r in results
        ]
    )
