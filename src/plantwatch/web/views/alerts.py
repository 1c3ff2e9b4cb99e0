"""Pages of the UI: alerts — the live feed with filters, and one alert's detail.

The feed is a GET form (works without script; htmx swaps `#alerts-feed` from
`/alerts/feed` and pushes the canonical URL). Live updates and actions are in
static/js/alerts.js: actions call the REST API, then re-render the fragments
below (`/alerts/{id}/row`, `/alerts/{id}/body`, `/alerts/{id}/actions`).
Reads go through `plantwatch.alerts.service`, always with the visitor's factory.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import QueryParams
from starlette.responses import Response

from plantwatch.alerts import service
from plantwatch.alerts.schemas import AlertOut
from plantwatch.assets.models import Device
from plantwatch.core.errors import NotFound
from plantwatch.core.schemas import MAX_DB_ID, PageParams
from plantwatch.rules.models import Rule
from plantwatch.tenancy import service as tenancy_service
from plantwatch.tenancy.auth import Principal, container
from plantwatch.web.render import not_found, render
from plantwatch.web.session import page_principal

router = APIRouter(include_in_schema=False)
Visitor = Annotated[Principal, Depends(page_principal)]

SEVERITIES: tuple[str, ...] = service.SEVERITIES
# The status filter: one choice; "open" (the default) is everything not resolved.
STATUS_CHOICES: dict[str, tuple[str, ...]] = {
    "open": ("triggered", "acknowledged"),
    "triggered": ("triggered",),
    "acknowledged": ("acknowledged",),
    "resolved": ("resolved",),
    "all": (),
}
STATUS_LABELS = {
    "open": "Open (triggered or acknowledged)",
    "triggered": "Triggered",
    "acknowledged": "Acknowledged",
    "resolved": "Resolved",
    "all": "Any status",
}
# Sortable columns (a subset of the API's) and the direction a first click sorts in.
SORTS: dict[str, str] = {
    "severity": "-",
    "status": "",
    "occurrences": "-",
    "triggered_at": "-",
    "last_seen_at": "-",
}
DEFAULT_SORT = "-triggered_at"
PER_PAGE = 50
MAX_CHOICES = 500  # users and rules offered in selects
LOCAL_INPUT = "%Y-%m-%dT%H:%M"  # <input type="datetime-local">
MAX_KEY = 100

OPERATORS = {
    "gt": ">",
    "gte": "≥",
    "lt": "<",
    "lte": "≤",
    "eq": "=",
    "neq": "≠",
}
TIMELINE_LABELS = {
    "created": "Alert opened",
    "repeated": "Fired again",
    "acknowledged": "Acknowledged",
    "assigned": "Assigned",
    "commented": "Comment",
    "escalated": "Escalated",
    "reminder": "Reminder sent",
    "resolved": "Resolved",
    "auto-resolved": "Resolved automatically",
    "reopened": "Reopened",
}


def _zone(name: str) -> dt.tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return dt.UTC


def duration(seconds: float | None) -> str:
    """A short human duration: 2d 3h, 3h 20m, 12m 5s, 40s."""
    if seconds is None:
        return ""
    s = int(abs(seconds))
    days, rest = divmod(s, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def value_text(value: Any) -> str:
    """A fact or snapshot value: numbers without trailing zeros, text as is."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:,.4f}".rstrip("0").rstrip(".")
    return str(value)


def _int(value: str | None, low: int = 1, high: int = MAX_DB_ID) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    number = int(value.strip())
    return number if low <= number <= high else None


