"""Telemetry import (CSV / Parquet backfill) and export (CSV / NDJSON / Parquet, streamed).

Import
------
A file is one table in one of two layouts, told apart by its header:

- **wide**: ``device_key, timestamp, <one column per parameter>``;
- **long**: exactly the columns ``device_key, parameter, timestamp, value`` (any
  order) — what export writes, so an export imports back unchanged.

Timestamps are ISO-8601 (an offset or ``Z``; without one the time is read as
UTC) or epoch milliseconds. Empty cells are skipped. A parameter whose cells
include a number (or ``true``/``false``) is numeric: its numbers are stored as
samples (ints and bools as numbers, recorded as ``int``/``bool`` data types on
discovery), and a text cell in it is a bad cell. A parameter with only text
cells is a state tag (its newest text is the latest value). Parquet columns are
typed by their Arrow type instead.

Every row goes through `IngestPipeline.ingest`, in chunks of `CHUNK_ROWS` rows
(one payload per device per chunk) with the skew limits lifted, so discovery,
rollups, latest values, dedup and dead letters behave exactly as for live
traffic. Rows for devices the factory does not have become `unknown_device`
dead letters (source ``import``), bad cells and bad rows become per-point
dead letters with their reason; nothing is dropped silently.

Export
------
Raw samples ``(device_key, parameter, timestamp, value)`` of one factory, series
by series in time order, read in keyset-paginated pages (`EXPORT_PAGE_ROWS`) on
short connections and encoded page by page, so an export of any size streams
in bounded memory. State tags are not history (only their latest value is
kept), so they are not exported.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import functools
import io
import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Literal

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from plantwatch.assets.models import Device, DeviceParameter
from plantwatch.core.db import Database
from plantwatch.core.errors import NotFound, Problem
from plantwatch.telemetry import payloads
from plantwatch.telemetry.pipeline import DeviceRef, IngestOutcome, IngestPipeline
from plantwatch.telemetry.service import DEVICE_INACTIVE, UNKNOWN_DEVICE

if TYPE_CHECKING:
    from types import ModuleType

SOURCE = "import"
CHUNK_ROWS = 5_000
EXPORT_PAGE_ROWS = 10_000
PARQUET_MAGIC = b"PAR1"
MAX_UNKNOWN_LISTED = 50
# Reason for a cell that cannot be read as its column's type (or a row that cannot be
# read at all); the same codes live ingest uses.
BAD_CELL = payloads.INVALID_VALUE_TYPE
BAD_ROW = payloads.INVALID_SHAPE

ImportFormat = Literal["csv", "parquet"]
ExportFormat = Literal["csv", "json", "parquet"]
Layout = Literal["wide", "long"]

EXPORT_MEDIA_TYPES: dict[str, str] = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
}
EXPORT_SUFFIXES: dict[str, str] = {"csv": "csv", "json": "ndjson", "parquet": "parquet"}

_DEVICE, _TIMESTAMP, _PARAMETER, _VALUE = "device_key", "timestamp", "parameter", "value"
_LONG_COLUMNS = frozenset({_DEVICE, _PARAMETER, _TIMESTAMP, _VALUE})
_INT = re.compile(r"[+-]?\d+\Z")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")
_NON_FINITE = frozenset(
    {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}
)
_BOOLS = {"true": True, "false": False}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MAX_MS = 253402300799999  # 9999-12-31T23:59:59.999Z, the parser's upper bound


class ImportFileError(Problem):
    """The file as a whole cannot be imported (unreadable, no header, missing columns)."""

    status, code, title = 422, "invalid_import_file", "Invalid import file"


class ParquetUnavailable(Problem):
    status, code, title = 501, "parquet_unavailable", "Parquet support is not installed"

    def __init__(self) -> None:
        super().__init__("Parquet needs pyarrow: install plantwatch[parquet]")


def _pyarrow() -> tuple[ModuleType, ModuleType]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ParquetUnavailable() from None
    return pyarrow, pyarrow.parquet


def parquet_available() -> bool:
    try:
        _pyarrow()
    except ParquetUnavailable:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def _minute_prefix(minute: int) -> str:
    return (_EPOCH + dt.timedelta(minutes=minute)).strftime("%Y-%m-%dT%H:%M:")


def iso_ms(ms: int) -> str:
    """Epoch milliseconds as ISO-8601 UTC with milliseconds: 2026-02-19T10:30:00.000Z."""
    minute, rest = divmod(ms, 60_000)  # exports run in time order: the minute is cached
    return f"{_minute_prefix(minute)}{rest // 1000:02d}.{rest % 1000:03d}Z"


def parse_time(value: str) -> int | None:
    """A user-given instant (ISO-8601, UTC without offset, or epoch ms) -> epoch ms."""
    text = value.strip()
    if _INT.match(text):
        return payloads.parse_timestamp(int(text), millis=True)
    return payloads.parse_timestamp(text, millis=False)


# --- import: reading cells ---------------------------------------------------------------


@dataclass(frozen=True)
class BadCell:
    """A cell that cannot be read as its column's type: becomes a dead letter."""

    text: str
    detail: str


