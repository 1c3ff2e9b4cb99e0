"""KPI services: live values of a device, history for charts, factory-wide latest
values for dashboards, and energy (current power, energy today).

Every function takes the factory from the caller and answers only for that
factory's devices; another factory's device is `device_not_found`.

Latest values live in `series_latest`; the factory-wide read for dashboards is
answered from memory (`latest.LatestCache`: this process's commits at once,
other processes' within seconds). What changes rarely — which device and
parameter a series is, its unit, limits and offline limit — is cached per
factory for a few seconds (`SeriesDirectory`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from sqlalchemy import ColumnElement, and_, case, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from plantwatch.assets.models import Device, DeviceParameter
from plantwatch.core.db import utcnow
from plantwatch.core.errors import NotFound, Problem
from plantwatch.telemetry import queries
from plantwatch.telemetry.latest import Entry, LatestCache, of_devices
from plantwatch.telemetry.models import series_latest, telemetry_raw
from plantwatch.telemetry.rollups import MINUTE_MS
from plantwatch.telemetry.schemas import (
    DeviceEnergyDetailOut,
    DeviceEnergyOut,
    EnergyParameterOut,
    EnergySummaryOut,
    HistorySeriesOut,
    KpiHistoryOut,
    KpiValueOut,
    Level,
    LiveKpisOut,
)
from plantwatch.tenancy.models import Factory

log = structlog.get_logger("plantwatch.kpis")

INTERVALS = ("raw", *queries.NAMED_INTERVALS, "auto")
DEFAULT_HISTORY_SPAN = dt.timedelta(hours=24)
MAX_HISTORY_PARAMETERS = 20
# Power units and their factor to kW. Anything else is reported but not counted.
POWER_UNITS_KW = {"W": 0.001, "w": 0.001, "kW": 1.0, "KW": 1.0, "kw": 1.0, "MW": 1000.0}
MS_PER_HOUR = 3_600_000


def query_error(name: str, message: str, code: str = "validation_error") -> Problem:
    """A 422 naming a query parameter, shaped like FastAPI's own validation errors."""
    return Problem(
        message,
        status=422,
        code=code,
        errors=[{"path": f"query.{name}", "message": message, "type": "value_error"}],
    )


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ONE_MS = dt.timedelta(milliseconds=1)


def _ms(value: dt.datetime) -> int:
    """Epoch milliseconds, exactly (float seconds would round 10:00:00.123 to .122)."""
    return (value - _EPOCH) // _ONE_MS


