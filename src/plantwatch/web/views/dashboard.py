"""The dashboard ("/"): devices online/offline, open alerts by severity, power and
energy today, the factory's health, the worst machines and the latest alerts.

Every figure is aggregated in the database (GROUP BY): no device is loaded into
Python to be counted, and the worst machines are ranked from the devices that have
something wrong (open alerts, parameters at a limit, offline) rather than from all
of them. Energy today integrates every power series since midnight, which takes a
while in a big factory: it is computed at most every few seconds per factory, and
the page leaves its card to load right after the rest (docs/ui.md).

The page shows only the cards its visitor may see (CARD_PERMISSIONS). The same
card templates render the page and the fragment `GET /dashboard/cards?card=...`,
which the page's script asks for when a live event says a card changed; the
fragment's cards carry `hx-swap-oob`, so one request refreshes several cards.
"""

from __future__ import annotations

import asyncio
import heapq
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from plantwatch.alerts import service as alerts_service
from plantwatch.alerts.schemas import AlertOut
from plantwatch.analytics.health import Health, device_health, factory_health
from plantwatch.assets import service as assets_service
from plantwatch.assets.models import DeviceParameter
from plantwatch.core.db import Database
from plantwatch.core.errors import Forbidden
from plantwatch.telemetry import kpis
from plantwatch.telemetry.schemas import EnergySummaryOut
from plantwatch.tenancy.auth import Principal, container
from plantwatch.web.render import render
from plantwatch.web.session import page_principal

log = structlog.get_logger("plantwatch.web")

router = APIRouter(include_in_schema=False)

PAGE_PERMISSION = "assets:read"
# What a card needs beyond the page's own permission. Health is built from open
# alerts, so it needs both.
CARD_PERMISSIONS: dict[str, tuple[str, ...]] = {
    "devices": (),
    "alerts": ("alerts:read",),
    "energy": ("telemetry:read",),
    "health": ("alerts:read", "analytics:read"),
    "worst": ("alerts:read", "analytics:read"),
    "latest": ("alerts:read",),
}
CARDS = tuple(CARD_PERMISSIONS)
SEVERITY_ORDER = ("critical", "high", "medium", "low")
WORST_LIMIT = 8
LATEST_LIMIT = 10
TOP_CONSUMERS = 3


def visible_cards(principal: Principal) -> list[str]:
    if not principal.can(PAGE_PERMISSION):
        return []
    return [c for c, needs in CARD_PERMISSIONS.items() if all(principal.can(p) for p in needs)]


@dataclass(frozen=True)
class DeviceCounts:
    """Active devices by connectivity; decommissioned ones are counted apart."""

    total: int
    online: int
    offline: int
    never_seen: int
    decommissioned: int


@dataclass(frozen=True)
class AlertSummary:
    open: int
    triggered: int
    acknowledged: int
    by_severity: list[tuple[str, int]]  # most severe first


@dataclass(frozen=True)
class Deduction:
    reason: str
    points: int
    url: str | None


@dataclass(frozen=True)
class HealthCard:
    score: int
    label: str
    deductions: list[Deduction]


@dataclass(frozen=True)
class WorstMachine:
    id: int
    name: str
    device_key: str
    status: str
    health: Health
    open_alerts: int


