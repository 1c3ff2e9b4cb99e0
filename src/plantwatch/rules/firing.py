"""From condition verdicts to alert transitions, per (rule, device). Pure: no I/O.

The same state machine drives the live engine and backtests, so a backtest
shows exactly what the engine would have done:

- a rising edge opens an alert, unless the rule fired less than `cooldown`
  ago (then it is suppressed);
- a rising edge while the alert is still open (not auto-resolved) is a repeat:
  the alert's `occurrences` goes up, no new alert;
- a falling edge resolves the alert when the rule auto-resolves;
- outside the rule's schedule the condition counts as false.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Transition:
    kind: str  # "open" | "repeat" | "clear"
    at_ms: int


@dataclass
class FiringTracker:
    cooldown_ms: int
    auto_resolve: bool
    condition_true: bool = False
    open: bool = False
    last_fired_ms: int | None = None

    def step(self, now_ms: int, fired: bool) -> Transition | None:
        if fired and not self.condition_true:
            self.condition_true = True
            if self.open:
                self.last_fired_ms = now_ms
                return Transition("repeat", now_ms)
            if self.last_fired_ms is not None and now_ms - self.last_fired_ms < self.cooldown_ms:
                return None
            self.open = True
            self.last_fired_ms = now_ms
            return Transition("open", now_ms)
        if not fired and self.condition_true:
            self.condition_true = False
            if self.open and self.auto_resolve:
                self.open = False
                return Transition("clear", now_ms)
        return None

    def resolved(self) -> None:
        """A person resolved the alert: the next rising edge may open a new one."""
        self.open = False
