"""Operational health scores (0-100) of a factory and of a machine. Pure: no I/O.

Both are computed from what plantwatch knows now — open alerts, devices offline,
parameters beyond their limits — and come with the breakdown behind the number,
so the UI can say *why* a machine scores 62. The factory formula is FactoryOps'
(100, minus 5 per open critical alert, 2 per high, 1 per offline device); the
machine formula weighs the same facts for one machine. Predictive health (from
degradation models and RUL) is the analytics issue's, and will be combined here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

FACTORY_ALERT_PENALTY: Mapping[str, int] = {"critical": 5, "high": 2, "medium": 0, "low": 0}
FACTORY_OFFLINE_PENALTY = 1

DEVICE_ALERT_PENALTY: Mapping[str, int] = {"critical": 30, "high": 15, "medium": 7, "low": 3}
DEVICE_OFFLINE_PENALTY = 20
DEVICE_LIMIT_PENALTY: Mapping[str, int] = {"critical": 10, "warning": 4}


@dataclass(frozen=True)
class Health:
    score: int
    # (reason, points taken off), largest first: the tooltip behind the number.
    deductions: list[tuple[str, int]] = field(default_factory=list)

    @property
    def label(self) -> str:
        """Words for the number, so colour is never the only signal."""
        if self.score >= 90:
            return "good"
        if self.score >= 70:
            return "fair"
        if self.score >= 40:
            return "needs attention"
        return "critical"


def _score(deductions: list[tuple[str, int]]) -> Health:
    taken = [(reason, points) for reason, points in deductions if points > 0]
    taken.sort(key=lambda d: -d[1])
    return Health(max(0, 100 - sum(points for _, points in taken)), taken)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def factory_health(open_alerts: Mapping[str, int], offline_devices: int) -> Health:
    """The factory's score from its open alerts by severity and its offline devices."""
    deductions = [
        (
            f"{_plural(count, severity + ' alert')} open",
            count * FACTORY_ALERT_PENALTY.get(severity, 0),
        )
        for severity, count in open_alerts.items()
    ]
    deductions.append(
        (f"{_plural(offline_devices, 'device')} offline", offline_devices * FACTORY_OFFLINE_PENALTY)
    )
    return _score(deductions)


def device_health(
    online: bool | None, open_alerts: Mapping[str, int], limit_levels: Mapping[str, int]
) -> Health:
    """One machine: its open alerts by severity, whether it is online (None: never seen,
    which costs nothing), and how many of its parameters sit at each limit level."""
    deductions = [
        (
            f"{_plural(count, severity + ' alert')} open",
            count * DEVICE_ALERT_PENALTY.get(severity, 0),
        )
        for severity, count in open_alerts.items()
    ]
    if online is False:
        deductions.append(("offline", DEVICE_OFFLINE_PENALTY))
    deductions.extend(
        (
            f"{_plural(count, 'parameter')} at {level} limit",
            count * DEVICE_LIMIT_PENALTY.get(level, 0),
        )
        for level, count in limit_levels.items()
    )
    return _score(deductions)
