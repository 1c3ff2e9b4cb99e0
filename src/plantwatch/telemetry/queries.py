"""History and latest-value queries over the time-series store.

A history request [start, end) at an interval is split into segments, each
answered from the coarsest tier that is exact for it: whole hours from the
1-hour rollups, whole minutes around them from the 1-minute rollups, and the
sub-minute edges from raw points. Output buckets are aligned to the interval
in UTC, so every value is exact, never an approximation across tiers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from plantwatch.telemetry.rollups import HOUR_MS, MINUTE_MS, Agg, merge

SECOND_MS = 1000
DAY_MS = 86_400_000
NAMED_INTERVALS = {
    "1m": MINUTE_MS,
    "5m": 5 * MINUTE_MS,
    "15m": 15 * MINUTE_MS,
    "1h": HOUR_MS,
    "6h": 6 * HOUR_MS,
    "1d": DAY_MS,
}
# What "auto" picks from: the smallest step giving no more than the asked-for points.
AUTO_LADDER = [
    SECOND_MS,
    2 * SECOND_MS,
    5 * SECOND_MS,
    10 * SECOND_MS,
    15 * SECOND_MS,
    30 * SECOND_MS,
    MINUTE_MS,
    2 * MINUTE_MS,
    5 * MINUTE_MS,
    10 * MINUTE_MS,
    15 * MINUTE_MS,
    30 * MINUTE_MS,
    HOUR_MS,
    2 * HOUR_MS,
    3 * HOUR_MS,
    6 * HOUR_MS,
    12 * HOUR_MS,
    DAY_MS,
    7 * DAY_MS,
]
AGGREGATES = ("avg", "min", "max", "sum", "count", "first", "last")
MAX_RAW_POINTS = 1_000_000


class QueryTooLarge(ValueError):
    pass


def choose_interval(start_ms: int, end_ms: int, points: int) -> int:
    """The auto interval: the smallest ladder step that yields at most `points` buckets."""
    want = (end_ms - start_ms) / max(1, points)
    for step in AUTO_LADDER:
        if step >= want:
            return step
    return AUTO_LADDER[-1]


def interval_label(interval_ms: int | None) -> str:
    if interval_ms is None:
        return "raw"
    for unit, size in (("d", DAY_MS), ("h", HOUR_MS), ("m", MINUTE_MS), ("s", SECOND_MS)):
        if interval_ms % size == 0:
            return f"{interval_ms // size}{unit}"
    return f"{interval_ms}ms"


def _floor(value: int, step: int) -> int:
    return value - value % step


def _ceil(value: int, step: int) -> int:
    return -((-value) // step) * step


@dataclass(frozen=True)
class Segment:
    tier: str  # "raw" | "1m" | "1h"
    start: int
    end: int


def plan(start_ms: int, end_ms: int, interval_ms: int | None) -> list[Segment]:
    """Split [start, end) into tier segments that are exact for this interval.

    A rollup tier is usable only when the interval is a multiple of its bucket,
    so output buckets never cut a rollup bucket in two.
    """
    if start_ms >= end_ms:
        return []
    if interval_ms is None or interval_ms % MINUTE_MS:
        return [Segment("raw", start_ms, end_ms)]

    def minutes(lo: int, hi: int) -> list[Segment]:
        m0, m1 = _ceil(lo, MINUTE_MS), _floor(hi, MINUTE_MS)
        if m0 >= m1:
            return [Segment("raw", lo, hi)] if lo < hi else []
        out = [Segment("raw", lo, m0)] if lo < m0 else []
        out.append(Segment("1m", m0, m1))
        if m1 < hi:
            out.append(Segment("raw", m1, hi))
        return out

    if interval_ms % HOUR_MS:
        return minutes(start_ms, end_ms)
    h0, h1 = _ceil(start_ms, HOUR_MS), _floor(end_ms, HOUR_MS)
    if h0 >= h1:
        return minutes(start_ms, end_ms)
    return [*minutes(start_ms, h0), Segment("1h", h0, h1), *minutes(h1, end_ms)]


def value_of(agg: Agg, how: str) -> float:
    if how == "avg":
        return agg[1] / agg[0]
    if how == "min":
        return agg[2]
    if how == "max":
        return agg[3]
    if how == "sum":
        return agg[1]
    if how == "count":
        return agg[0]
    if how == "first":
        return agg[5]
    return agg[7]  # last


_TIER_TABLE = {"1m": "telemetry_1m", "1h": "telemetry_1h"}


async def history(
    conn: AsyncConnection,
    series_id: int,
    start_ms: int,
    end_ms: int,
    interval_ms: int | None,
    agg: str,
) -> list[tuple[int, float]]:
    """[(bucket_start_ms, value)] for one series; raw points when interval is None."""
    p = "$" if conn.dialect.name == "postgresql" else "?"
    if interval_ms is None:
        count = await conn.exec_driver_sql(
            f"SELECT count(*) FROM telemetry_raw WHERE series_id = {p}1 AND ts >= {p}2 "
            f"AND ts < {p}3",
            (series_id, start_ms, end_ms),
        )
        if (count.scalar() or 0) > MAX_RAW_POINTS:
            raise QueryTooLarge(
                f"more than {MAX_RAW_POINTS} raw points in range; ask for an interval"
            )
        rows = await conn.exec_driver_sql(
            f"SELECT ts, value FROM telemetry_raw WHERE series_id = {p}1 AND ts >= {p}2 "
            f"AND ts < {p}3 ORDER BY ts",
            (series_id, start_ms, end_ms),
        )
        found: list[Any] = list(rows.all())
        return [(r[0], r[1]) for r in found]

    buckets: dict[int, Agg] = {}
    for segment in plan(start_ms, end_ms, interval_ms):
        if segment.tier == "raw":
            rows = await conn.exec_driver_sql(
                f"SELECT ts, value FROM telemetry_raw WHERE series_id = {p}1 AND ts >= {p}2 "
                f"AND ts < {p}3 ORDER BY ts",
                (series_id, segment.start, segment.end),
            )
            raw_rows: list[Any] = list(rows.all())
            for ts, value in raw_rows:
                key = ts - ts % interval_ms
                current = buckets.get(key)
                if current is None:
                    buckets[key] = [1, value, value, value, ts, value, ts, value]
                else:
                    merge(current, [1, value, value, value, ts, value, ts, value])
        else:
            rows = await conn.exec_driver_sql(
                f"SELECT bucket, cnt, total, vmin, vmax, first_ts, vfirst, last_ts, vlast "
                f"FROM {_TIER_TABLE[segment.tier]} WHERE series_id = {p}1 AND bucket >= {p}2 "
                f"AND bucket < {p}3",
                (series_id, segment.start, segment.end),
            )
            tier_rows: list[Any] = list(rows.all())
            for row in tier_rows:
                key = row[0] - row[0] % interval_ms
                partial: Agg = list(row[1:])
                current = buckets.get(key)
                if current is None:
                    buckets[key] = partial
                else:
                    merge(current, partial)
    return [(key, value_of(buckets[key], agg)) for key in sorted(buckets)]


@dataclass(frozen=True)
class Latest:
    series_id: int
    device_id: int
    ts: int
    value: float | None
    text: str | None


async def latest(
    conn: AsyncConnection, factory_id: int, device_ids: Sequence[int] | None = None
) -> list[Latest]:
    p = "$" if conn.dialect.name == "postgresql" else "?"
    sql = f"SELECT series_id, device_id, ts, value, text FROM series_latest WHERE factory_id = {p}1"
    params: tuple[Any, ...] = (factory_id,)
    if device_ids is not None:
        if not device_ids:
            return []
        if p == "$":
            sql += " AND device_id = ANY($2::bigint[])"
            params = (factory_id, list(device_ids))
        else:
            sql += f" AND device_id IN ({','.join('?' * len(device_ids))})"
            params = (factory_id, *device_ids)
    result = await conn.exec_driver_sql(sql, params)
    rows: list[Any] = list(result.all())
    return [Latest(r[0], r[1], r[2], r[3], r[4]) for r in rows]