@dataclass
class _Row:
    line: int
    device_key: str
    ts: int | str  # epoch ms, or the unusable original (the parser rejects it)
    values: list[tuple[str, Any]]  # (parameter, float | int | bool | str | BadCell)


@dataclass
class _RowError:
    line: int
    device_key: str
    detail: str
    raw: Any


@dataclass
class _Chunk:
    rows: list[_Row] = field(default_factory=list)
    row_errors: list[_RowError] = field(default_factory=list)
    count: int = 0  # data rows read, good or bad


def _timestamp(value: Any) -> int | str:
    """A timestamp cell -> epoch ms, or the cell as text when it is not a usable one."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return int((value - _EPOCH) // dt.timedelta(milliseconds=1))
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float):
        ms = payloads.parse_timestamp(value, millis=True)
        return str(value) if ms is None else ms
    text = str(value).strip()
    if _INT.match(text):
        ms = payloads.parse_timestamp(int(text), millis=True)
    elif _FLOAT.match(text):
        ms = payloads.parse_timestamp(float(text), millis=True)
    else:
        ms = payloads.parse_timestamp(text, millis=False)
    return text if ms is None else ms


class _TextKind:
    """What a text column (or a long-layout parameter) holds, judged from all its cells."""

    __slots__ = ("bools", "floats", "ints", "texts")

    def __init__(self) -> None:
        self.bools = self.ints = self.floats = self.texts = False

    def see(self, cell: str) -> None:
        text = cell.strip()
        low = text.lower()
        if low in _BOOLS:
            self.bools = True
        elif _INT.match(text):
            self.ints = True
        elif _FLOAT.match(text) or low in _NON_FINITE:
            self.floats = True
        else:
            self.texts = True

    @property
    def kind(self) -> str:
        if not (self.bools or self.ints or self.floats):
            return "string"
        if self.floats or (self.ints and self.bools):
            return "float"
        return "int" if self.ints else "bool"


def _convert(cell: str, kind: str) -> Any:
    """A non-empty text cell as a value of its column's kind (or a BadCell)."""
    if kind == "string":
        return cell
    text = cell.strip()
    low = text.lower()
    if low in _BOOLS:
        flag = _BOOLS[low]
        return flag if kind == "bool" else (float(flag) if kind == "float" else int(flag))
    if kind == "int" and _INT.match(text):
        return int(text)
    if kind in ("int", "float") and (_FLOAT.match(text) or low in _NON_FINITE):
        return float(text)
    return BadCell(cell, f"'{cell[:60]}' is not a {'number' if kind != 'bool' else 'bool'}")


def _header(names: Sequence[str]) -> tuple[Layout, dict[str, int]]:
    cleaned = [n.strip() for n in names]
    lowered = [n.lower() for n in cleaned]
    seen: set[str] = set()
    for name in cleaned:
        if not name:
            raise ImportFileError("the header has an empty column name")
        if name in seen:
            raise ImportFileError(f"the header names column '{name[:100]}' twice")
        seen.add(name)
    if set(lowered) == _LONG_COLUMNS:
        return "long", {n: lowered.index(n) for n in _LONG_COLUMNS}
    for required in (_DEVICE, _TIMESTAMP):
        if required not in lowered:
            raise ImportFileError(
                f"the header has no '{required}' column (need device_key, timestamp and one "
                "column per parameter, or device_key, parameter, timestamp, value)"
            )
    index = {_DEVICE: lowered.index(_DEVICE), _TIMESTAMP: lowered.index(_TIMESTAMP)}
    for i, name in enumerate(cleaned):
        if i not in index.values():
            index[name] = i
    return "wide", index


