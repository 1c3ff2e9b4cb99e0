"""History and latest-value query latency (issue 3 targets).

    python bench/query.py [--database-url URL] [--runs 60]

Seeds a throwaway database (SQLite temp file by default, or a new database on
the PostgreSQL server named by --database-url):

- a 1-second series for 30 days (2.6 M raw points) written through the real
  store, so its 1-minute and 1-hour rollups are what ingest would make;
- a series with a year of 1-minute and 1-hour rollups (written directly: a year
  of raw points would outlive the 90-day raw retention anyway);
- 10,000 series with latest values (1,000 devices x 10 parameters);

then times the KPI service functions the API calls, with an end time that moves
and is never bucket-aligned. Each measurement prints one JSON line; the last
line is the summary with p50s and the issue's targets:
30-day chart p50 < 20 ms, 1-year chart < 50 ms, 10,000 latest values < 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import backend_of, emit, machine, throwaway_database

from plantwatch.core.db import Database
from plantwatch.telemetry import kpis, store
from plantwatch.telemetry.latest import LatestCache
from plantwatch.telemetry.partitions import DAY_MS, Partitions
from plantwatch.telemetry.rollups import HOUR_MS, MINUTE_MS, aggregate

SECOND_SERIES, YEAR_SERIES = 1, 2
LATEST_DEVICES, LATEST_PARAMS = 1000, 10


async def seed(db: Database, now_ms: int) -> dict[str, float]:
    engine = db.engine
    rng = random.Random(1)
    timings: dict[str, float] = {}
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO factories (id, name, slug, timezone, auto_register_devices, "
                "offline_after_s, created_at, updated_at) VALUES (1, 'Bench', 'bench', 'UTC', "
                "false, 300, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
        await conn.execute(
            text(
                "INSERT INTO devices (id, factory_id, device_key, name, criticality, metadata, "
                "is_active, status, created_at, updated_at) VALUES (:id, 1, :k, :k, 'medium', "
                "'{}', true, 'online', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            ),
            [{"id": d, "k": f"D{d}"} for d in range(1, LATEST_DEVICES + 1)],
        )
        params = [
            {"id": SECOND_SERIES, "d": 1, "k": "sec"},
            {"id": YEAR_SERIES, "d": 1, "k": "year"},
        ]
        params += [
            {"id": 100 + (d - 1) * LATEST_PARAMS + p, "d": d, "k": f"p{p}"}
            for d in range(1, LATEST_DEVICES + 1)
            for p in range(LATEST_PARAMS)
        ]
        await conn.execute(
            text(
                "INSERT INTO device_parameters (id, factory_id, device_id, key, display_name, "
                "unit, data_type, is_kpi, is_power, discovered_at, updated_at) VALUES (:id, 1, "
                ":d, :k, :k, 'C', 'float', true, false, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            ),
            params,
        )
    partitions = Partitions(engine)

    started = time.perf_counter()
    first = now_ms - 30 * DAY_MS
    first -= first % 1000
    chunk = 100_000
    for ts in range(first, now_ms, chunk * 1000):
        points = [
            (SECOND_SERIES, t, 50 + rng.random())
            for t in range(ts, min(ts + chunk * 1000, now_ms), 1000)
        ]
        await partitions.ensure(p[1] for p in points)
        async with engine.begin() as conn:
            await store.write_points(conn, points)
    timings["seed_30d_1s_s"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    year_start = now_ms - 366 * DAY_MS
    year_start -= year_start % MINUTE_MS
    minutes: dict[tuple[int, int], list[float]] = {}
    for bucket in range(year_start, now_ms - now_ms % MINUTE_MS, MINUTE_MS):
        v = rng.random()
        minutes[(YEAR_SERIES, bucket)] = [60, 60 * v, v - 1, v + 1, bucket, v, bucket + 59_000, v]
    hours = aggregate(((YEAR_SERIES, b, agg[1] / 60) for (_, b), agg in minutes.items()), HOUR_MS)
    async with engine.begin() as conn:
        dialect = store.dialect_for(conn)
        items = list(minutes.items())
        for i in range(0, len(items), 50_000):
            await dialect.upsert_rollups(
                conn, "telemetry_1m", dict(items[i : i + 50_000]), replace=True
            )
        await dialect.upsert_rollups(conn, "telemetry_1h", hours, replace=True)
        rows = [
            store.LatestRow(
                p["id"], 1, p["d"], now_ms - rng.randrange(0, 600_000), rng.random(), None
            )
            for p in params
            if p["id"] >= 100
        ]
        await store.write_latest(conn, rows)
    if backend_of(db.url) == "postgresql":
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("ANALYZE"))
    timings["seed_year_and_latest_s"] = round(time.perf_counter() - started, 1)
    return timings


async def timed(
    name: str, target_ms: float | None, fn: Callable[[int], Awaitable[str]], runs: int
) -> dict[str, Any]:
    for i in range(3):
        await fn(i)
    samples = []
    detail = ""
    for i in range(runs):
        started = time.perf_counter()
        detail = await fn(i)
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    result = {
        "query": name,
        "p50_ms": round(statistics.median(samples), 2),
        "p95_ms": round(samples[int(len(samples) * 0.95) - 1], 2),
        "min_ms": round(samples[0], 2),
        "runs": runs,
        "target_p50_ms": target_ms,
        "detail": detail,
    }
    emit(result)
    return result


async def measure(db: Database, now_ms: int, runs: int) -> list[dict[str, Any]]:
    def span(i: int, days: int) -> tuple[dt.datetime, dt.datetime]:
        end = now_ms - i * 7_777  # a moving "now", never aligned to a bucket
        return (
            dt.datetime.fromtimestamp((end - days * DAY_MS) / 1000, dt.UTC),
            dt.datetime.fromtimestamp(end / 1000, dt.UTC),
        )

    def chart(key: str, days: int, agg: str) -> Callable[[int], Awaitable[str]]:
        async def run(i: int) -> str:
            start, end = span(i, days)
            async with db.session() as session:
                result = await kpis.kpi_history(
                    session, 1, 1, [key], start=start, end=end, interval="auto", agg=agg, points=500
                )
            return (
                f"{result.interval}, {len(result.parameters[0].points)} points, "
                f"tiers {','.join(result.tiers)}"
            )

        return run

    directory = kpis.SeriesDirectory()
    cache = LatestCache()

    async def latest(_: int) -> str:
        # As the API answers it: values from memory (reloaded from the table every
        # `refresh_s`, which some of the runs pay), metadata from the directory.
        async with db.engine.connect() as conn:
            values = await kpis.latest_values(conn, 1, directory=directory, cache=cache)
        return f"{len(values)} values"

    async def latest_from_table(_: int) -> str:
        async with db.engine.connect() as conn:
            values = await kpis.latest_values(conn, 1, directory=directory)
        return f"{len(values)} values"

    return [
        await timed("chart_30d_1s_series_500pts_avg", 20, chart("sec", 30, "avg"), runs),
        await timed("chart_30d_1s_series_500pts_last", 20, chart("sec", 30, "last"), runs),
        await timed("chart_1y_500pts_avg", 50, chart("year", 365, "avg"), runs),
        await timed("latest_10000_series", 20, latest, runs),
        await timed("latest_10000_series_from_table", None, latest_from_table, runs),
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()
    now_ms = int(time.time() * 1000)
    async with throwaway_database(args.database_url) as url:
        db = Database(url)
        try:
            seeded = await seed(db, now_ms)
            emit({"seeded": seeded})
            results = await measure(db, now_ms, args.runs)
        finally:
            await db.dispose()
    summary: dict[str, Any] = {"database": backend_of(url), **machine(), **seeded}
    for r in results:
        summary[f"{r['query']}_p50_ms"] = r["p50_ms"]
    summary["targets_met"] = all(
        r["p50_ms"] < r["target_p50_ms"] for r in results if r["target_p50_ms"] is not None
    )
    emit(summary)


if __name__ == "__main__":
    asyncio.run(main())
