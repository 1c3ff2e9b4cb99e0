"""The time-series store on a real database: idempotent raw writes, rollups that
stay exact under late, out-of-order, duplicate and rewritten points, latest
values, partitions and retention."""

from __future__ import annotations

import random
from typing import Any

from sqlalchemy import text

from plantwatch.app import Container
from plantwatch.telemetry import store
from plantwatch.telemetry.partitions import DAY_MS, Partitions, Retention
from plantwatch.telemetry.rollups import HOUR_MS, MINUTE_MS, aggregate

T0 = 1_771_491_600_000  # 2026-02-19T09:00:00Z, an hour boundary


async def _write(container: Container, points: list[tuple[int, int, float]]) -> store.WriteResult:
    partitions = Partitions(container.db.engine)
    await partitions.ensure(p[1] for p in points)
    async with container.db.engine.begin() as conn:
        return await store.write_points(conn, points)


async def _rows(container: Container, sql: str) -> list[Any]:
    async with container.db.engine.connect() as conn:
        return [tuple(r) for r in await conn.execute(text(sql))]


async def _assert_rollups_match_raw(container: Container) -> None:
    raw = await _rows(container, "SELECT series_id, ts, value FROM telemetry_raw")
    for table, bucket in (("telemetry_1m", MINUTE_MS), ("telemetry_1h", HOUR_MS)):
        expected = aggregate(raw, bucket)
        stored = await _rows(
            container,
            f"SELECT series_id, bucket, cnt, total, vmin, vmax, first_ts, vfirst, last_ts, vlast "
            f"FROM {table}",
        )
        got = {(r[0], r[1]): list(r[2:]) for r in stored}
        assert got.keys() == expected.keys(), table
        for key, agg in expected.items():
            g = got[key]
            assert g[0] == agg[0] and g[2:] == agg[2:], (table, key, g, agg)
            assert abs(g[1] - agg[1]) < 1e-6 * max(1.0, abs(agg[1])), (table, key)


async def test_same_point_twice_is_stored_once(container: Container) -> None:
    points = [(1, T0 + i * 1000, float(i)) for i in range(120)]
    first = await _write(container, points)
    again = await _write(container, points)
    assert (first.inserted, again.inserted, again.duplicates) == (120, 0, 120)
    assert await _rows(container, "SELECT count(*) FROM telemetry_raw") == [(120,)]
    rollup = await _rows(container, "SELECT bucket, cnt FROM telemetry_1m ORDER BY bucket")
    assert rollup == [(T0, 60), (T0 + MINUTE_MS, 60)]


async def test_rewritten_point_replaces_value_and_fixes_min_max(container: Container) -> None:
    await _write(container, [(1, T0, 5.0), (1, T0 + 1000, 9.0), (1, T0 + 2000, 7.0)])
    result = await _write(container, [(1, T0 + 1000, 1.0)])  # the old maximum is corrected
    assert (result.rewritten, result.inserted) == (1, 0)
    row = await _rows(container, "SELECT cnt, total, vmin, vmax, vfirst, vlast FROM telemetry_1m")
    assert row == [(3, 13.0, 1.0, 7.0, 5.0, 7.0)]
    await _assert_rollups_match_raw(container)


async def test_within_one_batch_the_last_write_wins(container: Container) -> None:
    await _write(container, [(3, T0, 1.0), (3, T0, 2.0)])
    assert await _rows(container, "SELECT value FROM telemetry_raw") == [(2.0,)]
    assert await _rows(container, "SELECT cnt, total FROM telemetry_1m") == [(1, 2.0)]


async def test_rollups_stay_exact_under_late_and_out_of_order_data(container: Container) -> None:
    rng = random.Random(7)
    universe = [
        (sid, T0 + rng.randrange(0, 3 * HOUR_MS, 500)) for sid in (1, 2, 3) for _ in range(400)
    ]
    for _ in range(12):
        batch = []
        for _ in range(rng.randrange(1, 150)):
            sid, ts = rng.choice(universe)
            batch.append((sid, ts, round(rng.uniform(-50, 50), 3)))
        await _write(container, batch)
    await _assert_rollups_match_raw(container)


async def test_latest_never_goes_back_in_time(container: Container) -> None:
    newer = store.LatestRow(9, 1, 1, T0 + 5000, 42.0, None)
    older = store.LatestRow(9, 1, 1, T0, 1.0, None)
    state = store.LatestRow(10, 1, 1, T0, None, "RUNNING")
    async with container.db.engine.begin() as conn:
        await store.write_latest(conn, [newer, state])
    async with container.db.engine.begin() as conn:
        await store.write_latest(conn, [older])
    rows = await _rows(
        container, "SELECT series_id, ts, value, text FROM series_latest ORDER BY series_id"
    )
    assert rows == [(9, T0 + 5000, 42.0, None), (10, T0, None, "RUNNING")]


async def test_backfill_across_days_and_retention(container: Container) -> None:
    now = T0 + 200 * DAY_MS
    old = [(1, T0 + d * DAY_MS, float(d)) for d in range(3)]
    recent = [(1, now - DAY_MS, 1.0), (2, now - 1000, 2.0)]
    await _write(container, old + recent)
    async with container.db.engine.begin() as conn:
        await store.write_latest(
            conn,
            [
                store.LatestRow(1, 1, 1, now - DAY_MS, 1.0, None),
                store.LatestRow(2, 1, 1, now - 1000, 2.0, None),
            ],
        )
    removed = await Partitions(container.db.engine).apply_retention(
        now, Retention(raw_days=90, minute_days=100, hour_days=365)
    )
    assert await _rows(container, "SELECT series_id, ts FROM telemetry_raw ORDER BY ts") == [
        (1, now - DAY_MS),
        (2, now - 1000),
    ]
    assert await _rows(container, "SELECT count(*) FROM telemetry_1m") == [(2,)]
    assert await _rows(container, "SELECT count(*) FROM telemetry_1h") == [(5,)]
    if container.db.dialect == "postgresql":
        assert removed["raw_partitions"] >= 3
    else:
        assert removed["telemetry_raw"] == 3
