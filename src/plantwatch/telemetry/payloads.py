"""Telemetry payload formats and validation. Pure: no I/O, no database.

Accepted (DESIGN.md §5), as one object or a JSON array of them:

- ``{"timestamp": "2026-02-19T10:30:00Z", "metrics": {"voltage": 231.4}}``
  (``timestamp`` may also be epoch seconds; omitted = time of receipt)
- ``{"ts": 1708338600000, "values": {"voltage": 231.4}}`` (epoch milliseconds)

Numbers, bools and ints become float samples; strings are state values
(kept as the parameter's latest value, not as samples). Anything else, and
every limit, is rejected with a stable reason code — per point where the rest
of the message is good, so one bad value never costs its neighbours.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import orjson

# Stable reason codes: stored in dead_letters.reason and filtered on by the API.
INVALID_JSON = "invalid_json"
INVALID_SHAPE = "invalid_shape"
PAYLOAD_TOO_LARGE = "payload_too_large"
TOO_MANY_ENTRIES = "too_many_entries"
TOO_MANY_METRICS = "too_many_metrics"
INVALID_TIMESTAMP = "invalid_timestamp"
TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
INVALID_METRIC_NAME = "invalid_metric_name"
NON_FINITE_VALUE = "non_finite_value"
INVALID_VALUE_TYPE = "invalid_value_type"
STRING_TOO_LONG = "string_too_long"

METRIC_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")
MAX_STATE_LENGTH = 256
_EPOCH_MS_MIN = 0
_EPOCH_MS_MAX = 253402300799999  # 9999-12-31T23:59:59.999Z


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 1_048_576
    max_entries: int = 10_000
    max_metrics: int = 1_000
    # Allowed distance of a timestamp from now; None = any age (backfill imports).
    max_future_ms: int | None = 5 * 60 * 1000
    max_past_ms: int | None = 7 * 24 * 3600 * 1000


def clean_text(value: str, limit: int) -> str:
    """Text safe for any database column: no NUL, no lone surrogates, bounded length
    (a reject's detail quotes what the sender sent, which may be anything)."""
    cleaned = value[: limit * 2].replace("\x00", "\\x00")
    return cleaned.encode("utf-8", "backslashreplace").decode()[:limit]


def backfill_limits(live: Limits, max_entries: int = 0) -> Limits:
    """Limits for history being loaded (imports and their replays): timestamps of any
    age, any payload size; the live metric count, and at least `max_entries` entries."""
    return Limits(
        max_bytes=sys.maxsize,
        max_entries=max(max_entries, live.max_entries),
        max_metrics=live.max_metrics,
        max_future_ms=None,
        max_past_ms=None,
    )


@dataclass(frozen=True)
class Reject:
    reason: str
    detail: str
    # The smallest piece of the input that shows the problem, itself a valid payload
    # shape (one entry, or {"ts", "values": {metric: value}}), so it can be replayed.
    fragment: Any = None


# metric -> (timestamps, values) in arrival order: the pipeline's form of the points.
# Read-only once parsed: the columns of a one-entry message share one timestamps list.
Columns = dict[str, tuple[list[int], list[float]]]


@dataclass
class Parsed:
    points: list[tuple[str, int, float]] = field(default_factory=list)
    # metric -> (ts_ms, text): the newest string value per metric
    states: dict[str, tuple[int, str]] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)
    # metric -> "int" | "bool" for metrics that arrived as such (default "float"),
    # so discovery records the parameter's real data type.
    kinds: dict[str, str] = field(default_factory=dict)
    # Set when the message as a whole is unusable (nothing else is filled then).
    fatal: Reject | None = None
    # Filled instead of `points` by `parse_columns`: the same points, per metric.
    columns: Columns | None = None
    # True when the accepted entries' timestamps strictly increase, so every column's
    # timestamps do too (no duplicates inside the message, buckets are runs).
    ordered: bool = True

    @property
    def point_count(self) -> int:
        """Accepted samples (in `points` or `columns`) plus state values."""
        if self.columns is None:
            return len(self.points) + len(self.states)
        return sum(len(ts) for ts, _ in self.columns.values()) + len(self.states)