@dataclass
class FeedQuery:
    """The feed's filters as the form sends them, checked; problems become messages."""

    severity: list[str] = field(default_factory=list)
    status: str = "open"
    device: str = ""
    device_id: int | None = None
    rule_id: int | None = None
    assigned: str = ""  # "" anyone, else a user id
    start_text: str = ""
    end_text: str = ""
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    sort: str = DEFAULT_SORT
    page: int = 1
    errors: list[str] = field(default_factory=list)
    nothing: bool = False  # a filter names something that does not exist: no rows

    @classmethod
    def parse(cls, params: QueryParams, tz: str) -> FeedQuery:
        q = cls()
        wanted = set(params.getlist("severity"))
        q.severity = [s for s in SEVERITIES if s in wanted]
        status = params.get("status") or "open"
        q.status = status if status in STATUS_CHOICES else "open"
        q.device = (params.get("device") or "").strip()[:MAX_KEY]
        q.device_id = _int(params.get("device_id"))
        q.rule_id = _int(params.get("rule_id"))
        assigned = _int(params.get("assigned"))
        q.assigned = str(assigned) if assigned else ""
        sort = params.get("sort") or DEFAULT_SORT
        q.sort = sort if sort.lstrip("-") in SORTS else DEFAULT_SORT
        q.page = _int(params.get("page"), 1, 1_000_000) or 1
        zone = _zone(tz)
        for name, label in (("from", "From"), ("to", "To")):
            text = (params.get(name) or "").strip()[:40]
            if not text:
                continue
            try:
                local = dt.datetime.fromisoformat(text)
                when = (local if local.tzinfo else local.replace(tzinfo=zone)).astimezone(dt.UTC)
            except (ValueError, OverflowError):
                q.errors.append(f"{label}: not a date and time ({text!r})")
                continue
            if name == "from":
                q.start_text, q.start = local.strftime(LOCAL_INPUT), when
            else:
                q.end_text, q.end = local.strftime(LOCAL_INPUT), when
        if q.start and q.end and q.end <= q.start:
            q.errors.append("To must be after From")
            q.nothing = True
        return q

    def filters(self, *, with_state: bool = True) -> dict[str, Any]:
        """Keyword filters of service.list_alerts / counts / find_alert."""
        return {
            "severity": self.severity if with_state else [],
            "status": list(STATUS_CHOICES[self.status]) if with_state else [],
            "device_id": self.device_id,
            "rule_id": self.rule_id,
            "assigned_to": int(self.assigned) if self.assigned else None,
            "start": self.start,
            "end": self.end,
        }

    def pairs(self, **override: Any) -> list[tuple[str, str]]:
        """The canonical query (what the form would send), defaults left out."""
        values: dict[str, Any] = {
            "severity": self.severity,
            "status": self.status if self.status != "open" else "",
            "device": self.device,
            # A link's device id that names no machine stays, so it keeps matching nothing.
            "device_id": self.device_id if self.device_id and not self.device else "",
            "rule_id": self.rule_id or "",
            "assigned": self.assigned,
            "from": self.start_text,
            "to": self.end_text,
            "sort": self.sort if self.sort != DEFAULT_SORT else "",
            "page": self.page if self.page > 1 else "",
        }
        values.update(override)
        out: list[tuple[str, str]] = []
        for key, value in values.items():
            for item in value if isinstance(value, list) else [value]:
                if item not in ("", None):
                    out.append((key, str(item)))
        return out

    def url(self, **override: Any) -> str:
        query = urlencode(self.pairs(**override))
        return "/alerts" + (f"?{query}" if query else "")

    @property
    def query(self) -> str:
        return urlencode(self.pairs())


@dataclass(frozen=True)
class UserChoice:
    id: int
    label: str
    active: bool


async def _users(session: AsyncSession, factory_id: int) -> list[UserChoice]:
    rows, _ = await tenancy_service.list_users(
        session,
        factory_id,
        tenancy_service.UserFilters(),
        PageParams(page=1, per_page=MAX_CHOICES),
        sort="email",
    )
    return [
        UserChoice(u.id, f"{u.full_name} ({u.email})" if u.full_name else u.email, u.is_active)
        for u in rows
    ]


async def _rules(session: AsyncSession, factory_id: int) -> list[tuple[int, str]]:
    rows = await session.execute(
        select(Rule.id, Rule.name)
        .where(Rule.factory_id == factory_id)
        .order_by(Rule.name, Rule.id)
        .limit(MAX_CHOICES)
    )
    return [(rid, name) for rid, name in rows.all()]


async def _resolve_device(session: AsyncSession, factory_id: int, q: FeedQuery) -> None:
    """The device filter: typed as a key (or given as device_id by links), as an id."""
    if q.device:
        found = await session.scalar(
            select(Device.id).where(Device.factory_id == factory_id, Device.device_key == q.device)
        )
        if found is None:
            q.errors.append(f"No machine with the key {q.device!r}")
            q.nothing = True
        q.device_id = found
    elif q.device_id is not None:
        key = await session.scalar(
            select(Device.device_key).where(
                Device.factory_id == factory_id, Device.id == q.device_id
            )
        )
        if key is None:
            q.errors.append(f"No machine {q.device_id}")
            q.nothing = True
        else:
            q.device = key


