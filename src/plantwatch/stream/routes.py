"""`GET /api/v1/stream`: Server-Sent Events of alerts, device status and KPI values."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.security import HTTPAuthorizationCredentials
from starlette.responses import StreamingResponse

from plantwatch.core.errors import Forbidden, Unauthorized
from plantwatch.stream.service import STREAM_TYPES, TYPE_PERMISSIONS, StreamClosed, StreamRequest
from plantwatch.telemetry.kpis import query_error
from plantwatch.tenancy.auth import (
    ACCESS_COOKIE,
    Principal,
    bearer,
    container,
    current_principal,
)

router = APIRouter(prefix="/api/v1", tags=["stream"])

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx and similar proxies would otherwise buffer the stream.
    "X-Accel-Buffering": "no",
}


async def _principal(request: Request, credentials: HTTPAuthorizationCredentials) -> Principal:
    # A session of our own, closed at once: the stream must not hold a connection.
    async with container(request).db.session() as session:
        return await current_principal(request, credentials, session)


def _types(raw: str | None, principal: Principal) -> frozenset[str]:
    if raw is None:
        allowed = frozenset(t for t, p in TYPE_PERMISSIONS.items() if principal.can(p))
        if not allowed:
            raise Forbidden(
                "Missing permission to see any stream events",
                code="permission_denied",
                permission=TYPE_PERMISSIONS["alert"],
            )
        return allowed
    wanted = [t.strip().lower() for t in raw.split(",") if t.strip()]
    unknown = sorted({t for t in wanted if t not in TYPE_PERMISSIONS})
    if unknown or not wanted:
        raise query_error(
            "types", f"unknown event type {', '.join(unknown) or '(none)'}; of {STREAM_TYPES}"
        )
    for t in wanted:
        if not principal.can(TYPE_PERMISSIONS[t]):
            raise Forbidden(
                f"Missing permission '{TYPE_PERMISSIONS[t]}'",
                code="permission_denied",
                permission=TYPE_PERMISSIONS[t],
            )
    return frozenset(wanted)


@router.get(
    "/stream",
    summary="Live events (SSE): alerts, device online/offline, KPI values; resumable",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "An endless text/event-stream; see docs/stream.md",
        }
    },
)
async def stream(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    types: Annotated[
        str | None,
        Query(max_length=100, description="Comma-separated subset of alert,device,kpi"),
    ] = None,
    device: Annotated[
        list[int] | None, Query(description="KPI values of these devices only (repeatable)")
    ] = None,
    kpi_only: Annotated[
        bool, Query(description="KPI values of parameters marked as KPIs only")
    ] = False,
    last_event_id: Annotated[
        str | None,
        Query(max_length=40, description="Resume after this event id (for a new EventSource)"),
    ] = None,
    last_event_id_header: Annotated[
        str | None, Header(alias="Last-Event-ID", max_length=40, description="Resume after this id")
    ] = None,
    access_token: Annotated[
        str | None,
        Query(
            max_length=4096,
            description="The access token, for clients that cannot send headers (EventSource)",
        ),
    ] = None,
) -> StreamingResponse:
    if credentials is None:
        # EventSource sends no headers: the token comes in the URL, or the web UI's
        # session cookie (read once: a stream outliving its token ends with `close`).
        token = access_token or request.cookies.get(ACCESS_COOKIE)
        if token:
            credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("Missing bearer token", code="token_missing")
    auth = credentials
    principal = await _principal(request, auth)
    wanted = _types(types, principal)

    async def revalidate() -> frozenset[str]:
        """The caller's permissions now; StreamClosed when their login has ended."""
        try:
            return (await _principal(request, auth)).permissions
        except Unauthorized as exc:
            raise StreamClosed(exc.code) from exc

    connection = container(request).stream.connect(
        StreamRequest(
            factory_id=principal.factory_id,
            permissions=principal.permissions,
            types=wanted,
            # The header (what EventSource sends when it reconnects) is newer than
            # anything in the URL it was first opened with.
            last_event_id=last_event_id_header or last_event_id,
            devices=frozenset(device) if device else None,
            kpi_only=kpi_only,
        ),
        revalidate,
    )
    return StreamingResponse(
        connection.events(), media_type="text/event-stream", headers=SSE_HEADERS
    )
