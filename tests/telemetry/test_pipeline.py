"""The ingest pipeline's two write paths on a real database.

Messages whose series are known and whose timestamps increase are merged into
the batch's rows, rollup aggregates and latest values (several samples a series:
aggregated by their callers) and stored without RETURNING; anything else —
timestamps out of order within a message or across messages of one batch, points
already stored, rewrites — takes the exact path.
Either way the store must end up as if every point had been written one by one:
raw rows unique per (series, ts) with the last value, rollups equal to the
aggregates of the raw rows, latest values the newest point of each series.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from plantwatch.app import Container
from plantwatch.assets.models import Device
from plantwatch.telemetry import store
from plantwatch.telemetry.pipeline import DeviceRef, IngestOutcome
from plantwatch.telemetry.rollups import HOUR_MS, MINUTE_MS, aggregate
from tests.conftest import MakeFactory
from tests.telemetry.conftest import now_ms


async def _rows(container: Container, sql: str) -> list[Any]:
    async with container.db.engine.connect() as conn:
        return [tuple(r) for r in await conn.execute(text(sql))]


async def _assert_store_consistent(container: Container) -> None:
    """Rollups are exactly the aggregates of the raw rows; latest is each series' newest."""
    raw = await _rows(container, "SELECT series_id, ts, value FROM telemetry_raw")
    for table, bucket in (("telemetry_1m", MINUTE_MS), ("telemetry_1h", HOUR_MS)):
        expected = aggregate(sorted(raw), bucket)
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
    newest: dict[int, tuple[int, float]] = {}
    for sid, ts, value in raw:
        if sid not in newest or ts > newest[sid][0]:
            newest[sid] = (ts, value)
    latest = await _rows(container, "SELECT series_id, ts, value FROM series_latest")
    numeric = {sid: (ts, value) for sid, ts, value in latest if value is not None}
    assert numeric == newest


async def _device(container: Container, make_factory: MakeFactory, key: str = "M01") -> DeviceRef:
    factory = await make_factory("acme")
    async with container.db.session() as session:
        device = Device(factory_id=factory.id, device_key=key, name=key)
        session.add(device)
        await session.commit()
        return DeviceRef(factory.id, device.id, key)


Batches = list[int]


def _count_batches(container: Container) -> Batches:
    """Record the number of messages in each committed batch."""
    pipeline = container.pipeline
    sizes: Batches = []
    flush: Callable[[list[Any]], Awaitable[Any]] = pipeline._flush

    async def counting(jobs: list[Any]) -> Any:
        sizes.append(len(jobs))
        return await flush(jobs)

    pipeline._flush = counting  # type: ignore[method-assign]
    return sizes


async def _send_together(
    container: Container, device: DeviceRef, bodies: list[Any]
) -> list[IngestOutcome]:
    """Submit messages at once; with a linger they are committed as one batch."""
    return await asyncio.gather(
        *(container.pipeline.ingest(device, orjson.dumps(b), source="test") for b in bodies)
    )


@pytest.fixture
async def started(container: Container) -> Container:
    container.pipeline.linger_s = 0.05
    await container.start()
    return container


async def test_ordered_messages_of_one_batch_merge_exactly(
    started: Container, make_factory: MakeFactory
) -> None:
    device = await _device(started, make_factory)
    # Discover the parameters first, so the batch below is prepared by its callers.
    base = now_ms() - 3 * HOUR_MS
    base -= base % HOUR_MS
    await started.pipeline.ingest(
        device, orjson.dumps({"ts": base, "values": {"a": 0.5, "b": 1}}), source="test"
    )
    sizes = _count_batches(started)
    bodies = [
        [
            {"ts": base + (m * 40 + i) * 3_000 + 1_000, "values": {"a": float(m * 40 + i), "b": i}}
            for i in range(40)
        ]
        for m in range(8)
    ]
    outcomes = await _send_together(started, device, bodies)
    assert sizes == [8]
    assert [o.accepted for o in outcomes] == [80] * 8
    assert await _rows(started, "SELECT count(*) FROM telemetry_raw") == [(642,)]
    await _assert_store_consistent(started)


