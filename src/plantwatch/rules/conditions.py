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
from collections.abc import Callable
from dataclasses import dataclass
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
#
# Two ways to ask a rule's state the same question. `RuleState.holds(now)` is the hot
# path the live engine runs on every point: a tree of closures compiled once per
# (rule, device), no allocation, no text. `RuleState.evaluate(now)` walks the tree and
# also says *why* (the facts and their message); the engine calls it only when the
# answer matters (a transition). Both move the same `for` clocks the same way, and
# asking twice at the same `now` gives the same answer, so the engine can call
# `holds` and then `evaluate` for one moment.

Check = Callable[[int, "RuleState"], bool]


@dataclass(frozen=True)
class Fact:
    """Why a leaf is true: what it read and what it compared against."""

    path: str
    parameter: str
    value: float | None
    text: str


class WindowAggregate:
    """avg/min/max/sum/count over the points newer than `now - span`, kept incrementally:
    a running total and monotonic queues, so reading it costs O(1) amortised."""

    __slots__ = ("high", "kind", "low", "points", "span", "total", "updates")

    RESUM_EVERY = 4096  # re-add the running total from scratch now and then (float drift)

    def __init__(self, kind: str, span_ms: int) -> None:
        self.kind = kind
        self.span = span_ms
        self.points: deque[tuple[int, float]] = deque()
        self.total = 0.0
        self.updates = 0
        # (ts, value) with decreasing values (max) / increasing values (min)
        self.high: deque[tuple[int, float]] | None = deque() if kind == "max" else None
        self.low: deque[tuple[int, float]] | None = deque() if kind == "min" else None

    def add(self, ts: int, value: float) -> None:
        point = (ts, value)
        self.points.append(point)
        self.total += value
        high, low = self.high, self.low
        if high is not None:
            while high and high[-1][1] <= value:
                high.pop()
            high.append(point)
        elif low is not None:
            while low and low[-1][1] >= value:
                low.pop()
            low.append(point)
        self.updates += 1
        if self.updates >= self.RESUM_EVERY:
            self.updates = 0
            self.total = math.fsum(v for _, v in self.points)

    def value(self, now: int) -> float | None:
        horizon = now - self.span
        points = self.points
        if points and points[0][0] <= horizon:
            while points and points[0][0] <= horizon:
                self.total -= points.popleft()[1]
            if not points:
                self.total = 0.0
            for queue in (self.high, self.low):
                if queue is not None:
                    while queue and queue[0][0] <= horizon:
                        queue.popleft()
        if not points:
            return None
        kind = self.kind
        if kind == "avg":
            return self.total / len(points)
        if kind == "sum":
            return self.total
        if kind == "count":
            return float(len(points))
        queue = self.high if kind == "max" else self.low
        assert queue is not None
        return queue[0][1]


def _comparison(op: str, t: float) -> Callable[[float], bool]:
    if op == "gt":
        return lambda x: x > t
    if op == "gte":
        return lambda x: x >= t
    if op == "lt":
        return lambda x: x < t
    if op == "lte":
        return lambda x: x <= t
    if op == "eq":
        return lambda x: x == t
    return lambda x: x != t


def _predicate(leaf: Leaf) -> Callable[[float], bool]:
    """What the leaf asks of the number it reads (no_data has none)."""
    op = leaf.op
    if op in COMPARISONS:
        assert leaf.threshold is not None
        return _comparison(op, leaf.threshold)
    if op in RANGES:
        low, high = leaf.low, leaf.high
        assert low is not None and high is not None
        if op == "between":
            return lambda x: low <= x <= high
        return lambda x: not low <= x <= high
    t = leaf.threshold if leaf.threshold is not None else 0.0
    if op in ("change", "rate"):
        if leaf.direction == "up":
            return lambda x: x > t
        if leaf.direction == "down":
            return lambda x: -x > t
        return lambda x: abs(x) > t
    return lambda x: x > t  # anomaly: score above threshold


Latest = dict[str, tuple[int, float]]


