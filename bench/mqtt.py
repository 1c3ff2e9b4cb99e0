"""Telemetry over MQTT through Mosquitto: publish -> broker -> plantwatch -> committed.

    python bench/mqtt.py                          # own Mosquitto on a free port, SQLite
    python bench/mqtt.py --messages 400000 --database-url postgresql+asyncpg://...

Devices publish 10-metric JSON payloads with QoS 1 to
`factories/bench/devices/<key>/telemetry`; plantwatch's external-broker subscriber
(`connectors/mqtt_client.IngestSubscriber`, shared subscription, acks after commit)
stores them through the ingest pipeline, in this process as `plantwatch run ingest`
would. The publishers run in child processes (`connectors/mqtt_load`, a pipelined
QoS 1 publisher), so they don't share plantwatch's event loop.

`points_per_s` = points stored / seconds from the first publish to the last point
committed. The run checks every point is in the store (raw rows, both rollup tiers).

The bench starts its own Mosquitto (from Debian's package) with a queue limit that
suits a burst of QoS 1 messages to one slow-starting subscriber: the stock
configuration drops QoS 1 messages beyond 1000 queued per client, which a benchmark
that publishes faster than it stores would hit (`--broker-url` uses a running one).

Prints JSON lines; the last line is the summary object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    RssSampler,
    backend_of,
    emit,
    machine,
    seed_devices,
    table_counts,
    throwaway_database,
)

from plantwatch.app import Container
from plantwatch.connectors.mqtt import STORED, MqttIngest
from plantwatch.connectors.mqtt_client import IngestSubscriber, MqttUrl
from plantwatch.connectors.mqtt_load import publish_messages, telemetry_messages
from plantwatch.core.config import Settings
from plantwatch.core.runtime import tune_gc

METRICS = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def mosquitto(url: str | None) -> AsyncIterator[tuple[str, int, int | None]]:
    """(host, port, pid of the broker if the bench started it)."""
    if url:
        parsed = MqttUrl.parse(url)
        yield parsed.host, parsed.port, None
        return
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    workdir = Path(tempfile.mkdtemp(prefix="plantwatch-bench-mqtt-"))
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_queued_messages 0\n"  # no limit: the subscriber falls behind during a burst
        "max_inflight_messages 0\n"
        "log_dest none\n"
    )
    # Started and stopped once per run: a blocking Popen is fine here.
    process = subprocess.Popen([binary, "-c", str(conf)])  # noqa: S603, ASYNC220
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("mosquitto did not start")
        yield "127.0.0.1", port, process.pid
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def publish_main(argv: Sequence[str]) -> None:
    """Child process: publish this share of the messages, print stats as JSON."""
    host, port, count, window, start_ms = argv[0], int(argv[1]), int(argv[2]), argv[3], argv[4]
    topics = orjson.loads(sys.stdin.buffer.read())

    async def run() -> dict[str, Any]:
        messages = list(telemetry_messages(topics, count, metrics=METRICS, start_ms=int(start_ms)))
        stats = await publish_messages(
            host, port, messages, qos=1, window=int(window), timeout_s=600
        )
        return {"sent": stats.sent, "acked": stats.acked, "seconds": stats.seconds}

    print(orjson.dumps(asyncio.run(run())).decode())


class Counting:
    """Counts messages stored, and wakes the bench when all are."""

    def __init__(self, ingest: MqttIngest, expected: int) -> None:
        self.ingest = ingest
        self.expected = expected
        self.stored = 0
        self.other: dict[str, int] = {}
        self.done = asyncio.Event()
        self.last_at = 0.0

    async def handle_messages(
        self, messages: list[tuple[str, bytes]], *, broker: str = "x"
    ) -> list[str]:
        results = await self.ingest.handle_messages(messages, broker=broker)
        for result in results:
            if result == STORED:
                self.stored += 1
            else:
                self.other[result] = self.other.get(result, 0) + 1
        self.last_at = time.perf_counter()
        if self.stored >= self.expected:
            self.done.set()
        return results


async def main(args: argparse.Namespace) -> dict[str, Any]:
    async with (
        throwaway_database(args.database_url) as url,
        mosquitto(args.broker_url) as (host, port, broker_pid),
    ):
        devices = await seed_devices(url, args.devices)
        data_dir = Path(tempfile.mkdtemp(prefix="plantwatch-bench-data-"))
        settings = Settings(database_url=url, data_dir=data_dir)
        container = Container.build(settings)
        await container.start()
        tune_gc()  # as `plantwatch run ingest` does
        ingest = MqttIngest(container.db, container.devices, container.pipeline)
        counting = Counting(ingest, args.messages)
        subscriber = IngestSubscriber(
            counting,  # type: ignore[arg-type]
            MqttUrl.parse(f"mqtt://{host}:{port}"),
            client_id=f"plantwatch-bench-{os.getpid()}",
            max_in_flight=args.in_flight,
        )
        running = asyncio.create_task(subscriber.run())
        sampler = RssSampler(os.getpid(), every_s=5).start()
        try:
            await asyncio.wait_for(subscriber.connected.wait(), 10)
            topics = [f"factories/bench/devices/{d.device_key}/telemetry" for d in devices]
            # Every series starts with the same timestamp; each message 1 ms after the
            # previous message of its topic, so every point is a new row.
            start_ms = int(time.time() * 1000) - args.messages // len(topics) - 60_000
            shares = [topics[i :: args.publishers] for i in range(args.publishers)]
            counts = [args.messages // args.publishers] * args.publishers
            counts[0] += args.messages - sum(counts)
            started = time.perf_counter()
            me = psutil.Process()
            cpu_before = me.cpu_times()
            broker_process = broker_pid and psutil.Process(broker_pid)
            broker_before = broker_process.cpu_times() if broker_process else None
            children = []
            for share, count in zip(shares, counts, strict=True):
                child = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--publish",
                    host,
                    str(port),
                    str(count),
                    str(args.window),
                    str(start_ms),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
                children.append((child, orjson.dumps(share)))
            outputs = await asyncio.gather(*(c.communicate(data) for c, data in children))
            published = [orjson.loads(out) for out, _ in outputs]
            await asyncio.wait_for(counting.done.wait(), 600)
            seconds = counting.last_at - started
            cpu_after = me.cpu_times()
            cpu_share = {
                "plantwatch_cpu_share": round(
                    (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system)
                    / seconds,
                    2,
                )
            }
            if broker_process and broker_before:
                now_cpu = broker_process.cpu_times()
                cpu_share["broker_cpu_share"] = round(
                    (now_cpu.user + now_cpu.system - broker_before.user - broker_before.system)
                    / seconds,
                    2,
                )
            await container.pipeline._queue.join()
        finally:
            rss = sampler.stop()
            subscriber.stop()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(running, 15)
            await container.close()
            shutil.rmtree(data_dir, ignore_errors=True)
        counts_now = await table_counts(url)
        points = counting.stored * METRICS
        return {
            "bench": "mqtt",
            "points_per_s": round(points / seconds),
            "messages_per_s": round(counting.stored / seconds),
            "seconds": round(seconds, 2),
            "messages": args.messages,
            "stored_messages": counting.stored,
            "not_stored": counting.other,
            "points": points,
            "verified": counts_now.get("raw") == points
            and counts_now.get("rollup_1m_points") == points,
            "stored": counts_now,
            "publishers": published,
            "devices": args.devices,
            "metrics_per_payload": METRICS,
            "in_flight": args.in_flight,
            "subscriber_connections": subscriber.connections,
            "subscriber_last_error": subscriber.last_error,
            **cpu_share,
            "database": backend_of(url),
            "broker": "external" if args.broker_url else "mosquitto (started by the bench)",
            **{k: v for k, v in rss.items() if k.startswith("rss")},
            "machine": machine(),
        }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--broker-url", default=None, help="use a running broker")
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--window", type=int, default=2000, help="QoS 1 window per publisher")
    parser.add_argument(
        "--in-flight",
        type=int,
        default=Settings().mqtt_max_in_flight,
        help="subscriber receive maximum (default: PLANTWATCH_MQTT_MAX_IN_FLIGHT's default)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--publish":
        publish_main(sys.argv[2:])
    else:
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
        emit(asyncio.run(main(parse_args())))