class _Source(ABC):
    """Reads an import file as chunks of rows."""

    format: ImportFormat
    layout: Layout

    @abstractmethod
    def chunks(self, size: int) -> Iterator[_Chunk]:
        """The file's rows, `size` at a time."""


class _CsvSource(_Source):
    format: ImportFormat = "csv"

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self._start = fh.tell()
        reader = self._reader()
        try:
            names = next(reader, None)
            if names is None:
                raise ImportFileError("the file is empty")
            self.layout, self.index = _header(names)
            self.kinds = self._scan(reader)
        finally:
            reader.close()

    def _reader(self) -> Generator[list[str], None, None]:
        self.fh.seek(self._start)
        text = io.TextIOWrapper(self.fh, encoding="utf-8-sig", newline="")
        try:
            yield from csv.reader(text, strict=True)
        except UnicodeDecodeError as exc:
            raise ImportFileError(f"not UTF-8 text (nor a Parquet file): {exc.reason}") from None
        except csv.Error as exc:
            raise ImportFileError(f"unreadable CSV: {exc}") from None
        finally:
            with contextlib.suppress(ValueError):  # the file was closed first
                text.detach()  # never close the caller's file

    def _scan(self, reader: Iterator[list[str]]) -> dict[str, str]:
        """First pass: the kind of every parameter (numeric vs state) from all its cells."""
        kinds: dict[str, _TextKind] = {}
        if self.layout == "long":
            p, v = self.index[_PARAMETER], self.index[_VALUE]
            for row in reader:
                if len(row) > max(p, v) and row[v] != "":
                    kind = kinds.get(row[p].strip())
                    if kind is None:
                        kind = kinds[row[p].strip()] = _TextKind()
                    kind.see(row[v])
        else:
            columns = [
                (name, i) for name, i in self.index.items() if name not in (_DEVICE, _TIMESTAMP)
            ]
            for name, _ in columns:
                kinds[name] = _TextKind()
            for row in reader:
                width = len(row)
                for name, i in columns:
                    if i < width and row[i] != "":
                        kinds[name].see(row[i])
        return {name: k.kind for name, k in kinds.items()}

    def chunks(self, size: int) -> Iterator[_Chunk]:
        reader = self._reader()
        next(reader)  # the header
        width = max(self.index.values()) + 1
        d, t = self.index[_DEVICE], self.index[_TIMESTAMP]
        long = self.layout == "long"
        params = [(n, i) for n, i in self.index.items() if n not in (_DEVICE, _TIMESTAMP)]
        kinds = self.kinds
        chunk = _Chunk()
        line = 1
        for row in reader:
            line += 1
            if not any(row):
                continue  # a blank line, or one of empty cells
            chunk.count += 1
            key = row[d].strip() if d < len(row) else ""
            if len(row) > width and any(cell != "" for cell in row[width:]):
                chunk.row_errors.append(
                    _RowError(line, key, f"row has {len(row)} cells, the header {width}", row)
                )
            else:
                ts = _timestamp(row[t] if t < len(row) else "")
                values: list[tuple[str, Any]] = []
                if long:
                    p, v = self.index[_PARAMETER], self.index[_VALUE]
                    if v < len(row) and row[v] != "":
                        name = row[p].strip() if p < len(row) else ""
                        values.append((name, _convert(row[v], kinds.get(name, "string"))))
                else:
                    n = len(row)
                    for name, i in params:
                        if i < n and row[i] != "":
                            values.append((name, _convert(row[i], kinds[name])))
                chunk.rows.append(_Row(line, key, ts, values))
            if chunk.count >= size:
                yield chunk
                chunk = _Chunk()
        if chunk.count:
            yield chunk