@dataclass
class _Dashboard:
    """Gathers what the cards need, each figure once per request."""

    request: Request
    principal: Principal
    session: AsyncSession
    lazy_energy: bool = False
    _devices: DeviceCounts | None = None
    _alerts: AlertSummary | None = None

    @property
    def factory_id(self) -> int:
        return self.principal.factory_id

    async def devices(self) -> DeviceCounts:
        if self._devices is None:
            counts = await assets_service.device_status_counts(self.session, self.factory_id)
            active = {s: n for (s, is_active), n in counts.items() if is_active}
            self._devices = DeviceCounts(
                total=sum(active.values()),
                online=active.get("online", 0),
                offline=active.get("offline", 0),
                never_seen=sum(n for s, n in active.items() if s not in ("online", "offline")),
                decommissioned=sum(n for (_, is_active), n in counts.items() if not is_active),
            )
        return self._devices

    async def alerts(self) -> AlertSummary:
        if self._alerts is None:
            counts = await alerts_service.counts(
                self.session, self.factory_id, status=list(alerts_service.OPEN_STATES)
            )
            self._alerts = AlertSummary(
                open=counts.open,
                triggered=counts.by_status.get("triggered", 0),
                acknowledged=counts.by_status.get("acknowledged", 0),
                by_severity=[(s, counts.open_by_severity.get(s, 0)) for s in SEVERITY_ORDER],
            )
        return self._alerts

    async def energy(self) -> EnergySummaryOut | None:
        """Fresh figures for a fragment; on the page only figures already at hand
        (None: the card loads itself right after the page)."""
        db = container(self.request).db
        if self.lazy_energy:
            return cached_energy(db, self.factory_id)
        return await energy_summary(db, self.factory_id)

    async def health(self) -> HealthCard:
        alerts = await self.alerts()
        devices = await self.devices()
        found = factory_health(
            {s: n for s, n in alerts.by_severity if n}, offline_devices=devices.offline
        )
        return HealthCard(found.score, found.label, _linked(found.deductions))

    async def worst(self) -> list[WorstMachine]:
        """The lowest device_health scores, without scoring every device: only devices
        with open alerts or parameters at a limit (two GROUP BYs) or offline can score
        below 100. An offline device with nothing else scores what every such device
        scores, so the first few of those (by id) are enough."""
        by_device = await alerts_service.open_counts_by_device(self.session, self.factory_id)
        limits: dict[int, dict[str, int]] = {}
        if self.principal.can("telemetry:read"):  # limit levels are telemetry
            conn = await self.session.connection()  # Core rows: no ORM work per row
            rows = await conn.execute(kpis.limit_levels_select(self.factory_id))
            for device_id, n_critical, n_warning in rows.all():
                found = {"critical": int(n_critical or 0), "warning": int(n_warning or 0)}
                limits[device_id] = {k: n for k, n in found.items() if n}
        offline, inactive = await assets_service.offline_and_inactive_ids(
            self.session, self.factory_id
        )
        offline_set = set(offline)
        flagged = (set(by_device) | set(limits)) - inactive
        quiet_offline = [d for d in offline if d not in flagged][:WORST_LIMIT]
        scores: dict[tuple[Any, ...], Health] = {}  # most devices share a few profiles
        scored: list[tuple[int, int, Health]] = []
        empty: dict[str, int] = {}
        for device_id in [*flagged, *quiet_offline]:
            alerts = by_device.get(device_id, empty)
            levels = limits.get(device_id, empty)
            online = False if device_id in offline_set else None
            key = (online, tuple(alerts.items()), tuple(levels.items()))
            health = scores.get(key)
            if health is None:
                health = scores[key] = device_health(online, alerts, levels)
            if health.score < 100:
                scored.append((health.score, device_id, health))
        worst = heapq.nsmallest(WORST_LIMIT, scored, key=lambda s: (s[0], s[1]))
        briefs = {
            b.id: b
            for b in await assets_service.device_briefs(
                self.session, self.factory_id, [device_id for _, device_id, _ in worst]
            )
        }
        machines = [
            WorstMachine(
                device_id,
                briefs[device_id].name,
                briefs[device_id].device_key,
                briefs[device_id].status,
                health,
                sum(by_device.get(device_id, {}).values()),
            )
            for _, device_id, health in worst
            if device_id in briefs
        ]
        machines.sort(key=lambda m: (m.health.score, m.name.lower(), m.id))
        return machines

    async def latest(self) -> list[AlertOut]:
        return await alerts_service.latest_alerts(self.session, self.factory_id, LATEST_LIMIT)

    async def context(self, cards: Sequence[str]) -> dict[str, Any]:
        ctx: dict[str, Any] = {"cards": list(cards)}
        loaders = {
            "devices": self.devices,
            "alerts": self.alerts,
            "energy": self.energy,
            "health": self.health,
            "worst": self.worst,
            "latest": self.latest,
        }
        for card in cards:
            ctx[card] = await loaders[card]()
        if "energy" in cards:
            energy: EnergySummaryOut | None = ctx["energy"]
            ctx["consumers"] = sorted(
                (d for d in energy.devices if d.current_power_kw > 0) if energy else (),
                key=lambda d: -d.current_power_kw,
            )[:TOP_CONSUMERS]
        return ctx


@asynccontextmanager
async def reading(db: Database) -> AsyncIterator[AsyncSession]:
    """A session for reading only. `Database.session()` is the API's unit of work and on
    SQLite takes the write lock at BEGIN (IMMEDIATE): a dashboard holding it for its
    queries would stall ingest, and a second session opened meanwhile (energy) would
    wait for it. Plain engine connections begin deferred, so readers run beside the
    writer (and on PostgreSQL nothing changes)."""
    async with AsyncSession(db.engine, expire_on_commit=False) as session:
        yield session


# --- energy: the factory's figures, shared by every dashboard of this process ----------------

ENERGY_TTL_S = 5.0
# Figures this long past their TTL are not shown while new ones are worked out: the
# first dashboard after a quiet spell waits for fresh ones instead.
ENERGY_STALE_S = 10.0


@dataclass
class _Energy:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    expires: float = 0.0
    value: EnergySummaryOut | None = None
    refresh: asyncio.Task[None] | None = None


_energy: weakref.WeakKeyDictionary[Database, dict[int, _Energy]] = weakref.WeakKeyDictionary()


