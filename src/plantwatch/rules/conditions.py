"""The rule condition language: validate, compile, evaluate. Pure: no I/O.

A condition is a tree (DESIGN.md §6):

    {"operator": "AND", "conditions": [
      {"parameter": "spindle_temp", "operator": "gt", "threshold": 80, "for": "5m"},
      {"operator": "OR", "conditions": [
        {"parameter": "coolant_flow", "operator": "lt", "threshold": 5},
        {"parameter": "vibration", "aggregate": "avg", "window": "10m",
         "operator": "gt", "threshold": 7}]}]}

Groups: AND, OR (one or more children), NOT (exactly one); any node may carry
`for` (it must hold continuously that long). Leaves: gt gte lt lte eq neq
(`threshold`), between outside (`low`, `high`), change and rate (per minute;
`threshold`, optional `direction` up/down/any, optional `window` to compare
against the value that long ago), anomaly (streaming detector score above
`threshold`, default 3; `detector` zscore or ewma), no_data (no point for
`duration`). Comparisons may read a sliding-window `aggregate` (avg min max
sum count) over `window`.

`validate` returns every problem with its JSON path, so an editor can mark
the bad node; `compile_condition` turns a valid tree into node objects once,
and `RuleState` holds one device's evaluation state for one rule.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from plantwatch.rules.detectors import Ewma, RollingZScore, make_detector, restore_detector

COMPARISONS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "eq": "==", "neq": "!="}
RANGES = ("between", "outside")
LEAF_OPERATORS = (*COMPARISONS, *RANGES, "change", "rate", "anomaly", "no_data")
GROUP_OPERATORS = ("AND", "OR", "NOT")
AGGREGATES = ("avg", "min", "max", "sum", "count")
DETECTORS = ("zscore", "ewma")
MAX_DEPTH = 8
MAX_NODES = 64
MAX_WINDOW_MS = 24 * 3600 * 1000
MAX_FOR_MS = 7 * 24 * 3600 * 1000
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
PARAMETER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,99}$")


class ConditionError(ValueError):
    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))
        self.problems = problems


def parse_duration(value: Any) -> int | None:
    """Milliseconds from "90s", "5m", "1.5h", "2d" or a number of seconds; None if invalid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value * 1000) if math.isfinite(value) and value >= 0 else None
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if match:
            return int(float(match.group(1)) * _UNIT_MS[match.group(2)])
    return None


def format_duration(ms: int) -> str:
    for unit in ("d", "h", "m", "s"):
        size = _UNIT_MS[unit]
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


# --- compiled nodes ----------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    path: str
    parameter: str
    op: str
    threshold: float | None = None
    low: float | None = None
    high: float | None = None
    for_ms: int = 0
    aggregate: str | None = None
    window_ms: int = 0
    direction: str = "any"
    detector: str = "zscore"
    detector_size: int = 100
    alpha: float = 0.1
    duration_ms: int = 0


@dataclass(frozen=True)
class Group:
    path: str
    op: str
    children: tuple[Leaf | Group, ...]
    for_ms: int = 0


Node = Leaf | Group


# --- validation ----------------------------------------------------------------------------


def _number(
    node: dict[str, Any],
    key: str,
    path: str,
    problems: list[tuple[str, str]],
    required: bool = True,
) -> float | None:
    value = node.get(key)
    if value is None:
        if required:
            problems.append((f"{path}.{key}", "is required"))
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        problems.append((f"{path}.{key}", "must be a finite number"))
        return None
    return float(value)


def _duration(
    node: dict[str, Any], key: str, path: str, problems: list[tuple[str, str]], limit: int
) -> int:
    if key not in node or node[key] is None:
        return 0
    ms = parse_duration(node[key])
    if ms is None:
        problems.append((f"{path}.{key}", "must be a duration like 30s, 5m, 1h or 2d"))
        return 0
    if ms > limit:
        problems.append((f"{path}.{key}", f"must be at most {format_duration(limit)}"))
        return 0
    return ms


_LEAF_KEYS = {
    "parameter",
    "operator",
    "threshold",
    "low",
    "high",
    "for",
    "aggregate",
    "window",
    "direction",
    "detector",
    "size",
    "alpha",
    "duration",
}
_GROUP_KEYS = {"operator", "conditions", "for"}


def validate(tree: Any, path: str = "conditions") -> Node:
    """The compiled tree, or ConditionError listing every problem with its path."""
    problems: list[tuple[str, str]] = []
    count = [0]
    node = _validate(tree, path, 1, problems, count)
    if count[0] > MAX_NODES:
        problems.append((path, f"at most {MAX_NODES} nodes"))
    if problems or node is None:
        raise ConditionError(problems or [(path, "invalid condition")])
    return node