class LeafState:
    """One leaf's state on one device.

    Plain leaves (comparisons and ranges of the last value, no_data) keep nothing of
    their own: they read the device's latest values (`latest`: parameter -> (ts,
    value)), which the owner of that mapping updates once per point for every rule.
    Leaves with memory — aggregates, change/rate, anomaly — are `private` and must
    be fed every point of their parameter (`observe`)."""

    __slots__ = (
        "_test",
        "aggregate",
        "detector",
        "last_score",
        "last_ts",
        "last_value",
        "latest",
        "leaf",
        "prev_ts",
        "prev_value",
        "private",
        "started",
        "window",
    )

    def __init__(self, leaf: Leaf, started: int, latest: Latest | None = None) -> None:
        self.leaf = leaf
        self.started = started
        self.latest: Latest = {} if latest is None else latest
        self.last_ts: int | None = None
        self.last_value: float | None = None
        self.prev_ts: int | None = None
        self.prev_value: float | None = None
        self.last_score = 0.0
        self._test: Callable[[float], bool] | None = None
        self.window: deque[tuple[int, float]] | None = None
        self.aggregate: WindowAggregate | None = None
        self.detector: RollingZScore | Ewma | None = None
        op = leaf.op
        self.private = leaf.aggregate is not None or op in ("change", "rate", "anomaly")
        if not self.private:
            return
        if leaf.aggregate is not None:
            self.aggregate = WindowAggregate(leaf.aggregate, leaf.window_ms)
        elif leaf.window_ms:
            # change/rate over a window: the points, plus one older as the baseline
            self.window = deque()
        if op == "anomaly":
            self.detector = make_detector(leaf.detector, leaf.detector_size, leaf.alpha)

    @property
    def test(self) -> Callable[[float], bool]:
        if self._test is None:
            self._test = _predicate(self.leaf)
        return self._test

    def observe(self, ts: int, value: float) -> None:
        """Feed a private leaf one point of its parameter (plain leaves ignore it)."""
        if not self.private:
            return
        last_ts = self.last_ts
        if last_ts is not None and ts < last_ts:
            return  # a late point: the stream evaluator works on time order per device
        self.prev_ts, self.prev_value = last_ts, self.last_value
        self.last_ts, self.last_value = ts, value
        if self.aggregate is not None:
            self.aggregate.add(ts, value)
        elif self.window is not None:
            self.window.append((ts, value))
        if self.detector is not None:
            self.last_score = self.detector.score(value)

    def _baseline(self, now: int) -> tuple[int, float]:
        window = self.window
        assert window is not None
        # Keep one point older than the window for change/rate baselines.
        horizon = now - self.leaf.window_ms
        while len(window) > 1 and window[1][0] <= horizon:
            window.popleft()
        return window[0]

    def reading(self, now: int) -> float | None:
        """The number this leaf compares, or None when it has nothing to judge."""
        if not self.private:
            seen = self.latest.get(self.leaf.parameter)
            return None if seen is None else seen[1]
        last = self.last_value
        if last is None:
            return None
        if self.aggregate is not None:
            return self.aggregate.value(now)
        op = self.leaf.op
        if op == "change" or op == "rate":
            if self.window is not None:
                base_ts, base_value = self._baseline(now)
            else:
                if self.prev_value is None or self.prev_ts is None:
                    return None
                base_ts, base_value = self.prev_ts, self.prev_value
            delta = last - base_value
            if op == "change":
                return delta
            assert self.last_ts is not None
            minutes = (self.last_ts - base_ts) / 60_000
            return delta / minutes if minutes > 0 else None
        return self.last_score  # anomaly

    def silent_ms(self, now: int) -> int:
        seen = self.latest.get(self.leaf.parameter)
        return now - (self.started if seen is None else seen[0])

    def hit(self, now: int) -> bool:
        if self.leaf.op == "no_data":
            return self.silent_ms(now) >= self.leaf.duration_ms
        x = self.reading(now)
        return x is not None and self.test(x)

    def truth(self, now: int) -> tuple[bool, Fact | None]:
        leaf = self.leaf
        if leaf.op == "no_data":
            silent = self.silent_ms(now)
            if silent >= leaf.duration_ms:
                return True, Fact(
                    leaf.path,
                    leaf.parameter,
                    None,
                    f"no {leaf.parameter} data for {format_duration(silent)}",
                )
            return False, None
        x = self.reading(now)
        if x is None or not self.test(x):
            return False, None
        return True, Fact(leaf.path, leaf.parameter, x, self._text(x))

    def _text(self, x: float) -> str:
        leaf = self.leaf
        op = leaf.op
        label = (
            f"{leaf.aggregate}({leaf.parameter}, {format_duration(leaf.window_ms)})"
            if leaf.aggregate
            else leaf.parameter
        )
        if op in COMPARISONS:
            return f"{label} {_num(x)} {COMPARISONS[op]} {_num(leaf.threshold or 0.0)}"
        if op in RANGES:
            return (
                f"{label} {_num(x)} {'within' if op == 'between' else 'outside'} "
                f"[{_num(leaf.low or 0.0)}, {_num(leaf.high or 0.0)}]"
            )
        t = leaf.threshold or 0.0
        if op in ("change", "rate"):
            unit = "/min" if op == "rate" else ""
            return f"{leaf.parameter} {op} {_num(x)}{unit} beyond {_num(t)}{unit}"
        return (
            f"{leaf.parameter} {_num(self.last_value or 0.0)} anomalous "
            f"({leaf.detector} score {_num(x)} > {_num(t)})"
        )


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


