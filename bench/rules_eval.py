"""Rule evaluation throughput: leaf evaluations per second (issue 4 target >= 200,000).

    python bench/rules_eval.py [--rules 1000] [--devices 500] [--seconds 30] [--seed 4]

In memory, no database or bus: the live engine's own evaluation path
(`RuleEngine.evaluate_item` for every committed message, `evaluate_due` once per
simulated second for the time-driven rules) over a realistic plant:

- `--devices` machines in one factory, each sending one message a second with 10
  metrics (random walks, now and then a spike or a dropout, so rules do fire and
  clear and `for` clocks start and stop);
- `--rules` rules: scopes 30 % whole factory, 50 % 5-20 listed devices, 20 % a group
  of 50; conditions a mix of plain comparisons, AND/OR/NOT trees, ranges, `for`
  durations, sliding-window aggregates, change/rate, anomaly detectors (z-score
  and EWMA) and no_data; some rules have a working-hours schedule.

A leaf evaluation is one leaf of a condition tree judged at one moment (the
engine short-circuits AND/OR, so leaves it does not need are not counted). The
count comes from a first, instrumented pass that wraps every compiled leaf check
with a counter; the timed pass runs the identical, seeded workload without the
wrapper. Each pass prints a JSON line; the last line is the summary with
`leaf_evals_per_s`, `rule_evals_per_s`, `points_per_s` and `transitions`.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit, machine

from plantwatch.rules import conditions as cond
from plantwatch.rules.engine import CompiledRule, RuleEngine
from plantwatch.rules.models import Rule

FACTORY = 1
METRICS = (
    "spindle_temp",
    "coolant_flow",
    "vibration",
    "pressure",
    "current",
    "voltage",
    "rpm",
    "oil_temp",
    "humidity",
    "torque",
)
BASE = {m: 50.0 + 10 * i for i, m in enumerate(METRICS)}
START_MS = 1_780_000_000_000  # a Wednesday, 2026-05-27T19:06:40Z


def comparison(rng: random.Random, metric: str | None = None) -> dict[str, Any]:
    metric = metric or rng.choice(METRICS)
    op = rng.choice(("gt", "gte", "lt", "lte"))
    offset = rng.uniform(4, 12)
    threshold = BASE[metric] + (offset if op.startswith("g") else -offset)
    return {"parameter": metric, "operator": op, "threshold": round(threshold, 1)}


def condition(rng: random.Random, kind: str) -> dict[str, Any]:
    m = rng.choice(METRICS)
    if kind == "compare":
        return comparison(rng)
    if kind == "and":
        return {"operator": "AND", "conditions": [comparison(rng), comparison(rng)]}
    if kind == "tree":
        return {
            "operator": "AND",
            "conditions": [
                comparison(rng),
                {
                    "operator": "OR",
                    "conditions": [
                        comparison(rng),
                        {"operator": "NOT", "conditions": [comparison(rng)]},
                    ],
                },
            ],
        }
    if kind == "for":
        return {**comparison(rng), "for": rng.choice(("30s", "1m", "5m"))}
    if kind == "range":
        return {
            "parameter": m,
            "operator": rng.choice(("between", "outside")),
            "low": BASE[m] - 8,
            "high": BASE[m] + 8,
        }
    if kind == "window":
        return {
            "parameter": m,
            "aggregate": rng.choice(("avg", "max", "min", "sum", "count")),
            "window": rng.choice(("1m", "5m")),
            "operator": "gt",
            "threshold": BASE[m] + 5,
        }
    if kind == "change":
        return {
            "parameter": m,
            "operator": rng.choice(("change", "rate")),
            "threshold": 6,
            **({"window": "1m"} if rng.random() < 0.5 else {}),
        }
    if kind == "anomaly":
        detector = rng.choice(("zscore", "ewma"))
        return {"parameter": m, "operator": "anomaly", "detector": detector, "threshold": 4}
    return {"parameter": m, "operator": "no_data", "duration": "10s"}


KINDS = (
    ("compare", 30),
    ("and", 15),
    ("tree", 10),
    ("for", 12),
    ("range", 8),
    ("window", 10),
    ("change", 7),
    ("anomaly", 5),
    ("no_data", 3),
)


def build_engine(args: argparse.Namespace, clock: Callable[[], int]) -> RuleEngine:
    rng = random.Random(args.seed)
    devices = list(range(1, args.devices + 1))
    groups = [rng.sample(devices, min(50, len(devices))) for _ in range(10)]
    engine = RuleEngine(None, None, clock=clock, background=False)
    kinds = [k for k, weight in KINDS for _ in range(weight)]
    working_hours = {
        "type": "time_window",
        "windows": [{"days": [1, 2, 3, 4, 5], "start": "06:00", "end": "22:00"}],
    }
    for rule_id in range(1, args.rules + 1):
        roll = rng.random()
        if roll < 0.3:
            scope, members = "factory", []
        elif roll < 0.8:
            scope, members = "devices", rng.sample(devices, rng.randint(5, 20))
        else:
            scope, members = "group", rng.choice(groups)
        rule = Rule(
            id=rule_id,
            factory_id=FACTORY,
            name=f"rule {rule_id}",
            conditions=condition(rng, rng.choice(kinds)),
            scope=scope,
            schedule=working_hours if rng.random() < 0.2 else None,
            severity="high",
            cooldown_s=rng.choice((0, 60, 900)),
            auto_resolve=True,
            actions={"alert": True, "event": True},
            version=1,
        )
        engine.add_rule(CompiledRule.build(rule, "Europe/Berlin", members), devices)
    return engine


def workload(args: argparse.Namespace) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Per simulated second: (now_ms, the messages committed in it)."""
    rng = random.Random(args.seed + 1)
    level = {(d, m): BASE[m] for d in range(1, args.devices + 1) for m in METRICS}
    for second in range(args.seconds):
        now = START_MS + second * 1000
        items = []
        for device in range(1, args.devices + 1):
            columns: dict[str, tuple[list[int], list[float]]] = {}
            for m in METRICS:
                if rng.random() < 0.01:
                    continue  # a dropped reading
                value = level[(device, m)] + rng.gauss(0, 1.5)
                value += rng.gauss(0, 15) if rng.random() < 0.005 else 0.0  # a spike
                level[(device, m)] += (BASE[m] - level[(device, m)]) * 0.05 + rng.gauss(0, 0.5)
                columns[m] = ([now], [round(value, 3)])
            items.append(
                {
                    "factory_id": FACTORY,
                    "device_id": device,
                    "device_key": f"M{device:04d}",
                    "received_ms": now,
                    "columns": columns,
                    "states": {},
                }
            )
        yield now, items