def _sort_links(q: FeedQuery) -> dict[str, dict[str, str]]:
    current = q.sort.lstrip("-")
    descending = q.sort.startswith("-")
    out: dict[str, dict[str, str]] = {}
    for name, first in SORTS.items():
        if name == current:
            target = name if descending else f"-{name}"
            aria = "descending" if descending else "ascending"
        else:
            target, aria = f"{first}{name}", ""
        out[name] = {"url": q.url(sort=target, page=""), "aria": aria}
    return out


async def _feed_context(request: Request, principal: Principal) -> dict[str, Any]:
    q = FeedQuery.parse(request.query_params, principal.factory_timezone)
    fid = principal.factory_id
    async with container(request).db.session() as session:
        await _resolve_device(session, fid, q)
        users = await _users(session, fid)
        rules = await _rules(session, fid)
        if q.nothing:
            alerts: list[AlertOut] = []
            total = 0
            open_counts = dict.fromkeys(SEVERITIES, 0)
        else:
            params = PageParams(page=q.page, per_page=PER_PAGE)
            alerts, total = await service.list_alerts(
                session, fid, params, sort=q.sort, **q.filters()
            )
            if not alerts and total and q.page > 1:  # past the end: the last page
                q.page = (total + PER_PAGE - 1) // PER_PAGE
                params = PageParams(page=q.page, per_page=PER_PAGE)
                alerts, total = await service.list_alerts(
                    session, fid, params, sort=q.sort, **q.filters()
                )
            counted = await service.counts(session, fid, **q.filters(with_state=False))
            open_counts = counted.open_by_severity
    if q.rule_id is not None and all(rid != q.rule_id for rid, _ in rules):
        rules.append((q.rule_id, f"Rule {q.rule_id}"))
    return {
        "q": q,
        "alerts": alerts,
        "meta": {"page": q.page, "per_page": PER_PAGE, "total": total},
        "open_counts": open_counts,
        "users": users,
        "user_names": {u.id: u.label for u in users},
        "rules": rules,
        "severities": SEVERITIES,
        "status_labels": STATUS_LABELS,
        "sorts": _sort_links(q),
        "page_base": q.url(page="") + ("&" if "?" in q.url(page="") else "?"),
        "duration": duration,
        "can_respond": principal.can("alerts:respond"),
    }


@router.get("/alerts")
async def alerts_page(request: Request, principal: Visitor) -> Response:
    context = await _feed_context(request, principal)
    return render(request, "alerts.html", principal, **context)


@router.get("/alerts/feed")
async def alerts_feed(request: Request, principal: Visitor) -> Response:
    """The feed fragment (counters, filters, table, pager) for htmx and live refresh."""
    context = await _feed_context(request, principal)
    response = render(request, "_alerts_feed.html", principal, **context)
    response.headers["HX-Push-Url"] = context["q"].url()
    return response


def _alert_id(raw: str) -> int | None:
    return _int(raw)


@router.get("/alerts/{alert_id}/row")
async def alert_row(alert_id: str, request: Request, principal: Visitor) -> Response:
    """One feed row, if the alert still matches the feed's filters (else 204)."""
    number = _alert_id(alert_id)
    q = FeedQuery.parse(request.query_params, principal.factory_timezone)
    if number is None:
        return Response(status_code=404)
    async with container(request).db.session() as session:
        await _resolve_device(session, principal.factory_id, q)
        if q.nothing:
            return Response(status_code=204)
        alert = await service.find_alert(session, principal.factory_id, number, **q.filters())
        if alert is None:
            return Response(status_code=204)
        users = await _users(session, principal.factory_id)
    return render(
        request,
        "_alerts_row.html",
        principal,
        alert=alert,
        q=q,
        user_names={u.id: u.label for u in users},
        duration=duration,
        can_respond=principal.can("alerts:respond"),
    )