def _validate(
    tree: Any, path: str, depth: int, problems: list[tuple[str, str]], count: list[int]
) -> Node | None:
    count[0] += 1
    if not isinstance(tree, dict):
        problems.append((path, "must be an object"))
        return None
    if depth > MAX_DEPTH:
        problems.append((path, f"nested deeper than {MAX_DEPTH} levels"))
        return None
    op = tree.get("operator")
    if isinstance(op, str) and op.upper() in GROUP_OPERATORS and "parameter" not in tree:
        return _validate_group(tree, op.upper(), path, depth, problems, count)
    if "conditions" in tree:
        problems.append(
            (f"{path}.operator", f"a group's operator is one of {', '.join(GROUP_OPERATORS)}")
        )
        return None
    return _validate_leaf(tree, path, problems)


def _validate_group(
    tree: dict[str, Any],
    op: str,
    path: str,
    depth: int,
    problems: list[tuple[str, str]],
    count: list[int],
) -> Group | None:
    for key in tree.keys() - _GROUP_KEYS:
        problems.append((f"{path}.{key}", "unknown field in a group"))
    children = tree.get("conditions")
    if not isinstance(children, list) or not children:
        problems.append((f"{path}.conditions", "must be a non-empty list"))
        return None
    if op == "NOT" and len(children) != 1:
        problems.append((f"{path}.conditions", "NOT takes exactly one condition"))
    compiled = [
        _validate(child, f"{path}.conditions[{i}]", depth + 1, problems, count)
        for i, child in enumerate(children)
    ]
    for_ms = _duration(tree, "for", path, problems, MAX_FOR_MS)
    if any(c is None for c in compiled):
        return None
    return Group(path, op, tuple(c for c in compiled if c is not None), for_ms)


def _validate_leaf(tree: dict[str, Any], path: str, problems: list[tuple[str, str]]) -> Leaf | None:
    before = len(problems)
    for key in tree.keys() - _LEAF_KEYS:
        problems.append((f"{path}.{key}", "unknown field in a condition"))
    parameter = tree.get("parameter")
    if not isinstance(parameter, str) or not PARAMETER.match(parameter):
        problems.append((f"{path}.parameter", "must be a parameter key"))
    op = tree.get("operator")
    if op not in LEAF_OPERATORS:
        problems.append(
            (
                f"{path}.operator",
                f"must be one of {', '.join(LEAF_OPERATORS)} "
                f"(or a group: {', '.join(GROUP_OPERATORS)})",
            )
        )
        return None
    for_ms = _duration(tree, "for", path, problems, MAX_FOR_MS)
    leaf: dict[str, Any] = {"path": path, "parameter": parameter, "op": op, "for_ms": for_ms}
    aggregate = tree.get("aggregate")
    window_ms = _duration(tree, "window", path, problems, MAX_WINDOW_MS)
    if aggregate is not None:
        if op not in COMPARISONS and op not in RANGES:
            problems.append((f"{path}.aggregate", "only comparisons and ranges aggregate"))
        elif aggregate not in AGGREGATES:
            problems.append((f"{path}.aggregate", f"must be one of {', '.join(AGGREGATES)}"))
        elif not window_ms:
            problems.append((f"{path}.window", "an aggregate needs a window"))
        leaf["aggregate"] = aggregate
    elif "window" in tree and op not in ("change", "rate"):
        problems.append((f"{path}.window", "a window needs an aggregate"))
    leaf["window_ms"] = window_ms
    if op in COMPARISONS:
        leaf["threshold"] = _number(tree, "threshold", path, problems)
    elif op in RANGES:
        low = _number(tree, "low", path, problems)
        high = _number(tree, "high", path, problems)
        if low is not None and high is not None and low > high:
            problems.append((f"{path}.low", "must not be above high"))
        leaf["low"], leaf["high"] = low, high
    elif op in ("change", "rate"):
        threshold = _number(tree, "threshold", path, problems)
        if threshold is not None and threshold < 0:
            problems.append((f"{path}.threshold", "is a magnitude: must be >= 0"))
        leaf["threshold"] = threshold
        direction = tree.get("direction", "any")
        if direction not in ("up", "down", "any"):
            problems.append((f"{path}.direction", "must be up, down or any"))
        leaf["direction"] = direction
    elif op == "anomaly":
        threshold = _number(tree, "threshold", path, problems, required=False)
        leaf["threshold"] = 3.0 if threshold is None else threshold
        detector = tree.get("detector", "zscore")
        if detector not in DETECTORS:
            problems.append((f"{path}.detector", f"must be one of {', '.join(DETECTORS)}"))
        leaf["detector"] = detector
        size = tree.get("size", 100)
        if isinstance(size, bool) or not isinstance(size, int) or not 10 <= size <= 10_000:
            problems.append((f"{path}.size", "must be an integer from 10 to 10000"))
        else:
            leaf["detector_size"] = size
        alpha = tree.get("alpha", 0.1)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
            problems.append((f"{path}.alpha", "must be between 0 and 1"))
        else:
            leaf["alpha"] = float(alpha)
    elif op == "no_data":
        duration = _duration(tree, "duration", path, problems, MAX_FOR_MS)
        if not duration:
            problems.append((f"{path}.duration", "no_data needs a duration, e.g. 5m"))
        leaf["duration_ms"] = duration
    if len(problems) > before:
        return None
    return Leaf(**leaf)