class _ParquetSource(_Source):
    format: ImportFormat = "parquet"

    def __init__(self, fh: IO[bytes]) -> None:
        self.pa, pq = _pyarrow()
        try:
            self.file = pq.ParquetFile(fh)
            names = list(self.file.schema_arrow.names)
        except (self.pa.ArrowException, OSError) as exc:
            raise ImportFileError(f"unreadable Parquet file: {exc}") from None
        self.layout, self.index = _header(names)
        self.names = names
        self.kinds: dict[str, str] = {}
        # device_key -> parameter -> "int" | "bool", written by our own export
        self.data_types: dict[str, dict[str, str]] = {}
        if self.layout == "long":
            self.data_types = _data_types_of(self.file.schema_arrow.metadata)
            value_type = self.file.schema_arrow.field(self.index[_VALUE]).type
            if self._is_text(value_type):
                self.kinds = self._scan_long()

    def _is_text(self, arrow_type: Any) -> bool:
        types = self.pa.types
        if types.is_dictionary(arrow_type):
            arrow_type = arrow_type.value_type
        return bool(types.is_string(arrow_type) or types.is_large_string(arrow_type))

    def _scan_long(self) -> dict[str, str]:
        kinds: dict[str, _TextKind] = {}
        p, v = self.names[self.index[_PARAMETER]], self.names[self.index[_VALUE]]
        for batch in self._batches(CHUNK_ROWS, [p, v]):
            for name, cell in zip(*(c.to_pylist() for c in batch.columns), strict=True):
                if cell is not None and cell != "":
                    kinds.setdefault(str(name).strip(), _TextKind()).see(str(cell))
        return {name: k.kind for name, k in kinds.items()}

    def _batches(self, size: int, columns: list[str] | None = None) -> Iterator[Any]:
        try:
            yield from self.file.iter_batches(batch_size=size, columns=columns)
        except (self.pa.ArrowException, OSError) as exc:
            raise ImportFileError(f"unreadable Parquet data: {exc}") from None

    def _column(self, array: Any, text_kind: str | None) -> list[Any]:
        """An Arrow column as Python values: numbers, bools, state texts or BadCells."""
        types = self.pa.types
        kind = array.type
        if types.is_dictionary(kind):
            array = array.dictionary_decode()
            kind = array.type
        if types.is_boolean(kind) or types.is_integer(kind) or types.is_floating(kind):
            values: list[Any] = array.to_pylist()
            return values
        if types.is_decimal(kind):
            return [None if v is None else float(v) for v in array.to_pylist()]
        if types.is_string(kind) or types.is_large_string(kind):
            cells: list[Any] = array.to_pylist()
            if text_kind is None:
                return [None if c == "" else c for c in cells]
            return [None if c is None or c == "" else _convert(c, text_kind) for c in cells]
        detail = f"Parquet type {kind} is not a number, bool or string"
        return [None if v is None else BadCell(str(v)[:100], detail) for v in array.to_pylist()]

    def _timestamps(self, array: Any) -> list[Any]:
        pa, types = self.pa, self.pa.types
        kind = array.type
        if types.is_timestamp(kind):
            ms = array.cast(pa.timestamp("ms", tz=kind.tz)).cast(pa.int64())
            return [None if v is None else int(v) for v in ms.to_pylist()]
        if types.is_date(kind):
            ms = array.cast(pa.date64()).cast(pa.int64())
            return [None if v is None else int(v) for v in ms.to_pylist()]
        if types.is_dictionary(kind):
            array = array.dictionary_decode()
        values: list[Any] = array.to_pylist()
        return values

    def chunks(self, size: int) -> Iterator[_Chunk]:
        names = self.names
        d, t = self.index[_DEVICE], self.index[_TIMESTAMP]
        line = 1
        for batch in self._batches(size):
            chunk = _Chunk(count=batch.num_rows)
            keys = [None if k is None else str(k).strip() for k in batch.column(d).to_pylist()]
            stamps = [_timestamp(v) for v in self._timestamps(batch.column(t))]
            if self.layout == "long":
                p, v = self.index[_PARAMETER], self.index[_VALUE]
                text_kinds = self.kinds
                params = [
                    None if x is None else str(x).strip() for x in batch.column(p).to_pylist()
                ]
                raw_values = batch.column(v)
                if text_kinds:
                    cells = raw_values.to_pylist()
                    values = [
                        None
                        if c is None or c == ""
                        else _convert(c, text_kinds.get(params[i] or "", "string"))
                        for i, c in enumerate(cells)
                    ]
                else:
                    values = self._column(raw_values, None)
                    if self.data_types:
                        values = [
                            _as_type(
                                value, self.data_types.get(keys[i] or "", {}).get(params[i] or "")
                            )
                            for i, value in enumerate(values)
                        ]
                for i in range(batch.num_rows):
                    value = values[i]
                    row_values = [] if value is None else [(params[i] or "", value)]
                    chunk.rows.append(_Row(line + i + 1, keys[i] or "", stamps[i], row_values))
            else:
                columns = [
                    (names[i], self._column(batch.column(i), None))
                    for i in range(len(names))
                    if i not in (d, t)
                ]
                for i in range(batch.num_rows):
                    row_values = [(name, col[i]) for name, col in columns if col[i] is not None]
                    chunk.rows.append(_Row(line + i + 1, keys[i] or "", stamps[i], row_values))
            line += batch.num_rows
            yield chunk