def has_for(node: Node) -> bool:
    """Whether the node or anything under it keeps a `for` clock."""
    if node.for_ms:
        return True
    return isinstance(node, Group) and any(has_for(child) for child in node.children)


def _leaf_check(leaf: Leaf, i: int) -> Check:
    """The leaf's truth as a function of (now, state); plain leaves read the device's
    latest values inline, leaves with memory ask their LeafState (the i-th)."""
    p = leaf.parameter
    if leaf.op in COMPARISONS and leaf.aggregate is None:
        t = leaf.threshold
        assert t is not None
        op = leaf.op
        if op == "gt":

            def gt(now: int, st: RuleState, p: str = p, t: float = t) -> bool:
                seen = st.latest.get(p)
                return seen is not None and seen[1] > t

            return gt
        if op == "gte":

            def gte(now: int, st: RuleState, p: str = p, t: float = t) -> bool:
                seen = st.latest.get(p)
                return seen is not None and seen[1] >= t

            return gte
        if op == "lt":

            def lt(now: int, st: RuleState, p: str = p, t: float = t) -> bool:
                seen = st.latest.get(p)
                return seen is not None and seen[1] < t

            return lt
        if op == "lte":

            def lte(now: int, st: RuleState, p: str = p, t: float = t) -> bool:
                seen = st.latest.get(p)
                return seen is not None and seen[1] <= t

            return lte
    if leaf.op in RANGES and leaf.aggregate is None:
        low, high = leaf.low, leaf.high
        assert low is not None and high is not None
        inside = leaf.op == "between"

        def in_range(
            now: int,
            st: RuleState,
            p: str = p,
            lo: float = low,
            hi: float = high,
            want: bool = inside,
        ) -> bool:
            seen = st.latest.get(p)
            return seen is not None and (lo <= seen[1] <= hi) is want

        return in_range
    if leaf.op == "no_data":
        duration = leaf.duration_ms

        def silent(now: int, st: RuleState, p: str = p, d: int = duration) -> bool:
            seen = st.latest.get(p)
            return now - (st.started if seen is None else seen[0]) >= d

        return silent

    def remembered(now: int, st: RuleState, i: int = i) -> bool:
        return st.leaf_list[i].hit(now)

    return remembered


def _all(checks: tuple[Check, ...], stateful: tuple[bool, ...]) -> Check:
    if not any(stateful):
        if len(checks) == 2:
            a, b = checks
            return lambda now, st: a(now, st) and b(now, st)

        def every(now: int, st: RuleState) -> bool:
            for check in checks:  # noqa: SIM110 (a loop beats all() over a generator)
                if not check(now, st):
                    return False
            return True

        return every
    pairs = tuple(zip(checks, stateful, strict=True))

    def every_keeping_clocks(now: int, st: RuleState) -> bool:
        # After the first false child, children with `for` clocks are still asked, so
        # their clocks see every moment (else a clock could span a gap it never saw).
        result = True
        for check, keeps_clock in pairs:
            if result:
                result = check(now, st)
            elif keeps_clock:
                check(now, st)
        return result

    return every_keeping_clocks


def _any(checks: tuple[Check, ...], stateful: tuple[bool, ...]) -> Check:
    if not any(stateful):
        if len(checks) == 2:
            a, b = checks
            return lambda now, st: a(now, st) or b(now, st)

        def some(now: int, st: RuleState) -> bool:
            for check in checks:  # noqa: SIM110 (a loop beats any() over a generator)
                if check(now, st):
                    return True
            return False

        return some
    pairs = tuple(zip(checks, stateful, strict=True))

    def some_keeping_clocks(now: int, st: RuleState) -> bool:
        result = False
        for check, keeps_clock in pairs:
            if not result:
                result = check(now, st)
            elif keeps_clock:
                check(now, st)
        return result

    return some_keeping_clocks


def _held(check: Check, path: str, for_ms: int) -> Check:
    def held(now: int, st: RuleState) -> bool:
        since = st.since
        if not check(now, st):
            if path in since:
                del since[path]
                st.clock_moves += 1
            return False
        start = since.get(path)
        if start is None:
            since[path] = start = now
            st.clock_moves += 1
        return now - start >= for_ms

    return held