def _dt(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def level_of(
    value: float | None,
    warning_low: float | None,
    warning_high: float | None,
    critical_low: float | None,
    critical_high: float | None,
) -> Level | None:
    """ok / warning / critical: a value at or beyond a limit is in that band.
    None without a value or without any limit."""
    if value is None or (
        warning_low is None
        and warning_high is None
        and critical_low is None
        and critical_high is None
    ):
        return None
    if (critical_high is not None and value >= critical_high) or (
        critical_low is not None and value <= critical_low
    ):
        return "critical"
    if (warning_high is not None and value >= warning_high) or (
        warning_low is not None and value <= warning_low
    ):
        return "warning"
    return "ok"


def is_stale(ts: int | None, now_ms: int, offline_after_s: int) -> bool:
    """No value, or a value at least the offline limit old (the same rule that marks
    the device offline)."""
    return ts is None or now_ms - ts >= offline_after_s * 1000


async def _device(
    session: AsyncSession, factory_id: int, device_id: int
) -> tuple[Device, int, str]:
    """The device, its offline limit in seconds and the factory's timezone; 404 otherwise."""
    row = (
        await session.execute(
            select(Device, Factory.offline_after_s, Factory.timezone)
            .join(Factory, Factory.id == Device.factory_id)
            .where(Device.id == device_id, Device.factory_id == factory_id)
        )
    ).first()
    if row is None:
        raise NotFound(f"no device {device_id}", code="device_not_found")
    device, factory_limit, timezone = row
    return device, device.offline_after_s or factory_limit, timezone


# --- live KPIs of one device --------------------------------------------------------------


async def live_kpis(
    session: AsyncSession,
    factory_id: int,
    device_id: int,
    *,
    kpi_only: bool = False,
    now: dt.datetime | None = None,
) -> LiveKpisOut:
    """Every parameter of the device with its latest value (KPIs first, then by key)."""
    now = now or utcnow()
    now_ms = _ms(now)
    device, offline_after_s, _ = await _device(session, factory_id, device_id)
    stmt = select(DeviceParameter).where(
        DeviceParameter.device_id == device.id, DeviceParameter.factory_id == factory_id
    )
    if kpi_only:
        stmt = stmt.where(DeviceParameter.is_kpi.is_(True))
    parameters = (
        await session.scalars(stmt.order_by(DeviceParameter.is_kpi.desc(), DeviceParameter.key))
    ).all()
    latest = {
        row[0]: row[1:]
        for row in (
            await session.execute(
                select(
                    series_latest.c.series_id,
                    series_latest.c.ts,
                    series_latest.c.value,
                    series_latest.c.text,
                ).where(
                    series_latest.c.factory_id == factory_id,
                    series_latest.c.device_id == device.id,
                )
            )
        ).all()
    }
    kpis: list[KpiValueOut] = []
    for p in parameters:
        ts, value, text = latest.get(p.id, (None, None, None))
        kpis.append(
            KpiValueOut(
                parameter_id=p.id,
                key=p.key,
                display_name=p.display_name,
                unit=p.unit,
                data_type=p.data_type,
                is_kpi=p.is_kpi,
                value=value,
                text=text,
                ts=_dt(ts) if ts is not None else None,
                stale=is_stale(ts, now_ms, offline_after_s),
                level=level_of(
                    value, p.warning_low, p.warning_high, p.critical_low, p.critical_high
                ),
                warning_low=p.warning_low,
                warning_high=p.warning_high,
                critical_low=p.critical_low,
                critical_high=p.critical_high,
            )
        )
    return LiveKpisOut(
        device_id=device.id,
        device_key=device.device_key,
        name=device.name,
        status=device.status,
        last_seen=device.last_seen,
        offline_after_s=offline_after_s,
        timestamp=now,
        kpis=kpis,
    )


# --- history ------------------------------------------------------------------------------


def resolve_interval(interval: str, start_ms: int, end_ms: int, points: int) -> int | None:
    """The step in ms for an interval name (None = raw points); `auto` aims at `points`."""
    if interval == "raw":
        return None
    if interval == "auto":
        return queries.choose_interval(start_ms, end_ms, points)
    step = queries.NAMED_INTERVALS.get(interval)
    if step is None:
        raise query_error("interval", f"unknown interval '{interval}'; one of {INTERVALS}")
    return step


def history_range(
    start: dt.datetime | None, end: dt.datetime | None, now: dt.datetime | None = None
) -> tuple[dt.datetime, dt.datetime]:
    """Defaults: the 24 hours up to `end` (itself defaulting to now)."""
    if end is None:
        end = now or utcnow()
    if start is None:
        start = end - DEFAULT_HISTORY_SPAN
    if start.tzinfo is None or end.tzinfo is None:
        raise query_error("start", "start and end need a timezone (e.g. Z or +01:00)")
    if end <= start:
        raise query_error("end", "end must be after start")
    return start, end


async def kpi_history(
    session: AsyncSession,
    factory_id: int,
    device_id: int,
    parameters: Sequence[str],
    *,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    interval: str = "auto",
    agg: str = "avg",
    points: int = 500,
    now: dt.datetime | None = None,
) -> KpiHistoryOut:
    """History of some parameters of one device, from the coarsest exact tiers."""
    if agg not in queries.AGGREGATES:
        raise query_error("agg", f"unknown aggregate '{agg}'; one of {queries.AGGREGATES}")
    keys = list(dict.fromkeys(k.strip() for k in parameters if k.strip()))
    if not keys:
        raise query_error("parameters", "name at least one parameter")
    if len(keys) > MAX_HISTORY_PARAMETERS:
        raise query_error("parameters", f"at most {MAX_HISTORY_PARAMETERS} parameters")
    start, end = history_range(start, end, now)
    device, _, _ = await _device(session, factory_id, device_id)
    found = {
        p.key: p
        for p in (
            await session.scalars(
                select(DeviceParameter).where(
                    DeviceParameter.device_id == device.id,
                    DeviceParameter.factory_id == factory_id,
                    DeviceParameter.key.in_(keys),
                )
            )
        ).all()
    }
    unknown = [k for k in keys if k not in found]
    if unknown:
        raise query_error(
            "parameters",
            f"device {device.id} has no parameter {', '.join(repr(k) for k in unknown)}",
        )
    start_ms, end_ms = _ms(start), _ms(end)
    step = resolve_interval(interval, start_ms, end_ms, points)
    conn = await session.connection()
    try:
        result = await queries.history_many(
            conn, [found[k].id for k in keys], start_ms, end_ms, step, agg
        )
    except queries.QueryTooLarge as exc:
        raise query_error("interval", str(exc), code="query_too_large") from exc
    return KpiHistoryOut(
        device_id=device.id,
        start=start,
        end=end,
        interval=queries.interval_label(step),
        interval_ms=step,
        agg=agg if step is not None else None,
        tiers=result.tiers,
        parameters=[
            HistorySeriesOut.model_construct(
                parameter_id=found[k].id,
                key=k,
                display_name=found[k].display_name,
                unit=found[k].unit,
                points=result.series[found[k].id],
            )
            for k in keys
        ],
    )


# --- the series directory (cached metadata) -------------------------------------------------


@dataclass(slots=True)
class SeriesInfo:
    """What a series is (treat as read-only; not frozen, which would make the 10,000
    constructions of a directory load several times slower)."""

    series_id: int
    device_id: int
    key: str
    is_kpi: bool
    is_power: bool
    limits: tuple[float | None, float | None, float | None, float | None] | None
    offline_after_ms: int
    rank: int  # position in the dashboard order: device, KPIs first, then key
    # The fields of a latest-value row that don't change with the value.
    static: dict[str, Any]


@dataclass
class _FactorySeries:
    by_id: dict[int, SeriesInfo]
    max_id: int
    loaded_at: float


class SeriesDirectory:
    """Per-factory metadata of every series, reloaded after `ttl_s`, or at once when a
    series newer than any seen at the last load appears (a parameter just discovered
    by ingest: its row is committed before its first latest value).

    Names, units, limits and offline limits changed through the API (in any
    process) show within `ttl_s`; values are never cached here.
    """

    def __init__(self, ttl_s: float = 5.0) -> None:
        self.ttl_s = ttl_s
        self._factories: dict[int, _FactorySeries] = {}

    def invalidate(self, factory_id: int | None = None) -> None:
        if factory_id is None:
            self._factories.clear()
        else:
            self._factories.pop(factory_id, None)

    async def get(
        self, conn: AsyncConnection, factory_id: int, *, newest_seen: int = 0
    ) -> tuple[dict[int, SeriesInfo], int]:
        """The factory's series and the highest series id accounted for.

        `newest_seen` is the highest series id the caller holds a value for. A
        missing id at or below the mark belongs to a deleted parameter and never
        forces a reload; one above it is new and does.
        """
        now = time.monotonic()
        entry = self._factories.get(factory_id)
        if entry is not None and now - entry.loaded_at < self.ttl_s and newest_seen <= entry.max_id:
            return entry.by_id, entry.max_id
        by_id = await self._load(conn, factory_id)
        mark = max(max(by_id, default=0), newest_seen)
        self._factories[factory_id] = _FactorySeries(by_id, mark, now)
        return by_id, mark

    async def _load(self, conn: AsyncConnection, factory_id: int) -> dict[int, SeriesInfo]:
        rows = await queries.series_metadata(conn, factory_id)
        # (series, device, device_key, device_name, key, display_name, unit, is_kpi,
        #  is_power, warning_low, warning_high, critical_low, critical_high, offline_s)
        ordered = sorted(rows, key=lambda r: (r[1], not r[7], r[4]))
        out: dict[int, SeriesInfo] = {}
        for rank, r in enumerate(ordered):
            sid, device_id, key, is_kpi = r[0], r[1], r[4], bool(r[7])
            wl, wh, cl, ch = r[9], r[10], r[11], r[12]
            no_limits = wl is None and wh is None and cl is None and ch is None
            out[sid] = SeriesInfo(
                sid,
                device_id,
                key,
                is_kpi,
                bool(r[8]),
                None if no_limits else (wl, wh, cl, ch),
                r[13] * 1000,
                rank,
                {
                    "device_id": device_id,
                    "device_key": r[2],
                    "device_name": r[3],
                    "parameter_id": sid,
                    "key": key,
                    "display_name": r[5],
                    "unit": r[6],
                    "is_kpi": is_kpi,
                },
            )
        return out


# --- latest values for dashboards -------------------------------------------------------------


class LatestValue(TypedDict):
    """One series' latest value (the fields of schemas.LatestValueOut). A plain dict:
    orjson writes ten thousand of them in a couple of milliseconds."""

    device_id: int
    device_key: str
    device_name: str
    parameter_id: int
    key: str
    display_name: str | None
    unit: str | None
    is_kpi: bool
    value: float | None
    text: str | None
    ts: dt.datetime
    stale: bool
    level: Level | None


async def latest_values(
    conn: AsyncConnection,
    factory_id: int,
    *,
    device_ids: Sequence[int] | None = None,
    parameters: Sequence[str] | None = None,
    kpi_only: bool = False,
    now: dt.datetime | None = None,
    directory: SeriesDirectory,
    cache: LatestCache | None = None,
) -> list[LatestValue]:
    """The latest value of every series of the factory (optionally of some devices,
    parameter keys, KPIs only), ordered by device, KPIs first, then key.

    The work is one read of `series_latest` and one pass over its rows.
    """
    now_ms = _ms(now or utcnow())
    entries: dict[int, Entry]
    if cache is None:
        rows = await queries.latest_rows(conn, factory_id, device_ids)
        entries = {sid: (did, ts, value, text) for sid, did, ts, value, text in rows}
    else:
        entries = await cache.values(conn, factory_id)
        if device_ids is not None:
            entries = of_devices(entries, device_ids)
    if not entries:
        return []
    by_id, mark = await directory.get(conn, factory_id)
    newest = max(entries)
    if newest > mark:  # a series discovered since the last load
        by_id, mark = await directory.get(conn, factory_id, newest_seen=newest)
    wanted = frozenset(parameters) if parameters else None
    fromts = dt.datetime.fromtimestamp
    utc = dt.UTC
    stamps: dict[int, dt.datetime] = {}  # values of one payload share their timestamp
    slots: list[dict[str, Any] | None] = [None] * len(by_id)
    for sid, (_, ts, value, text) in entries.items():
        info = by_id.get(sid)
        if info is None:  # its parameter was deleted
            continue
        if (kpi_only and not info.is_kpi) or (wanted is not None and info.key not in wanted):
            continue
        when = stamps.get(ts)
        if when is None:
            when = stamps[ts] = fromts(ts / 1000, utc)
        limits = info.limits
        item = info.static.copy()  # cheaper than a dict display with ** (measured)
        item["value"] = value
        item["text"] = text
        item["ts"] = when
        item["stale"] = now_ms - ts >= info.offline_after_ms
        item["level"] = None if limits is None or value is None else level_of(value, *limits)
        slots[info.rank] = item
    return cast(list[LatestValue], [item for item in slots if item is not None])


# --- energy -----------------------------------------------------------------------------------


def day_start(now: dt.datetime, timezone: str) -> dt.datetime:
    """Local midnight of `now`'s day in `timezone`, in UTC. On a day whose midnight is
    skipped by a DST change, the day starts at the change."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo("UTC")
    local = now.astimezone(zone)
    midnight = dt.datetime.combine(local.date(), dt.time(0), tzinfo=zone)
    return midnight.astimezone(dt.UTC)


@dataclass(frozen=True)
class _PowerSeries:
    series_id: int
    device_id: int
    device_key: str
    device_name: str
    key: str
    unit: str | None
    offline_after_ms: int


async def _power_series(
    session: AsyncSession, factory_id: int, device_id: int | None
) -> list[_PowerSeries]:
    p, d = DeviceParameter, Device
    stmt = (
        select(
            p.id,
            p.device_id,
            d.device_key,
            d.name,
            p.key,
            p.unit,
            d.offline_after_s,
            Factory.offline_after_s,
        )
        .join(d, d.id == p.device_id)
        .join(Factory, Factory.id == p.factory_id)
        .where(p.factory_id == factory_id, d.factory_id == factory_id, p.is_power.is_(True))
        .order_by(p.device_id, p.key)
    )
    if device_id is not None:
        stmt = stmt.where(p.device_id == device_id)
    rows = (await session.execute(stmt)).all()
    return [_PowerSeries(r[0], r[1], r[2], r[3], r[4], r[5], (r[6] or r[7]) * 1000) for r in rows]


# Today's integrals up to a finished minute, per process: (engine, day start, caps) ->
# _Prefix. A request adds the minutes finished since (a few rows per series) and
# computes only the current minute afresh, instead of integrating every power series
# since midnight each time (10,000 series: ~1 s per hour of the day on SQLite). The
# prefix is rebuilt from scratch in the background every ENERGY_REBUILD_S, so points
# arriving late for minutes already added show within that time.
ENERGY_REBUILD_S = 300.0
# Minutes this close to now are not final yet: points still arrive for them.
ENERGY_SETTLE_MS = 2 * MINUTE_MS


@dataclass
class _Prefix:
    upto_ms: int  # a minute boundary: `values` integrate [day start, upto)
    values: dict[int, float]
    built: float  # time.monotonic() of the last full build
    rebuild: asyncio.Task[None] | None = None


_prefixes: weakref.WeakKeyDictionary[Any, dict[Any, _Prefix]] = weakref.WeakKeyDictionary()


def _add(into: dict[int, float], more: dict[int, float]) -> None:
    for sid, value in more.items():
        into[sid] = into.get(sid, 0.0) + value


async def _energy_today(
    conn: AsyncConnection, caps: dict[int, int], start_ms: int, now_ms: int
) -> dict[int, float]:
    """queries.energy_integrals over [start, now), split at a settled minute: the
    prefix before it is kept and extended, the rest is computed afresh. The split is
    exact (each part clips the held values at its edges, and the later part looks
    back for values held across the split)."""
    settled = now_ms - now_ms % MINUTE_MS - ENERGY_SETTLE_MS
    if not caps or settled <= start_ms:
        whole = await queries.energy_integrals(conn, caps, start_ms, now_ms)
        return {sid: whole.get(sid, 0.0) for sid in caps}
    engine = conn.engine
    cache = _prefixes.setdefault(engine.sync_engine, {})
    key = (start_ms, tuple(sorted(caps.items())))
    prefix = cache.get(key)
    if prefix is not None and prefix.upto_ms > settled:  # an earlier moment: not cached
        whole = await queries.energy_integrals(conn, caps, start_ms, now_ms)
        return {sid: whole.get(sid, 0.0) for sid in caps}
    if prefix is None:
        for stale in [k for k in cache if k[0] != start_ms]:  # yesterday's
            del cache[stale]
        values = await queries.energy_integrals(conn, caps, start_ms, settled)
        prefix = cache[key] = _Prefix(settled, values, time.monotonic())
    elif prefix.upto_ms < settled:
        _add(prefix.values, await queries.energy_integrals(conn, caps, prefix.upto_ms, settled))
        prefix.upto_ms = settled
    if time.monotonic() - prefix.built > ENERGY_REBUILD_S and prefix.rebuild is None:
        prefix.rebuild = asyncio.get_running_loop().create_task(
            _rebuild(engine, caps, start_ms, prefix)
        )
    recent = await queries.energy_integrals(conn, caps, prefix.upto_ms, now_ms)
    return {sid: prefix.values.get(sid, 0.0) + recent.get(sid, 0.0) for sid in caps}


async def _rebuild(
    engine: AsyncEngine, caps: dict[int, int], start_ms: int, prefix: _Prefix
) -> None:
    """Integrate the prefix again from scratch (late points), then swap it in."""
    try:
        upto = prefix.upto_ms
        async with engine.connect() as conn:
            values = await queries.energy_integrals(conn, caps, start_ms, upto)
            if prefix.upto_ms > upto:  # extended meanwhile
                _add(values, await queries.energy_integrals(conn, caps, upto, prefix.upto_ms))
                upto = prefix.upto_ms
        if prefix.upto_ms == upto:
            prefix.values = values
            prefix.built = time.monotonic()
    except Exception:
        log.warning("energy_rebuild_failed", exc_info=True)
    finally:
        prefix.rebuild = None


async def _energy(
    session: AsyncSession,
    factory_id: int,
    device_id: int | None,
    now: dt.datetime,
    timezone: str,
    top: int | None = None,
) -> tuple[dt.datetime, list[DeviceEnergyOut], tuple[float, float]]:
    now_ms = _ms(now)
    start = day_start(now, timezone)
    series = await _power_series(session, factory_id, device_id)
    counted = [s for s in series if s.unit in POWER_UNITS_KW]
    conn = await session.connection()
    integrals = await _energy_today(
        conn, {s.series_id: s.offline_after_ms for s in counted}, _ms(start), now_ms
    )
    latest: dict[int, tuple[int, float | None]] = {}
    if series:
        rows = (
            await session.execute(
                select(series_latest.c.series_id, series_latest.c.ts, series_latest.c.value).where(
                    series_latest.c.factory_id == factory_id,
                    series_latest.c.series_id.in_([s.series_id for s in series]),
                )
            )
        ).all()
        latest = {r[0]: (r[1], r[2]) for r in rows}
    # Summed in plain numbers, and turned into response models only for the devices
    # returned: building and adding up 10,000 models took most of the request.
    sums: dict[int, list[float]] = {}  # device -> [power kW, energy kWh]
    parts: dict[int, list[tuple[_PowerSeries, float | None, float | None, int | None, bool, float]]]
    parts = {}
    for s in series:
        factor = POWER_UNITS_KW.get(s.unit or "")
        ts, value = latest.get(s.series_id, (None, None))
        stale = ts is None or now_ms - ts >= s.offline_after_ms
        power = value * factor if (factor is not None and value is not None and not stale) else None
        energy = integrals.get(s.series_id, 0.0) * factor / MS_PER_HOUR if factor else 0.0
        total = sums.get(s.device_id)
        if total is None:
            total = sums[s.device_id] = [0.0, 0.0]
            parts[s.device_id] = []
        total[0] += power or 0.0
        total[1] += energy
        parts[s.device_id].append((s, factor, power, ts, stale, energy))
    chosen = list(sums)
    if top is not None:
        chosen = heapq.nlargest(top, chosen, key=lambda did: sums[did][0])
    devices = []
    for did in chosen:
        first = parts[did][0][0]
        devices.append(
            DeviceEnergyOut(
                device_id=did,
                device_key=first.device_key,
                name=first.device_name,
                current_power_kw=sums[did][0],
                energy_today_kwh=sums[did][1],
                parameters=[
                    EnergyParameterOut(
                        parameter_id=s.series_id,
                        key=s.key,
                        unit=s.unit,
                        counted=factor is not None,
                        power_kw=power,
                        ts=_dt(ts) if ts is not None else None,
                        stale=stale,
                        energy_today_kwh=energy,
                    )
                    for s, factor, power, ts, stale, energy in parts[did]
                ],
            )
        )
    totals = (sum(t[0] for t in sums.values()), sum(t[1] for t in sums.values()))
    return start, devices, totals


async def energy_summary(
    session: AsyncSession,
    factory_id: int,
    *,
    now: dt.datetime | None = None,
    top: int | None = None,
) -> EnergySummaryOut:
    """Current total power and energy today (since local midnight), in total and per
    device: every device, or (`top`) the ones drawing the most power now."""
    now = now or utcnow()
    factory = await session.get(Factory, factory_id)
    if factory is None:
        raise NotFound(f"no factory {factory_id}", code="factory_not_found")
    start, devices, (power, energy) = await _energy(
        session, factory_id, None, now, factory.timezone, top
    )
    return EnergySummaryOut(
        timestamp=now,
        timezone=factory.timezone,
        day_start=start,
        current_power_kw=power,
        energy_today_kwh=energy,
        devices=devices,
    )


async def device_energy(
    session: AsyncSession, factory_id: int, device_id: int, *, now: dt.datetime | None = None
) -> DeviceEnergyDetailOut:
    """The same figures for one device (zero when it has no power parameters)."""
    now = now or utcnow()
    device, _, timezone = await _device(session, factory_id, device_id)
    start, devices, _ = await _energy(session, factory_id, device.id, now, timezone)
    found = devices[0] if devices else None
    return DeviceEnergyDetailOut(
        device_id=device.id,
        device_key=device.device_key,
        name=device.name,
        current_power_kw=found.current_power_kw if found else 0.0,
        energy_today_kwh=found.energy_today_kwh if found else 0.0,
        parameters=found.parameters if found else [],
        timestamp=now,
        timezone=timezone,
        day_start=start,
    )


# --- limit levels and previous values (machines list, machine page) --------------------------


def _at_limit(value: Any, low: Any, high: Any) -> ColumnElement[bool]:
    return or_(and_(high.is_not(None), value >= high), and_(low.is_not(None), value <= low))


def limit_levels_select(factory_id: int, device_ids: Sequence[int] | None = None) -> Any:
    """A GROUP BY select, one row per device with a latest value at a limit: device_id,
    `critical` and `warning` (how many of its parameters sit at each level, the rule
    of `level_of`). Join it as a subquery to sort devices by health. Only values at a
    limit reach the GROUP BY, read in the (factory, device) index's order."""
    p, latest = DeviceParameter, series_latest
    value = latest.c.value
    critical = _at_limit(value, p.critical_low, p.critical_high)
    warning = _at_limit(value, p.warning_low, p.warning_high)
    stmt = (
        select(
            latest.c.device_id.label("device_id"),
            func.sum(case((critical, 1), else_=0)).label("critical"),
            func.sum(case((critical, 0), else_=1)).label("warning"),
        )
        .select_from(latest)
        .join(p, p.id == latest.c.series_id)
        .where(
            latest.c.factory_id == factory_id,
            p.factory_id == factory_id,
            value.is_not(None),
            or_(critical, warning),
        )
        .group_by(latest.c.device_id)
    )
    if device_ids is not None:
        stmt = stmt.where(latest.c.device_id.in_(list(device_ids)))
    return stmt


async def limit_levels_for_devices(
    session: AsyncSession, factory_id: int, device_ids: Sequence[int]
) -> dict[int, dict[str, int]]:
    """{device_id: {"critical": n, "warning": m}} for these devices, one query; devices
    with no parameter at a limit are left out."""
    if not device_ids:
        return {}
    rows = await session.execute(limit_levels_select(factory_id, device_ids))
    found: dict[int, dict[str, int]] = {}
    for device_id, n_critical, n_warning in rows.all():
        levels = {"critical": int(n_critical or 0), "warning": int(n_warning or 0)}
        found[device_id] = {k: v for k, v in levels.items() if v}
    return found


PREVIOUS_VALUE_WINDOW_MS = 24 * MS_PER_HOUR


async def previous_values(
    session: AsyncSession, factory_id: int, device_id: int
) -> dict[int, float]:
    """{series_id: value} of the sample before each latest value of a device (within a
    day of it), for trend arrows. One statement: an index probe per series."""
    r = telemetry_raw.alias("r")
    latest = series_latest
    before = (
        select(r.c.value)
        .where(
            r.c.series_id == latest.c.series_id,
            r.c.ts < latest.c.ts,
            r.c.ts >= latest.c.ts - PREVIOUS_VALUE_WINDOW_MS,
        )
        .order_by(r.c.ts.desc())
        .limit(1)
        .correlate(latest)
        .scalar_subquery()
    )
    rows = await session.execute(
        select(latest.c.series_id, before).where(
            latest.c.factory_id == factory_id,
            latest.c.device_id == device_id,
            latest.c.value.is_not(None),
        )
    )
    return {sid: float(v) for sid, v in rows.all() if v is not None}
