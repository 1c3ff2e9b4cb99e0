"""The invite page (public): `/accept-invite?token=...`, the link the Users page hands out.

GET shows a form: the optional full name, a new password and its confirmation.
POST (a plain form post, no script) spends the invite through
`tenancy.service.accept_invite` — the same call as `POST /api/v1/users/accept-invite`
— which sets the password and opens a session; its token pair goes into the
session cookies and the browser is sent to the dashboard.

The page is used before anyone is logged in, so there is no CSRF token: the
invite token in the form is the secret. Errors re-render the page and change
nothing: a mismatched confirmation or a password the API refuses (422, the form
again), a link that is unknown, used, withdrawn or expired (400, the reason and
no form — a new link is needed).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from pydantic import ValidationError
from starlette.responses import RedirectResponse, Response

from plantwatch.core.errors import Problem
from plantwatch.tenancy import service as tenancy_service
from plantwatch.tenancy.auth import container
from plantwatch.tenancy.routes import client_info
from plantwatch.tenancy.schemas import AcceptInvite
from plantwatch.web.render import render
from plantwatch.web.session import set_session_cookies

router = APIRouter(include_in_schema=False)

# Mirrors tenancy.schemas.Password (the API enforces it; the form only hints).
PASSWORD_MIN = 8
PASSWORD_MAX = 256
PASSWORD_RULE = f"{PASSWORD_MIN} to {PASSWORD_MAX} characters."
# A bound on what the form parser takes; AcceptInvite checks the real limits, so an
# over-long value gets the page with its error rather than a JSON 422.
FIELD_MAX = 4096

BAD_LINK = "This invite link is not valid. Check that you copied the whole link."
# The service's problem codes for a link that cannot be used (any of them: ask again).
LINK_PROBLEMS = {"invite_invalid", "invite_used", "invite_revoked", "invite_expired"}


def _page(
    request: Request,
    token: str,
    *,
    error: str | None = None,
    link_error: bool = False,
    full_name: str = "",
    status_code: int = 200,
) -> Response:
    return render(
        request,
        "accept_invite.html",
        status_code=status_code,
        token=token,
        error=error,
        link_error=link_error,
        full_name=full_name,
        password_min=PASSWORD_MIN,
        password_max=PASSWORD_MAX,
        password_rule=PASSWORD_RULE,
    )


def _validation_message(exc: ValidationError) -> tuple[str, bool]:
    """The first field the API refused, in words; and whether it was the link."""
    fields = {str(e["loc"][0]) for e in exc.errors() if e.get("loc")}
    if "token" in fields:
        return BAD_LINK, True
    if "password" in fields:
        return f"Choose a password of {PASSWORD_RULE.lower()}", False
    if "full_name" in fields:
        return "The name must be at most 200 characters, on one line.", False
    return "Check the form and try again.", False


@router.get("/accept-invite")
async def accept_invite_page(request: Request, token: str = "") -> Response:
    if not token:
        return _page(request, "", error=BAD_LINK, link_error=True, status_code=400)
    return _page(request, token)


@router.post("/accept-invite")
async def accept_invite(
    request: Request,
    token: Annotated[str, Form(max_length=FIELD_MAX)] = "",
    full_name: Annotated[str, Form(max_length=FIELD_MAX)] = "",
    password: Annotated[str, Form(max_length=FIELD_MAX)] = "",
    password_confirm: Annotated[str, Form(max_length=FIELD_MAX)] = "",
) -> Response:
    if password != password_confirm:
        return _page(
            request,
            token,
            error="The two passwords do not match. Type the same password twice.",
            full_name=full_name,
            status_code=422,
        )
    try:
        data = AcceptInvite(token=token, password=password, full_name=full_name.strip() or None)
    except ValidationError as exc:
        message, link_error = _validation_message(exc)
        return _page(
            request,
            token,
            error=message,
            link_error=link_error,
            full_name=full_name,
            status_code=400 if link_error else 422,
        )
    c = container(request)
    try:
        async with c.db.session() as session:
            pair = await tenancy_service.accept_invite(
                session, c.settings, c.secret, data, client_info(request)
            )
    except Problem as exc:
        if exc.code not in LINK_PROBLEMS:
            raise
        return _page(
            request,
            token,
            error=f"{exc.detail}.",
            link_error=True,
            full_name=full_name,
            status_code=400,
        )
    response = RedirectResponse("/", status_code=303)
    set_session_cookies(response, c.settings, pair)
    return response
