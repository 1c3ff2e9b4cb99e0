"""Pages of the UI: rules — the list with its switches, the rule builder, backtests.

The pages only read (rules service, alerts, assets, notification channels); every
change is made by static/js/rules.js and rule_builder.js through the REST API
(create, PATCH, toggle, delete, validate, backtest), which checks `rules:write`
again. Visitors without `rules:write` get no switch, no editor and no backtest.

Query strings are parsed leniently: a page answers with HTML, so an unknown filter
value is ignored rather than answered with a problem document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from plantwatch.alerts import service as alerts_service
from plantwatch.alerts.schemas import AlertOut
from plantwatch.assets import service as assets_service
from plantwatch.core.errors import NotFound
from plantwatch.core.schemas import MAX_DB_ID, PageParams
from plantwatch.notify import service as notify_service
from plantwatch.rules import conditions as cond
from plantwatch.rules import service
from plantwatch.rules.schemas import RuleOut, Severity
from plantwatch.tenancy.auth import Principal, container
from plantwatch.web.render import not_found, render
from plantwatch.web.session import page_principal

router = APIRouter(include_in_schema=False)
Visitor = Annotated[Principal, Depends(page_principal)]

PER_PAGE = 50
SEVERITIES = [s.value for s in Severity]
SORTS = {"name", "-name", "created_at", "-created_at"}
ENABLED = {"on": True, "off": False}
DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
OPERATOR_TEXT = {**cond.COMPARISONS, "between": "between", "outside": "outside"}
GROUP_TEXT = {"AND": "all of", "OR": "any of", "NOT": "not"}
RECENT_ALERTS = 10
DASH = "\u2013"  # an en dash between the ends of a range


# --- plain-language summaries ------------------------------------------------------------


def duration_text(seconds: int | float | str | None) -> str:
    if seconds is None or seconds == "":
        return ""
    if isinstance(seconds, str):
        return seconds
    return cond.format_duration(int(seconds * 1000)) if seconds else "0s"


def _num(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def leaf_text(node: dict[str, Any]) -> str:
    """One condition as a person reads it: `avg(vibration, 10m) > 7 for 5m`."""
    parameter = str(node.get("parameter", "?"))
    op = str(node.get("operator", "?"))
    subject = parameter
    if node.get("aggregate"):
        subject = f"{node['aggregate']}({parameter}, {node.get('window', '?')})"
    if op in cond.COMPARISONS:
        text = f"{subject} {cond.COMPARISONS[op]} {_num(node.get('threshold', '?'))}"
    elif op in cond.RANGES:
        text = f"{subject} {op} {_num(node.get('low', '?'))}..{_num(node.get('high', '?'))}"
    elif op in ("change", "rate"):
        direction = node.get("direction", "any")
        per = "/min" if op == "rate" else ""
        against = f" over {node['window']}" if node.get("window") else ""
        text = f"{parameter} {op} {direction} > {_num(node.get('threshold', '?'))}{per}{against}"
    elif op == "anomaly":
        detector = node.get("detector", "zscore")
        text = f"{parameter} anomaly ({detector}) score > {_num(node.get('threshold', 3))}"
    elif op == "no_data":
        text = f"no {parameter} data for {node.get('duration', '?')}"
    else:
        text = f"{parameter} {op}"
    if node.get("for"):
        text += f" for {node['for']}"
    return text


def is_group(node: Any) -> bool:
    return (
        isinstance(node, dict)
        and isinstance(node.get("operator"), str)
        and node["operator"].upper() in cond.GROUP_OPERATORS
        and "parameter" not in node
    )


def condition_text(node: Any, top: bool = True) -> str:
    """The whole tree on one line (the list's summary)."""
    if not isinstance(node, dict):
        return "?"
    if not is_group(node):
        return leaf_text(node)
    op = str(node["operator"]).upper()
    children = [condition_text(c, False) for c in node.get("conditions") or []]
    if op == "NOT":
        text = f"NOT ({children[0] if children else '?'})"
    else:
        text = f" {op} ".join(children)
        if not top and len(children) > 1:
            text = f"({text})"
    if node.get("for"):
        text = f"({text}) for {node['for']}"
    return text


def schedule_text(schedule: dict[str, Any] | None, tz: str) -> str:
    if not schedule or schedule.get("type", "always") == "always":
        return "Always"
    zone = schedule.get("timezone") or tz
    if schedule["type"] == "date_range":
        return f"{schedule.get('start_date')} to {schedule.get('end_date')} ({zone})"
    parts = []
    for window in schedule.get("windows") or []:
        days = window.get("days") or [1, 2, 3, 4, 5, 6, 7]
        parts.append(f"{_days_text(days)} {window.get('start')}{DASH}{window.get('end')}")
    return "; ".join(parts) + f" ({zone})"


def _days_text(days: list[int]) -> str:
    ordered = sorted({d for d in days if isinstance(d, int) and 1 <= d <= 7})
    if ordered == list(range(1, 8)):
        return "Every day"
    if len(ordered) > 2 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{DAY_NAMES[ordered[0] - 1]}{DASH}{DAY_NAMES[ordered[-1] - 1]}"
    return ", ".join(DAY_NAMES[d - 1] for d in ordered)


def scope_text(scope: str, device_count: int, group_name: str | None) -> str:
    if scope == "devices":
        return "1 device" if device_count == 1 else f"{device_count} devices"
    if scope == "group":
        return f"Group {group_name}" if group_name else "A deleted group"
    return "All devices"


# --- the list --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListQuery:
    q: str
    enabled: str
    severity: str
    sort: str
    page: int

    def url(self, **changes: Any) -> str:
        """This list's URL with some parameters changed (empty ones left out)."""
        values = {
            "q": self.q,
            "enabled": self.enabled,
            "severity": self.severity,
            "sort": "" if self.sort == "name" else self.sort,
            "page": "" if self.page == 1 else str(self.page),
        }
        values.update({k: str(v) for k, v in changes.items()})
        query = urlencode({k: v for k, v in values.items() if v})
        return "/rules" + (f"?{query}" if query else "")

    def pager_base(self) -> str:
        base = self.url(page="")
        return base + ("&" if "?" in base else "?")


def _list_query(request: Request) -> ListQuery:
    qp = request.query_params
    q = qp.get("q", "").strip()[:200]
    enabled = qp.get("enabled", "")
    severity = qp.get("severity", "")
    sort = qp.get("sort", "name")
    page_text = qp.get("page", "1")
    page = int(page_text) if page_text.isdigit() and 0 < int(page_text) < 100_000 else 1
    return ListQuery(
        q="".join(ch for ch in q if ch.isprintable()),
        enabled=enabled if enabled in ENABLED else "",
        severity=severity if severity in SEVERITIES else "",
        sort=sort if sort in SORTS else "name",
        page=page,
    )


@router.get("/rules")
async def rules_list(request: Request, principal: Visitor) -> Response:
    if not principal.can("rules:read"):
        return _forbidden(request, principal, "The rules list", "rules:read")
    query = _list_query(request)
    params = PageParams(page=query.page, per_page=PER_PAGE)
    async with container(request).db.session() as session:
        rows, total = await service.list_rule_rows(
            session,
            principal.factory_id,
            params,
            search=query.q or None,
            is_active=ENABLED.get(query.enabled),
            severity=query.severity or None,
            sort=query.sort,
        )
    fragment = request.headers.get("hx-target") == "rules-table" and not request.headers.get(
        "hx-history-restore-request"
    )
    return render(
        request,
        "_rules_table.html" if fragment else "rules.html",
        principal,
        rows=rows,
        meta={"page": query.page, "per_page": PER_PAGE, "total": total},
        query=query,
        severities=SEVERITIES,
        can_write=principal.can("rules:write"),
        scope_text=scope_text,
        schedule_text=schedule_text,
        condition_text=condition_text,
    )


# --- one rule, the builder ---------------------------------------------------------------


def _forbidden(request: Request, principal: Principal, what: str, permission: str) -> Response:
    return render(
        request,
        "_rules_forbidden.html",
        principal,
        status_code=403,
        what=what,
        permission=permission,
    )


async def _editor_context(
    request: Request, principal: Principal, rule: RuleOut | None
) -> dict[str, Any]:
    """What the builder needs beyond the rule: groups, channels, parameter keys, and
    the names of the devices a rule lists."""
    all_rows = PageParams(page=1, per_page=500)
    async with container(request).db.session() as session:
        groups, _ = await assets_service.list_groups(session, principal.factory_id, all_rows)
        channels, _ = await notify_service.list_channels(
            session,
            principal.factory_id,
            all_rows,
            kind=None,
            is_active=None,
            search=None,
            sort=None,
        )
        keys = await service.parameter_keys(session, principal.factory_id)
        listed = (rule.scope.get("device_ids") or []) if rule is not None else []
        labels = await service.device_labels(session, principal.factory_id, listed)
    data = {
        "rule_id": rule.id if rule else None,
        "conditions": rule.conditions if rule else None,
        "schedule": rule.schedule if rule else None,
        "devices": [{"id": i, "key": k, "name": n} for i, k, n in labels],
        "timezone": principal.factory_timezone,
        "can_read_telemetry": principal.can("telemetry:read"),
        "can_read_assets": principal.can("assets:read"),
    }
    return {
        "groups": groups,
        "channels": channels,
        "parameter_keys": keys,
        "editor": data,
        "notify_ids": set((rule.actions.get("notify") or []) if rule else []),
    }


def _page_context(principal: Principal) -> dict[str, Any]:
    return {
        "severities": SEVERITIES,
        "can_write": principal.can("rules:write"),
        "day_names": DAY_NAMES,
        "duration_text": duration_text,
        "schedule_text": schedule_text,
        "leaf_text": leaf_text,
        "is_group": is_group,
        "group_text": GROUP_TEXT,
    }


@router.get("/rules/new")
async def rule_new(request: Request, principal: Visitor) -> Response:
    if not principal.can("rules:write"):
        return _forbidden(request, principal, "Creating a rule", "rules:write")
    return render(
        request,
        "rule_edit.html",
        principal,
        rule=None,
        activity=None,
        alerts=[],
        scope_label="All devices",
        **_page_context(principal),
        **await _editor_context(request, principal, None),
    )


def _rule_id(text: str) -> int | None:
    return int(text) if text.isdigit() and 0 < int(text) <= MAX_DB_ID else None


async def _recent_alerts(
    request: Request, principal: Principal, rule_id: int
) -> tuple[list[AlertOut], int]:
    if not principal.can("alerts:read"):
        return [], 0
    async with container(request).db.session() as session:
        return await alerts_service.list_alerts(
            session,
            principal.factory_id,
            PageParams(page=1, per_page=RECENT_ALERTS),
            rule_id=rule_id,
        )


@router.get("/rules/{rule_id}")
async def rule_page(request: Request, rule_id: str, principal: Visitor) -> Response:
    if not principal.can("rules:read"):
        return _forbidden(request, principal, "A rule", "rules:read")
    wanted = _rule_id(rule_id)
    missing = not_found(request, principal, f"Rule {rule_id[:40]}", "/rules", "the rules")
    if wanted is None:
        return missing
    async with container(request).db.session() as session:
        try:
            rule = await service.get_rule(session, principal.factory_id, wanted)
        except NotFound:
            return missing
        activity = (await service.rule_activity(session, principal.factory_id, [rule.id])).get(
            rule.id, service.RuleActivity()
        )
        group_name = None
        if rule.scope["type"] == "group":
            try:
                group = await assets_service.get_group(
                    session, principal.factory_id, rule.scope["group_id"]
                )
                group_name = group.name
            except NotFound:
                group_name = None
    alerts, alerts_total = await _recent_alerts(request, principal, rule.id)
    extra = await _editor_context(request, principal, rule) if principal.can("rules:write") else {}
    return render(
        request,
        "rule_edit.html",
        principal,
        rule=rule,
        activity=activity,
        alerts=alerts,
        alerts_total=alerts_total,
        scope_label=scope_text(
            rule.scope["type"], len(rule.scope.get("device_ids") or []), group_name
        ),
        **_page_context(principal),
        **extra,
    )


@router.get("/rules/{rule_id}/activity")
async def rule_activity_fragment(request: Request, rule_id: str, principal: Visitor) -> Response:
    """The rule page's status card (last fired, open alerts, recent alerts): refreshed
    by the page's script when an alert of this rule arrives on the live stream."""
    wanted = _rule_id(rule_id)
    if not principal.can("rules:read") or wanted is None:
        return Response(status_code=404)
    async with container(request).db.session() as session:
        try:
            rule = await service.get_rule(session, principal.factory_id, wanted)
        except NotFound:
            return Response(status_code=404)
        activity = (await service.rule_activity(session, principal.factory_id, [rule.id])).get(
            rule.id, service.RuleActivity()
        )
    alerts, alerts_total = await _recent_alerts(request, principal, rule.id)
    return render(
        request,
        "_rule_activity.html",
        principal,
        rule=rule,
        activity=activity,
        alerts=alerts,
        alerts_total=alerts_total,
    )
