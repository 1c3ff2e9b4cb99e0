"""The time-series store: raw points, 1-minute and 1-hour rollups, latest values.

Writes are idempotent: a point is keyed by (series_id, ts); sending it again
changes nothing, sending it with another value replaces it. Rollups are
merged incrementally from the points that were really new (the insert's
RETURNING says which) and recomputed from raw only for the rare buckets where
a point was rewritten, so a duplicate never counts twice.

Statements are written per dialect because this is the hot path: multi-row
VALUES on SQLite, `unnest` of arrays on PostgreSQL (one round trip a batch).
On SQLite every statement is one `sqlite3_step` over many rows: executemany and
RETURNING step once per row, and each step hands the GIL between the driver's
thread and the event loop, which stalls both.

The common case is a batch of points none of which is stored yet. It is written
without RETURNING inside a savepoint: when the insert's row count says every point
was new, the rollups merge the batch's own aggregates; otherwise the savepoint is
rolled back and the batch takes the exact path (RETURNING says which points were
new, rewrites recompute their buckets from raw data).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from plantwatch.telemetry.rollups import HOUR_MS, MINUTE_MS, Agg, aggregate, merge

# Rows per SQLite statement: at most 1024, and otherwise a power of two, so a few dozen
# distinct statements cover every batch and stay in the connection's statement cache.
# Preparing a multi-row VALUES statement costs more than running it (~1.2 us a row
# against ~0.4), and statements of 128-1024 rows run faster than bigger ones.
_SQLITE_ROWS = 1024


# (series_id, factory_id, device_id, ts, value, text)
LatestValues = tuple[int, int, int, int, float | None, str | None]

_ROLLUP_COLUMNS = "series_id, bucket, cnt, total, vmin, vmax, first_ts, vfirst, last_ts, vlast"


def _merge_sql(table: str, least: str, greatest: str) -> str:
    t = table
    return (
        f"ON CONFLICT (series_id, bucket) DO UPDATE SET "
        f"cnt = {t}.cnt + excluded.cnt, total = {t}.total + excluded.total, "
        f"vmin = {least}({t}.vmin, excluded.vmin), vmax = {greatest}({t}.vmax, excluded.vmax), "
        f"vfirst = CASE WHEN excluded.first_ts < {t}.first_ts THEN excluded.vfirst "
        f"ELSE {t}.vfirst END, "
        f"first_ts = {least}({t}.first_ts, excluded.first_ts), "
        f"vlast = CASE WHEN excluded.last_ts >= {t}.last_ts THEN excluded.vlast "
        f"ELSE {t}.vlast END, "
        f"last_ts = {greatest}({t}.last_ts, excluded.last_ts)"
    )


def _replace_sql(table: str) -> str:
    return (
        "ON CONFLICT (series_id, bucket) DO UPDATE SET cnt = excluded.cnt, "
        "total = excluded.total, vmin = excluded.vmin, vmax = excluded.vmax, "
        "first_ts = excluded.first_ts, vfirst = excluded.vfirst, "
        "last_ts = excluded.last_ts, vlast = excluded.vlast"
    )


@dataclass
class WriteResult:
    inserted: int = 0
    rewritten: int = 0
    duplicates: int = 0


@dataclass(frozen=True)
class LatestRow:
    series_id: int
    factory_id: int
    device_id: int
    ts: int
    value: float | None
    text: str | None


class _Dialect(ABC):
    """The statements one backend needs; each backend writes its own fast paths."""

    # Numbered placeholder prefix: `?1` on SQLite, `$1` on PostgreSQL.
    param = "?"

    @abstractmethod
    async def insert_all(
        self,
        conn: AsyncConnection,
        series: Sequence[int],
        stamps: Sequence[int],
        values: Sequence[float],
    ) -> int:
        """Insert rows expected not to exist yet, without RETURNING. Returns how many were
        inserted, or -1 when the statement failed on a stored row (the caller rolls back
        to its savepoint)."""

    @abstractmethod
    async def insert_new(
        self, conn: AsyncConnection, rows: Sequence[tuple[int, int, float]]
    ) -> set[tuple[int, int]]:
        """Insert rows that don't exist yet; return the keys that were inserted."""

    @abstractmethod
    async def upsert_rollups(
        self,
        conn: AsyncConnection,
        table: str,
        aggs: dict[tuple[int, int], Agg],
        *,
        replace: bool,
    ) -> None:
        """Merge partial aggregates into a rollup table (or replace buckets outright)."""

    @abstractmethod
    async def upsert_latest(self, conn: AsyncConnection, rows: Sequence[LatestValues]) -> None:
        """Upsert latest values unless the stored one is newer."""

    async def merge_batch(
        self,
        conn: AsyncConnection,
        minute: dict[tuple[int, int], Agg],
        hour: dict[tuple[int, int], Agg],
        latest: Sequence[LatestValues],
    ) -> None:
        """Merge new points' aggregates into both rollups and upsert latest values."""
        await self.upsert_rollups(conn, "telemetry_1m", minute, replace=False)
        await self.upsert_rollups(conn, "telemetry_1h", hour, replace=False)
        if latest:
            await self.upsert_latest(conn, latest)