PARQUET_METADATA_KEY = b"plantwatch"


def _data_types_of(metadata: dict[bytes, bytes] | None) -> dict[str, dict[str, str]]:
    """The data types our export records in a Parquet file's metadata (or none)."""
    try:
        found = json.loads((metadata or {})[PARQUET_METADATA_KEY])["data_types"]
    except (KeyError, ValueError, TypeError):
        return {}
    if not isinstance(found, dict):
        return {}
    return {
        str(device): {str(k): str(v) for k, v in params.items()}
        for device, params in found.items()
        if isinstance(params, dict)
    }


def _as_type(value: Any, data_type: str | None) -> Any:
    """A float read back as the int or bool its parameter was exported as."""
    if not isinstance(value, float) or not math.isfinite(value):
        return value
    if data_type == "int" and value.is_integer():
        return int(value)
    if data_type == "bool" and value in (0.0, 1.0):
        return value == 1.0
    return value


def open_source(fh: IO[bytes]) -> _Source:
    """Sniff the file (Parquet by its magic bytes, else CSV) and read its header."""
    start = fh.tell()
    head = fh.read(len(PARQUET_MAGIC))
    fh.seek(start)
    if head == PARQUET_MAGIC:
        return _ParquetSource(fh)
    return _CsvSource(fh)


# --- import: feeding the pipeline -----------------------------------------------------------


@dataclass
class ImportReport:
    format: str
    layout: str
    rows: int = 0
    values_stored: int = 0
    # reason -> count: values for point rejects (bad cells, non-finite numbers), rows
    # for row rejects (unknown device, bad timestamp, unreadable row).
    rejected: dict[str, int] = field(default_factory=dict)
    devices: int = 0
    unknown_devices: list[str] = field(default_factory=list)
    first_ts: int | None = None
    last_ts: int | None = None

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def reject(self, reason: str, count: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + count

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "layout": self.layout,
            "rows": self.rows,
            "values_stored": self.values_stored,
            "rejected": self.rejected_total,
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "devices": self.devices,
            "unknown_devices": self.unknown_devices,
            "first_timestamp": None if self.first_ts is None else iso_ms(self.first_ts),
            "last_timestamp": None if self.last_ts is None else iso_ms(self.last_ts),
        }


def _encode(document: Any, *, fast: bool = True) -> bytes:
    """JSON for the pipeline. orjson writes NaN as null and refuses huge ints; the
    standard encoder keeps both as the file had them, so the parser rejects them
    with their real reason."""
    if fast:
        try:
            return orjson.dumps(document)
        except TypeError:
            pass
    return json.dumps(document, allow_nan=True, default=str).encode()


