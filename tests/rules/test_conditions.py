"""The condition language without a database: validation paths, every operator,
durations, windows, detectors, explanations, and state that survives a restart."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from plantwatch.rules.conditions import (
    ConditionError,
    RuleState,
    needs_clock,
    parameters_of,
    parse_duration,
    validate,
)
from plantwatch.rules.detectors import Ewma, RollingZScore, restore_detector

S = 1000
M = 60 * S

DESIGN_EXAMPLE = {
    "operator": "AND",
    "conditions": [
        {"parameter": "spindle_temp", "operator": "gt", "threshold": 80, "for": "5m"},
        {
            "operator": "OR",
            "conditions": [
                {"parameter": "coolant_flow", "operator": "lt", "threshold": 5},
                {
                    "parameter": "vibration",
                    "aggregate": "avg",
                    "window": "10m",
                    "operator": "gt",
                    "threshold": 7,
                },
            ],
        },
    ],
}


def state_of(tree: dict[str, Any], started: int = 0) -> RuleState:
    return RuleState(validate(tree), started)


def test_durations() -> None:
    assert parse_duration("5m") == 5 * M
    assert parse_duration("1.5h") == 90 * M
    assert parse_duration(30) == 30 * S
    assert parse_duration("soon") is None
    assert parse_duration(-1) is None
    assert parse_duration(True) is None


def test_every_problem_is_reported_with_its_path() -> None:
    tree = {
        "operator": "AND",
        "conditions": [
            {"parameter": "t", "operator": "bigger", "threshold": 1},
            {"operator": "OR", "conditions": []},
            {"parameter": "v", "operator": "gt", "threshold": "x", "for": "forever"},
            {
                "parameter": "w",
                "operator": "gt",
                "threshold": 1,
                "aggregate": "avg",
                "window": "30d",
            },
            {"parameter": "f", "operator": "between", "low": 5, "high": 1},
            {
                "operator": "NOT",
                "conditions": [
                    {"parameter": "a", "operator": "gt", "threshold": 1},
                    {"parameter": "b", "operator": "gt", "threshold": 1},
                ],
            },
            {"parameter": "g", "operator": "no_data"},
            {"parameter": "h", "operator": "gt", "threshold": 1, "colour": "red"},
        ],
    }
    with pytest.raises(ConditionError) as caught:
        validate(tree)
    paths = {path for path, _ in caught.value.problems}
    assert paths == {
        "conditions.conditions[0].operator",
        "conditions.conditions[1].conditions",
        "conditions.conditions[2].threshold",
        "conditions.conditions[2].for",
        "conditions.conditions[3].window",
        "conditions.conditions[4].low",
        "conditions.conditions[5].conditions",
        "conditions.conditions[6].duration",
        "conditions.conditions[7].colour",
    }


def test_depth_and_shape_limits() -> None:
    tree: dict[str, Any] = {"parameter": "x", "operator": "gt", "threshold": 1}
    for _ in range(10):
        tree = {"operator": "NOT", "conditions": [tree]}
    with pytest.raises(ConditionError, match="deeper"):
        validate(tree)
    with pytest.raises(ConditionError):
        validate([1, 2])


def test_design_example_fires_with_facts_after_its_duration() -> None:
    state = state_of(DESIGN_EXAMPLE)
    assert parameters_of(state.root) == {"spindle_temp", "coolant_flow", "vibration"}
    assert needs_clock(state.root)
    state.observe("coolant_flow", 0, 3.0)
    state.observe("spindle_temp", 0, 82.5)
    assert not state.evaluate(0).fired  # hot, but not for 5 minutes yet
    state.observe("spindle_temp", 4 * M, 83.0)
    assert not state.evaluate(4 * M).fired
    state.observe("spindle_temp", 5 * M, 82.5)
    verdict = state.evaluate(5 * M)
    assert verdict.fired
    assert verdict.message == "spindle_temp 82.5 > 80 for 5m; coolant_flow 3 < 5"
    # A dip below the threshold restarts the clock.
    state.observe("spindle_temp", 6 * M, 79.0)
    assert not state.evaluate(6 * M).fired
    state.observe("spindle_temp", 7 * M, 90.0)
    assert not state.evaluate(8 * M).fired


def test_windowed_average_slides() -> None:
    state = state_of(
        {"parameter": "v", "aggregate": "avg", "window": "1m", "operator": "gt", "threshold": 7}
    )
    for i, value in enumerate([6, 6, 10, 10]):
        state.observe("v", i * 20 * S, value)
    assert state.evaluate(60 * S).fired  # (6 + 10 + 10) / 3 over (0, 60 s]
    assert "avg(v, 1m) 8.66667 > 7" in state.evaluate(60 * S).message
    state.observe("v", 130 * S, 1)
    assert not state.evaluate(130 * S).fired


@pytest.mark.parametrize(
    ("leaf", "values", "expected"),
    [
        ({"operator": "between", "low": 1, "high": 2}, [1.5], True),
        ({"operator": "outside", "low": 1, "high": 2}, [1.5], False),
        ({"operator": "outside", "low": 1, "high": 2}, [2.5], True),
        ({"operator": "eq", "threshold": 1}, [1], True),
        ({"operator": "neq", "threshold": 1}, [1], False),
        ({"operator": "lte", "threshold": 1}, [1], True),
        ({"operator": "change", "threshold": 5}, [10, 16], True),
        ({"operator": "change", "threshold": 5, "direction": "down"}, [10, 16], False),
        ({"operator": "change", "threshold": 5, "direction": "down"}, [16, 10], True),
        ({"operator": "rate", "threshold": 2}, [10, 13], True),  # 3 per minute
        ({"operator": "rate", "threshold": 4}, [10, 13], False),
    ],
)
def test_leaf_operators(leaf: dict[str, Any], values: list[float], expected: bool) -> None:
    state = state_of({"parameter": "x", **leaf})
    for i, value in enumerate(values):
        state.observe("x", i * M, value)
    assert state.evaluate((len(values) - 1) * M).fired is expected


def test_change_over_a_window_compares_with_the_value_that_long_ago() -> None:
    state = state_of(
        {"parameter": "p", "operator": "change", "window": "10m", "threshold": 3, "direction": "up"}
    )
    for minute, value in [(0, 10.0), (4, 11.0), (8, 12.0), (12, 14.0)]:
        state.observe("p", minute * M, value)
    # Baseline: the last point at or before 12m - 10m = 2m is 10.0 -> change 4.
    assert state.evaluate(12 * M).fired


def test_no_data_fires_on_silence_and_clears_on_data() -> None:
    state = state_of({"parameter": "x", "operator": "no_data", "duration": "2m"}, started=0)
    assert not state.evaluate(1 * M).fired
    assert state.evaluate(2 * M).message == "no x data for 2m"
    state.observe("x", 3 * M, 1.0)
    assert not state.evaluate(4 * M).fired
    assert state.evaluate(5 * M).fired


def test_not_inverts() -> None:
    state = state_of(
        {
            "operator": "NOT",
            "conditions": [{"parameter": "running", "operator": "eq", "threshold": 1}],
        }
    )
    state.observe("running", 0, 0.0)
    verdict = state.evaluate(0)
    assert verdict.fired and verdict.message == "not (running == 1)"


@pytest.mark.parametrize("detector", ["zscore", "ewma"])
def test_anomaly_detectors_flag_a_spike(detector: str) -> None:
    rng = random.Random(3)
    state = state_of(
        {"parameter": "vib", "operator": "anomaly", "detector": detector, "threshold": 4}
    )
    for i in range(200):
        state.observe("vib", i * S, 2.0 + rng.gauss(0, 0.1))
        assert not state.evaluate(i * S).fired
    state.observe("vib", 200 * S, 4.0)
    verdict = state.evaluate(200 * S)
    assert verdict.fired and "anomalous" in verdict.message


def test_detector_and_clock_state_survive_a_restart() -> None:
    rng = random.Random(5)
    tree = {
        "operator": "OR",
        "conditions": [
            {"parameter": "t", "operator": "anomaly", "detector": "ewma", "threshold": 4},
            {"parameter": "p", "operator": "gt", "threshold": 10, "for": "1m"},
        ],
    }
    running, restarted = state_of(tree), state_of(tree)
    history = [50 + rng.gauss(0, 1) for _ in range(100)]
    for i, value in enumerate(history):
        running.observe("t", i * S, value)
        restarted.observe("t", i * S, value)
    for state in (running, restarted):
        state.observe("p", 100 * S, 12.0)
        state.evaluate(100 * S)  # the `for` clock starts
    restarted = state_of(tree)
    restarted.restore(running.snapshot())
    # The clock kept running across the restart: 61 s later the `for` is met...
    restarted.observe("p", 161 * S, 12.0)
    assert restarted.evaluate(161 * S).message == "p 12 > 10 for 61s"
    # ...and the detector remembers the signal: a spike scores as it would have.
    running.observe("t", 162 * S, 80.0)
    restarted.observe("t", 162 * S, 80.0)
    assert running.leaf_states["conditions.conditions[0]"].last_score == pytest.approx(
        restarted.leaf_states["conditions.conditions[0]"].last_score
    )
    assert restarted.leaf_states["conditions.conditions[0]"].last_score > 4


def test_detectors_round_trip_and_handle_flat_signals() -> None:
    z = RollingZScore(size=20, min_count=5)
    for _ in range(10):
        assert z.score(1.0) == 0.0
    assert math.isinf(z.score(2.0))
    restored = restore_detector(z.state())
    assert restored.state() == z.state()
    e = Ewma(alpha=0.2, min_count=2)
    for value in (1.0, 2.0, 3.0):
        e.score(value)
    assert restore_detector(e.state()).state() == e.state()