def _row_chunks(total: int) -> Iterator[tuple[int, int]]:
    """(start, size) pieces of `total` rows: full pieces of _SQLITE_ROWS, then the rest
    in falling powers of two (2500 -> 1024, 1024, 256, 128, 64, 4)."""
    start, size = 0, _SQLITE_ROWS
    while start < total:
        while size > total - start:
            size //= 2
        yield start, size
        start += size


@lru_cache(maxsize=256)
def _values_sql(head: str, width: int, rows: int, tail: str) -> str:
    """`head VALUES (?,..),(?,..) tail` for `rows` rows of `width` columns."""
    one = "(" + ",".join("?" * width) + ")"
    return f"{head} VALUES {','.join([one] * rows)} {tail}"


_RAW_HEAD = "INSERT INTO telemetry_raw (series_id, ts, value)"
_UNIQUE_VIOLATION = "23505"
_RAW_NOTHING = "ON CONFLICT (series_id, ts) DO NOTHING"
_LATEST_HEAD = "INSERT INTO series_latest (series_id, factory_id, device_id, ts, value, text)"
_LATEST_TAIL = (
    "ON CONFLICT (series_id) DO UPDATE SET ts = excluded.ts, value = excluded.value, "
    "text = excluded.text WHERE excluded.ts >= series_latest.ts"
)


# One SQL statement and its parameters.
Statement = tuple[str, tuple[Any, ...]]


def _sqlite_raw_statements(
    series: Sequence[int], stamps: Sequence[int], values: Sequence[float], tail: str
) -> list[Statement]:
    statements = []
    for start, size in _row_chunks(len(series)):
        end = start + size
        flat = tuple(
            chain.from_iterable(
                zip(series[start:end], stamps[start:end], values[start:end], strict=True)
            )
        )
        statements.append((_values_sql(_RAW_HEAD, 3, size, tail), flat))
    return statements


def _sqlite_rollup_statements(
    table: str, aggs: dict[tuple[int, int], Agg], *, replace: bool
) -> list[Statement]:
    head = f"INSERT INTO {table} ({_ROLLUP_COLUMNS})"
    tail = _replace_sql(table) if replace else _merge_sql(table, "min", "max")
    items = list(aggs.items())
    statements = []
    for start, size in _row_chunks(len(items)):
        # (key, agg), (key, agg), ... -> series_id, bucket, cnt, ..., series_id, ...
        flat = tuple(chain.from_iterable(chain.from_iterable(items[start : start + size])))
        statements.append((_values_sql(head, 10, size, tail), flat))
    return statements


def _sqlite_latest_statements(rows: Sequence[LatestValues]) -> list[Statement]:
    return [
        (
            _values_sql(_LATEST_HEAD, 6, size, _LATEST_TAIL),
            tuple(chain.from_iterable(rows[start : start + size])),
        )
        for start, size in _row_chunks(len(rows))
    ]