async def test_one_sample_and_many_sample_messages_of_one_batch_merge_exactly(
    started: Container, make_factory: MakeFactory
) -> None:
    """Small messages (one sample a series, added to the batch's aggregates) and larger
    ones (a metric with several samples beside one with a single sample, aggregated by
    the caller) fill the same buckets; every point counts exactly once."""
    device = await _device(started, make_factory)
    base = now_ms() - 2 * HOUR_MS
    base -= base % HOUR_MS
    await started.pipeline.ingest(
        device, orjson.dumps({"ts": base, "values": {"a": 0.5, "b": 1, "c": 2}}), source="test"
    )
    sizes = _count_batches(started)
    bodies: list[Any] = [
        {"ts": base + 1_000, "values": {"a": 3.0, "b": 2, "c": -1.0}},
        # "c" appears once, "a" three times: the caller aggregates the whole message.
        [
            {"ts": base + 2_000, "values": {"a": -7.0, "c": 9.5}},
            {"ts": base + 3_000, "values": {"a": 11.0}},
            {"ts": base + 61_000, "values": {"a": 1.0}},
        ],
        {"ts": base + 62_000, "values": {"a": 4.0, "b": 5, "c": 0.25}},
        {"ts": base + 63_000, "values": {"c": 8.0}},
    ]
    outcomes = await _send_together(started, device, bodies)
    assert sizes == [4]
    assert [o.accepted for o in outcomes] == [3, 4, 3, 1]
    assert await _rows(started, "SELECT count(*) FROM telemetry_raw") == [(14,)]
    await _assert_store_consistent(started)
    minute = await _rows(
        started,
        "SELECT cnt, vmin, vmax, vfirst, vlast FROM telemetry_1m r "
        "JOIN device_parameters p ON p.id = r.series_id WHERE p.key = 'c' ORDER BY bucket",
    )
    assert minute == [(3, -1.0, 9.5, 2.0, 9.5), (2, 0.25, 8.0, 0.25, 8.0)]


async def test_overlapping_messages_in_one_batch_take_the_exact_path(
    started: Container, make_factory: MakeFactory
) -> None:
    device = await _device(started, make_factory)
    base = now_ms() - HOUR_MS
    first = [{"ts": base + i * 1000, "values": {"a": float(i)}} for i in range(120)]
    # The same series again, half of it at the same times with other values, half later.
    second = [{"ts": base + i * 1000, "values": {"a": float(-i)}} for i in range(60, 180)]
    sizes = _count_batches(started)
    outcomes = await _send_together(started, device, [first, second])
    assert sizes == [2] and [o.accepted for o in outcomes] == [120, 120]
    raw = await _rows(started, "SELECT ts, value FROM telemetry_raw ORDER BY ts")
    assert len(raw) == 180
    # Within a batch the later message wins, as for points within one message.
    assert raw[60] == (base + 60_000, -60.0) and raw[0] == (base, 0.0)
    await _assert_store_consistent(started)


async def test_out_of_order_and_duplicate_entries_in_one_message(
    started: Container, make_factory: MakeFactory
) -> None:
    device = await _device(started, make_factory)
    base = now_ms() - 2 * HOUR_MS
    rng = random.Random(3)
    entries = [
        {"ts": base + rng.randrange(0, 2 * HOUR_MS, 250), "values": {"x": rng.uniform(-9, 9)}}
        for _ in range(400)
    ]
    entries += entries[:50]  # exact repeats
    entries.append({"ts": entries[0]["ts"], "values": {"x": 123.0}})  # a rewrite, last wins
    outcome = await started.pipeline.ingest(device, orjson.dumps(entries), source="test")
    assert outcome.accepted == len(entries)
    stored = dict(await _rows(started, "SELECT ts, value FROM telemetry_raw"))
    assert stored[entries[0]["ts"]] == 123.0
    assert len(stored) == len({e["ts"] for e in entries})
    await _assert_store_consistent(started)


