"""Jinja2 rendering for the UI: one environment, the layout's context, time filters."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import Request
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.responses import HTMLResponse

from plantwatch import __version__
from plantwatch.stream.service import TYPE_PERMISSIONS
from plantwatch.tenancy.auth import CSRF_COOKIE, Principal

WEB_DIR = Path(__file__).parent
TEMPLATES_DIR = WEB_DIR / "templates"
STATIC_DIR = WEB_DIR / "static"


@dataclass(frozen=True)
class NavItem:
    label: str
    path: str
    permission: str


# Only pages that exist: later issues add theirs (work orders, calendar, parts,
# analytics, reports, commands) when they land. Each is shown to those who may use it.
NAV: tuple[NavItem, ...] = (
    NavItem("Dashboard", "/", "assets:read"),
    NavItem("Machines", "/machines", "assets:read"),
    NavItem("Alerts", "/alerts", "alerts:read"),
    NavItem("Rules", "/rules", "rules:read"),
    NavItem("Dead letters", "/dead-letters", "telemetry:write"),
    NavItem("Users", "/users", "users:read"),
    NavItem("Audit log", "/audit", "audit:read"),
)


@lru_cache(maxsize=64)
def _zone(name: str) -> dt.tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return dt.UTC


def localtime(value: dt.datetime | None, tz: str, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    """A UTC timestamp shown in the factory's timezone ("" for none)."""
    if value is None:
        return ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(_zone(tz)).strftime(fmt)


def isotime(value: dt.datetime | None) -> str:
    """For `<time datetime=...>` and scripts: ISO 8601 in UTC."""
    if value is None:
        return ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat()


def number(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.{digits}f}"


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.filters["isotime"] = isotime
    env.filters["number"] = number
    env.globals["version"] = __version__
    env.globals["static"] = lambda path: f"/static/{path}?v={__version__}"
    return env


templates = _environment()


def stream_types_for(principal: Principal | None, wanted: str) -> str:
    """The stream event types a page asks for that its visitor may see, comma-separated."""
    if principal is None:
        return ""
    names = [t.strip() for t in wanted.split(",") if t.strip()]
    allowed = [t for t in names if t in TYPE_PERMISSIONS and principal.can(TYPE_PERMISSIONS[t])]
    return ",".join(allowed)


def nav_for(principal: Principal | None) -> list[NavItem]:
    if principal is None:
        return []
    return [item for item in NAV if principal.can(item.permission)]


def render(
    request: Request,
    template: str,
    principal: Principal | None = None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    """A page or fragment. Pages get the layout's context: nav, the visitor, time zone."""
    tz = principal.factory_timezone if principal else "UTC"
    html = templates.get_template(template).render(
        request=request,
        principal=principal,
        nav=nav_for(principal),
        current_path=request.url.path,
        tz=tz,
        localtime=lambda value, fmt="%Y-%m-%d %H:%M:%S": localtime(value, tz, fmt),
        csrf_token=request.cookies.get(CSRF_COOKIE, ""),
        stream_types=lambda wanted: stream_types_for(principal, wanted),
        **context,
    )
    return HTMLResponse(html, status_code=status_code, headers={"Cache-Control": "no-store"})


def not_found(
    request: Request,
    principal: Principal,
    what: str,
    back_url: str = "/",
    back_label: str = "the dashboard",
) -> HTMLResponse:
    """The 404 page: another factory's object looks exactly like one that never existed."""
    return render(
        request,
        "not_found.html",
        principal,
        status_code=404,
        what=what,
        back_url=back_url,
        back_label=back_label,
    )