class _SQLite(_Dialect):
    async def insert_all(
        self,
        conn: AsyncConnection,
        series: Sequence[int],
        stamps: Sequence[int],
        values: Sequence[float],
    ) -> int:
        inserted = 0
        for sql, params in _sqlite_raw_statements(series, stamps, values, _RAW_NOTHING):
            result = await conn.exec_driver_sql(sql, params)
            inserted += result.rowcount
        return inserted

    async def insert_new(
        self, conn: AsyncConnection, rows: Sequence[tuple[int, int, float]]
    ) -> set[tuple[int, int]]:
        inserted: set[tuple[int, int]] = set()
        for start, size in _row_chunks(len(rows)):
            sql = _values_sql(_RAW_HEAD, 3, size, _RAW_NOTHING + " RETURNING series_id, ts")
            flat = tuple(chain.from_iterable(rows[start : start + size]))
            result = await conn.exec_driver_sql(sql, flat)
            returned: list[Any] = list(result.all())
            inserted.update((r[0], r[1]) for r in returned)
        return inserted

    async def upsert_rollups(
        self,
        conn: AsyncConnection,
        table: str,
        aggs: dict[tuple[int, int], Agg],
        *,
        replace: bool,
    ) -> None:
        for sql, params in _sqlite_rollup_statements(table, aggs, replace=replace):
            await conn.exec_driver_sql(sql, params)

    async def upsert_latest(self, conn: AsyncConnection, rows: Sequence[LatestValues]) -> None:
        for sql, params in _sqlite_latest_statements(rows):
            await conn.exec_driver_sql(sql, params)


class _Postgres(_Dialect):
    param = "$"

    async def insert_all(
        self,
        conn: AsyncConnection,
        series: Sequence[int],
        stamps: Sequence[int],
        values: Sequence[float],
    ) -> int:
        # COPY, the server's fastest way in (the benchmark's raw baseline), into the
        # partitioned table inside our transaction. It cannot skip stored rows: one
        # fails it with a unique violation, and the caller takes the exact path.
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        try:
            await driver.copy_records_to_table(
                "telemetry_raw",
                records=zip(series, stamps, values, strict=True),
                columns=("series_id", "ts", "value"),
            )
        except Exception as exc:
            if getattr(exc, "sqlstate", None) == _UNIQUE_VIOLATION:
                return -1
            raise
        return len(series)

    async def insert_new(
        self, conn: AsyncConnection, rows: Sequence[tuple[int, int, float]]
    ) -> set[tuple[int, int]]:
        series, stamps, values = zip(*rows, strict=True)
        result = await conn.exec_driver_sql(
            "INSERT INTO telemetry_raw (series_id, ts, value) "
            "SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::float8[]) "
            "ON CONFLICT (series_id, ts) DO NOTHING RETURNING series_id, ts",
            (list(series), list(stamps), list(values)),
        )
        returned: list[Any] = list(result.all())
        return {(r[0], r[1]) for r in returned}

    async def upsert_rollups(
        self,
        conn: AsyncConnection,
        table: str,
        aggs: dict[tuple[int, int], Agg],
        *,
        replace: bool,
    ) -> None:
        if not aggs:
            return
        tail = _replace_sql(table) if replace else _merge_sql(table, "LEAST", "GREATEST")
        await conn.exec_driver_sql(
            f"INSERT INTO {table} ({_ROLLUP_COLUMNS}) {_pg_rollup_unnest(1)} {tail}",
            _pg_rollup_columns(aggs),
        )

    async def upsert_latest(self, conn: AsyncConnection, rows: Sequence[LatestValues]) -> None:
        if not rows:
            return
        await conn.exec_driver_sql(
            f"{_LATEST_HEAD} {_pg_latest_unnest(1)} {_LATEST_TAIL}", _pg_latest_columns(rows)
        )

    async def merge_batch(
        self,
        conn: AsyncConnection,
        minute: dict[tuple[int, int], Agg],
        hour: dict[tuple[int, int], Agg],
        latest: Sequence[LatestValues],
    ) -> None:
        # One round trip: each statement of a batch waits for the server and then for
        # the event loop, so three upserts as data-modifying CTEs of one statement.
        await conn.exec_driver_sql(
            _PG_MERGE_BATCH,
            (
                *_pg_rollup_columns(minute),
                *_pg_rollup_columns(hour),
                *_pg_latest_columns(latest),
            ),
        )