async def test_redelivery_partial_overlap_and_rewrites_across_batches(
    started: Container, make_factory: MakeFactory
) -> None:
    device = await _device(started, make_factory)
    base = now_ms() - 2 * HOUR_MS
    message = [{"ts": base + i * 2_000, "values": {"a": float(i), "b": i % 7}} for i in range(200)]
    first = await started.pipeline.ingest(device, orjson.dumps(message), source="test")
    again = await started.pipeline.ingest(device, orjson.dumps(message), source="test")
    assert first.accepted == again.accepted == 400
    assert await _rows(started, "SELECT count(*) FROM telemetry_raw") == [(400,)]
    assert await _rows(started, "SELECT sum(cnt) FROM telemetry_1h") == [(400,)]
    # Overlaps the tail of the first message, rewrites some values, and adds new points.
    overlap = [
        {"ts": base + i * 2_000, "values": {"a": float(i) + (0.5 if i % 3 == 0 else 0.0)}}
        for i in range(150, 260)
    ]
    await started.pipeline.ingest(device, orjson.dumps(overlap), source="test")
    assert await _rows(started, "SELECT count(*) FROM telemetry_raw") == [(460,)]
    assert await _rows(
        started, f"SELECT value FROM telemetry_raw WHERE ts = {base + 150 * 2_000} AND value > 100"
    ) == [(150.5,)]
    await _assert_store_consistent(started)


async def test_latest_never_goes_back_and_states_are_kept(
    started: Container, make_factory: MakeFactory
) -> None:
    device = await _device(started, make_factory)
    base = now_ms() - HOUR_MS
    newer = {"ts": base + 10_000, "values": {"t": 2.0, "mode": "AUTO"}}
    older = {"ts": base, "values": {"t": 1.0, "mode": "MANUAL"}}
    await started.pipeline.ingest(device, orjson.dumps(newer), source="test")
    await started.pipeline.ingest(device, orjson.dumps(older), source="test")
    # And in one batch, in either order.
    later = {"ts": base + 20_000, "values": {"t": 3.0, "mode": "STOP"}}
    await _send_together(started, device, [later, older])
    latest = await _rows(started, "SELECT ts, value, text FROM series_latest ORDER BY ts, value")
    assert sorted(latest, key=lambda r: r[1] is None) == [
        (base + 20_000, 3.0, None),
        (base + 20_000, None, "STOP"),
    ]
    await _assert_store_consistent(started)


async def test_new_parameters_bad_points_and_good_points_in_one_batch(
    started: Container, make_factory: MakeFactory
) -> None:
    device = await _device(started, make_factory)
    base = now_ms() - HOUR_MS
    await started.pipeline.ingest(
        device, orjson.dumps({"ts": base, "values": {"known": 1.0}}), source="test"
    )
    sizes = _count_batches(started)
    outcomes = await asyncio.gather(
        started.pipeline.ingest(
            device,
            orjson.dumps(
                [{"ts": base + 1000 * i, "values": {"known": i, "fresh": i}} for i in (1, 2)]
            ),
            source="test",
        ),
        started.pipeline.ingest(
            device, b'{"ts": 1, "values": {"known": 5}}', source="test"
        ),  # far outside the skew
        started.pipeline.ingest(device, b"not json", source="test"),
    )
    assert sizes == [3]
    assert [(o.accepted, len(o.rejects)) for o in outcomes] == [(4, 0), (0, 1), (0, 1)]
    reasons = await _rows(started, "SELECT reason FROM dead_letters ORDER BY reason")
    assert reasons == [("invalid_json",), ("timestamp_out_of_range",)]
    assert await _rows(started, "SELECT count(*) FROM telemetry_raw") == [(5,)]
    await _assert_store_consistent(started)


