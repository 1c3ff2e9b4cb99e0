"""Pages of the UI: dashboard."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from plantwatch.tenancy.auth import Principal
from plantwatch.web.render import render
from plantwatch.web.session import page_principal

router = APIRouter(include_in_schema=False)


@router.get("/")
async def dashboard(
    request: Request, principal: Annotated[Principal, Depends(page_principal)]
) -> Response:
    return render(request, "dashboard.html", principal)
