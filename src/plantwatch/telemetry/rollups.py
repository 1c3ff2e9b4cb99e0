"""Rollup arithmetic: bucket partial aggregates and merge them. Pure, no I/O.

A bucket aggregate is (count, sum, min, max, first_ts, first, last_ts, last).
Aggregates of disjoint point sets merge exactly, which is what lets late and
out-of-order points update the right bucket without rereading raw data.
"""

from __future__ import annotations

from collections.abc import Iterable

MINUTE_MS = 60_000
HOUR_MS = 3_600_000

# (cnt, total, vmin, vmax, first_ts, vfirst, last_ts, vlast)
Agg = list[float]


def aggregate(
    points: Iterable[tuple[int, int, float]], bucket_ms: int
) -> dict[tuple[int, int], Agg]:
    """Partial aggregates per (series_id, bucket start) of distinct points."""
    out: dict[tuple[int, int], Agg] = {}
    for series_id, ts, value in points:
        add_point(out, (series_id, ts - ts % bucket_ms), ts, value)
    return out


def add_point(out: dict[tuple[int, int], Agg], key: tuple[int, int], ts: int, value: float) -> None:
    """Add one point, not already counted, to its bucket's aggregate in `out`."""
    agg = out.get(key)
    if agg is None:
        out[key] = [1, value, value, value, ts, value, ts, value]
        return
    agg[0] += 1
    agg[1] += value
    if value < agg[2]:
        agg[2] = value
    elif value > agg[3]:
        agg[3] = value
    if ts < agg[4]:
        agg[4] = ts
        agg[5] = value
    if ts >= agg[6]:
        agg[6] = ts
        agg[7] = value


def merge(into: Agg, other: Agg) -> None:
    into[0] += other[0]
    into[1] += other[1]
    into[2] = min(into[2], other[2])
    into[3] = max(into[3], other[3])
    if other[4] < into[4]:
        into[4], into[5] = other[4], other[5]
    if other[6] >= into[6]:
        into[6], into[7] = other[6], other[7]