class Importer:
    """Feeds rows of one factory's file through the ingest pipeline."""

    def __init__(
        self,
        db: Database,
        pipeline: IngestPipeline,
        factory_id: int,
        *,
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        self.db = db
        self.pipeline = pipeline
        self.factory_id = factory_id
        self.chunk_rows = chunk_rows
        self.limits = payloads.backfill_limits(pipeline.limits, chunk_rows)
        # device_key -> (ref, is_active), or None when the factory has no such device
        self._devices: dict[str, tuple[DeviceRef, bool] | None] = {}
        self._stored_devices: set[str] = set()

    async def _resolve(self, keys: set[str]) -> None:
        missing = sorted(k for k in keys if k not in self._devices)
        for start in range(0, len(missing), 500):
            part = missing[start : start + 500]
            async with self.db.session() as session:
                rows = (
                    await session.execute(
                        select(Device.id, Device.device_key, Device.is_active).where(
                            Device.factory_id == self.factory_id, Device.device_key.in_(part)
                        )
                    )
                ).all()
            for device_id, key, active in rows:
                self._devices[key] = (DeviceRef(self.factory_id, device_id, key), bool(active))
            for key in part:
                self._devices.setdefault(key, None)

    async def run(
        self, source: _Source, progress: Callable[[ImportReport], None] | None = None
    ) -> ImportReport:
        report = ImportReport(source.format, source.layout)
        chunks = source.chunks(self.chunk_rows)
        while True:
            # Parsing is CPU work: keep the event loop (API, other roles) responsive.
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None:
                break
            await self._ingest(chunk, report)
            if progress is not None:
                progress(report)
        report.devices = len(self._stored_devices)
        return report

    async def _ingest(self, chunk: _Chunk, report: ImportReport) -> None:
        report.rows += chunk.count
        await self._resolve(
            {r.device_key for r in chunk.rows} | {e.device_key for e in chunk.row_errors}
        )
        # device_key -> ts -> values: rows of one instant merge into one entry
        entries: dict[str, dict[int | str, dict[str, Any]]] = {}
        rows_of: dict[str, int] = {}
        nonfinite: set[str] = set()  # devices with NaN/inf values: need the exact encoder
        bad_cells: list[tuple[_Row, str, BadCell]] = []
        for row in chunk.rows:
            values = entries.setdefault(row.device_key, {})
            rows_of[row.device_key] = rows_of.get(row.device_key, 0) + 1
            target = values.get(row.ts)
            if target is None:
                target = values[row.ts] = {}
            for name, value in row.values:
                if isinstance(value, BadCell):
                    bad_cells.append((row, name, value))
                    continue
                if isinstance(value, float) and not math.isfinite(value):
                    nonfinite.add(row.device_key)
                target[name] = value

        jobs: list[Any] = []
        outcomes_for: list[str] = []
        for key, by_ts in entries.items():
            document = [{"ts": ts, "values": values} for ts, values in by_ts.items() if values]
            known = self._devices.get(key)
            if known is None or not known[1]:
                reason = UNKNOWN_DEVICE if known is None else DEVICE_INACTIVE
                report.reject(reason, rows_of[key])
                listed = report.unknown_devices
                if known is None and key and len(listed) < MAX_UNKNOWN_LISTED and key not in listed:
                    listed.append(key)
                jobs.append(
                    self.pipeline.dead_letter(
                        factory_id=self.factory_id,
                        source=SOURCE,
                        raw=_encode(document, fast=key not in nonfinite),
                        reason=reason,
                        detail=(
                            f"{rows_of[key]} rows for device '{key[:100]}', which this factory "
                            + ("does not have" if known is None else "has decommissioned")
                            if key
                            else f"{rows_of[key]} rows without a device_key"
                        ),
                        device_key=key[:100] or None,
                        device_id=None if known is None else known[0].device_id,
                    )
                )
                continue
            ref = known[0]
            for ts in by_ts:
                if isinstance(ts, int) and by_ts[ts]:
                    report.first_ts = ts if report.first_ts is None else min(report.first_ts, ts)
                    report.last_ts = ts if report.last_ts is None else max(report.last_ts, ts)
            if document:
                jobs.append(
                    self.pipeline.ingest(
                        ref,
                        _encode(document, fast=key not in nonfinite),
                        source=SOURCE,
                        limits=self.limits,
                    )
                )
                outcomes_for.append(key)

        for row, name, bad in bad_cells:
            known = self._devices.get(row.device_key)
            if known is None or not known[1]:
                continue  # the whole row is already a dead letter of its device
            report.reject(BAD_CELL)
            jobs.append(
                self.pipeline.dead_letter(
                    factory_id=self.factory_id,
                    source=SOURCE,
                    raw=_encode({"ts": row.ts, "values": {name: bad.text}}),
                    reason=BAD_CELL,
                    detail=f"line {row.line}, {name[:100]}: {bad.detail}",
                    device_key=row.device_key[:100],
                    device_id=known[0].device_id,
                )
            )
        for error in chunk.row_errors:
            known = self._devices.get(error.device_key)
            report.reject(BAD_ROW)
            jobs.append(
                self.pipeline.dead_letter(
                    factory_id=self.factory_id,
                    source=SOURCE,
                    raw=_encode({"line": error.line, "cells": error.raw}),
                    reason=BAD_ROW,
                    detail=f"line {error.line}: {error.detail}",
                    device_key=error.device_key[:100] or None,
                    device_id=None if known is None else known[0].device_id,
                )
            )

        results = await asyncio.gather(*jobs)
        for result in results:
            if isinstance(result, IngestOutcome):
                report.values_stored += result.accepted
                for reject in result.rejects:
                    report.reject(reject.reason)
        for key, result in zip(
            outcomes_for, (r for r in results if isinstance(r, IngestOutcome)), strict=True
        ):
            if result.accepted:
                self._stored_devices.add(key)


async def import_file(
    db: Database,
    pipeline: IngestPipeline,
    factory_id: int,
    fh: IO[bytes],
    *,
    chunk_rows: int = CHUNK_ROWS,
    progress: Callable[[ImportReport], None] | None = None,
) -> ImportReport:
    """Import a CSV or Parquet file (seekable, binary) into one factory."""
    source = await asyncio.to_thread(open_source, fh)
    return await Importer(db, pipeline, factory_id, chunk_rows=chunk_rows).run(source, progress)


# --- export -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesInfo:
    series_id: int
    device_key: str
    parameter: str
    data_type: str


async def export_series(
    session: AsyncSession,
    factory_id: int,
    *,
    device_ids: Sequence[int] | None = None,
    device_keys: Sequence[str] | None = None,
    parameters: Sequence[str] | None = None,
) -> list[SeriesInfo]:
    """The factory's series to export, by device key and parameter.

    Devices named by id or key must be this factory's: another factory's device
    (or none at all) is a 404, never an empty export that hides the mistake.
    Parameters are a filter: one a device does not have just matches nothing.
    Reads in the caller's session (the request's own), so no second connection
    is opened while it holds a transaction.
    """
    stmt = (
        select(
            DeviceParameter.id, Device.device_key, DeviceParameter.key, DeviceParameter.data_type
        )
        .join(Device, Device.id == DeviceParameter.device_id)
        .where(Device.factory_id == factory_id, DeviceParameter.factory_id == factory_id)
        .order_by(Device.device_key, DeviceParameter.key)
    )
    if device_ids is not None:
        wanted = set(device_ids)
        found = set(
            (
                await session.scalars(
                    select(Device.id).where(Device.factory_id == factory_id, Device.id.in_(wanted))
                )
            ).all()
        )
        if missing := sorted(wanted - found):
            raise NotFound(f"no devices {missing}", code="device_not_found")
        stmt = stmt.where(Device.id.in_(wanted))
    if device_keys is not None:
        wanted_keys = set(device_keys)
        found_keys = set(
            (
                await session.scalars(
                    select(Device.device_key).where(
                        Device.factory_id == factory_id, Device.device_key.in_(wanted_keys)
                    )
                )
            ).all()
        )
        if missing_keys := sorted(wanted_keys - found_keys):
            raise NotFound(f"no devices {missing_keys}", code="device_not_found")
        stmt = stmt.where(Device.device_key.in_(wanted_keys))
    if parameters is not None:
        stmt = stmt.where(DeviceParameter.key.in_(set(parameters)))
    rows = (await session.execute(stmt)).all()
    return [SeriesInfo(r[0], r[1], r[2], r[3]) for r in rows]


Point = tuple[SeriesInfo, int, float]
_PAGE_SQL_SQLITE = (
    "SELECT ts, value FROM telemetry_raw WHERE series_id = ?1 AND ts > ?2 AND ts < ?3 "
    "ORDER BY ts LIMIT ?4"
)
_PAGE_SQL_PG = (
    "SELECT ts, value FROM telemetry_raw WHERE series_id = $1 AND ts > $2 AND ts < $3 "
    "ORDER BY ts LIMIT $4"
)


async def iter_points(
    db: Database,
    series: Sequence[SeriesInfo],
    start_ms: int | None = None,
    end_ms: int | None = None,
    *,
    page_rows: int = EXPORT_PAGE_ROWS,
) -> AsyncIterator[list[Point]]:
    """Raw points of `series` in [start, end), in pages of about `page_rows`.

    Keyset pagination per series on its (series_id, ts) primary key: every query
    is an index range scan, each page uses its own short connection (no
    long-running transaction), and memory stays at one page whatever the size.
    """
    lo = 0 if start_ms is None else max(0, start_ms)
    hi = _MAX_MS + 1 if end_ms is None else min(end_ms, _MAX_MS + 1)
    if lo >= hi or not series:
        return
    position = 0  # index into series
    after = lo - 1  # last ts read of series[position]
    while position < len(series):
        page: list[Point] = []
        async with db.engine.connect() as conn:
            sql = _PAGE_SQL_PG if conn.dialect.name == "postgresql" else _PAGE_SQL_SQLITE
            while position < len(series) and len(page) < page_rows:
                info = series[position]
                want = page_rows - len(page)
                result = await conn.exec_driver_sql(sql, (info.series_id, after, hi, want))
                rows: list[Any] = list(result.all())
                page.extend((info, r[0], r[1]) for r in rows)
                if len(rows) < want:
                    position += 1
                    after = lo - 1
                else:
                    after = rows[-1][0]
        if page:
            yield page


def _typed(info: SeriesInfo, value: float) -> float | int | bool:
    if info.data_type == "bool":
        return value != 0.0
    if info.data_type == "int" and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


class _Sink(io.RawIOBase):
    """A write-only stream that hands out what was written since the last drain."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def drain(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


async def encode(
    pages: AsyncIterator[list[Point]],
    fmt: ExportFormat,
    series: Sequence[SeriesInfo] = (),
) -> AsyncIterator[bytes]:
    """Encode pages of points as CSV, NDJSON or Parquet, one output chunk per page.

    CSV and NDJSON write int and bool parameters as such; Parquet's value column is
    float64, with the int/bool parameters of `series` recorded in the file's metadata.
    """
    if fmt == "parquet":
        async for chunk in _encode_parquet(pages, series):
            yield chunk
        return
    if fmt == "csv":
        yield b"device_key,parameter,timestamp,value\r\n"
    async for page in pages:
        if fmt == "csv":
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            for info, ts, value in page:
                typed = _typed(info, value)
                cell = ("true" if typed else "false") if isinstance(typed, bool) else typed
                writer.writerow((info.device_key, info.parameter, iso_ms(ts), cell))
            yield buffer.getvalue().encode()
        else:
            yield b"".join(
                orjson.dumps(
                    {
                        "device_key": info.device_key,
                        "parameter": info.parameter,
                        "timestamp": iso_ms(ts),
                        "value": _typed(info, value),
                    }
                )
                + b"\n"
                for info, ts, value in page
            )


async def _encode_parquet(
    pages: AsyncIterator[list[Point]], series: Sequence[SeriesInfo]
) -> AsyncIterator[bytes]:
    pa, pq = _pyarrow()
    data_types: dict[str, dict[str, str]] = {}
    for info in series:
        if info.data_type in ("int", "bool"):
            data_types.setdefault(info.device_key, {})[info.parameter] = info.data_type
    schema = pa.schema(
        [
            ("device_key", pa.string()),
            ("parameter", pa.string()),
            ("timestamp", pa.timestamp("ms", tz="UTC")),
            ("value", pa.float64()),
        ],
        metadata={PARQUET_METADATA_KEY: json.dumps({"data_types": data_types}).encode()},
    )
    sink = _Sink()
    writer = pq.ParquetWriter(sink, schema, compression="zstd")
    try:
        async for page in pages:
            table = pa.table(
                [
                    pa.array([p[0].device_key for p in page], pa.string()),
                    pa.array([p[0].parameter for p in page], pa.string()),
                    pa.array([p[1] for p in page], pa.int64()).cast(schema.field(2).type),
                    pa.array([p[2] for p in page], pa.float64()),
                ],
                schema=schema,
            )
            writer.write_table(table)
            yield sink.drain()
    finally:
        writer.close()
    yield sink.drain()


@dataclass
class ExportCount:
    points: int = 0
    series: set[int] = field(default_factory=set)  # series that had points


async def export_stream(
    db: Database,
    series: Sequence[SeriesInfo],
    fmt: ExportFormat,
    start_ms: int | None = None,
    end_ms: int | None = None,
    *,
    page_rows: int = EXPORT_PAGE_ROWS,
    count: ExportCount | None = None,
) -> AsyncIterator[bytes]:
    """The encoded export; `count` (when given) counts what was written."""
    if fmt == "parquet":
        _pyarrow()  # fail before the first byte, not in the middle of a response

    async def pages() -> AsyncIterator[list[Point]]:
        async for page in iter_points(db, series, start_ms, end_ms, page_rows=page_rows):
            if count is not None:
                count.points += len(page)
                count.series.update(p[0].series_id for p in page)
            yield page

    async for chunk in encode(pages(), fmt, series):
        if chunk:
            yield chunk
