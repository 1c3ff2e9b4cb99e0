"""`parse_columns` (what the pipeline uses) gives exactly what `parse` gives, per metric:
the same samples in the same order, the same rejects, states and kinds."""

from __future__ import annotations

import json
from itertools import pairwise
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from plantwatch.telemetry import payloads as p

NOW = 1_771_497_000_000


def _by_metric(points: list[tuple[str, int, float]]) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for name, ts, value in points:
        column = out.setdefault(name, ([], []))
        column[0].append(ts)
        column[1].append(value)
    return out


def _same(raw: bytes) -> p.Parsed:
    rows = p.parse(raw, NOW)
    cols = p.parse_columns(raw, NOW)
    assert cols.points == []
    assert (cols.columns or {}) == _by_metric(rows.points)
    assert cols.rejects == rows.rejects
    assert cols.states == rows.states and cols.kinds == rows.kinds and cols.fatal == rows.fatal
    assert cols.point_count == rows.point_count == len(rows.points) + len(rows.states)
    if cols.ordered:
        # What the pipeline relies on: then no column repeats or goes back in time.
        for column_stamps, _ in (cols.columns or {}).values():
            assert all(a < b for a, b in pairwise(column_stamps))
    return cols


def test_columns_keep_order_per_metric() -> None:
    raw = orjson.dumps(
        [
            {"ts": NOW - 2000, "values": {"a": 1, "b": True, "s": "RUN"}},
            {"ts": NOW - 1000, "values": {"b": False, "a": 2.5}},
            {"ts": NOW - 3000, "values": {"a": 0.0}},
        ]
    )
    parsed = _same(raw)
    assert parsed.columns == {
        "a": ([NOW - 2000, NOW - 1000, NOW - 3000], [1.0, 2.5, 0.0]),
        "b": ([NOW - 2000, NOW - 1000], [1.0, 0.0]),
    }
    assert parsed.ordered is False
    assert parsed.kinds == {"a": "int", "b": "bool"}


def test_repeated_timestamps_are_not_ordered() -> None:
    entry = {"ts": NOW, "values": {"a": 1.0}}
    assert _same(orjson.dumps([entry, entry])).ordered is False
    assert _same(orjson.dumps([entry])).ordered is True


def test_increasing_entries_are_ordered_whatever_else_is_rejected() -> None:
    raw = orjson.dumps(
        [
            {"ts": NOW - 3000, "values": {"a": 1.0}},
            {"ts": NOW - 9_000_000_000, "values": {"a": 1.0}},  # out of range: not counted
            "junk",
            {"ts": NOW - 2000, "values": {"a": None, "b": 2}},
            {"ts": NOW - 1000, "values": {"a": 3.0}},
        ]
    )
    parsed = _same(raw)
    assert parsed.ordered is True
    assert parsed.columns == {
        "a": ([NOW - 3000, NOW - 1000], [1.0, 3.0]),
        "b": ([NOW - 2000], [2.0]),
    }


def test_invalid_names_are_never_remembered_as_valid() -> None:
    p._VALID_NAMES.clear()
    bad = orjson.dumps({"ts": NOW, "values": {"a b": 1.0, "ok": 2.0}})
    for _ in range(2):
        parsed = _same(bad)
        assert [r.reason for r in parsed.rejects] == [p.INVALID_METRIC_NAME]
    assert "a b" not in p._VALID_NAMES and "ok" in p._VALID_NAMES


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)
names = st.sampled_from(["a", "b", "c.d", "x y", "", "s"]) | st.text(max_size=4)
values = (
    st.floats()
    | st.integers(-(2**70), 2**70)
    | st.booleans()
    | st.text(max_size=300)
    | st.none()
    | st.lists(st.integers(), max_size=2)
)
stamps = st.one_of(
    st.integers(NOW - 10 * 86_400_000, NOW + 3_600_000),
    st.sampled_from([NOW, NOW - 1000, NOW - 2000]),
    st.floats(),
    st.text(max_size=5),
    st.none(),
)
entries = st.one_of(
    st.fixed_dictionaries({"ts": stamps, "values": st.dictionaries(names, values, max_size=5)}),
    st.fixed_dictionaries({"metrics": st.dictionaries(names, values, max_size=5)}),
    json_values,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(entries, max_size=12) | entries)
def test_parse_columns_matches_parse(document: Any) -> None:
    _same(json.dumps(document).encode())
