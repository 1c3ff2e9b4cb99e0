"""History queries: the tier plan (pure) and history on a real database, checked
against a brute-force computation over the raw points for every aggregate at
every interval, over ranges that start and end mid-minute and mid-hour, with
late, out-of-order and rewritten points."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plantwatch.app import Container
from plantwatch.telemetry import queries, store
from plantwatch.telemetry.partitions import Partitions
from plantwatch.telemetry.queries import (
    AGGREGATES,
    AUTO_LADDER,
    DAY_MS,
    NAMED_INTERVALS,
    QueryTooLarge,
    Segment,
    bucket_count,
    choose_interval,
    interval_label,
    plan,
)
from plantwatch.telemetry.rollups import HOUR_MS, MINUTE_MS

T0 = 1_771_459_200_000  # 2026-02-19T00:00:00Z, a day boundary
SECOND = 1000

# --- the plan (pure) ------------------------------------------------------------------


def _check_plan(start: int, end: int, interval: int | None, segments: list[Segment]) -> None:
    """Segments tile [start, end) exactly, and each rollup segment is exact for the interval."""
    if start >= end:
        assert segments == []
        return
    assert segments[0].start == start and segments[-1].end == end
    for a, b in itertools.pairwise(segments):
        assert a.end == b.start
    for s in segments:
        assert s.start < s.end
        if s.tier == "raw":
            continue
        size = queries.TIER_MS[s.tier]
        assert interval is not None and interval % size == 0
        assert s.start % size == 0 and s.end % size == 0


def test_plan_aligned_day_uses_the_hour_tier_only() -> None:
    assert plan(T0, T0 + DAY_MS, HOUR_MS) == [Segment("1h", T0, T0 + DAY_MS)]
    assert plan(T0, T0 + DAY_MS, DAY_MS) == [Segment("1h", T0, T0 + DAY_MS)]


def test_plan_mid_minute_and_mid_hour_edges() -> None:
    start = T0 + 10 * MINUTE_MS + 15 * SECOND  # 00:10:15
    end = T0 + 3 * HOUR_MS + 20 * MINUTE_MS + 30 * SECOND  # 03:20:30
    assert plan(start, end, HOUR_MS) == [
        Segment("raw", start, T0 + 11 * MINUTE_MS),
        Segment("1m", T0 + 11 * MINUTE_MS, T0 + HOUR_MS),
        Segment("1h", T0 + HOUR_MS, T0 + 3 * HOUR_MS),
        Segment("1m", T0 + 3 * HOUR_MS, T0 + 3 * HOUR_MS + 20 * MINUTE_MS),
        Segment("raw", T0 + 3 * HOUR_MS + 20 * MINUTE_MS, end),
    ]
    # 5 minutes is not a multiple of an hour: minutes in the middle, raw at the edges.
    assert plan(start, end, 5 * MINUTE_MS) == [
        Segment("raw", start, T0 + 11 * MINUTE_MS),
        Segment("1m", T0 + 11 * MINUTE_MS, T0 + 3 * HOUR_MS + 20 * MINUTE_MS),
        Segment("raw", T0 + 3 * HOUR_MS + 20 * MINUTE_MS, end),
    ]


def test_plan_sub_minute_intervals_and_short_ranges_read_raw() -> None:
    assert plan(T0, T0 + HOUR_MS, 30 * SECOND) == [Segment("raw", T0, T0 + HOUR_MS)]
    assert plan(T0, T0 + HOUR_MS, None) == [Segment("raw", T0, T0 + HOUR_MS)]
    inside = [Segment("raw", T0 + 5 * SECOND, T0 + 50 * SECOND)]
    assert plan(T0 + 5 * SECOND, T0 + 50 * SECOND, HOUR_MS) == inside
    assert plan(T0, T0, HOUR_MS) == []
    assert plan(T0 + 1, T0, HOUR_MS) == []
    # Within one hour but across minutes: no hour tier.
    start, end = T0 + 30 * SECOND, T0 + 50 * MINUTE_MS + 1
    assert queries.tiers_of(plan(start, end, HOUR_MS)) == ["raw", "1m"]


_STEPS = sorted({*NAMED_INTERVALS.values(), *AUTO_LADDER, 90 * SECOND, 7 * MINUTE_MS})


@given(
    start=st.integers(T0 - 3 * DAY_MS, T0 + 3 * DAY_MS),
    length=st.integers(0, 4 * DAY_MS),
    interval=st.sampled_from([None, *_STEPS]),
)
def test_plan_always_tiles_the_range_exactly(start: int, length: int, interval: int | None) -> None:
    _check_plan(start, start + length, interval, plan(start, start + length, interval))


@given(
    start=st.integers(T0 - 400 * DAY_MS, T0),
    length=st.integers(1, 800 * DAY_MS),
    points=st.integers(1, 5000),
)
def test_choose_interval_is_the_smallest_step_within_points(
    start: int, length: int, points: int
) -> None:
    end = start + length
    step = choose_interval(start, end, points)
    assert step in AUTO_LADDER
    index = AUTO_LADDER.index(step)
    if bucket_count(start, end, step) > points:
        assert step == AUTO_LADDER[-1]  # nothing on the ladder is coarse enough
    if index:
        assert bucket_count(start, end, AUTO_LADDER[index - 1]) > points


def test_choose_interval_examples_and_labels() -> None:
    assert choose_interval(T0, T0 + 30 * DAY_MS, 500) == 2 * HOUR_MS
    assert choose_interval(T0, T0 + 365 * DAY_MS, 500) == DAY_MS
    assert choose_interval(T0, T0 + DAY_MS, 500) == 5 * MINUTE_MS
    assert choose_interval(T0, T0 + 10 * MINUTE_MS, 500) == 2 * SECOND
    assert choose_interval(T0, T0 + 100 * 365 * DAY_MS, 10) == 7 * DAY_MS
    assert [interval_label(x) for x in (None, SECOND, 30 * SECOND, MINUTE_MS, 2 * HOUR_MS)] == [
        "raw",
        "1s",
        "30s",
        "1m",
        "2h",
    ]
    assert [interval_label(x) for x in (DAY_MS, 7 * DAY_MS, 1500)] == ["1d", "7d", "1500ms"]
    assert bucket_count(T0, T0 + HOUR_MS, HOUR_MS) == 1
    assert bucket_count(T0 + 1, T0 + HOUR_MS + 1, HOUR_MS) == 2
    assert bucket_count(T0, T0, HOUR_MS) == 0


def test_value_of_refuses_unknown_aggregates() -> None:
    with pytest.raises(ValueError):
        queries.value_of([1, 1.0, 1.0, 1.0, 0, 1.0, 0, 1.0], "median")


# --- history against brute force -----------------------------------------------------------


async def _write(container: Container, points: list[tuple[int, int, float]]) -> None:
    await Partitions(container.db.engine).ensure(p[1] for p in points)
    async with container.db.engine.begin() as conn:
        await store.write_points(conn, points)


def _brute(
    points: dict[int, float], start: int, end: int, interval: int | None, agg: str
) -> list[tuple[int, float]]:
    chosen = sorted((ts, v) for ts, v in points.items() if start <= ts < end)
    if interval is None:
        return chosen
    groups: dict[int, list[tuple[int, float]]] = {}
    for ts, v in chosen:
        groups.setdefault(ts - ts % interval, []).append((ts, v))
    out = []
    for key in sorted(groups):
        values = [v for _, v in groups[key]]
        result = {
            "avg": sum(values) / len(values),
            "min": min(values),
            "max": max(values),
            "sum": sum(values),
            "count": len(values),
            "first": groups[key][0][1],
            "last": groups[key][-1][1],
        }[agg]
        out.append((key, float(result)))
    return out


def _assert_same(got: list[tuple[int, float]], want: list[tuple[int, float]], label: str) -> None:
    assert [k for k, _ in got] == [k for k, _ in want], label
    for (_, g), (_, w) in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-9, abs=1e-9), label


def _dataset(seed: int) -> tuple[dict[int, dict[int, float]], list[list[tuple[int, int, float]]]]:
    """Two series over 27 hours around T0 with irregular timestamps, written in shuffled
    batches (late and out-of-order points), with some points rewritten and some resent."""
    rng = random.Random(seed)
    truth: dict[int, dict[int, float]] = {1: {}, 2: {}}
    stamps: dict[int, list[int]] = {1: [], 2: []}
    for sid, mean_gap in ((1, 37 * SECOND), (2, 5 * MINUTE_MS)):
        ts = T0 - 2 * HOUR_MS + rng.randrange(0, 5000)
        while ts < T0 + 25 * HOUR_MS:
            stamps[sid].append(ts)
            ts += rng.randrange(1, 2 * mean_gap)
        # a dense burst across a minute and an hour boundary
        for i in range(-90, 90):
            stamps[sid].append(T0 + 5 * HOUR_MS + i * 997)
    writes: list[tuple[int, int, float]] = []
    for sid, all_ts in stamps.items():
        for ts in set(all_ts):
            value = round(rng.uniform(-100, 100), 3)
            truth[sid][ts] = value
            writes.append((sid, ts, value))
    rng.shuffle(writes)
    batches = [writes[i : i + 700] for i in range(0, len(writes), 700)]
    # rewrites and exact resends, late
    resend = rng.sample(writes, 50)
    rewrites = []
    for sid, ts, _ in rng.sample(writes, 40):
        value = round(rng.uniform(-500, 500), 3)
        truth[sid][ts] = value
        rewrites.append((sid, ts, value))
    batches.append(resend)
    batches.append(rewrites)
    return truth, batches


_RANGES = [
    ("aligned day", T0, T0 + DAY_MS),
    ("everything", T0 - 3 * HOUR_MS, T0 + 26 * HOUR_MS),
    ("mid-minute", T0 + 3 * HOUR_MS + 17 * MINUTE_MS + 12_345, T0 + 7 * HOUR_MS + 41_002),
    ("mid-hour", T0 - HOUR_MS - 25 * MINUTE_MS, T0 + 20 * HOUR_MS + 35 * MINUTE_MS),
    ("inside a minute", T0 + 5 * HOUR_MS + 3_000, T0 + 5 * HOUR_MS + 41_000),
    ("across one hour edge", T0 + 5 * HOUR_MS - 75_500, T0 + 5 * HOUR_MS + 75_500),
]
_INTERVALS = [None, 10 * SECOND, *NAMED_INTERVALS.values(), 2 * HOUR_MS, 7 * DAY_MS]


async def test_history_matches_brute_force_for_every_agg_and_interval(
    container: Container,
) -> None:
    truth, batches = _dataset(11)
    for batch in batches:
        await _write(container, batch)
    async with container.db.engine.connect() as conn:
        for label, start, end in _RANGES:
            for interval in _INTERVALS:
                for agg in AGGREGATES if interval is not None else ("avg",):
                    got = await queries.history_many(conn, [1, 2], start, end, interval, agg)
                    assert got.interval_ms == interval
                    for sid in (1, 2):
                        want = _brute(truth[sid], start, end, interval, agg)
                        _assert_same(got.series[sid], want, f"{label} {interval} {agg} s{sid}")
                    assert set(got.tiers) == {s.tier for s in plan(start, end, interval)}
            # the single-series helper answers the same
            one = await queries.history(conn, 1, start, end, HOUR_MS, "max")
            _assert_same(one, _brute(truth[1], start, end, HOUR_MS, "max"), label)


async def test_late_points_land_in_the_right_buckets(container: Container) -> None:
    """A point arriving after the buckets were read changes exactly its bucket."""
    truth: dict[int, float] = {T0 + i * 20 * SECOND: float(i) for i in range(3 * 180)}
    await _write(container, [(7, ts, v) for ts, v in truth.items()])
    start, end = T0 + 30 * SECOND, T0 + 3 * HOUR_MS - 30 * SECOND
    async with container.db.engine.connect() as conn:
        before = await queries.history(conn, 7, start, end, HOUR_MS, "sum")
    late = {T0 + HOUR_MS + 5 * SECOND: 1000.0, T0 + 2 * HOUR_MS + 59 * MINUTE_MS + 7: -7.5}
    truth.update(late)
    await _write(container, [(7, ts, v) for ts, v in late.items()])
    async with container.db.engine.connect() as conn:
        for agg in AGGREGATES:
            for interval in (MINUTE_MS, 15 * MINUTE_MS, HOUR_MS):
                got = await queries.history(conn, 7, start, end, interval, agg)
                _assert_same(got, _brute(truth, start, end, interval, agg), f"{agg} {interval}")
        after = await queries.history(conn, 7, start, end, HOUR_MS, "sum")
    assert [a[1] - b[1] for a, b in zip(after, before, strict=True)] == [0.0, 1000.0, -7.5]


async def test_raw_points_and_the_raw_limit(container: Container) -> None:
    points = [(3, T0 + i * SECOND, float(i)) for i in range(3 * 3600 + 30)]
    await _write(container, points)
    async with container.db.engine.connect() as conn:
        start, end = T0 + 1500, T0 + 2 * HOUR_MS + 30_500
        assert await queries.count_points(conn, [3], start, end) == sum(
            1 for _, ts, _ in points if start <= ts < end
        )
        raw = await queries.history_many(conn, [3], T0 + 100 * SECOND, T0 + 110 * SECOND, None)
        assert raw.tiers == ["raw"] and raw.interval_ms is None
        assert raw.series[3] == [(T0 + i * SECOND, float(i)) for i in range(100, 110)]
        with pytest.raises(QueryTooLarge, match="raw points"):
            await queries.history_many(conn, [3], T0, T0 + 3 * HOUR_MS, None, max_raw_points=10_000)
        # The same range at an interval is fine and comes mostly from the rollups.
        hourly = await queries.history_many(conn, [3], T0, T0 + 3 * HOUR_MS, HOUR_MS, "count")
        assert hourly.tiers == ["1h"]
        assert hourly.series[3] == [(T0 + h * HOUR_MS, 3600) for h in range(3)]
        with pytest.raises(QueryTooLarge, match="buckets"):
            await queries.history_many(
                conn, [3], T0, T0 + 30 * DAY_MS, MINUTE_MS, "avg", max_buckets=10_000
            )
        empty = await queries.history_many(conn, [3, 99], T0, T0 + HOUR_MS, MINUTE_MS, "avg")
        assert empty.series[99] == [] and len(empty.series[3]) == 60
        assert (await queries.history_many(conn, [], T0, T0 + 1, None)).series == {}
        with pytest.raises(ValueError):
            await queries.history_many(conn, [3], T0, T0 + HOUR_MS, HOUR_MS, "median")


async def test_latest_rows_by_factory_and_device(container: Container) -> None:
    rows = [
        store.LatestRow(1, 10, 100, T0, 1.5, None),
        store.LatestRow(2, 10, 101, T0 + 1, None, "RUNNING"),
        store.LatestRow(3, 11, 102, T0 + 2, 3.0, None),
    ]
    async with container.db.engine.begin() as conn:
        await store.write_latest(conn, rows)
    async with container.db.engine.connect() as conn:
        everything = sorted(await queries.latest(conn, 10), key=lambda x: x.series_id)
        assert everything == [
            queries.Latest(1, 100, T0, 1.5, None),
            queries.Latest(2, 101, T0 + 1, None, "RUNNING"),
        ]
        assert [x.series_id for x in await queries.latest(conn, 10, [101, 102])] == [2]
        assert await queries.latest(conn, 10, []) == []
        assert await queries.latest(conn, 12) == []