def parameters_of(node: Node) -> set[str]:
    if isinstance(node, Leaf):
        return {node.parameter}
    return set().union(*(parameters_of(child) for child in node.children))


def needs_clock(node: Node) -> bool:
    """Whether truth can change with time alone (for-durations, no_data, windows)."""
    if isinstance(node, Leaf):
        return bool(node.for_ms or node.op == "no_data" or node.window_ms)
    return bool(node.for_ms) or any(needs_clock(child) for child in node.children)


def leaves(node: Node) -> list[Leaf]:
    if isinstance(node, Leaf):
        return [node]
    return [leaf for child in node.children for leaf in leaves(child)]


# --- evaluation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """Why a leaf is true: what it read and what it compared against."""

    path: str
    parameter: str
    value: float | None
    text: str


class LeafState:
    __slots__ = (
        "detector",
        "last_score",
        "last_ts",
        "last_value",
        "leaf",
        "prev_ts",
        "prev_value",
        "started",
        "window",
    )

    def __init__(self, leaf: Leaf, started: int) -> None:
        self.leaf = leaf
        self.started = started
        self.last_ts: int | None = None
        self.last_value: float | None = None
        self.prev_ts: int | None = None
        self.prev_value: float | None = None
        self.window: deque[tuple[int, float]] | None = deque() if leaf.window_ms else None
        self.detector: RollingZScore | Ewma | None = (
            make_detector(leaf.detector, leaf.detector_size, leaf.alpha)
            if leaf.op == "anomaly"
            else None
        )
        self.last_score = 0.0

    def observe(self, ts: int, value: float) -> None:
        if self.last_ts is not None and ts < self.last_ts:
            return  # a late point: the stream evaluator works on time order per device
        self.prev_ts, self.prev_value = self.last_ts, self.last_value
        self.last_ts, self.last_value = ts, value
        if self.window is not None:
            self.window.append((ts, value))
        if self.detector is not None:
            self.last_score = self.detector.score(value)

    def _trim(self, now: int) -> deque[tuple[int, float]]:
        window = self.window
        assert window is not None
        # Keep one point older than the window for change/rate baselines.
        horizon = now - self.leaf.window_ms
        while len(window) > 1 and window[1][0] <= horizon:
            window.popleft()
        return window

    def reading(self, now: int) -> float | None:
        """The number this leaf compares, or None when it has nothing to judge."""
        leaf = self.leaf
        if self.last_value is None:
            return None
        if leaf.aggregate is not None:
            window = self._trim(now)
            horizon = now - leaf.window_ms
            values = [v for t, v in window if t > horizon]
            if not values:
                return None
            agg = leaf.aggregate
            if agg == "avg":
                return sum(values) / len(values)
            if agg == "min":
                return min(values)
            if agg == "max":
                return max(values)
            if agg == "sum":
                return sum(values)
            return float(len(values))
        if leaf.op in ("change", "rate"):
            if self.window is not None:
                window = self._trim(now)
                base_ts, base_value = window[0]
            else:
                if self.prev_value is None or self.prev_ts is None:
                    return None
                base_ts, base_value = self.prev_ts, self.prev_value
            assert self.last_ts is not None
            delta = self.last_value - base_value
            if leaf.op == "change":
                return delta
            minutes = (self.last_ts - base_ts) / 60_000
            return delta / minutes if minutes > 0 else None
        if leaf.op == "anomaly":
            return self.last_score
        return self.last_value

    def truth(self, now: int) -> tuple[bool, Fact | None]:
        leaf = self.leaf
        if leaf.op == "no_data":
            since = self.last_ts if self.last_ts is not None else self.started
            silent = now - since
            if silent >= leaf.duration_ms:
                return True, Fact(
                    leaf.path,
                    leaf.parameter,
                    None,
                    f"no {leaf.parameter} data for {format_duration(silent)}",
                )
            return False, None
        x = self.reading(now)
        if x is None:
            return False, None
        label = (
            f"{leaf.aggregate}({leaf.parameter}, {format_duration(leaf.window_ms)})"
            if leaf.aggregate
            else leaf.parameter
        )
        op = leaf.op
        if op in COMPARISONS:
            t = leaf.threshold
            assert t is not None
            hit = (
                x > t
                if op == "gt"
                else x >= t
                if op == "gte"
                else x < t
                if op == "lt"
                else x <= t
                if op == "lte"
                else x == t
                if op == "eq"
                else x != t
            )
            text = f"{label} {_num(x)} {COMPARISONS[op]} {_num(t)}"
        elif op in RANGES:
            assert leaf.low is not None and leaf.high is not None
            inside = leaf.low <= x <= leaf.high
            hit = inside if op == "between" else not inside
            text = (
                f"{label} {_num(x)} {'within' if op == 'between' else 'outside'} "
                f"[{_num(leaf.low)}, {_num(leaf.high)}]"
            )
        elif op in ("change", "rate"):
            t = leaf.threshold
            assert t is not None
            d = leaf.direction
            hit = x > t if d == "up" else -x > t if d == "down" else abs(x) > t
            unit = "/min" if op == "rate" else ""
            text = f"{leaf.parameter} {op} {_num(x)}{unit} beyond {_num(t)}{unit}"
        else:  # anomaly
            t = leaf.threshold
            assert t is not None
            hit = x > t
            text = (
                f"{leaf.parameter} {_num(self.last_value or 0.0)} anomalous "
                f"({leaf.detector} score {_num(x)} > {_num(t)})"
            )
        return hit, (Fact(leaf.path, leaf.parameter, x, text) if hit else None)


