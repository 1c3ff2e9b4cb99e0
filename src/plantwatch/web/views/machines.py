"""Pages of the UI: machines (the list) and a machine's detail.

The list is one page of 50 devices: filtered and sorted in SQL, with health and
open alerts computed for the page's rows only (one GROUP BY per input). Sorting
by health or by alerts joins the per-device aggregates as subqueries and orders
by the health formula written in SQL, so the page stays fast with 10,000
devices. The detail page shows the device, its live KPI cards, its health, its
alerts and a history chart (static/js/machine.js) fed by the KPI history API.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from sqlalchemy import case, func, nulls_last, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from plantwatch.alerts import service as alerts_service
from plantwatch.analytics.health import (
    DEVICE_ALERT_PENALTY,
    DEVICE_LIMIT_PENALTY,
    DEVICE_OFFLINE_PENALTY,
    Health,
    device_health,
)
from plantwatch.assets import service as assets_service
from plantwatch.assets.models import Device
from plantwatch.assets.schemas import DeviceOut
from plantwatch.assets.service import DeviceFilters, _filtered_devices, device_out
from plantwatch.core.errors import NotFound
from plantwatch.core.schemas import MAX_DB_ID, PageMeta, PageParams
from plantwatch.telemetry import kpis
from plantwatch.telemetry.schemas import LiveKpisOut
from plantwatch.tenancy.auth import Principal, container
from plantwatch.web.render import not_found, render
from plantwatch.web.session import page_principal

router = APIRouter(include_in_schema=False)

PER_PAGE = 50
TABLE_ID = "machines-table"
# The list's status filter -> Device.status ("unknown": no data ever received).
STATUS_FILTERS = {"online": "online", "offline": "offline", "never_seen": "unknown"}
# Decommissioned machines are listed only under their own filter, as the dashboard
# leaves them out of its counts.
DECOMMISSIONED = "decommissioned"
# Sortable columns and the direction a first click sorts in ("-" = descending):
# the worst health and the most alerts come first, the latest seen first.
SORT_DEFAULTS = {"name": "", "status": "", "health": "", "alerts": "-", "last_seen": "-"}
DEFAULT_SORT = "name"
ALERT_FILTER_LIMIT = 20
RECENT_ALERTS = 10
CHART_DEFAULTS = 3

Principals = Annotated[Principal, Depends(page_principal)]


def display_status(status: str) -> str:
    """online / offline / never_seen (the pill's class and, with a space, its text)."""
    return "never_seen" if status == "unknown" else status


def _online(status: str) -> bool | None:
    return {"online": True, "offline": False}.get(status)


def _int_param(value: str | None) -> int | None:
    if value and value.isdigit() and 1 <= int(value) <= MAX_DB_ID:
        return int(value)
    return None


# --- the list's query string -------------------------------------------------------------


@dataclass(frozen=True)
class ListQuery:
    """The list's filters, sort and page, read leniently: a value that makes no sense
    is ignored (a page must render), never a 422."""

    q: str = ""
    status: str = ""
    group: int | None = None
    line: int | None = None
    kind: str = ""
    sort: str = DEFAULT_SORT
    page: int = 1

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> ListQuery:
        q = " ".join(params.get("q", "").split())[:200]
        status = params.get("status", "")
        sort = params.get("sort", DEFAULT_SORT)
        if sort.lstrip("-") not in SORT_DEFAULTS:
            sort = DEFAULT_SORT
        page = _int_param(params.get("page")) or 1
        kind = params.get("kind", "")[:64]
        return cls(
            q="".join(ch for ch in q if ch.isprintable()),
            status=status if status in STATUS_FILTERS or status == DECOMMISSIONED else "",
            group=_int_param(params.get("group")),
            line=_int_param(params.get("line")),
            kind="".join(ch for ch in kind if ch.isprintable()),
            sort=sort,
            page=min(page, 1_000_000),
        )

    @property
    def sort_key(self) -> str:
        return self.sort.lstrip("-")

    @property
    def descending(self) -> bool:
        return self.sort.startswith("-")

    @property
    def filtered(self) -> bool:
        return bool(self.q or self.status or self.group or self.line or self.kind)

    def filters(self) -> DeviceFilters:
        return DeviceFilters(
            search=self.q or None,
            status=STATUS_FILTERS.get(self.status),
            is_active=self.status != DECOMMISSIONED,
            group_id=self.group,
            line_id=self.line,
            kind=self.kind or None,
        )

    def params(self, **changes: Any) -> dict[str, str]:
        values: dict[str, Any] = {
            "q": self.q,
            "status": self.status,
            "group": self.group,
            "line": self.line,
            "kind": self.kind,
            "sort": self.sort if self.sort != DEFAULT_SORT else "",
            "page": self.page if self.page > 1 else "",
        }
        values.update(changes)
        return {k: str(v) for k, v in values.items() if v not in (None, "")}

    def url(self, **changes: Any) -> str:
        query = urlencode(self.params(**changes))
        return "/machines" + (f"?{query}" if query else "")

    def sort_url(self, key: str) -> str:
        """The column header's link: the other direction when sorted by it, else its
        first direction; back to page 1."""
        if self.sort_key == key:
            target = key if self.descending else f"-{key}"
        else:
            target = SORT_DEFAULTS[key] + key
        return self.url(sort=target if target != DEFAULT_SORT else "", page="")

    def aria_sort(self, key: str) -> str | None:
        if self.sort_key != key:
            return None
        return "descending" if self.descending else "ascending"

    def pager_base(self) -> str:
        """For the pager macro, which appends `page=N`."""
        query = urlencode(self.params(page=""))
        return "/machines?" + (f"{query}&" if query else "")


# --- the list's rows -------------------------------------------------------------------------


@dataclass(frozen=True)
class MachineRow:
    device: DeviceOut
    status: str  # online | offline | never_seen | decommissioned
    health: Health
    open_alerts: int
    worst: str | None  # the worst open alert's severity

    @property
    def why(self) -> str:
        if not self.health.deductions:
            return "Nothing takes points off"
        return "; ".join(f"{reason}: -{points}" for reason, points in self.health.deductions)


_STATUS_ORDER = case({"offline": 0, "online": 1}, value=Device.status, else_=2)


def _health_sql(alerts: Any, levels: Any) -> Any:
    """health.device_health's score in SQL, from the aggregate subqueries."""
    taken: Any = sum(
        (
            func.coalesce(getattr(alerts.c, severity), 0) * points
            for severity, points in DEVICE_ALERT_PENALTY.items()
            if points
        ),
        start=case((Device.status == "offline", DEVICE_OFFLINE_PENALTY), else_=0),
    )
    for level, points in DEVICE_LIMIT_PENALTY.items():
        taken = taken + func.coalesce(getattr(levels.c, level), 0) * points
    score = 100 - taken
    return case((score < 0, 0), else_=score)


async def machine_rows(
    session: AsyncSession, factory_id: int, query: ListQuery
) -> tuple[list[MachineRow], int]:
    """One page of the factory's devices (PER_PAGE) and the total matching."""
    base = _filtered_devices(factory_id, query.filters())
    total = int(
        await session.scalar(select(func.count()).select_from(base.order_by(None).subquery())) or 0
    )
    stmt = base
    key = query.sort_key
    order: list[Any]
    if key == "health":
        alerts = alerts_service.open_alerts_select(factory_id).subquery()
        levels = kpis.limit_levels_select(factory_id).subquery()
        stmt = stmt.outerjoin(alerts, alerts.c.device_id == Device.id).outerjoin(
            levels, levels.c.device_id == Device.id
        )
        order = [_health_sql(alerts, levels)]
    elif key == "alerts":
        alerts = alerts_service.open_alerts_select(factory_id).subquery()
        stmt = stmt.outerjoin(alerts, alerts.c.device_id == Device.id)
        order = [func.coalesce(alerts.c.open, 0), func.coalesce(alerts.c.worst, 0)]
    elif key == "status":
        order = [_STATUS_ORDER]
    elif key == "last_seen":
        order = [Device.last_seen]
    else:
        order = [func.lower(Device.name)]
    clauses = [nulls_last(c.desc() if query.descending else c.asc()) for c in order]
    if key != "name":
        clauses.append(func.lower(Device.name).asc())
    clauses.append(Device.id.asc())
    # Sort narrow rows (ids), then read the page's 50 devices with their line names.
    offset = (query.page - 1) * PER_PAGE
    page_ids = (
        await session.scalars(
            stmt.with_only_columns(Device.id).order_by(*clauses).offset(offset).limit(PER_PAGE)
        )
    ).all()
    found = {}
    if page_ids:
        rows = await session.execute(base.where(Device.id.in_(page_ids)))
        found = {row[0].id: device_out(row) for row in rows.all()}
    devices = [found[i] for i in page_ids if i in found]
    return await _with_health(session, factory_id, devices), total


async def _with_health(
    session: AsyncSession, factory_id: int, devices: Sequence[DeviceOut]
) -> list[MachineRow]:
    ids = [d.id for d in devices]
    open_alerts = await alerts_service.open_counts_for_devices(session, factory_id, ids)
    levels = await kpis.limit_levels_for_devices(session, factory_id, ids)
    out: list[MachineRow] = []
    for device in devices:
        counts = open_alerts.get(device.id, {})
        worst = max(
            (s for s, n in counts.items() if n),
            key=lambda s: alerts_service.SEVERITY_RANK.get(s, 0),
            default=None,
        )
        out.append(
            MachineRow(
                device=device,
                status=display_status(device.status) if device.is_active else DECOMMISSIONED,
                health=device_health(_online(device.status), counts, levels.get(device.id, {})),
                open_alerts=sum(counts.values()),
                worst=worst,
            )
        )
    return out


async def _filter_choices(session: AsyncSession, factory_id: int) -> dict[str, Any]:
    everything = PageParams(page=1, per_page=500)
    groups, _ = await assets_service.list_groups(session, factory_id, everything)
    lines, _ = await assets_service.list_lines(
        session, factory_id, everything, sort="site_name,area_name,name"
    )
    kinds = await assets_service.device_kinds(session, factory_id)
    return {"groups": groups, "lines": lines, "kinds": kinds}


def _wants_table(request: Request) -> bool:
    """htmx swapping the table (filters, sort links, pager, live refresh), not a
    history restore, which needs the whole page."""
    headers = request.headers
    return (
        headers.get("hx-request") == "true"
        and headers.get("hx-target") == TABLE_ID
        and headers.get("hx-history-restore-request") != "true"
    )


def _forbidden(request: Request, principal: Principal) -> Response:
    return render(
        request,
        "not_found.html",
        principal,
        status_code=403,
        what="This page",
        back_url="/",
        back_label="the dashboard",
    )


@router.get("/machines")
async def machines(request: Request, principal: Principals) -> Response:
    if not principal.can("assets:read"):
        return _forbidden(request, principal)
    query = ListQuery.parse(request.query_params)
    async with container(request).db.session() as session:
        rows, total = await machine_rows(session, principal.factory_id, query)
        table: dict[str, Any] = {
            "query": query,
            "rows": rows,
            "meta": PageMeta(page=query.page, per_page=PER_PAGE, total=total),
            "table_id": TABLE_ID,
            "can_alerts": principal.can("alerts:read"),
        }
        if _wants_table(request):
            return render(request, "_machines_table.html", principal, **table)
        choices = await _filter_choices(session, principal.factory_id)
    return render(request, "machines.html", principal, **table, **choices)


# --- a machine -------------------------------------------------------------------------------


def _parse_id(raw: str) -> int | None:
    return _int_param(raw) if raw.isascii() else None


def _ms(value: dt.datetime | None) -> int | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return int(value.timestamp() * 1000)


def _trend(value: float | None, previous: float | None) -> str | None:
    if value is None or previous is None:
        return None
    if abs(value - previous) <= 1e-9 * max(1.0, abs(previous)):
        return "steady"
    return "rising" if value > previous else "falling"


def format_value(value: float | None, text: str | None = None) -> str:
    """A KPI value as the page's script writes it (pw.fmtNumber, en-US): up to 2
    decimals, 1 from 100, none from 1000, trailing zeros dropped."""
    if value is None:
        return text if text is not None else "—"
    size = abs(value)
    digits = 0 if size >= 1000 else 1 if size >= 100 else 2
    shown = f"{value:,.{digits}f}"
    if "." in shown:
        shown = shown.rstrip("0").rstrip(".")
    return "0" if shown == "-0" else shown


def _limits_text(k: Any) -> str:
    parts = []
    for label, low, high in (
        ("warning", k.warning_low, k.warning_high),
        ("critical", k.critical_low, k.critical_high),
    ):
        if low is not None:
            parts.append(f"{label} at or below {low:g}")
        if high is not None:
            parts.append(f"{label} at or above {high:g}")
    return "; ".join(parts)


@dataclass(frozen=True)
class KpiCard:
    key: str
    name: str
    unit: str | None
    numeric: bool
    is_kpi: bool
    value: float | None
    text: str | None
    ts: dt.datetime | None
    ts_ms: int | None
    stale: bool
    level: str | None
    trend: str | None
    limits: str

    @property
    def display(self) -> str:
        return format_value(self.value, self.text)


def _cards(live: LiveKpisOut, previous: Mapping[int, float]) -> list[KpiCard]:
    return [
        KpiCard(
            key=k.key,
            name=k.display_name or k.key,
            unit=k.unit,
            numeric=k.data_type != "string",
            is_kpi=k.is_kpi,
            value=k.value,
            text=k.text,
            ts=k.ts,
            ts_ms=_ms(k.ts),
            stale=k.stale,
            level=k.level,
            trend=_trend(k.value, previous.get(k.parameter_id)),
            limits=_limits_text(k),
        )
        for k in live.kpis
    ]


async def _device_or_none(
    session: AsyncSession, factory_id: int, device_id: int | None
) -> DeviceOut | None:
    if device_id is None:
        return None
    try:
        return await assets_service.get_device(session, factory_id, device_id)
    except NotFound:
        return None


def _missing(request: Request, principal: Principal) -> Response:
    return not_found(request, principal, "This machine", "/machines", "the machines")


async def _health(session: AsyncSession, factory_id: int, device: DeviceOut) -> Health:
    counts = await alerts_service.open_counts_for_devices(session, factory_id, [device.id])
    levels = await kpis.limit_levels_for_devices(session, factory_id, [device.id])
    return device_health(
        _online(device.status), counts.get(device.id, {}), levels.get(device.id, {})
    )


async def _alerts(session: AsyncSession, factory_id: int, device_id: int) -> dict[str, Any]:
    open_alerts, open_total = await alerts_service.list_alerts(
        session,
        factory_id,
        PageParams(page=1, per_page=ALERT_FILTER_LIMIT),
        sort="-severity,-triggered_at",
        status=["triggered", "acknowledged"],
        device_id=device_id,
    )
    recent, _ = await alerts_service.list_alerts(
        session,
        factory_id,
        PageParams(page=1, per_page=RECENT_ALERTS),
        sort="-triggered_at",
        status=["resolved"],
        device_id=device_id,
    )
    return {"open_alerts": open_alerts, "open_total": open_total, "recent_alerts": recent}


@router.get("/machines/{device_id}")
async def machine(request: Request, device_id: str, principal: Principals) -> Response:
    if not principal.can("assets:read"):
        return _forbidden(request, principal)
    async with container(request).db.session() as session:
        device = await _device_or_none(session, principal.factory_id, _parse_id(device_id))
        if device is None:
            return _missing(request, principal)
        groups = await assets_service.groups_of_device(session, principal.factory_id, device.id)
        cards: list[KpiCard] = []
        offline_after_s = device.offline_after_s or 300
        if principal.can("telemetry:read"):
            live = await kpis.live_kpis(session, principal.factory_id, device.id)
            previous = await kpis.previous_values(session, principal.factory_id, device.id)
            cards = _cards(live, previous)
            offline_after_s = live.offline_after_s
        health = await _health(session, principal.factory_id, device)
        alerts: dict[str, Any] = {}
        if principal.can("alerts:read"):
            alerts = await _alerts(session, principal.factory_id, device.id)
    numeric = [c for c in cards if c.numeric]
    # Charted at first: up to three KPIs, else the first three numeric parameters.
    first = [c.key for c in numeric if c.is_kpi][:CHART_DEFAULTS] or [
        c.key for c in numeric[:CHART_DEFAULTS]
    ]
    chart = {
        "device_id": device.id,
        "offline_after_s": offline_after_s,
        # For the stale markers: the browser's clock may be off the server's.
        "server_now_ms": _ms(dt.datetime.now(dt.UTC)),
        "parameters": [
            {"key": c.key, "name": c.name, "unit": c.unit, "default": c.key in first}
            for c in numeric
        ],
    }
    return render(
        request,
        "machine.html",
        principal,
        device=device,
        status=display_status(device.status),
        groups=groups,
        cards=cards,
        health=health,
        chart=chart,
        can_telemetry=principal.can("telemetry:read"),
        can_alerts=principal.can("alerts:read"),
        **alerts,
    )


@router.get("/machines/{device_id}/health")
async def machine_health(request: Request, device_id: str, principal: Principals) -> Response:
    """The health card, re-fetched by the page when alerts or limit levels change."""
    if not principal.can("assets:read"):
        return _forbidden(request, principal)
    async with container(request).db.session() as session:
        device = await _device_or_none(session, principal.factory_id, _parse_id(device_id))
        if device is None:
            return _missing(request, principal)
        health = await _health(session, principal.factory_id, device)
    return render(
        request,
        "_machine_health.html",
        principal,
        device=device,
        status=display_status(device.status),
        health=health,
    )


@router.get("/machines/{device_id}/alerts")
async def machine_alerts(request: Request, device_id: str, principal: Principals) -> Response:
    """The machine's alerts card, re-fetched by the page on alert events."""
    if not principal.can("alerts:read"):
        return _forbidden(request, principal)
    async with container(request).db.session() as session:
        device = await _device_or_none(session, principal.factory_id, _parse_id(device_id))
        if device is None:
            return _missing(request, principal)
        alerts = await _alerts(session, principal.factory_id, device.id)
    return render(request, "_machine_alerts.html", principal, device=device, **alerts)
