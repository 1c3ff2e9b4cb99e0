"""Streaming anomaly detectors, one per series. Pure: no I/O.

Each detector scores a new value against what it has seen so far (the score
is computed *before* the value is learned, so an outlier cannot hide itself),
and its whole state is a small JSON-able dict so the engine can persist it and
resume after a restart.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Protocol


class Detector(Protocol):
    kind: str

    def score(self, value: float) -> float:
        """Anomaly score of `value` (|z|-like), then learn it."""

    def state(self) -> dict[str, Any]: ...


class RollingZScore:
    """|x - mean| / std over the last `size` values (needs `min_count` to speak)."""

    kind = "zscore"

    def __init__(self, size: int = 100, min_count: int = 10) -> None:
        self.size = size
        self.min_count = min_count
        self.values: deque[float] = deque(maxlen=size)
        self.total = 0.0
        self.total_sq = 0.0

    def score(self, value: float) -> float:
        n = len(self.values)
        result = 0.0
        if n >= self.min_count:
            mean = self.total / n
            var = max(self.total_sq / n - mean * mean, 0.0)
            std = math.sqrt(var)
            if std > 1e-12:
                result = abs(value - mean) / std
            elif abs(value - mean) > 1e-9 * max(1.0, abs(mean)):
                result = math.inf  # a flat signal that moved
        if n == self.size:
            old = self.values[0]
            self.total -= old
            self.total_sq -= old * old
        self.values.append(value)
        self.total += value
        self.total_sq += value * value
        return result

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "size": self.size,
            "min_count": self.min_count,
            "values": list(self.values),
        }

    @classmethod
    def restore(cls, state: dict[str, Any]) -> RollingZScore:
        detector = cls(int(state["size"]), int(state.get("min_count", 10)))
        for value in state.get("values", [])[-detector.size :]:
            detector.values.append(float(value))
            detector.total += float(value)
            detector.total_sq += float(value) ** 2
        return detector


class Ewma:
    """Exponentially weighted mean and variance; score = |x - mean| / std."""

    kind = "ewma"

    def __init__(self, alpha: float = 0.1, min_count: int = 10) -> None:
        self.alpha = alpha
        self.min_count = min_count
        self.count = 0
        self.mean = 0.0
        self.var = 0.0

    def score(self, value: float) -> float:
        result = 0.0
        if self.count >= self.min_count:
            std = math.sqrt(self.var)
            if std > 1e-12:
                result = abs(value - self.mean) / std
            elif abs(value - self.mean) > 1e-9 * max(1.0, abs(self.mean)):
                result = math.inf
        if self.count == 0:
            self.mean = value
        else:
            diff = value - self.mean
            incr = self.alpha * diff
            self.mean += incr
            self.var = (1 - self.alpha) * (self.var + diff * incr)
        self.count += 1
        return result

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "alpha": self.alpha,
            "min_count": self.min_count,
            "count": self.count,
            "mean": self.mean,
            "var": self.var,
        }

    @classmethod
    def restore(cls, state: dict[str, Any]) -> Ewma:
        detector = cls(float(state["alpha"]), int(state.get("min_count", 10)))
        detector.count = int(state["count"])
        detector.mean = float(state["mean"])
        detector.var = float(state["var"])
        return detector


def make_detector(kind: str, size: int, alpha: float) -> RollingZScore | Ewma:
    return RollingZScore(size) if kind == "zscore" else Ewma(alpha)


def restore_detector(state: dict[str, Any]) -> RollingZScore | Ewma:
    return RollingZScore.restore(state) if state["kind"] == "zscore" else Ewma.restore(state)