class Program:
    """A condition tree compiled once (per rule, not per device): a tree of closures
    of (now, RuleState) -> bool. The per-device state lives in the RuleState."""

    __slots__ = ("check", "index", "leaves", "root")

    def __init__(self, root: Node) -> None:
        self.root = root
        self.leaves = tuple(leaves(root))
        self.index = {leaf.path: i for i, leaf in enumerate(self.leaves)}
        self.check = self._compile(root)

    def _compile(self, node: Node) -> Check:
        check: Check
        if isinstance(node, Leaf):
            check = _leaf_check(node, self.index[node.path])
        else:
            children = tuple(self._compile(child) for child in node.children)
            stateful = tuple(has_for(child) for child in node.children)
            if node.op == "NOT":
                only = children[0]

                def negated(now: int, st: RuleState) -> bool:
                    return not only(now, st)

                check = negated
            elif node.op == "AND":
                check = _all(children, stateful)
            else:
                check = _any(children, stateful)
        if node.for_ms:
            check = _held(check, node.path, node.for_ms)
        return check


class RuleState:
    """One rule's evaluation state for one device.

    `latest` (parameter -> (ts, value)) is the device's latest values; give the same
    mapping to every RuleState of a device and keep it current (as `observe` does)
    to share it, then feed only the `private` leaves each point. Without it the
    state keeps its own, and `observe` does everything. `program`: the rule's
    compiled Program, shared by all devices (compiled here when not given)."""

    __slots__ = (
        "_by_parameter",
        "clock_moves",
        "latest",
        "leaf_list",
        "private",
        "program",
        "root",
        "since",
        "started",
    )

    def __init__(
        self,
        root: Node,
        started: int,
        latest: Latest | None = None,
        program: Program | None = None,
    ) -> None:
        self.root = root
        self.started = started
        self.latest: Latest = {} if latest is None else latest
        self.program = program if program is not None else Program(root)
        # node path -> ts since when the node's own condition has held (for `for`)
        self.since: dict[str, int] = {}
        # Bumped whenever a `for` clock starts or stops: the engine persists on change.
        self.clock_moves = 0
        self.leaf_list = [LeafState(leaf, started, self.latest) for leaf in self.program.leaves]
        # (parameter, leaf) of the leaves with memory of their own, fed point by point
        self.private = tuple((s.leaf.parameter, s) for s in self.leaf_list if s.private)
        self._by_parameter: dict[str, list[LeafState]] | None = None

    @property
    def leaf_states(self) -> dict[str, LeafState]:
        return {s.leaf.path: s for s in self.leaf_list}

    def observe(self, parameter: str, ts: int, value: float) -> None:
        latest = self.latest
        seen = latest.get(parameter)
        if seen is None or ts >= seen[0]:  # a late point does not replace a newer one
            latest[parameter] = (ts, value)
        if self.private:
            by_parameter = self._by_parameter
            if by_parameter is None:
                by_parameter = self._by_parameter = {}
                for p, state in self.private:
                    by_parameter.setdefault(p, []).append(state)
            for state in by_parameter.get(parameter, ()):
                state.observe(ts, value)

    def holds(self, now: int) -> bool:
        """Whether the condition holds at `now` (the hot path: no facts, no text)."""
        return self.program.check(now, self)

    def evaluate(self, now: int) -> Verdict:
        """Whether the condition holds, and why (the facts of the true leaves)."""
        fired, facts = self._eval(self.root, now)
        return Verdict(fired, facts if fired else [])

    def _eval(self, node: Node, now: int) -> tuple[bool, list[Fact]]:
        facts: list[Fact]
        if isinstance(node, Leaf):
            hit, fact = self.leaf_list[self.program.index[node.path]].truth(now)
            facts = [fact] if fact is not None else []
        elif node.op == "AND":
            facts = []
            hit = True
            for child in node.children:
                if not hit:
                    if has_for(child):
                        self._eval(child, now)  # keep its clocks current, as holds() does
                    continue
                child_hit, child_facts = self._eval(child, now)
                if child_hit:
                    facts.extend(child_facts)
                else:
                    hit = False
                    facts = []
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
                if self.since.pop(node.path, None) is not None:
                    self.clock_moves += 1
                return False, []
            since = self.since.get(node.path)
            if since is None:
                since = self.since[node.path] = now
                self.clock_moves += 1
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
                s.leaf.path: s.detector.state() for s in self.leaf_list if s.detector is not None
            },
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        # In place: the compiled `for` checks hold this very dict.
        self.since.clear()
        self.since.update({str(k): int(v) for k, v in snapshot.get("since", {}).items()})
        self.clock_moves += 1
        for path, state in snapshot.get("detectors", {}).items():
            i = self.program.index.get(path)
            leaf_state = self.leaf_list[i] if i is not None else None
            if leaf_state is not None and leaf_state.detector is not None:
                leaf_state.detector = restore_detector(state)


def _describe(node: Node) -> str:
    if isinstance(node, Leaf):
        if node.op in COMPARISONS:
            return f"{node.parameter} {COMPARISONS[node.op]} {_num(node.threshold or 0.0)}"
        return f"{node.parameter} {node.op}"
    return f" {node.op.lower()} ".join(_describe(c) for c in node.children)
