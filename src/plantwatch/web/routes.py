"""The UI's own routes (login, logout, session refresh) and its installation in the app."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, FastAPI, Form, Request
from pydantic import ValidationError
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from plantwatch.core.errors import TooManyRequests, Unauthorized
from plantwatch.tenancy import service as tenancy_service
from plantwatch.tenancy.auth import (
    ACCESS_COOKIE,
    CSRF_COOKIE,
    check_csrf,
    container,
    principal_for_token,
)
from plantwatch.tenancy.routes import client_info
from plantwatch.tenancy.schemas import LoginRequest
from plantwatch.web.render import STATIC_DIR, render
from plantwatch.web.session import (
    LoginRequired,
    SessionRefreshed,
    clear_session_cookies,
    login_required_response,
    refresh_pair,
    safe_next,
    session_refreshed_response,
    set_session_cookies,
)
from plantwatch.web.views import admin, alerts, dashboard, invite, machines, rules

router = APIRouter(include_in_schema=False)

VIEW_ROUTERS = [
    dashboard.router,
    machines.router,
    rules.router,
    alerts.router,
    admin.router,
    invite.router,
]


async def _login_page(
    request: Request,
    next_url: str,
    error: str | None = None,
    status_code: int = 200,
    email: str = "",
    factory_slug: str | None = None,
) -> Response:
    async with container(request).db.session() as session:
        factories = await tenancy_service.list_factories(session)
    return render(
        request,
        "login.html",
        status_code=status_code,
        factories=factories,
        next_url=safe_next(next_url),
        error=error,
        email=email,
        factory_slug=factory_slug or (factories[0].slug if len(factories) == 1 else None),
    )


@router.get("/login")
async def login_page(request: Request, next: str = "/") -> Response:
    return await _login_page(request, next)


@router.post("/login")
async def login(
    request: Request,
    factory_slug: Annotated[str, Form(max_length=64)] = "",
    email: Annotated[str, Form(max_length=254)] = "",
    password: Annotated[str, Form(max_length=256)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/",
) -> Response:
    c = container(request)
    try:
        data = LoginRequest(factory_slug=factory_slug or None, email=email, password=password)
    except ValidationError:
        return await _login_page(
            request,
            next,
            "Choose a factory and enter your email and password.",
            422,
            email,
            factory_slug,
        )
    try:
        async with c.db.session() as session:
            pair = await tenancy_service.login(
                session, c.settings, c.secret, data, client_info(request)
            )
    except TooManyRequests:
        return await _login_page(
            request,
            next,
            "Too many attempts. Wait a minute and try again.",
            429,
            email,
            factory_slug,
        )
    except Unauthorized:
        return await _login_page(
            request, next, "Wrong email or password for this factory.", 401, email, factory_slug
        )
    response = RedirectResponse(safe_next(next), status_code=303)
    set_session_cookies(response, c.settings, pair)
    return response


@router.post("/logout")
async def logout(request: Request, csrf: Annotated[str, Form(max_length=100)] = "") -> Response:
    expected = request.cookies.get(CSRF_COOKIE, "")
    if not expected or not secrets.compare_digest(expected, csrf):
        # A plain form post: the token rides in the form, not a header.
        check_csrf(request)
    token = request.cookies.get(ACCESS_COOKIE)
    if token:
        async with container(request).db.session() as session:
            try:
                principal = await principal_for_token(request, token, session)
                await tenancy_service.logout(session, principal.session_id, principal)
            except Unauthorized:
                pass
    response = RedirectResponse("/login", status_code=303)
    clear_session_cookies(response)
    return response


@router.post("/session/refresh")
async def session_refresh(request: Request) -> Response:
    """For the page's script when the API answers 401: rotate the cookies, or 401."""
    check_csrf(request)
    async with container(request).db.session() as session:
        pair = await refresh_pair(request, session)
    if pair is None:
        response = Response(status_code=401)
        clear_session_cookies(response)
        return response
    response = Response(status_code=204)
    set_session_cookies(response, container(request).settings, pair)
    return response


def install_web(app: FastAPI) -> None:
    """Mount the UI: its routes, the pages of each area, the static files."""
    app.include_router(router)
    for view_router in VIEW_ROUTERS:
        app.include_router(view_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, exc: LoginRequired) -> Response:
        return login_required_response(request, exc)

    @app.exception_handler(SessionRefreshed)
    async def _session_refreshed(request: Request, exc: SessionRefreshed) -> Response:
        return session_refreshed_response(request, exc)
