"""Pages of the UI: admin — dead letters, users and roles, the audit log.

Each page needs the permission of its nav entry (telemetry:write, users:read,
audit:read); without it the visitor gets the "no permission" page with status
403. Changes are made by the page's script (static/js/admin.js) through the
REST API, which checks permissions again; these views only read.

Query strings are parsed leniently here (a page answers with HTML, never a
problem document): a bad filter value is shown as an error next to its field
and left out of the query.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from plantwatch.core.errors import NotFound
from plantwatch.core.schemas import MAX_DB_ID, PageMeta, PageParams
from plantwatch.telemetry import payloads
from plantwatch.telemetry import service as telemetry_service
from plantwatch.telemetry.models import DeadLetter
from plantwatch.tenancy import service as tenancy_service
from plantwatch.tenancy.auth import Principal, container
from plantwatch.tenancy.models import AuditEntry, User
from plantwatch.tenancy.permissions import (
    PERMISSIONS,
    ROLE_DESCRIPTIONS,
    ROLE_PERMISSIONS,
    Role,
    can_assign_role,
    effective_permissions,
    escalation,
)
from plantwatch.web.render import not_found, render
from plantwatch.web.session import page_principal

router = APIRouter(include_in_schema=False)
Visitor = Annotated[Principal, Depends(page_principal)]

PER_PAGE = 50
MAX_PAGE = 1_000_000
PREVIEW_CHARS = 90
# The expanded payload is capped: a 1 MB message in a table of 50 would make a slow page.
FULL_PAYLOAD_CHARS = 20_000
PRETTY_MAX_BYTES = 200_000

DEAD_LETTER_REASONS: tuple[str, ...] = (
    payloads.INVALID_JSON,
    payloads.INVALID_SHAPE,
    payloads.PAYLOAD_TOO_LARGE,
    payloads.TOO_MANY_ENTRIES,
    payloads.TOO_MANY_METRICS,
    payloads.INVALID_TIMESTAMP,
    payloads.TIMESTAMP_OUT_OF_RANGE,
    payloads.INVALID_METRIC_NAME,
    payloads.NON_FINITE_VALUE,
    payloads.INVALID_VALUE_TYPE,
    payloads.STRING_TOO_LONG,
    telemetry_service.UNKNOWN_DEVICE,
    telemetry_service.UNKNOWN_FACTORY,
    telemetry_service.INVALID_TOPIC,
    telemetry_service.DEVICE_INACTIVE,
    telemetry_service.DEVICE_MISMATCH,
)
DEAD_LETTER_STATES = {"open": "Not replayed", "replayed": "Replayed", "all": "All"}
USER_STATES = {
    "active": "Active",
    "pending": "Invite pending",
    "deactivated": "Deactivated",
}
USER_SORTABLE = {
    "email": "Email",
    "full_name": "Name",
    "role": "Role",
    "last_login_at": "Last login",
}
# Suggestions for the audit filters (any value may be typed).
AUDIT_ENTITY_TYPES = (
    "user",
    "session",
    "factory",
    "device",
    "device_key",
    "parameter",
    "site",
    "area",
    "line",
    "group",
    "rule",
    "alert",
    "dead_letter",
    "notification_channel",
)
AUDIT_ACTIONS = (
    "user.create",
    "user.invite",
    "user.reinvite",
    "user.invite_accepted",
    "user.update",
    "user.deactivate",
    "user.password_change",
    "user.password_reset",
    "auth.login",
    "auth.login_failed",
    "auth.logout",
    "auth.refresh_reuse",
    "factory.update",
    "device.create",
    "device.update",
    "device_key.create",
    "device_key.revoke",
    "rule.create",
    "rule.update",
    "rule.toggle",
    "dead_letter.replay",
)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


# --- shared helpers -----------------------------------------------------------------------


def forbidden(request: Request, principal: Principal, permission: str, what: str) -> Response:
    """The "you don't have permission" page (403): what the page is and what it needs."""
    return render(
        request,
        "forbidden.html",
        principal,
        status_code=403,
        what=what,
        permission=permission,
        permission_text=PERMISSIONS.get(permission, ""),
    )


@dataclass
class Form:
    """A page's filters: cleaned values, errors per field, and the query to keep them."""

    values: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def text(self, name: str, raw: str | None, max_len: int = 200) -> str | None:
        value = _CONTROL.sub("", (raw or "").strip())[:max_len]
        if value:
            self.values[name] = value
            return value
        return None

    def choice(self, name: str, raw: str | None, allowed: Any, default: str | None) -> str | None:
        value = (raw or "").strip()
        if value and value in allowed:
            if value != default:
                self.values[name] = value
            return value
        if value:
            self.errors[name] = "Unknown value, ignored"
        return default

    def number(self, name: str, raw: str | None) -> int | None:
        value = (raw or "").strip()
        if not value:
            return None
        if value.isdigit() and 1 <= int(value) <= MAX_DB_ID:
            self.values[name] = value
            return int(value)
        self.errors[name] = "Not a valid id, ignored"
        return None

    def local_time(self, name: str, raw: str | None, tz: str) -> dt.datetime | None:
        """A `datetime-local` value, read in the factory's timezone, returned in UTC."""
        value = (raw or "").strip()
        if not value:
            return None
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            self.errors[name] = "Not a date and time, ignored"
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=_zone(tz))
        self.values[name] = value
        return parsed.astimezone(dt.UTC)

    def time_range(
        self, raw_start: str | None, raw_end: str | None, tz: str
    ) -> tuple[dt.datetime | None, dt.datetime | None]:
        start = self.local_time("start", raw_start, tz)
        end = self.local_time("end", raw_end, tz)
        if start is not None and end is not None and start >= end:
            self.errors["end"] = "Must be after the start, ignored"
            self.values.pop("end", None)
            end = None
        return start, end

    def query(self, **extra: str) -> str:
        """`?a=1&b=2&` (ends so that `page=N` can follow) with the filters kept."""
        items = {**self.values, **extra}
        return "?" + (urlencode(items) + "&" if items else "")