def cached_energy(db: Database, factory_id: int) -> EnergySummaryOut | None:
    entry = _energy.get(db, {}).get(factory_id)
    if entry is not None and entry.value is not None and entry.expires > time.monotonic():
        return entry.value
    return None


async def energy_summary(db: Database, factory_id: int) -> EnergySummaryOut:
    """kpis.energy_summary (totals and the top consumers), computed at most once per
    ENERGY_TTL_S per factory and process however many dashboards ask, in its own
    session. While someone watches, a request never waits for new figures: it gets the
    last ones (at most ENERGY_TTL_S + ENERGY_STALE_S old) and the refresh runs in the
    background (10,000 power series: ~0.3 s)."""
    entry = _energy.setdefault(db, {}).setdefault(factory_id, _Energy())
    now = time.monotonic()
    if entry.value is None or now > entry.expires + ENERGY_STALE_S:
        await _refresh_energy(db, factory_id, entry)  # none yet, or too old to show
    elif entry.expires <= now and (entry.refresh is None or entry.refresh.done()):
        entry.refresh = asyncio.create_task(_refresh_energy(db, factory_id, entry))
    assert entry.value is not None
    return entry.value


async def _refresh_energy(db: Database, factory_id: int, entry: _Energy) -> None:
    async with entry.lock:
        if entry.value is not None and entry.expires > time.monotonic():
            return  # another caller just did
        try:
            async with reading(db) as session:
                value = await kpis.energy_summary(session, factory_id, top=TOP_CONSUMERS)
        except Exception:
            if entry.value is None:
                raise
            log.warning("energy_refresh_failed", factory_id=factory_id, exc_info=True)
            return
        entry.value = value
        entry.expires = time.monotonic() + ENERGY_TTL_S


async def warm_energy(db: Database) -> None:
    """Work out each factory's energy figures once when the server starts, in the
    background, so the first dashboard after a restart does not wait while today's
    integral is summed from midnight (10,000 power series: a second or more per hour
    of the day); later requests only add the minutes since."""
    try:
        async with reading(db) as session:
            factory_ids = list(
                await session.scalars(
                    select(DeviceParameter.factory_id)
                    .where(DeviceParameter.is_power.is_(True))
                    .distinct()
                )
            )
        for factory_id in factory_ids:
            await energy_summary(db, factory_id)
    except Exception:
        log.warning("energy_warm_up_failed", exc_info=True)


def _linked(deductions: Sequence[tuple[str, int]]) -> list[Deduction]:
    """The factory score's reasons, each linked to the list behind it."""
    out = []
    for reason, points in deductions:
        url = None
        if reason.endswith("offline"):
            url = "/machines?status=offline"
        else:
            severity = next((s for s in SEVERITY_ORDER if f" {s} alert" in reason), None)
            if severity is not None:
                url = f"/alerts?severity={severity}"
        out.append(Deduction(reason, points, url))
    return out


def _allowed(principal: Principal, cards: Sequence[str]) -> None:
    for card in cards:
        for permission in CARD_PERMISSIONS[card]:
            if not principal.can(permission):
                raise Forbidden(
                    f"Missing permission '{permission}'",
                    code="permission_denied",
                    permission=permission,
                )


@router.get("/")
async def dashboard(
    request: Request, principal: Annotated[Principal, Depends(page_principal)]
) -> Response:
    cards = visible_cards(principal)
    if not cards:
        return render(request, "dashboard.html", principal, status_code=403, cards=[])
    async with reading(container(request).db) as session:
        ctx = await _Dashboard(request, principal, session, lazy_energy=True).context(cards)
    return render(request, "dashboard.html", principal, **ctx)


@router.get("/dashboard/cards")
async def dashboard_cards(
    request: Request,
    principal: Annotated[Principal, Depends(page_principal)],
    card: Annotated[
        list[str] | None, Query(description="Cards to render (default: all you may see)")
    ] = None,
) -> Response:
    """Cards of the dashboard as out-of-band swaps (`hx-swap-oob`), for live updates."""
    if not principal.can(PAGE_PERMISSION):
        raise Forbidden(
            f"Missing permission '{PAGE_PERMISSION}'",
            code="permission_denied",
            permission=PAGE_PERMISSION,
        )
    wanted = _parse_cards(card) if card else visible_cards(principal)
    _allowed(principal, wanted)
    async with reading(container(request).db) as session:
        ctx = await _Dashboard(request, principal, session).context(wanted)
    return render(request, "_dashboard_fragment.html", principal, **ctx)


def _parse_cards(values: Sequence[str]) -> list[str]:
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in CARD_PERMISSIONS]
    if unknown:
        raise kpis.query_error(
            "card", f"unknown card '{unknown[0][:40]}'; one of {', '.join(CARDS)}"
        )
    return list(dict.fromkeys(names))