def _pg_rollup_unnest(first: int) -> str:
    # series_id, bucket, cnt, total, vmin, vmax, first_ts, vfirst, last_ts, vlast
    types = [
        "bigint",
        "bigint",
        "int",
        "float8",
        "float8",
        "float8",
        "bigint",
        "float8",
        "bigint",
        "float8",
    ]
    arrays = ", ".join(f"${first + i}::{t}[]" for i, t in enumerate(types))
    return f"SELECT * FROM unnest({arrays})"


def _pg_latest_unnest(first: int) -> str:
    types = ["bigint", "bigint", "bigint", "bigint", "float8", "text"]
    arrays = ", ".join(f"${first + i}::{t}[]" for i, t in enumerate(types))
    return f"SELECT * FROM unnest({arrays})"


def _pg_rollup_columns(aggs: dict[tuple[int, int], Agg]) -> tuple[list[Any], ...]:
    columns: tuple[list[Any], ...] = tuple([] for _ in range(10))
    for (sid, bucket), agg in aggs.items():
        columns[0].append(sid)
        columns[1].append(bucket)
        columns[2].append(int(agg[0]))
        columns[3].append(agg[1])
        columns[4].append(agg[2])
        columns[5].append(agg[3])
        columns[6].append(int(agg[4]))
        columns[7].append(agg[5])
        columns[8].append(int(agg[6]))
        columns[9].append(agg[7])
    return columns


def _pg_latest_columns(rows: Sequence[LatestValues]) -> tuple[list[Any], ...]:
    if not rows:
        return ([], [], [], [], [], [])
    return tuple(list(c) for c in zip(*rows, strict=True))


_PG_MERGE_BATCH = (
    f"WITH m AS (INSERT INTO telemetry_1m ({_ROLLUP_COLUMNS}) {_pg_rollup_unnest(1)} "
    f"{_merge_sql('telemetry_1m', 'LEAST', 'GREATEST')}), "
    f"h AS (INSERT INTO telemetry_1h ({_ROLLUP_COLUMNS}) {_pg_rollup_unnest(11)} "
    f"{_merge_sql('telemetry_1h', 'LEAST', 'GREATEST')}) "
    f"{_LATEST_HEAD} {_pg_latest_unnest(21)} {_LATEST_TAIL}"
)


def _sqlite_batch_in_thread(
    dbapi: Any, inserts: Sequence[Statement], total: int, rest: Sequence[Statement]
) -> bool:
    """Runs in the SQLite driver's own thread: one transaction, no round trips."""
    dbapi.execute("BEGIN")
    try:
        inserted = 0
        for sql, params in inserts:
            inserted += dbapi.execute(sql, params).rowcount
        if inserted != total:
            dbapi.execute("ROLLBACK")
            return False
        for sql, params in rest:
            dbapi.execute(sql, params)
        dbapi.execute("COMMIT")
        return True
    except BaseException:
        if dbapi.in_transaction:
            dbapi.execute("ROLLBACK")
        raise