class Clock:
    def __init__(self) -> None:
        self.now = START_MS

    def __call__(self) -> int:
        return self.now


def run(args: argparse.Namespace, counting: bool) -> dict[str, Any]:
    counter = [0]
    original = cond._leaf_check
    if counting:

        def counted(leaf: cond.Leaf, i: int) -> cond.Check:
            check = original(leaf, i)

            def wrapper(now: int, st: cond.RuleState) -> bool:
                counter[0] += 1
                return check(now, st)

            return wrapper

        cond._leaf_check = counted  # type: ignore[assignment]
    try:
        clock = Clock()
        engine = build_engine(args, clock)
        batches = list(workload(args))
        warmup, measured = batches[: args.warmup], batches[args.warmup :]

        def play(part: list[tuple[int, list[dict[str, Any]]]]) -> int:
            transitions = 0
            for now, items in part:
                clock.now = now
                for item in items:
                    transitions += len(engine.evaluate_item(item))
                transitions += len(engine.evaluate_due(now + 500))
            return transitions

        # Warm-up: every (rule, device) slot is created on its device's first message
        # (once per process lifetime), and windows and detectors fill.
        started = time.perf_counter()
        play(warmup)
        warmup_s = time.perf_counter() - started
        counter[0] = 0
        before = dict(engine.stats)
        gc.collect()
        started, cpu_started = time.perf_counter(), time.process_time()
        transitions = play(measured)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    finally:
        cond._leaf_check = original
    return {
        "pass": "counting" if counting else "timed",
        "warmup_seconds": round(warmup_s, 3),
        "seconds": round(elapsed, 3),
        "cpu_seconds": round(cpu, 3),
        "leaf_evals": counter[0],
        "rule_evals": engine.stats["evaluations"] - before["evaluations"],
        "points": engine.stats["points"] - before["points"],
        "transitions": transitions,
        "slots": sum(len(s) for s in engine._slots.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--seconds", type=int, default=30, help="simulated seconds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed simulated seconds")
    parser.add_argument("--seed", type=int, default=4)
    args = parser.parse_args()
    counted = run(args, counting=True)
    emit(counted)
    timed = run(args, counting=False)
    emit(timed)
    assert timed["rule_evals"] == counted["rule_evals"], "the two passes must do the same work"
    assert timed["transitions"] == counted["transitions"]
    seconds, cpu = timed["seconds"], timed["cpu_seconds"]
    emit(
        {
            **machine(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "rules": args.rules,
            "devices": args.devices,
            "simulated_seconds": args.seconds - args.warmup,
            "slots": timed["slots"],
            "warmup_seconds": timed["warmup_seconds"],
            "leaf_evals": counted["leaf_evals"],
            "rule_evals": timed["rule_evals"],
            "points": timed["points"],
            "transitions": timed["transitions"],
            "seconds": seconds,
            "cpu_seconds": cpu,
            "leaf_evals_per_s": round(counted["leaf_evals"] / seconds),
            "leaf_evals_per_cpu_s": round(counted["leaf_evals"] / cpu),
            "rule_evals_per_s": round(timed["rule_evals"] / seconds),
            "points_per_s": round(timed["points"] / seconds),
            "target_leaf_evals_per_s": 200_000,
            "target_met": counted["leaf_evals"] / seconds >= 200_000,
        }
    )


if __name__ == "__main__":
    main()
