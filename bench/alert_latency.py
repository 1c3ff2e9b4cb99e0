"""Telemetry-to-alert latency: a point arrives -> rule fires -> alert committed -> on the stream.

    python bench/alert_latency.py                       # 60 s, SQLite, `plantwatch up`
    python bench/alert_latency.py --duration 30 --database-url postgresql+asyncpg://...

Runs the real product: `plantwatch up` in a child process (API, ingest, rules engine,
scheduler, jobs) on a fresh database seeded here with one factory, `--devices`
devices and `--rules` active rules (each rule reads one parameter of a few devices,
with a mix of leaves: thresholds, ranges, windowed averages, rates, anomaly). While a
background load of `--rate` points/s arrives over HTTP (10-metric payloads from the
load devices), a trigger device sends a value over its rule's threshold and then
back under it, `--triggers-per-s` times a second. Each alert opens, is committed,
and is pushed on `GET /api/v1/stream`, read here over HTTP.

Latency = when this process reads the alert's `alert.created` event from the stream
minus `received_ms` in the event: the moment plantwatch's ingest took the point in.
Both clocks are this machine's.

Prints JSON lines; the last line is the summary object with `p50_ms`, `p99_ms` and
`points_per_s` (the background load actually sent).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    SeededDevice,
    backend_of,
    emit,
    machine,
    seed_devices,
    throwaway_database,
)

from plantwatch.core.db import Database
from plantwatch.rules import service as rules_service
from plantwatch.rules.schemas import RuleBody
from plantwatch.tenancy.service import SystemActor, add_user

METRICS = 10
PASSWORD = "bench-password-123"  # noqa: S105 (a throwaway database's user)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def background_condition(rng: random.Random, parameter: str) -> dict[str, Any]:
    """A leaf that reads `parameter` and, on the load's values (0..110), rarely holds."""
    kind = rng.choice(["gt", "between", "avg", "rate", "anomaly", "and"])
    if kind == "gt":
        return {"parameter": parameter, "operator": "gt", "threshold": 1e6}
    if kind == "between":
        return {"parameter": parameter, "operator": "between", "low": -10, "high": -5}
    if kind == "avg":
        return {
            "parameter": parameter,
            "aggregate": "avg",
            "window": "1m",
            "operator": "gt",
            "threshold": 1e6,
        }
    if kind == "rate":
        return {"parameter": parameter, "operator": "rate", "threshold": 1e9}
    if kind == "anomaly":
        return {"parameter": parameter, "operator": "anomaly", "threshold": 1e6}
    return {
        "operator": "AND",
        "conditions": [
            {"parameter": parameter, "operator": "gt", "threshold": 1e6, "for": "1m"},
            {"parameter": parameter, "operator": "lt", "threshold": 1e7},
        ],
    }


async def seed(url: str, args: argparse.Namespace) -> tuple[list[SeededDevice], str]:
    devices = await seed_devices(url, args.devices)
    factory_id = devices[0].factory_id
    actor = SystemActor(factory_id, email="bench")
    db = Database(url)
    rng = random.Random(7)
    load = devices[1:]
    trigger = devices[0]
    try:
        async with db.session() as session:
            await add_user(
                session,
                factory_id,
                email="bench@example.com",
                role="factory_manager",
                password=PASSWORD,
                full_name="Bench",
                actor=actor,
            )
            await session.commit()
        async with db.session() as session:
            await rules_service.create_rule(
                session,
                actor,
                RuleBody.model_validate(
                    {
                        "name": "trigger over 50",
                        "conditions": {"parameter": "trigger", "operator": "gt", "threshold": 50},
                        "scope": {"type": "devices", "device_ids": [trigger.device_id]},
                        "severity": "high",
                        "cooldown": 0,
                        "auto_resolve": True,
                    }
                ),
            )
            for i in range(args.rules - 1):
                parameter = f"m{i % METRICS}"
                covered = rng.sample(load, k=min(len(load), args.devices_per_rule))
                await rules_service.create_rule(
                    session,
                    actor,
                    RuleBody.model_validate(
                        {
                            "name": f"background {i}",
                            "conditions": background_condition(rng, parameter),
                            "scope": {
                                "type": "devices",
                                "device_ids": [d.device_id for d in covered],
                            },
                            "severity": rng.choice(["low", "medium", "high"]),
                        }
                    ),
                )
    finally:
        await db.dispose()
    return devices, "bench"