async def write_batch_in_one_step(
    conn: AsyncConnection,
    series: Sequence[int],
    stamps: Sequence[int],
    values: Sequence[float],
    minute: dict[tuple[int, int], Agg],
    hour: dict[tuple[int, int], Agg],
    latest: Sequence[LatestValues],
    extra: Sequence[Statement] = (),
) -> bool | None:
    """SQLite: store a batch as `write_distinct_points` + `write_latest_values` would,
    plus `extra` statements, as one transaction run entirely in the driver's thread.

    `conn` must not be in a transaction (this one begins and commits its own). Every
    statement of a batch otherwise costs a round trip to that thread, and each resumes
    only when the event loop gets to it — behind whatever parsing is queued there — so
    the database would sit idle between statements.

    Returns True once committed; False, having changed nothing, when some point was
    already stored (the caller takes the exact path); None when the driver does not
    offer its thread (then nothing was done either).
    """
    if conn.dialect.name != "sqlite" or conn.in_transaction():
        return None
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    # aiosqlite's queue to its thread and its sqlite3 connection: not public API, but
    # what SQLAlchemy's own aiosqlite dialect uses too. Absent: the caller goes the
    # statement-by-statement way.
    run = getattr(driver, "_execute", None)
    dbapi = getattr(driver, "_conn", None)
    if run is None or dbapi is None:
        return None
    inserts = _sqlite_raw_statements(series, stamps, values, _RAW_NOTHING)
    rest = [
        *_sqlite_rollup_statements("telemetry_1m", minute, replace=False),
        *_sqlite_rollup_statements("telemetry_1h", hour, replace=False),
        *_sqlite_latest_statements(latest),
        *extra,
    ]
    done: bool = await run(_sqlite_batch_in_thread, dbapi, inserts, len(series), rest)
    return done


def _coarsen(aggs: dict[tuple[int, int], Agg], bucket_ms: int) -> dict[tuple[int, int], Agg]:
    """Aggregates of finer buckets (of distinct points) merged into coarser buckets."""
    out: dict[tuple[int, int], Agg] = {}
    for (series_id, bucket), agg in aggs.items():
        key = (series_id, bucket - bucket % bucket_ms)
        into = out.get(key)
        if into is None:
            out[key] = list(agg)
        else:
            merge(into, agg)
    return out


def dialect_for(conn: AsyncConnection) -> _Dialect:
    return _Postgres() if conn.dialect.name == "postgresql" else _SQLite()


async def write_points(
    conn: AsyncConnection, points: Iterable[tuple[int, int, float]]
) -> WriteResult:
    """Store points (series_id, ts_ms, value) in the caller's transaction."""
    latest_value: dict[tuple[int, int], float] = {}
    for series_id, ts, value in points:
        latest_value[(series_id, ts)] = value  # within one batch, the last write wins
    if not latest_value:
        return WriteResult()
    keys = list(latest_value)
    series = [k[0] for k in keys]
    stamps = [k[1] for k in keys]
    return await write_distinct_points(conn, series, stamps, list(latest_value.values()))


async def write_distinct_points(
    conn: AsyncConnection,
    series: Sequence[int],
    stamps: Sequence[int],
    values: Sequence[float],
    minute: dict[tuple[int, int], Agg] | None = None,
    hour: dict[tuple[int, int], Agg] | None = None,
    *,
    latest: Sequence[LatestValues] = (),
) -> WriteResult:
    """Store points given as columns, no two with the same (series, ts), in the caller's
    transaction. `minute`/`hour`, when given, must be the 1m/1h aggregates of exactly
    these points (the ingest pipeline computes them from sorted runs); else they are
    computed here. Points already stored are handled exactly as `write_points` does.
    `latest` rows, if any, are written as `write_latest_values` would."""
    total = len(series)
    dialect = dialect_for(conn)
    if not total:
        if latest:
            await dialect.upsert_latest(conn, latest)
        return WriteResult()
    # A bare savepoint (no RELEASE needed: the commit releases it) costs one round trip.
    await conn.exec_driver_sql("SAVEPOINT pw_points")
    inserted = await dialect.insert_all(conn, series, stamps, values)
    if inserted == total:
        if minute is None or hour is None:
            minute = aggregate(zip(series, stamps, values, strict=True), MINUTE_MS)
            hour = _coarsen(minute, HOUR_MS)
        await dialect.merge_batch(conn, minute, hour, latest)
        return WriteResult(inserted=total)
    rows = list(zip(series, stamps, values, strict=True))
    if inserted == 0:
        # Nothing was new (a redelivery on SQLite): nothing changed, all are conflicts.
        conflicts = rows
        result = WriteResult()
    else:
        # Some were new, or the insert failed on a stored row: undo, and insert again
        # learning which are new.
        await conn.exec_driver_sql("ROLLBACK TO SAVEPOINT pw_points")
        keys = await dialect.insert_new(conn, rows)
        result = WriteResult(inserted=len(keys))
        new_rows = [r for r in rows if (r[0], r[1]) in keys]
        conflicts = [r for r in rows if (r[0], r[1]) not in keys]
        minute = aggregate(new_rows, MINUTE_MS)
        await dialect.upsert_rollups(conn, "telemetry_1m", minute, replace=False)
        await dialect.upsert_rollups(conn, "telemetry_1h", _coarsen(minute, HOUR_MS), replace=False)
    rewritten = await _apply_rewrites(conn, dialect, conflicts)
    result.rewritten = len(rewritten)
    result.duplicates = len(conflicts) - len(rewritten)
    if latest:
        await dialect.upsert_latest(conn, latest)
    return result