# Metric names that passed METRIC_NAME: devices send the same few names in every
# message, so a set lookup replaces a regex match per point. Bounded: cleared when full.
_VALID_NAMES: set[str] = set()
_VALID_NAMES_MAX = 65_536


def _valid_name(name: str) -> bool:
    if name in _VALID_NAMES:
        return True
    if not METRIC_NAME.match(name):
        return False
    if len(_VALID_NAMES) >= _VALID_NAMES_MAX:
        _VALID_NAMES.clear()
    _VALID_NAMES.add(name)
    return True


def parse_timestamp(value: Any, *, millis: bool) -> int | None:
    """Epoch milliseconds, or None if `value` is not a usable timestamp."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        scaled = value if millis else value * 1000
        if not (_EPOCH_MS_MIN <= scaled <= _EPOCH_MS_MAX):  # also rejects NaN and inf
            return None
        ms = int(scaled)
    elif isinstance(value, str) and not millis and 0 < len(value) <= 40:
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            # Naive times are read as UTC: devices rarely know their zone, and UTC is the
            # documented wire convention.
            parsed = parsed.replace(tzinfo=dt.UTC)
        ms = int(parsed.timestamp() * 1000)
    else:
        return None
    if not _EPOCH_MS_MIN <= ms <= _EPOCH_MS_MAX:
        return None
    return ms


def parse(raw: bytes, now_ms: int, limits: Limits = Limits()) -> Parsed:
    """Validate a message into `points` (one (metric, ts_ms, value) per sample, in order)."""
    return _parse(raw, now_ms, limits, columns=False)


def parse_columns(raw: bytes, now_ms: int, limits: Limits = Limits()) -> Parsed:
    """As `parse`, with the accepted samples in `columns` (per metric, in arrival order)
    instead of `points`: what the ingest pipeline stores, without a tuple per point.
    Rejects, states and kinds are exactly those `parse` gives."""
    return _parse(raw, now_ms, limits, columns=True)


def _parse(raw: bytes, now_ms: int, limits: Limits, *, columns: bool) -> Parsed:
    result = Parsed()
    if columns:
        result.columns = {}
    if len(raw) > limits.max_bytes:
        result.fatal = Reject(
            PAYLOAD_TOO_LARGE, f"{len(raw)} bytes exceeds the limit of {limits.max_bytes}"
        )
        return result
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson refuses NaN/Infinity literals and integers past 64 bits, which real
        # devices do send; the standard parser reads them so that only the bad point
        # is rejected, not the whole message.
        try:
            document = json.loads(raw)
        except (ValueError, RecursionError):
            result.fatal = Reject(INVALID_JSON, f"not valid JSON: {exc}"[:300])
            return result
    parse_document(document, now_ms, limits, result)
    return result


def parse_document(document: Any, now_ms: int, limits: Limits, result: Parsed) -> None:
    """Validate an already-decoded document into `result` (HTTP batches decode once).

    Samples go to `result.columns` when it is a dict, else to `result.points`.
    """
    entries = document if isinstance(document, list) else [document]
    if not entries:
        result.fatal = Reject(INVALID_SHAPE, "empty array")
        return
    if len(entries) > limits.max_entries:
        result.fatal = Reject(
            TOO_MANY_ENTRIES, f"{len(entries)} entries exceed the limit of {limits.max_entries}"
        )
        return
    low = None if limits.max_past_ms is None else now_ms - limits.max_past_ms
    high = None if limits.max_future_ms is None else now_ms + limits.max_future_ms
    points = result.points
    columns = result.columns
    states = result.states
    rejects = result.rejects
    kinds = result.kinds
    valid_names = _VALID_NAMES
    max_metrics = limits.max_metrics
    previous_ts = -1
    ordered = True
    for entry in entries:
        if not isinstance(entry, dict):
            rejects.append(Reject(INVALID_SHAPE, "entry is not an object", entry))
            continue
        if "metrics" in entry:
            metrics = entry["metrics"]
            raw_ts = entry.get("timestamp")
            ts = now_ms if raw_ts is None else parse_timestamp(raw_ts, millis=False)
        elif "values" in entry:
            metrics = entry["values"]
            raw_ts = entry.get("ts")
            if type(raw_ts) is int and _EPOCH_MS_MIN <= raw_ts <= _EPOCH_MS_MAX:
                ts = raw_ts  # the common case, without the general conversion
            else:
                ts = now_ms if raw_ts is None else parse_timestamp(raw_ts, millis=True)
        else:
            rejects.append(
                Reject(
                    INVALID_SHAPE,
                    "entry needs 'metrics' (with 'timestamp') or 'values' (with 'ts')",
                    entry,
                )
            )
            continue
        if not isinstance(metrics, dict):
            rejects.append(Reject(INVALID_SHAPE, "metrics/values must be an object", entry))
            continue
        if ts is None:
            rejects.append(Reject(INVALID_TIMESTAMP, f"unusable timestamp {raw_ts!r}"[:300], entry))
            continue
        if (low is not None and ts < low) or (high is not None and ts > high):
            rejects.append(
                Reject(
                    TIMESTAMP_OUT_OF_RANGE,
                    f"timestamp {ts} ms is outside the allowed skew of now ({now_ms} ms)",
                    entry,
                )
            )
            continue
        if len(metrics) > max_metrics:
            rejects.append(
                Reject(
                    TOO_MANY_METRICS,
                    f"{len(metrics)} metrics exceed the limit of {max_metrics}",
                    entry,
                )
            )
            continue
        if ts <= previous_ts:
            ordered = False
        previous_ts = ts
        single_stamp = [ts] if columns is not None and len(entries) == 1 else None
        for name, value in metrics.items():
            value_type = type(value)
            if value_type is float:
                # x - x is 0.0 for every finite float and NaN for NaN and the infinities.
                if value - value != 0.0:
                    rejects.append(
                        Reject(
                            NON_FINITE_VALUE,
                            f"{name}: {value!r} is not finite",
                            {"ts": ts, "values": {name: value}},
                        )
                    )
                    continue
                number = value
            elif value_type is int:
                try:
                    number = float(value)
                except OverflowError:
                    number = math.inf
                if not math.isfinite(number):
                    rejects.append(
                        Reject(
                            NON_FINITE_VALUE,
                            f"{name}: {value!r} is not finite",
                            {"ts": ts, "values": {name: value}},
                        )
                    )
                    continue
            elif value_type is bool:
                number = 1.0 if value else 0.0
            elif value_type is str:
                if not _valid_name(name):
                    rejects.append(
                        Reject(
                            INVALID_METRIC_NAME,
                            f"bad metric name {name[:120]!r}",
                            {"ts": ts, "values": {name[:120]: value}},
                        )
                    )
                elif len(value) > MAX_STATE_LENGTH:
                    rejects.append(
                        Reject(
                            STRING_TOO_LONG,
                            f"{name}: state text over {MAX_STATE_LENGTH} characters",
                            {"ts": ts, "values": {name: value}},
                        )
                    )
                else:
                    current = states.get(name)
                    if current is None or current[0] <= ts:
                        states[name] = (ts, value)
                continue
            else:
                rejects.append(
                    Reject(
                        INVALID_VALUE_TYPE,
                        f"{name[:120]}: {value_type.__name__} is not a number, bool or string",
                        {"ts": ts, "values": {name[:120]: value}},
                    )
                )
                continue
            if name not in valid_names and not _valid_name(name):
                rejects.append(
                    Reject(
                        INVALID_METRIC_NAME,
                        f"bad metric name {name[:120]!r}",
                        {"ts": ts, "values": {name[:120]: value}},
                    )
                )
                continue
            if value_type is not float and name not in kinds:
                kinds[name] = "bool" if value_type is bool else "int"
            if columns is None:
                points.append((name, ts, number))
            elif single_stamp is not None:
                # One entry: every column has this one timestamp, so they share its list
                # (fewer objects for the collector while the message waits to commit).
                columns[name] = (single_stamp, [number])
            else:
                column = columns.get(name)
                if column is None:
                    column = columns[name] = ([], [])
                column[0].append(ts)
                column[1].append(number)
    result.ordered = ordered