def _zone(name: str) -> dt.tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return dt.UTC


def _page(raw: str | None) -> PageParams:
    value = (raw or "").strip()
    page = int(value) if value.isdigit() and 1 <= int(value) <= MAX_PAGE else 1
    return PageParams(page=page, per_page=PER_PAGE)


def _meta(params: PageParams, total: int) -> PageMeta:
    return PageMeta(page=params.page, per_page=params.per_page, total=total)


def _safe_text(text: str) -> str:
    """Control characters (other than newlines and tabs) shown as escapes, never raw."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _compact(value: Any) -> str:
    if isinstance(value, str):
        return _safe_text(value)
    return _safe_text(json.dumps(value, ensure_ascii=False, sort_keys=True, default=str))


# --- dead letters -------------------------------------------------------------------------


@dataclass(frozen=True)
class PayloadView:
    preview: str
    full: str
    is_json: bool
    size: int
    cut: bool


def payload_view(raw: bytes) -> PayloadView:
    """A payload as text a person can read: bytes that are not UTF-8 as `\\xNN`, JSON
    pretty-printed, long payloads cut (the API has the whole of it)."""
    text = _safe_text(raw.decode("utf-8", errors="backslashreplace"))
    full, is_json = text, False
    if 0 < len(raw) <= PRETTY_MAX_BYTES:
        try:
            parsed = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            parsed = None
        else:
            is_json = True
        if is_json:
            full = _safe_text(json.dumps(parsed, indent=2, ensure_ascii=False))
    one_line = " ".join(text.split())
    preview = one_line if len(one_line) <= PREVIEW_CHARS else one_line[: PREVIEW_CHARS - 1] + "…"
    cut = len(full) > FULL_PAYLOAD_CHARS
    return PayloadView(preview, full[:FULL_PAYLOAD_CHARS], is_json, len(raw), cut)


@dataclass(frozen=True)
class DeadLetterRow:
    letter: DeadLetter
    payload: PayloadView


async def _dead_letters_context(
    request: Request,
    principal: Principal,
    reason: str | None,
    device: str | None,
    start: str | None,
    end: str | None,
    status: str | None,
    page: str | None,
) -> dict[str, Any]:
    form = Form()
    reason_value = form.text("reason", reason, 48)
    device_key = form.text("device", device, 100)
    state = form.choice("status", status, DEAD_LETTER_STATES, "open")
    start_at, end_at = form.time_range(start, end, principal.factory_timezone)
    params = _page(page)
    filters = telemetry_service.DeadLetterFilters(
        reason=reason_value,
        device_key=device_key,
        start=start_at,
        end=end_at,
        replayed=None if state == "all" else state == "replayed",
    )
    async with container(request).db.session() as session:
        letters, total = await telemetry_service.list_dead_letters(
            session, principal.factory_id, filters, params
        )
        open_by_reason = await telemetry_service.dead_letter_reasons(session, principal.factory_id)
    reasons = sorted(set(DEAD_LETTER_REASONS) | set(open_by_reason))
    return {
        "rows": [DeadLetterRow(letter, payload_view(letter.payload)) for letter in letters],
        "meta": _meta(params, total),
        "form": form,
        "reasons": reasons,
        "states": DEAD_LETTER_STATES,
        "status": state,
        "open_by_reason": dict(sorted(open_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
        "base_url": "/dead-letters" + form.query(),
        "rows_url": "/dead-letters/rows" + form.query(page=str(params.page)).rstrip("&"),
    }


@router.get("/dead-letters")
@router.get("/dead-letters/rows")
async def dead_letters_page(
    request: Request,
    principal: Visitor,
    reason: str | None = None,
    device: str | None = None,
    start: str | None = None,
    end: str | None = None,
    status: str | None = None,
    page: str | None = None,
) -> Response:
    """The page, or (`/rows`) the table alone, for refreshing it after a replay."""
    if not principal.can("telemetry:write"):
        return forbidden(request, principal, "telemetry:write", "Dead letters")
    ctx = await _dead_letters_context(request, principal, reason, device, start, end, status, page)
    if _fragment(request, "/rows"):
        return render(request, "_dead_letters_table.html", principal, **ctx)
    return render(request, "dead_letters.html", principal, **ctx)


def _fragment(request: Request, suffix: str) -> bool:
    """Whether the request is for a page's fragment route (the page's path + suffix)."""
    return request.url.path.endswith(suffix)


# --- users and roles ----------------------------------------------------------------------


def _status_of(user: User) -> str:
    if not user.is_active:
        return "deactivated"
    if user.password_hash is None:
        return "pending"
    return "active"


def assignable_roles(actor: Principal, target: User | None) -> list[str]:
    """Roles `actor` may give `target` (None: a new user), by the rules the API enforces:
    only a super admin makes or touches a super admin, and nobody hands out a
    permission they do not hold (with the target's grants kept)."""
    if target is not None and not can_assign_role(actor.role, target.role):
        return []
    grants = list(target.permissions or ()) if target is not None else []
    before = (
        effective_permissions(target.role, grants)
        if target is not None and target.is_active
        else frozenset()
    )
    out: list[str] = []
    for role in Role:
        if target is not None and role.value == target.role:
            out.append(role.value)
            continue
        if not can_assign_role(actor.role, role.value):
            continue
        after = effective_permissions(role.value, grants)
        if not escalation(actor.permissions, before, after):
            out.append(role.value)
    return out


def _roles_reference() -> list[dict[str, Any]]:
    return [
        {
            "name": role.value,
            "description": ROLE_DESCRIPTIONS[role],
            "permissions": [p for p in PERMISSIONS if p in ROLE_PERMISSIONS[role]],
        }
        for role in Role
    ]


def _sort_state(sort: str | None) -> tuple[str, str]:
    """(field, "ascending"|"descending") of the users table; email ascending by default."""
    value = (sort or "").strip()
    descending = value.startswith("-")
    name = value.lstrip("-")
    if name not in USER_SORTABLE:
        return "email", "ascending"
    return name, "descending" if descending else "ascending"


async def _users_context(
    request: Request,
    principal: Principal,
    search: str | None,
    role: str | None,
    status: str | None,
    sort: str | None,
    page: str | None,
) -> dict[str, Any]:
    form = Form()
    search_value = form.text("search", search, 200)
    role_value = form.choice("role", role, {r.value for r in Role}, None)
    state = form.choice("status", status, USER_STATES, None)
    sort_field, sort_dir = _sort_state(sort)
    sort_param = ("-" if sort_dir == "descending" else "") + sort_field
    params = _page(page)
    filters = tenancy_service.UserFilters(
        role=role_value,
        is_active=None if state is None else state != "deactivated",
        pending=None if state is None or state == "deactivated" else state == "pending",
        search=search_value,
    )
    async with container(request).db.session() as session:
        users, total = await tenancy_service.list_users(
            session, principal.factory_id, filters, params, sort_param
        )
    rows = [{"user": u, "status": _status_of(u)} for u in users]
    sorted_query = form.query(sort=sort_param) if sort_param != "email" else form.query()
    return {
        "rows": rows,
        "meta": _meta(params, total),
        "form": form,
        "roles": [r.value for r in Role],
        "states": USER_STATES,
        "sortable": USER_SORTABLE,
        "sort_field": sort_field,
        "sort_dir": sort_dir,
        "sort_url": lambda name: (
            "/users"
            + form.query(
                sort=("-" + name) if name == sort_field and sort_dir == "ascending" else name
            ).rstrip("&")
        ),
        "base_url": "/users" + sorted_query,
        "rows_url": "/users/rows" + form.query(page=str(params.page), sort=sort_param).rstrip("&"),
        "can_manage": principal.can("users:manage"),
    }


@router.get("/users")
@router.get("/users/rows")
async def users_page(
    request: Request,
    principal: Visitor,
    search: str | None = None,
    role: str | None = None,
    status: str | None = None,
    sort: str | None = None,
    page: str | None = None,
) -> Response:
    """The page, or (`/rows`) the users table alone, for refreshing it after an invite."""
    if not principal.can("users:read"):
        return forbidden(request, principal, "users:read", "Users and roles")
    ctx = await _users_context(request, principal, search, role, status, sort, page)
    if _fragment(request, "/rows"):
        return render(request, "_users_table.html", principal, **ctx)
    return render(
        request,
        "users.html",
        principal,
        invite_roles=assignable_roles(principal, None) if ctx["can_manage"] else [],
        roles_reference=_roles_reference(),
        permissions=PERMISSIONS,
        **ctx,
    )


def _parse_id(raw: str) -> int | None:
    return int(raw) if raw.isdigit() and 1 <= int(raw) <= MAX_DB_ID else None


async def _user_context(
    request: Request, principal: Principal, user_id: int
) -> dict[str, Any] | None:
    async with container(request).db.session() as session:
        try:
            user = await tenancy_service.get_user(session, principal.factory_id, user_id)
        except NotFound:
            return None
        recent: list[AuditEntry] = []
        if principal.can("audit:read"):
            entries, _ = await tenancy_service.list_audit(
                session,
                principal.factory_id,
                tenancy_service.AuditFilters(entity_type="user", entity_id=str(user.id)),
                PageParams(page=1, per_page=10),
            )
            recent = list(entries)
    can_manage = principal.can("users:manage")
    protected = not can_assign_role(principal.role, user.role)
    role_permissions = {r.value: sorted(ROLE_PERMISSIONS[r]) for r in Role}
    grants = set(user.permissions or ())
    return {
        "user": user,
        "status": _status_of(user),
        "effective": [p for p in PERMISSIONS if p in effective_permissions(user.role, grants)],
        "grants": grants,
        "role_permissions": role_permissions,
        "permissions": PERMISSIONS,
        "can_manage": can_manage and not protected,
        "protected": can_manage and protected,
        "is_self": user.id == principal.user_id,
        "roles": assignable_roles(principal, user) if can_manage else [],
        "grantable": {p for p in PERMISSIONS if principal.can(p) or p in grants},
        "recent": [_audit_row(e) for e in recent],
        "role_descriptions": {r.value: ROLE_DESCRIPTIONS[r] for r in Role},
    }


@router.get("/users/{user_id}")
@router.get("/users/{user_id}/detail")
async def user_page(request: Request, principal: Visitor, user_id: str) -> Response:
    """The page, or (`/detail`) the user's details and access controls alone, for
    refreshing them after a change."""
    if not principal.can("users:read"):
        return forbidden(request, principal, "users:read", "Users and roles")
    parsed = _parse_id(user_id)
    ctx = await _user_context(request, principal, parsed) if parsed is not None else None
    if ctx is None:
        return not_found(request, principal, "This user", "/users", "users")
    if _fragment(request, "/detail"):
        return render(request, "_users_detail.html", principal, **ctx)
    return render(request, "user.html", principal, **ctx)


# --- audit log ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    name: str
    before: str | None
    after: str | None


@dataclass(frozen=True)
class AuditRow:
    entry: AuditEntry
    changes: list[Change]


def _audit_row(entry: AuditEntry) -> AuditRow:
    """An entry with its before/after snapshots as one line per field."""
    before = entry.before or {}
    after = entry.after or {}
    names = [k for k in (*before.keys(), *after.keys()) if k != "updated_at"]
    changes = [
        Change(
            name,
            _compact(before[name]) if name in before else None,
            _compact(after[name]) if name in after else None,
        )
        for name in dict.fromkeys(names)
    ]
    return AuditRow(entry, changes)


async def _audit_context(
    request: Request,
    principal: Principal,
    actor: str | None,
    action: str | None,
    entity_type: str | None,
    entity_id: str | None,
    user_id: str | None,
    start: str | None,
    end: str | None,
    page: str | None,
) -> dict[str, Any]:
    form = Form()
    start_at, end_at = form.time_range(start, end, principal.factory_timezone)
    filters = tenancy_service.AuditFilters(
        actor=(form.text("actor", actor, 200) or "").lower() or None,
        action=form.text("action", action, 64),
        entity_type=form.text("entity_type", entity_type, 64),
        entity_id=form.text("entity_id", entity_id, 64),
        user_id=form.number("user_id", user_id),
        start=start_at,
        end=end_at,
    )
    params = _page(page)
    async with container(request).db.session() as session:
        entries, total = await tenancy_service.list_audit(
            session, principal.factory_id, filters, params
        )
    return {
        "rows": [_audit_row(e) for e in entries],
        "meta": _meta(params, total),
        "form": form,
        "entity_types": AUDIT_ENTITY_TYPES,
        "actions": AUDIT_ACTIONS,
        "base_url": "/audit" + form.query(),
    }


@router.get("/audit")
async def audit_page(
    request: Request,
    principal: Visitor,
    actor: str | None = None,
    action: str | None = None,
    entity_type: str | None = None,
    entity_id: str | None = None,
    user_id: str | None = None,
    start: str | None = None,
    end: str | None = None,
    page: str | None = None,
) -> Response:
    if not principal.can("audit:read"):
        return forbidden(request, principal, "audit:read", "The audit log")
    ctx = await _audit_context(
        request, principal, actor, action, entity_type, entity_id, user_id, start, end, page
    )
    return render(request, "audit.html", principal, **ctx)
