"""The payload parser: every accepted format, every reject reason, and property
tests that arbitrary input never crashes it, never loses a valid point and
never accepts a bad one silently."""

from __future__ import annotations

import json
import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plantwatch.telemetry import payloads as p

NOW = 1_771_497_000_000  # 2026-02-19T10:30:00Z


def test_timestamp_metrics_format() -> None:
    result = p.parse(
        b'{"timestamp": "2026-02-19T10:30:00Z", "metrics": {"voltage": 231.4, "rpm": 3500}}', NOW
    )
    assert result.fatal is None and result.rejects == []
    assert result.points == [("voltage", NOW, 231.4), ("rpm", NOW, 3500.0)]


def test_ts_values_format_in_epoch_ms_and_arrays() -> None:
    raw = orjson.dumps([{"ts": NOW - 1000, "values": {"a": 1}}, {"ts": NOW, "values": {"a": 2}}])
    assert p.parse(raw, NOW).points == [("a", NOW - 1000, 1.0), ("a", NOW, 2.0)]


def test_epoch_seconds_and_offsets_and_missing_timestamp() -> None:
    assert p.parse(b'{"timestamp": 1771497000, "metrics": {"a": 1}}', NOW).points[0][1] == NOW
    offset = p.parse(b'{"timestamp": "2026-02-19T11:30:00+01:00", "metrics": {"a": 1}}', NOW)
    assert offset.points[0][1] == NOW
    assert p.parse(b'{"metrics": {"a": 1}}', NOW).points == [("a", NOW, 1.0)]


def test_bools_are_numbers_and_strings_are_states() -> None:
    result = p.parse(
        b'[{"ts": 1771496999000, "values": {"running": true, "mode": "AUTO"}},'
        b' {"ts": 1771497000000, "values": {"running": false, "mode": "MANUAL"}}]',
        NOW,
    )
    assert result.points == [("running", NOW - 1000, 1.0), ("running", NOW, 0.0)]
    assert result.states == {"mode": (NOW, "MANUAL")}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", p.INVALID_JSON),
        (b"[]", p.INVALID_SHAPE),
        (b"x" * 2_000_000, p.PAYLOAD_TOO_LARGE),
    ],
)
def test_fatal_rejects(raw: bytes, reason: str) -> None:
    result = p.parse(raw, NOW)
    assert result.fatal is not None and result.fatal.reason == reason
    assert result.points == []


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"timestamp": "yesterday", "metrics": {"a": 1}}, p.INVALID_TIMESTAMP),
        ({"ts": "1771497000000", "values": {"a": 1}}, p.INVALID_TIMESTAMP),
        ({"ts": NOW + 3_600_000, "values": {"a": 1}}, p.TIMESTAMP_OUT_OF_RANGE),
        ({"ts": NOW - 30 * 86_400_000, "values": {"a": 1}}, p.TIMESTAMP_OUT_OF_RANGE),
        ({"ts": NOW, "values": {f"m{i}": i for i in range(1001)}}, p.TOO_MANY_METRICS),
        ({"ts": NOW, "values": [1, 2]}, p.INVALID_SHAPE),
        ({"temperature": 3}, p.INVALID_SHAPE),
        ({"ts": NOW, "values": {"a b": 1}}, p.INVALID_METRIC_NAME),
        ({"ts": NOW, "values": {"a": None}}, p.INVALID_VALUE_TYPE),
        ({"ts": NOW, "values": {"a": [1]}}, p.INVALID_VALUE_TYPE),
        ({"ts": NOW, "values": {"a": "x" * 300}}, p.STRING_TOO_LONG),
    ],
)
def test_entry_rejects_keep_neighbours(entry: dict[str, object], reason: str) -> None:
    good = {"ts": NOW, "values": {"ok": 1.5}}
    result = p.parse(orjson.dumps([good, entry, good]), NOW)
    assert [r.reason for r in result.rejects] == [reason]
    assert result.points == [("ok", NOW, 1.5), ("ok", NOW, 1.5)]


def test_non_finite_values_reject_only_that_point() -> None:
    raw = json.dumps({"ts": NOW, "values": {"a": math.nan, "b": 2, "c": math.inf}}).encode()
    result = p.parse(raw, NOW)
    assert result.points == [("b", NOW, 2.0)]
    assert sorted(r.reason for r in result.rejects) == [p.NON_FINITE_VALUE] * 2
    huge = p.parse(b'{"ts": 1771497000000, "values": {"a": 1' + b"0" * 400 + b', "b": 1}}', NOW)
    assert huge.points == [("b", NOW, 1.0)]
    assert huge.rejects[0].reason == p.NON_FINITE_VALUE


def test_skew_limits_can_be_lifted_for_backfill() -> None:
    old = orjson.dumps({"timestamp": "2019-01-01T00:00:00Z", "metrics": {"a": 1}})
    assert p.parse(old, NOW).rejects[0].reason == p.TIMESTAMP_OUT_OF_RANGE
    backfill = p.Limits(max_past_ms=None, max_future_ms=None)
    assert len(p.parse(old, NOW, backfill).points) == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(raw: bytes) -> None:
    result = p.parse(raw, NOW)
    if result.fatal is not None:
        assert result.fatal.reason in {p.INVALID_JSON, p.INVALID_SHAPE}
        assert not (result.points or result.rejects or result.states)


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_arbitrary_json_is_accounted_for(document: object) -> None:
    raw = json.dumps(document).encode()
    result = p.parse(raw, NOW)
    # Whatever came in is either a point, a state, or a reject with a reason.
    if result.fatal is None:
        for name, ts, value in result.points:
            assert math.isfinite(value) and p.METRIC_NAME.match(name) and ts == NOW
    for reject in result.rejects:
        assert reject.reason and reject.detail


metric_names = st.from_regex(p.METRIC_NAME, fullmatch=True)
finite = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53), 2**53)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(NOW - 86_400_000, NOW + 60_000),
            st.dictionaries(metric_names, finite, min_size=1, max_size=10),
        ),
        min_size=1,
        max_size=20,
    ),
    st.integers(0, 19),
)
def test_valid_points_are_never_lost(
    entries: list[tuple[int, dict[str, float]]], poison_at: int
) -> None:
    docs: list[object] = [{"ts": ts, "values": values} for ts, values in entries]
    docs.insert(poison_at % (len(docs) + 1), {"ts": NOW, "values": {"bad": "x" * 999}})
    result = p.parse(json.dumps(docs).encode(), NOW)
    expected = [(k, ts, float(v)) for ts, values in entries for k, v in values.items()]
    assert result.points == expected
    assert [r.reason for r in result.rejects] == [p.STRING_TOO_LONG]