def _num(value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.6g}"


@dataclass
class Verdict:
    fired: bool
    facts: list[Fact]

    @property
    def message(self) -> str:
        return "; ".join(f.text for f in self.facts)


@dataclass
class RuleState:
    """One rule's evaluation state for one device."""

    root: Node
    started: int
    leaf_states: dict[str, LeafState] = field(default_factory=dict)
    by_parameter: dict[str, list[LeafState]] = field(default_factory=dict)
    # node path -> ts since when the node's own condition has held (for `for`)
    since: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for leaf in leaves(self.root):
            state = LeafState(leaf, self.started)
            self.leaf_states[leaf.path] = state
            self.by_parameter.setdefault(leaf.parameter, []).append(state)

    def observe(self, parameter: str, ts: int, value: float) -> None:
        for state in self.by_parameter.get(parameter, ()):
            state.observe(ts, value)

    def evaluate(self, now: int) -> Verdict:
        fired, facts = self._eval(self.root, now)
        return Verdict(fired, facts if fired else [])

    def _eval(self, node: Node, now: int) -> tuple[bool, list[Fact]]:
        if isinstance(node, Leaf):
            hit, fact = self.leaf_states[node.path].truth(now)
            facts = [fact] if fact is not None else []
        elif node.op == "AND":
            facts = []
            hit = True
            for child in node.children:
                child_hit, child_facts = self._eval(child, now)
                if not child_hit:
                    hit = False
                    facts = []
                    break
                facts.extend(child_facts)
        elif node.op == "OR":
            facts = []
            hit = False
            for child in node.children:
                child_hit, child_facts = self._eval(child, now)
                if child_hit:
                    hit = True
                    facts.extend(child_facts)
        else:  # NOT
            child_hit, _ = self._eval(node.children[0], now)
            hit = not child_hit
            facts = [Fact(node.path, "", None, "not (" + _describe(node.children[0]) + ")")]
        if node.for_ms:
            if not hit:
                self.since.pop(node.path, None)
                return False, []
            since = self.since.setdefault(node.path, now)
            held = now - since
            if held < node.for_ms:
                return False, []
            facts = [
                Fact(f.path, f.parameter, f.value, f"{f.text} for {format_duration(held)}")
                for f in facts
            ]
        return hit, facts

    def snapshot(self) -> dict[str, Any]:
        """Persistable state: detector memory and `for` clocks (windows rebuild from data)."""
        return {
            "since": dict(self.since),
            "detectors": {
                path: s.detector.state()
                for path, s in self.leaf_states.items()
                if s.detector is not None
            },
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.since = {str(k): int(v) for k, v in snapshot.get("since", {}).items()}
        for path, state in snapshot.get("detectors", {}).items():
            leaf_state = self.leaf_states.get(path)
            if leaf_state is not None and leaf_state.detector is not None:
                leaf_state.detector = restore_detector(state)


def _describe(node: Node) -> str:
    if isinstance(node, Leaf):
        if node.op in COMPARISONS:
            return f"{node.parameter} {COMPARISONS[node.op]} {_num(node.threshold or 0.0)}"
        return f"{node.parameter} {node.op}"
    return f" {node.op.lower()} ".join(_describe(c) for c in node.children)
