"""History and latest-value queries over the time-series store.

A history request [start, end) at an interval is split into segments, each
answered from the coarsest tier that is exact for it: whole hours from the
1-hour rollups, whole minutes around them from the 1-minute rollups, and the
sub-minute edges from raw points. Output buckets are aligned to the interval
in UTC (epoch multiples), so every value is exact, never an approximation
across tiers.

The database does the bucketing: every segment is one `GROUP BY` over its
tier, all segments go in one statement (`UNION ALL`), and Python only merges
the few partial buckets where segments meet. The work in Python is
proportional to the number of output points, never to the raw data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

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
# Limits of one history request (all its series together): raw points returned, and
# output buckets. Beyond them the caller must pick a coarser interval or shorter range.
MAX_RAW_POINTS = 200_000
MAX_BUCKETS = 100_000

TIER_MS = {"1m": MINUTE_MS, "1h": HOUR_MS}
_TIER_TABLE = {"1m": "telemetry_1m", "1h": "telemetry_1h"}
# A float placeholder for first/last values nobody asked for (a bare 0.0 is NUMERIC on
# PostgreSQL).
_ZERO = "CAST(0 AS DOUBLE PRECISION)"


class QueryTooLarge(ValueError):
    pass


def bucket_count(start_ms: int, end_ms: int, step_ms: int) -> int:
    """How many `step`-aligned buckets [start, end) touches."""
    if end_ms <= start_ms:
        return 0
    return (end_ms - 1) // step_ms - start_ms // step_ms + 1


def choose_interval(start_ms: int, end_ms: int, points: int) -> int:
    """The auto interval: the smallest ladder step that yields at most `points` buckets
    (counting the partial buckets at both ends); the largest step if none does."""
    for step in AUTO_LADDER:
        if bucket_count(start_ms, end_ms, step) <= max(1, points):
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


def tiers_of(segments: Sequence[Segment]) -> list[str]:
    """The tiers a plan reads, finest first."""
    used = {s.tier for s in segments}
    return [t for t in ("raw", "1m", "1h") if t in used]


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
        return int(agg[0])
    if how == "first":
        return agg[5]
    if how == "last":
        return agg[7]
    raise ValueError(f"unknown aggregate '{how}'")


class _Statement:
    """Builds one statement for either backend: numbered placeholders (`?1` / `$1`)
    and a series filter (`IN` of integer literals on SQLite, `= ANY(array)` on
    PostgreSQL so the statement text, and its prepared plan, is reused)."""

    def __init__(self, conn: AsyncConnection, series_ids: Sequence[int]) -> None:
        self.pg = conn.dialect.name == "postgresql"
        self.params: list[Any] = []
        ids = [int(s) for s in series_ids]
        if self.pg:
            self._series = f"ANY({self.arg(ids)}::bigint[])"
        else:
            self._series = f"({','.join(str(s) for s in ids)})"

    def arg(self, value: Any) -> str:
        self.params.append(value)
        return f"${len(self.params)}" if self.pg else f"?{len(self.params)}"

    def series(self, column: str = "series_id") -> str:
        return f"{column} = {self._series}" if self.pg else f"{column} IN {self._series}"


def _segment_sql(q: _Statement, segment: Segment, interval_ms: int, first_last: bool) -> str:
    """Partial aggregates per (series, output bucket) of one segment:
    (series_id, bucket, cnt, total, vmin, vmax, first_ts, vfirst, last_ts, vlast).

    First and last values are only computed when asked for. PostgreSQL takes them
    with ordered `array_agg` in the same pass (a join back into the partitioned raw
    table costs more to plan than to run); SQLite, which has no array aggregates,
    looks them up by primary key, one lookup each per output bucket.
    """
    iv = int(interval_ms)
    lo, hi = q.arg(segment.start), q.arg(segment.end)
    if segment.tier == "raw":
        table, col = "telemetry_raw", "ts"
        k, cnt, total, vmin, vmax = f"ts - ts % {iv}", "count(*)", "sum(value)", "value", "value"
        fts, lts, vf, vl = "ts", "ts", "value", "value"
    else:
        table, col = _TIER_TABLE[segment.tier], "bucket"
        k, cnt, total, vmin, vmax = (
            f"bucket - bucket % {iv}",
            "sum(cnt)",
            "sum(total)",
            "vmin",
            "vmax",
        )
        fts, lts, vf, vl = "first_ts", "last_ts", "vfirst", "vlast"
    head = (
        f"SELECT series_id, {k} AS k, {cnt} AS cnt, {total} AS total, min({vmin}) AS vmin, "
        f"max({vmax}) AS vmax, min({fts}) AS fts"
    )
    where = f"FROM {table} WHERE {q.series()} AND {col} >= {lo} AND {col} < {hi} GROUP BY 1, 2"
    if not first_last:
        return f"{head}, {_ZERO} AS vfirst, max({lts}) AS lts, {_ZERO} AS vlast {where}"
    if q.pg:
        return (
            f"{head}, (array_agg({vf} ORDER BY {fts}))[1] AS vfirst, max({lts}) AS lts, "
            f"(array_agg({vl} ORDER BY {lts} DESC))[1] AS vlast {where}"
        )
    inner = f"{head}, max({lts}) AS lts {where}"
    if segment.tier == "raw":
        first_key, last_key, vfirst, vlast = "g.fts", "g.lts", "f.value", "l.value"
    else:
        size = TIER_MS[segment.tier]
        first_key, last_key = f"g.fts - g.fts % {size}", f"g.lts - g.lts % {size}"
        vfirst, vlast = "f.vfirst", "l.vlast"
    return (
        f"SELECT g.series_id, g.k, g.cnt, g.total, g.vmin, g.vmax, g.fts, {vfirst}, g.lts, "
        f"{vlast} FROM ({inner}) g "
        f"JOIN {table} f ON f.series_id = g.series_id AND f.{col} = {first_key} "
        f"JOIN {table} l ON l.series_id = g.series_id AND l.{col} = {last_key}"
    )


async def count_points(
    conn: AsyncConnection, series_ids: Sequence[int], start_ms: int, end_ms: int
) -> int:
    """Raw points of these series in [start, end), counted mostly from the rollups
    (a few hundred rows for a month), so checking a huge range is cheap."""
    segments = plan(start_ms, end_ms, HOUR_MS)
    if not segments or not series_ids:
        return 0
    q = _Statement(conn, series_ids)
    parts: list[str] = []
    for segment in segments:
        lo, hi = q.arg(segment.start), q.arg(segment.end)
        if segment.tier == "raw":
            parts.append(
                f"(SELECT count(*) FROM telemetry_raw WHERE {q.series()} "
                f"AND ts >= {lo} AND ts < {hi})"
            )
        else:
            parts.append(
                f"(SELECT coalesce(sum(cnt), 0) FROM {_TIER_TABLE[segment.tier]} "
                f"WHERE {q.series()} AND bucket >= {lo} AND bucket < {hi})"
            )
    result = await conn.exec_driver_sql("SELECT " + " + ".join(parts), tuple(q.params))
    return int(result.scalar() or 0)


Points = list[tuple[int, float]]


@dataclass
class HistoryResult:
    interval_ms: int | None  # None: raw points
    tiers: list[str]
    series: dict[int, Points]  # series_id -> [(ts_ms, value)], every asked series present


async def history_many(
    conn: AsyncConnection,
    series_ids: Sequence[int],
    start_ms: int,
    end_ms: int,
    interval_ms: int | None,
    agg: str = "avg",
    *,
    max_raw_points: int | None = None,
    max_buckets: int | None = None,
) -> HistoryResult:
    """History of several series over [start, end) in one statement.

    `interval_ms` None returns raw points (refused with QueryTooLarge past
    `max_raw_points`, default MAX_RAW_POINTS); otherwise buckets aligned to the
    interval, each `(bucket_start_ms, agg value)`, only buckets that hold data
    (refused past `max_buckets`, default MAX_BUCKETS, over all series).
    """
    max_raw_points = MAX_RAW_POINTS if max_raw_points is None else max_raw_points
    max_buckets = MAX_BUCKETS if max_buckets is None else max_buckets
    if agg not in AGGREGATES:
        raise ValueError(f"unknown aggregate '{agg}'")
    if interval_ms is not None and interval_ms <= 0:
        raise ValueError("interval must be positive")
    ids = list(dict.fromkeys(int(s) for s in series_ids))
    out: dict[int, Points] = {sid: [] for sid in ids}
    if not ids or start_ms >= end_ms:
        return HistoryResult(interval_ms, [], out)

    if interval_ms is None:
        found = await count_points(conn, ids, start_ms, end_ms)
        if found > max_raw_points:
            raise QueryTooLarge(
                f"{found} raw points in range (limit {max_raw_points}); "
                "ask for an interval such as 1m, 1h or auto"
            )
        q = _Statement(conn, ids)
        lo, hi = q.arg(start_ms), q.arg(end_ms)
        result = await conn.exec_driver_sql(
            f"SELECT series_id, ts, value FROM telemetry_raw WHERE {q.series()} "
            f"AND ts >= {lo} AND ts < {hi} ORDER BY series_id, ts",
            tuple(q.params),
        )
        raw_rows: list[Any] = list(result.all())
        for sid, ts, value in raw_rows:
            out[sid].append((ts, value))
        return HistoryResult(None, ["raw"], out)

    buckets = bucket_count(start_ms, end_ms, interval_ms) * len(ids)
    if buckets > max_buckets:
        raise QueryTooLarge(
            f"{buckets} buckets asked for (limit {max_buckets}); "
            "ask for a coarser interval or a shorter range"
        )
    segments = plan(start_ms, end_ms, interval_ms)
    q = _Statement(conn, ids)
    first_last = agg in ("first", "last")
    sql = " UNION ALL ".join(_segment_sql(q, s, interval_ms, first_last) for s in segments)
    result = await conn.exec_driver_sql(f"{sql} ORDER BY 1, 2", tuple(q.params))
    rows: list[Any] = list(result.all())
    # Rows come sorted by (series, bucket): partials of one bucket (where segments
    # meet) are adjacent and merge in one pass.
    current_sid: int | None = None
    current_key = -1
    acc: Agg | None = None
    for row in rows:
        sid, key = row[0], row[1]
        partial: Agg = [row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9]]
        if acc is not None and sid == current_sid and key == current_key:
            merge(acc, partial)
            continue
        if acc is not None and current_sid is not None:
            out[current_sid].append((current_key, value_of(acc, agg)))
        current_sid, current_key, acc = sid, key, partial
    if acc is not None and current_sid is not None:
        out[current_sid].append((current_key, value_of(acc, agg)))
    return HistoryResult(interval_ms, tiers_of(segments), out)


async def history(
    conn: AsyncConnection,
    series_id: int,
    start_ms: int,
    end_ms: int,
    interval_ms: int | None,
    agg: str,
) -> list[tuple[int, float]]:
    """[(bucket_start_ms, value)] for one series; raw points when interval is None."""
    result = await history_many(conn, [series_id], start_ms, end_ms, interval_ms, agg)
    return result.series[series_id]


async def energy_integrals(
    conn: AsyncConnection,
    caps: dict[int, int],
    start_ms: int,
    now_ms: int,
) -> dict[int, float]:
    """Time integral of each series over [start, now) in value x ms, from the 1-minute
    rollups: each minute's average is held until the next minute with data, but no
    longer than the series' offline limit (`caps`, ms) after its last point.

    One window query in the database; Python sees one row per series.
    """
    if not caps or now_ms <= start_ms:
        return {}
    pg = conn.dialect.name == "postgresql"
    least, greatest = ("LEAST", "GREATEST") if pg else ("min", "max")
    p = "$" if pg else "?"
    lookback = max(caps.values()) + MINUTE_MS
    values = ", ".join(f"({int(sid)}, {int(cap)})" for sid, cap in caps.items())
    end_expr = f"{least}(r.nxt, r.last_ts + r.cap, {p}2)"
    start_expr = f"{greatest}(r.bucket, {p}3)"
    # The minutes from `start` on, plus each series' last minute before it (within the
    # lookback: its value may be held into the range), found by one primary-key seek a
    # series instead of reading the whole lookback (which is the offline limit: hours).
    columns = "m.series_id, m.bucket, m.total, m.cnt, m.last_ts, c.cap"
    minutes = (
        f"SELECT {columns} FROM telemetry_1m m JOIN caps c ON c.sid = m.series_id "
        f"WHERE m.bucket >= {p}3 AND m.bucket < {p}2 "
        f"UNION ALL SELECT {columns} FROM caps c JOIN telemetry_1m m ON m.series_id = c.sid "
        "AND m.bucket = (SELECT max(x.bucket) FROM telemetry_1m x WHERE x.series_id = c.sid "
        f"AND x.bucket >= {p}1 AND x.bucket < {p}3)"
    )
    sql = (
        f"WITH caps(sid, cap) AS (VALUES {values}) "
        f"SELECT r.series_id, sum(r.avg_v * ({end_expr} - {start_expr})) FROM ("
        "SELECT m.series_id, m.bucket, m.total / m.cnt AS avg_v, m.last_ts, m.cap, "
        f"coalesce(lead(m.bucket) OVER (PARTITION BY m.series_id ORDER BY m.bucket), {p}2) "
        f"AS nxt FROM ({minutes}) m"
        f") r WHERE {end_expr} > {start_expr} GROUP BY r.series_id"
    )
    result = await conn.exec_driver_sql(sql, (start_ms - lookback, now_ms, start_ms))
    rows: list[Any] = list(result.all())
    return {int(r[0]): float(r[1] or 0.0) for r in rows}


@dataclass(frozen=True)
class Latest:
    series_id: int
    device_id: int
    ts: int
    value: float | None
    text: str | None


LatestTuple = tuple[int, int, int, float | None, str | None]


async def latest_rows(
    conn: AsyncConnection, factory_id: int, device_ids: Sequence[int] | None = None
) -> list[LatestTuple]:
    """(series_id, device_id, ts, value, text) of a factory's series, straight from the
    driver: this feeds dashboards with ten thousand series, and skipping the
    result-row layer halves the time."""
    ids = None if device_ids is None else [int(d) for d in device_ids]
    if ids is not None and not ids:
        return []
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    sql = "SELECT series_id, device_id, ts, value, text FROM series_latest WHERE factory_id = "
    if conn.dialect.name == "postgresql":
        if ids is None:
            records = await driver.fetch(sql + "$1", factory_id)
        else:
            records = await driver.fetch(
                sql + "$1 AND device_id = ANY($2::bigint[])", factory_id, ids
            )
        # asyncpg records index and unpack like tuples: no copy.
        return cast(list[LatestTuple], records)
    if ids is not None:
        sql += f"? AND device_id IN ({','.join(str(d) for d in ids)})"
    else:
        # A whole factory: read the table straight through (`+` keeps SQLite off the
        # factory index, which it would otherwise assume selective). An embedded
        # database holds one or a few factories, and the scan is half the time of
        # ten thousand index lookups.
        sql = sql.replace("WHERE factory_id", "WHERE +factory_id") + "?"
    cursor = await driver.execute(sql, (factory_id,))
    try:
        fetched: list[LatestTuple] = await cursor.fetchall()
    finally:
        await cursor.close()
    return fetched


async def series_metadata(conn: AsyncConnection, factory_id: int) -> list[Any]:
    """Every series of a factory with what a dashboard shows beside its value:
    (series_id, device_id, device_key, device_name, key, display_name, unit, is_kpi,
    is_power, warning_low, warning_high, critical_low, critical_high, offline_after_s),
    the offline limit being the device's or else the factory's."""
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    sql = (
        "SELECT p.id, p.device_id, d.device_key, d.name, p.key, p.display_name, p.unit, "
        "p.is_kpi, p.is_power, p.warning_low, p.warning_high, p.critical_low, "
        "p.critical_high, coalesce(d.offline_after_s, f.offline_after_s) "
        "FROM device_parameters p JOIN devices d ON d.id = p.device_id "
        "JOIN factories f ON f.id = p.factory_id "
        "WHERE p.factory_id = {p} AND d.factory_id = {p}"
    )
    if conn.dialect.name == "postgresql":
        return list(await driver.fetch(sql.format(p="$1"), factory_id))
    cursor = await driver.execute(sql.format(p="?1"), (factory_id,))
    try:
        rows: list[Any] = await cursor.fetchall()
    finally:
        await cursor.close()
    return rows


async def latest(
    conn: AsyncConnection, factory_id: int, device_ids: Sequence[int] | None = None
) -> list[Latest]:
    return [Latest(*row) for row in await latest_rows(conn, factory_id, device_ids)]