def _snapshot_rows(snapshot: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The engine stores {"values": {...}, "at": {...}, ...}; older/other writers a flat map."""
    values = snapshot.get("values")
    at: Mapping[str, Any] = snapshot.get("at") or {}
    if not isinstance(values, Mapping):
        values = {k: v for k, v in snapshot.items() if not isinstance(v, Mapping | list)}
    rows = []
    for name, value in sorted(values.items()):
        when = None
        raw = at.get(name) if isinstance(at, Mapping) else None
        if isinstance(raw, str):
            try:
                when = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
            except ValueError:
                when = None
        rows.append({"parameter": name, "value": value, "at": when})
    return rows


def _condition_text(fact: Mapping[str, Any]) -> str:
    """The leaf that held, e.g. "avg(vibration, 10m) > 7 for 5m"."""
    op = str(fact.get("operator") or "")
    subject = str(fact.get("parameter") or "")
    if fact.get("aggregate"):
        subject = f"{fact['aggregate']}({subject}, {fact.get('window', '')})"
    threshold = value_text(fact["threshold"]) if "threshold" in fact else None
    if op in OPERATORS and threshold is not None:
        text = f"{subject} {OPERATORS[op]} {threshold}"
    elif op in ("between", "outside"):
        text = f"{subject} {op} {value_text(fact.get('low'))} and {value_text(fact.get('high'))}"
    elif op == "no_data":
        text = f"no data from {subject} for {fact.get('duration', '')}"
    elif op == "NOT":
        text = "NOT group"
    else:
        text = f"{subject} {op} {threshold or ''}".strip()
    if fact.get("for"):
        text += f" for {fact['for']}"
    return text


async def _detail_context(
    session: AsyncSession, principal: Principal, alert_id: int
) -> dict[str, Any] | None:
    try:
        alert = await service.get_alert(session, principal.factory_id, alert_id)
    except NotFound:
        return None
    users = await _users(session, principal.factory_id)
    return {
        "alert": alert,
        "users": users,
        "user_names": {u.id: u.label for u in users},
        "facts": [{**f, "condition": _condition_text(f)} for f in alert.facts],
        "snapshot_rows": _snapshot_rows(alert.snapshot),
        "snapshot_key": alert.snapshot.get("device_key"),
        "timeline_labels": TIMELINE_LABELS,
        "timeline_limit": service.DETAIL_TIMELINE,
        "duration": duration,
        "value_text": value_text,
        "can_respond": principal.can("alerts:respond"),
        "can_manage": principal.can("alerts:manage"),
        "context": "detail",
    }


@router.get("/alerts/{alert_id}")
async def alert_page(alert_id: str, request: Request, principal: Visitor) -> Response:
    number = _alert_id(alert_id)
    context = None
    if number is not None:
        async with container(request).db.session() as session:
            context = await _detail_context(session, principal, number)
    if context is None:
        return not_found(request, principal, f"Alert {alert_id}", "/alerts", "alerts")
    return render(request, "alert.html", principal, **context)


@router.get("/alerts/{alert_id}/body")
async def alert_body(alert_id: str, request: Request, principal: Visitor) -> Response:
    """The detail's summary, SLA, facts, snapshot and timeline (live refresh)."""
    number = _alert_id(alert_id)
    context = None
    if number is not None:
        async with container(request).db.session() as session:
            context = await _detail_context(session, principal, number)
    if context is None:
        return Response(status_code=404)
    return render(request, "_alert_body.html", principal, **context)


@router.get("/alerts/{alert_id}/actions")
async def alert_actions(alert_id: str, request: Request, principal: Visitor) -> Response:
    """The action controls for one alert (rows load them when their menu opens)."""
    number = _alert_id(alert_id)
    if number is None:
        return Response(status_code=404)
    if not principal.can("alerts:respond"):
        return Response(status_code=204)
    async with container(request).db.session() as session:
        alert = await service.find_alert(session, principal.factory_id, number)
        if alert is None:
            return Response(status_code=404)
        users = await _users(session, principal.factory_id)
    context = request.query_params.get("context", "row")
    return render(
        request,
        "_alert_actions.html",
        principal,
        alert=alert,
        users=users,
        can_respond=True,
        can_manage=principal.can("alerts:manage"),
        context="detail" if context == "detail" else "row",
    )