async def _apply_rewrites(
    conn: AsyncConnection, dialect: _Dialect, conflicts: Sequence[tuple[int, int, float]]
) -> list[tuple[int, int, float]]:
    """Replace changed values and recompute the buckets they sit in from raw data."""
    p = [f"{dialect.param}{i}" for i in (1, 2, 3)]
    rewritten: list[tuple[int, int, float]] = []
    for sid, ts, value in conflicts:
        result = await conn.exec_driver_sql(
            f"UPDATE telemetry_raw SET value = {p[0]} WHERE series_id = {p[1]} "
            f"AND ts = {p[2]} AND value <> {p[0]} RETURNING series_id",
            (value, sid, ts),
        )
        if result.first() is not None:
            rewritten.append((sid, ts, value))
    if not rewritten:
        return rewritten
    minutes = {(sid, ts - ts % MINUTE_MS) for sid, ts, _ in rewritten}
    recomputed: dict[tuple[int, int], Agg] = {}
    for sid, bucket in minutes:
        raw = await conn.exec_driver_sql(
            f"SELECT series_id, ts, value FROM telemetry_raw WHERE series_id = {p[0]} "
            f"AND ts >= {p[1]} AND ts < {p[2]}",
            (sid, bucket, bucket + MINUTE_MS),
        )
        raw_rows: list[Any] = list(raw.all())
        recomputed.update(aggregate(((r[0], r[1], r[2]) for r in raw_rows), MINUTE_MS))
    await dialect.upsert_rollups(conn, "telemetry_1m", recomputed, replace=True)
    hours = {(sid, bucket - bucket % HOUR_MS) for sid, bucket in minutes}
    hourly: dict[tuple[int, int], Agg] = {}
    for sid, hour in hours:
        minute_rows = await conn.exec_driver_sql(
            f"SELECT cnt, total, vmin, vmax, first_ts, vfirst, last_ts, vlast FROM telemetry_1m "
            f"WHERE series_id = {p[0]} AND bucket >= {p[1]} AND bucket < {p[2]}",
            (sid, hour, hour + HOUR_MS),
        )
        total: Agg | None = None
        for row in minute_rows.all():
            if total is None:
                total = list(row)
            else:
                merge(total, list(row))
        if total is not None:
            hourly[(sid, hour)] = total
    await dialect.upsert_rollups(conn, "telemetry_1h", hourly, replace=True)
    return rewritten


async def write_latest(conn: AsyncConnection, rows: Sequence[LatestRow]) -> None:
    """Upsert latest values; an older point never overwrites a newer one."""
    await write_latest_values(
        conn, [(r.series_id, r.factory_id, r.device_id, r.ts, r.value, r.text) for r in rows]
    )


async def write_latest_values(conn: AsyncConnection, rows: Sequence[LatestValues]) -> None:
    """`write_latest` for plain tuples (series_id, factory_id, device_id, ts, value, text),
    at most one per series."""
    if rows:
        await dialect_for(conn).upsert_latest(conn, rows)
