"""Time partitions of the raw table (PostgreSQL) and retention of every tier.

On PostgreSQL `telemetry_raw` is range-partitioned by day. Partitions are
created a week ahead by the scheduler and on demand before a write that
reaches a day without one (backfills), each in its own short transaction so
the DDL lock never sits inside a telemetry batch. Retention drops whole
partitions. On SQLite there are no partitions and retention deletes rows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import bindparam, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

DAY_MS = 86_400_000
_RETENTION_CHUNK = 200


def partition_name(day_start_ms: int) -> str:
    day = dt.datetime.fromtimestamp(day_start_ms / 1000, dt.UTC)
    return f"telemetry_raw_p{day:%Y%m%d}"


@dataclass(frozen=True)
class Retention:
    raw_days: int = 90
    minute_days: int = 365
    hour_days: int = 5 * 365


class Partitions:
    """Knows which day partitions exist; creates missing ones. No-op off PostgreSQL."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.enabled = engine.dialect.name == "postgresql"
        self._known: set[int] = set()
        self._loaded = False
        self._lock = asyncio.Lock()

    async def _load(self) -> None:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                    "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'telemetry_raw'"
                )
            )
            for (name,) in rows:
                stamp = dt.datetime.strptime(name[-8:], "%Y%m%d").replace(tzinfo=dt.UTC)
                self._known.add(int(stamp.timestamp() * 1000))
        self._loaded = True

    async def ensure(self, timestamps: Iterable[int]) -> None:
        """Make sure the day of every timestamp (epoch ms) has a partition."""
        if not self.enabled:
            return
        days = {ts - ts % DAY_MS for ts in timestamps}
        if self._loaded and days <= self._known:
            return
        async with self._lock:
            if not self._loaded:
                await self._load()
            for day in sorted(days - self._known):
                await self._create(day)

    async def _create(self, day: int) -> None:
        name = partition_name(day)
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    text(
                        f'CREATE TABLE IF NOT EXISTS "{name}" PARTITION OF telemetry_raw '
                        f"FOR VALUES FROM ({day}) TO ({day + DAY_MS})"
                    )
                )
        except DBAPIError:
            # Another process made it between our check and our CREATE: that is fine.
            async with self.engine.connect() as conn:
                exists = await conn.scalar(text("SELECT to_regclass(:n)"), {"n": name})
            if exists is None:
                raise
        self._known.add(day)

    async def create_ahead(self, now_ms: int, days: int = 7) -> None:
        await self.ensure(now_ms + d * DAY_MS for d in range(days + 1))

    async def apply_retention(self, now_ms: int, retention: Retention) -> dict[str, int]:
        """Drop or delete data older than each tier keeps. Returns what went, per tier."""
        raw_cutoff = now_ms - retention.raw_days * DAY_MS
        removed: dict[str, int] = {}
        cutoffs = {
            "telemetry_1m": now_ms - retention.minute_days * DAY_MS,
            "telemetry_1h": now_ms - retention.hour_days * DAY_MS,
        }
        if self.enabled:
            async with self._lock:
                if not self._loaded:
                    await self._load()
                old = sorted(d for d in self._known if d + DAY_MS <= raw_cutoff)
                for day in old:
                    async with self.engine.begin() as conn:
                        await conn.execute(text(f'DROP TABLE IF EXISTS "{partition_name(day)}"'))
                    self._known.discard(day)
            removed["raw_partitions"] = len(old)
        else:
            cutoffs["telemetry_raw"] = raw_cutoff
        for table, cutoff in cutoffs.items():
            column = "ts" if table == "telemetry_raw" else "bucket"
            removed[table] = 0
            # Only the series that hold anything that old: one primary-key probe each,
            # read-only (a fresh or young store has none, and deletes nothing).
            async with self.engine.connect() as conn:
                series = [
                    row[0]
                    for row in await conn.execute(
                        text(
                            f"SELECT l.series_id FROM series_latest l WHERE EXISTS "
                            f"(SELECT 1 FROM {table} t WHERE t.series_id = l.series_id "
                            f"AND t.{column} < :c) ORDER BY l.series_id"
                        ),
                        {"c": cutoff},
                    )
                ]
            # Through the primary key, a chunk of series a statement, in short
            # transactions: a table scan would hold SQLite's single write lock and stall
            # ingest.
            delete = text(
                f"DELETE FROM {table} WHERE series_id IN :s AND {column} < :c"
            ).bindparams(bindparam("s", expanding=True))
            for start in range(0, len(series), _RETENTION_CHUNK):
                async with self.engine.begin() as conn:
                    result = await conn.execute(
                        delete, {"s": series[start : start + _RETENTION_CHUNK], "c": cutoff}
                    )
                    removed[table] += result.rowcount
        return removed