def start_plantwatch(url: str, data_dir: Path, port: int, log: Path) -> Any:
    env = {
        **os.environ,
        "PLANTWATCH_DATABASE_URL": url,
        "PLANTWATCH_DATA_DIR": str(data_dir),
        "PLANTWATCH_PORT": str(port),
        "PLANTWATCH_MQTT_PORT": str(free_port()),
        "PLANTWATCH_LOG_LEVEL": "warning",
    }
    binary = shutil.which("plantwatch") or "plantwatch"
    import subprocess

    return subprocess.Popen(  # noqa: S603 (our own command)
        [binary, "up"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


async def wait_ready(base: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise RuntimeError("plantwatch did not become ready")


def received_ms_of(event: Any) -> int | None:
    """`received_ms` of an alert event, wherever the stream put the alert's payload."""
    if isinstance(event, dict):
        value = event.get("received_ms")
        if isinstance(value, int):
            return value
        for key in ("payload", "data", "alert"):
            found = received_ms_of(event.get(key))
            if found is not None:
                return found
    return None


async def read_stream(
    base: str,
    token: str,
    latencies: list[float],
    stages: list[tuple[float, float]],
    ready: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    async with (
        httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(10, read=None)) as client,
        client.stream("GET", "/api/v1/stream", params={"types": "alert"}, headers=headers) as r,
    ):
        r.raise_for_status()
        ready.set()
        event = ""
        async for line in r.aiter_lines():
            if stop.is_set():
                return
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "alert":
                now = time.time() * 1000
                data = orjson.loads(line[5:])
                received = received_ms_of(data)
                if data.get("subject") == "alert.created" and received is not None:
                    latencies.append(now - received)
                    recorded = data.get("recorded_at")
                    if recorded:
                        at = dt.datetime.fromisoformat(recorded).timestamp() * 1000
                        stages.append((at - received, now - at))
            elif not line:
                event = ""


def load_main(base: str, rate: float) -> None:
    """Child process: send the background load until stdin closes; print
    [points sent, seconds]."""
    keys = orjson.loads(sys.stdin.buffer.readline())

    async def run() -> tuple[int, float]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(sys.stdin.fileno(), stop.set)  # EOF on stdin: stop
        started = time.perf_counter()
        sent = await background_load(base, keys, rate, stop)
        return sent, time.perf_counter() - started

    print(orjson.dumps(asyncio.run(run())).decode())


async def background_load(base: str, keys: Sequence[str], rate: float, stop: asyncio.Event) -> int:
    """`rate` points/s: each load device posts 10 payloads of 10 metrics once a second,
    the devices' requests spread evenly over the second."""
    sent = 0
    per_request = METRICS * 10
    requests_per_s = rate / per_request
    interval = 1 / requests_per_s
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        i = 0
        next_at = time.perf_counter()
        pending: set[asyncio.Task[Any]] = set()
        while not stop.is_set():
            key = keys[i % len(keys)]
            now_ms = int(time.time() * 1000)
            body = [
                {
                    "ts": now_ms - 900 + k * 100,
                    "values": {f"m{m}": round(random.uniform(0, 110), 2) for m in range(METRICS)},
                }
                for k in range(10)
            ]
            task = asyncio.create_task(
                client.post(
                    "/api/v1/ingest",
                    content=orjson.dumps(body),
                    headers={"X-Device-Key": key},
                )
            )
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += per_request
            i += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        await asyncio.gather(*pending, return_exceptions=True)
    return sent


async def triggers(base: str, trigger: SeededDevice, per_s: float, stop: asyncio.Event) -> int:
    count = 0
    half = 0.5 / per_s
    headers = {"X-Device-Key": trigger.key}
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        while not stop.is_set():
            await client.post("/api/v1/ingest", json={"values": {"trigger": 100}}, headers=headers)
            count += 1
            await asyncio.sleep(half)
            await client.post("/api/v1/ingest", json={"values": {"trigger": 0}}, headers=headers)
            await asyncio.sleep(half)
    return count


async def main(args: argparse.Namespace) -> dict[str, Any]:
    async with throwaway_database(args.database_url) as url:
        started = time.perf_counter()
        devices, slug = await seed(url, args)
        seed_s = time.perf_counter() - started
        data_dir = Path(tempfile.mkdtemp(prefix="plantwatch-bench-alerts-"))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        process = start_plantwatch(url, data_dir, port, data_dir / "plantwatch.log")
        try:
            await wait_ready(base)
            async with httpx.AsyncClient(base_url=base) as client:
                login = await client.post(
                    "/api/v1/auth/login",
                    json={"factory_slug": slug, "email": "bench@example.com", "password": PASSWORD},
                )
                login.raise_for_status()
                token = login.json()["access_token"]
            latencies: list[float] = []
            stages: list[tuple[float, float]] = []
            stop = asyncio.Event()
            ready = asyncio.Event()
            reader = asyncio.create_task(read_stream(base, token, latencies, stages, ready, stop))
            await asyncio.wait_for(ready.wait(), 10)
            # The load runs in a child process, so reading the stream here is not
            # delayed by building and sending it.
            keys = orjson.dumps([d.key for d in devices[1:]])
            loader = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--load",
                base,
                str(args.rate),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            assert loader.stdin is not None
            loader.stdin.write(keys + b"\n")
            await loader.stdin.drain()
            await asyncio.sleep(args.warmup)
            latencies.clear()
            stages.clear()
            server = psutil.Process(process.pid)
            server_cpu = server.cpu_times()
            fired = asyncio.create_task(triggers(base, devices[0], args.triggers_per_s, stop))
            await asyncio.sleep(args.duration)
            server_after = server.cpu_times()
            server_share = (
                server_after.user + server_after.system - server_cpu.user - server_cpu.system
            ) / args.duration
            stop.set()
            loader.stdin.close()  # tells the loader to stop
            out, _ = await loader.communicate()
            sent_points, load_seconds = orjson.loads(out)
            trigger_count = await fired
            await asyncio.sleep(1)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await reader
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except Exception:
                os.killpg(process.pid, signal.SIGKILL)
            log_tail = (data_dir / "plantwatch.log").read_bytes()[-2000:].decode(errors="replace")
            shutil.rmtree(data_dir, ignore_errors=True)
    if not latencies:
        raise SystemExit(f"no alert reached the stream; plantwatch log:\n{log_tail}")
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 2)

    to_log = sorted(s[0] for s in stages) or [0.0]
    to_client = sorted(s[1] for s in stages) or [0.0]
    return {
        "bench": "alert_latency",
        # arrival -> alert committed and recorded in the stream log; log -> client
        "to_stream_log_p50_ms": round(to_log[len(to_log) // 2], 2),
        "log_to_client_p50_ms": round(to_client[len(to_client) // 2], 2),
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": round(ordered[-1], 2),
        "mean_ms": round(statistics.fmean(ordered), 2),
        "alerts": len(ordered),
        "triggers": trigger_count,
        "points_per_s": round(sent_points / load_seconds),
        "target_points_per_s": args.rate,
        "server_cpu_share": round(server_share, 2),
        "rules": args.rules,
        "devices": args.devices,
        "devices_per_rule": args.devices_per_rule,
        "duration_s": args.duration,
        "seed_s": round(seed_s, 1),
        "database": backend_of(url),
        "targets_met": pct(50) < 10 and pct(99) < 50,
        "machine": machine(),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--rate", type=float, default=10_000, help="background points/s")
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=201, help="1 trigger + load devices")
    parser.add_argument("--devices-per-rule", type=int, default=5)
    parser.add_argument("--triggers-per-s", type=float, default=4)
    return parser.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        load_main(sys.argv[2], float(sys.argv[3]))
    else:
        emit(asyncio.run(main(parse_args())))