async def test_a_failed_commit_acknowledges_nothing(
    started: Container, make_factory: MakeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = await _device(started, make_factory)
    base = now_ms() - HOUR_MS
    await started.pipeline.ingest(
        device, orjson.dumps({"ts": base, "values": {"a": 1.0}}), source="test"
    )

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk on fire")

    # Either way of writing fails: in one step (SQLite), or statement by statement after
    # the points went in (they must be rolled back with the rest).
    monkeypatch.setattr(store, "write_batch_in_one_step", broken)
    monkeypatch.setattr(store._SQLite, "merge_batch", broken)
    monkeypatch.setattr(store._Postgres, "merge_batch", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        await started.pipeline.ingest(
            device, orjson.dumps({"ts": base + 1000, "values": {"a": 2.0}}), source="test"
        )
    # The batch's points were rolled back with it: nothing half-written.
    assert await _rows(started, "SELECT count(*) FROM telemetry_raw") == [(1,)]
    monkeypatch.undo()
    ok = await started.pipeline.ingest(
        device, orjson.dumps({"ts": base + 1000, "values": {"a": 2.0}}), source="test"
    )
    assert ok.accepted == 1
    await _assert_store_consistent(started)


async def test_write_distinct_points_falls_back_when_points_exist(container: Container) -> None:
    t0 = 1_771_491_600_000
    await container.partitions.ensure([t0])
    series = [1] * 100 + [2] * 100
    stamps = [t0 + i * 1000 for i in range(100)] * 2
    values = [float(i) for i in range(200)]
    minute = aggregate(zip(series, stamps, values, strict=True), MINUTE_MS)
    hour = aggregate(zip(series, stamps, values, strict=True), HOUR_MS)
    async with container.db.engine.begin() as conn:
        first = await store.write_distinct_points(conn, series, stamps, values, minute, hour)
    assert (first.inserted, first.duplicates, first.rewritten) == (200, 0, 0)
    # All stored already: nothing changes (the given aggregates must not be counted again).
    async with container.db.engine.begin() as conn:
        again = await store.write_distinct_points(conn, series, stamps, values, minute, hour)
    assert (again.inserted, again.duplicates, again.rewritten) == (0, 200, 0)
    # Half stored, one of those rewritten, half new.
    series2 = [2] * 100
    stamps2 = [t0 + i * 1000 for i in range(50, 150)]
    values2 = [float(100 + i) for i in range(50, 150)]
    values2[0] = -1.0
    minute2 = aggregate(zip(series2, stamps2, values2, strict=True), MINUTE_MS)
    hour2 = aggregate(zip(series2, stamps2, values2, strict=True), HOUR_MS)
    async with container.db.engine.begin() as conn:
        mixed = await store.write_distinct_points(conn, series2, stamps2, values2, minute2, hour2)
    assert (mixed.inserted, mixed.duplicates, mixed.rewritten) == (50, 49, 1)
    assert await _rows(container, "SELECT count(*) FROM telemetry_raw") == [(250,)]
    raw = await _rows(container, "SELECT series_id, ts, value FROM telemetry_raw")
    for table, bucket in (("telemetry_1m", MINUTE_MS), ("telemetry_1h", HOUR_MS)):
        counts = dict(
            await _rows(container, f"SELECT bucket, sum(cnt) FROM {table} GROUP BY bucket")
        )
        expected: dict[int, int] = {}
        for _, ts, _ in raw:
            expected[ts - ts % bucket] = expected.get(ts - ts % bucket, 0) + 1
        assert counts == expected, table


async def test_steady_state_batches_and_last_seen_on_either_path(
    started: Container, make_factory: MakeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite a steady-state batch is written in one step in the driver's thread
    (store.write_batch_in_one_step); elsewhere, or when the driver can't, statement by
    statement. Both store the same, last_seen included."""
    device = await _device(started, make_factory)
    pipeline = started.pipeline
    base = now_ms() - HOUR_MS
    await pipeline.ingest(device, orjson.dumps({"ts": base, "values": {"a": 1.0}}), source="t")
    outcomes: list[bool | None] = []
    one_step = store.write_batch_in_one_step

    async def spy(*args: Any, **kwargs: Any) -> bool | None:
        outcomes.append(await one_step(*args, **kwargs))
        return outcomes[-1]

    monkeypatch.setattr(store, "write_batch_in_one_step", spy)

    async def last_seen() -> Any:
        async with started.db.session() as session:
            found = await session.get(Device, device.device_id, populate_existing=True)
            assert found is not None
            return found.last_seen

    for step in range(1, 4):
        pipeline._last_seen_persisted.clear()  # due again (normally every 5 s)
        before = await last_seen()
        body = [{"ts": base + step * 10_000 + i, "values": {"a": float(i)}} for i in range(5)]
        assert (await pipeline.ingest(device, orjson.dumps(body), source="t")).accepted == 5
        after = await last_seen()
        assert after.tzinfo is not None and after > before
        if step == 2:
            # A driver without its own thread: the pipeline stops trying.
            monkeypatch.setattr(store, "write_batch_in_one_step", _unsupported)
    expected = [True, True] if started.db.dialect == "sqlite" else []
    assert outcomes == expected
    assert pipeline._one_step is False
    assert await _rows(started, "SELECT count(*) FROM telemetry_raw") == [(16,)]
    await _assert_store_consistent(started)


async def _unsupported(*args: Any, **kwargs: Any) -> None:
    return None


async def test_one_step_batch_with_stored_points_changes_nothing(container: Container) -> None:
    if container.db.dialect != "sqlite":
        pytest.skip("the one-step write is SQLite's")
    t0 = 1_771_491_600_000
    points = ([7, 7], [t0, t0 + 1000], [1.0, 2.0])
    minute = aggregate(zip(*points, strict=True), MINUTE_MS)
    hour = aggregate(zip(*points, strict=True), HOUR_MS)
    latest = [(7, 1, 1, t0 + 1000, 2.0, None)]
    async with container.db.engine.connect() as conn:
        assert await store.write_batch_in_one_step(conn, *points, minute, hour, latest) is True
    more = ([7, 7], [t0 + 1000, t0 + 2000], [5.0, 6.0])  # the first is stored already
    async with container.db.engine.connect() as conn:
        assert await store.write_batch_in_one_step(conn, *more, minute, hour, latest) is False
    assert await _rows(container, "SELECT ts, value FROM telemetry_raw ORDER BY ts") == [
        (t0, 1.0),
        (t0 + 1000, 2.0),
    ]
    assert await _rows(container, "SELECT cnt FROM telemetry_1m") == [(2,)]
    async with container.db.engine.begin() as conn:
        assert await store.write_batch_in_one_step(conn, *more, minute, hour, latest) is None
    # A failure part-way rolls the whole batch back.
    fresh = ([8], [t0], [3.0])
    async with container.db.engine.connect() as conn:
        with pytest.raises(Exception, match="no such table"):
            await store.write_batch_in_one_step(
                conn, *fresh, {}, {}, [], [("UPDATE no_such_table SET x = ?", (1,))]
            )
    assert await _rows(container, "SELECT count(*) FROM telemetry_raw WHERE series_id = 8") == [
        (0,)
    ]
    async with container.db.engine.connect() as conn:  # and the connection is usable
        assert await store.write_batch_in_one_step(conn, *fresh, {}, {}, []) is True


def test_sqlite_statements_come_in_few_sizes() -> None:
    """Multi-row statements are cut into pieces of a few fixed sizes, so the prepared
    statements are reused (preparing one costs more than running it)."""
    sizes: set[int] = set()
    for total in [*range(0, 2100), 10_000, 50_001]:
        pieces = list(store._row_chunks(total))
        assert [p[0] for p in pieces] == [sum(p[1] for p in pieces[:i]) for i in range(len(pieces))]
        assert sum(p[1] for p in pieces) == total
        sizes.update(p[1] for p in pieces)
    assert sizes == {2**k for k in range(11)}
