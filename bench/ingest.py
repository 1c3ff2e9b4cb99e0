"""End-to-end telemetry ingest throughput, against the raw insert rate of the same rows.

    python bench/ingest.py                                  # SQLite temp file, pipeline mode
    python bench/ingest.py --mode http
    python bench/ingest.py --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/postgres
    python bench/ingest.py --mode http --duration 600       # long run, RSS sampled

Payloads -> durable raw rows + 1m/1h rollups + latest values, in points/s:

- `--mode pipeline`: payload bytes straight into `IngestPipeline.ingest` from many
  concurrent callers in this process (what the MQTT connector and HTTP handler call).
- `--mode http`: the real app under uvicorn in a child process (its own core), fed
  `POST /api/v1/ingest` batches with `X-Device-Key` by an httpx client here over
  HTTP/1.1 keep-alive connections.

Then, in the same run and database, the same rows go into a twin of `telemetry_raw`
with the database's fastest bulk path (SQLite: executemany in one transaction per
chunk; PostgreSQL: COPY) -> `raw_rows_per_s`; `ratio` = points_per_s / raw_rows_per_s.

Prints JSON lines; the last line is the summary object. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    DAY_MS,
    RawResult,
    Row,
    RssSampler,
    SeededDevice,
    backend_of,
    checkpoint,
    emit,
    machine,
    postgres_cpu_seconds,
    raw_insert_rate,
    seed_devices,
    series_ids,
    table_counts,
    throwaway_database,
)

METRICS = (
    "spindle_temp",
    "vibration",
    "current",
    "voltage",
    "power",
    "load",
    "pressure",
    "flow",
    "rpm",
    "coolant_temp",
)
MINUTE_MS = 60_000


# --- the workload -----------------------------------------------------------------------


@dataclass
class Workload:
    """N devices x 10 metrics, one sample a metric every `interval_ms`, timestamps
    advancing. Request r is device r % N's next `batch` samples (one JSON array of
    `batch` {"ts", "values"} entries) — a gateway flushing its buffer."""

    devices: list[SeededDevice]
    batch: int
    t0: int
    interval_ms: int = 1000

    @property
    def points_per_request(self) -> int:
        return self.batch * len(METRICS)

    @staticmethod
    def value(d: int, k: int, m: int) -> float:
        # Deterministic, varied, short decimals like a real sensor's.
        return ((d * 7919 + k * 104_729 + m * 31_337) % 100_000) / 100.0

    def ticks(self, r: int) -> range:
        chunk = r // len(self.devices)
        return range(chunk * self.batch, (chunk + 1) * self.batch)

    def body(self, r: int) -> tuple[int, bytes]:
        d = r % len(self.devices)
        value = self.value
        t0, step = self.t0, self.interval_ms
        entries = [
            {
                "ts": t0 + k * step,
                "values": {name: value(d, k, m) for m, name in enumerate(METRICS)},
            }
            for k in self.ticks(r)
        ]
        return d, orjson.dumps(entries)

    def warmup_body(self, d: int) -> bytes:
        """One entry at tick -1: discovers the device's parameters before timing."""
        return orjson.dumps(
            [
                {
                    "ts": self.t0 - self.interval_ms,
                    "values": {name: self.value(d, -1, m) for m, name in enumerate(METRICS)},
                }
            ]
        )

    def rows(self, r: int, sids: dict[tuple[int, str], int]) -> list[Row]:
        d = r % len(self.devices)
        did = self.devices[d].device_id
        series = [sids[(did, name)] for name in METRICS]
        t0, step, value = self.t0, self.interval_ms, self.value
        return [
            (sid, t0 + k * step, value(d, k, m))
            for k in self.ticks(r)
            for m, sid in enumerate(series)
        ]

    def row_chunks(
        self, requests: int, sids: dict[tuple[int, str], int], chunk_rows: int
    ) -> Iterator[list[Row]]:
        """The timed rows in arrival order, `chunk_rows` at a time (generated lazily)."""
        chunk: list[Row] = []
        for r in range(requests):
            chunk.extend(self.rows(r, sids))
            if len(chunk) >= chunk_rows:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


# --- profiling ------------------------------------------------------------------------------


def start_profiler(args: argparse.Namespace, pid: int) -> subprocess.Popen[bytes] | None:
    """`--profile FILE`: py-spy (pip install py-spy) on the ingesting process during the
    timed phase only: collapsed stacks of the thread holding the GIL, for flamegraph.pl
    or a quick `sort | uniq`-style summary."""
    if not args.profile:
        return None
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    command = [py_spy, "record", "--pid", str(pid), "--gil", "--rate", "250"]
    command += ["--format", "raw", "--output", args.profile, "--nonblocking"]
    return subprocess.Popen(  # noqa: S603 (py-spy on our own process)
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_profiler(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        profiler.wait(60)


# --- pipeline mode ------------------------------------------------------------------------


BeforeTiming = Callable[[], Awaitable[None]]


async def run_pipeline(
    args: argparse.Namespace, url: str, work: Workload, before_timing: BeforeTiming
) -> dict[str, Any]:
    from plantwatch.app import Container
    from plantwatch.core.config import Settings
    from plantwatch.telemetry.pipeline import DeviceRef

    data_dir = Path(tempfile.mkdtemp(prefix="plantwatch-bench-data-"))
    container = Container.build(Settings(data_dir=data_dir, database_url=url))
    await container.start()
    pipeline = container.pipeline
    refs = [DeviceRef(d.factory_id, d.device_id, d.device_key) for d in work.devices]
    try:
        await asyncio.gather(
            *(
                pipeline.ingest(refs[d], work.warmup_body(d), source="bench")
                for d in range(len(refs))
            )
        )
        expected = work.points_per_request
        errors = 0
        accepted = 0

        if args.duration:
            deadline = time.perf_counter() + args.duration
            counter = itertools.count()

            async def caller() -> None:
                nonlocal errors, accepted
                while time.perf_counter() < deadline:
                    d, body = work.body(next(counter))
                    outcome = await pipeline.ingest(refs[d], body, source="bench")
                    accepted += outcome.accepted
                    errors += outcome.accepted != expected
        else:
            bodies = [work.body(r) for r in range(args.requests)]
            queue = iter(bodies)

            async def caller() -> None:
                nonlocal errors, accepted
                for d, body in queue:
                    outcome = await pipeline.ingest(refs[d], body, source="bench")
                    accepted += outcome.accepted
                    errors += outcome.accepted != expected

        await before_timing()
        profiler = start_profiler(args, os.getpid())
        sampler = RssSampler(os.getpid(), args.rss_every).start()
        progress = asyncio.create_task(_progress(lambda: accepted, args))
        pg0 = postgres_cpu_seconds()
        cpu0 = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(args.concurrency)))
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu0
        pg_cpu = postgres_cpu_seconds() - pg0
        progress.cancel()
        rss = sampler.stop()
        stop_profiler(profiler)
    finally:
        await container.close()
    requests = accepted // expected if expected else 0
    return {
        "points": accepted,
        "seconds": seconds,
        "requests": requests,
        "errors": errors,
        # Cores busy in this process (parser, writer, SQLite's thread) and in PostgreSQL
        # (all its processes: other users of the server count too).
        "process_cpu_share": round(cpu / seconds, 3),
        "postgres_cpu_share": round(pg_cpu / seconds, 3),
        **rss,
    }


# --- http mode ----------------------------------------------------------------------------


def serve(url: str, fd: int) -> None:
    """The child process of --mode http: the real app under uvicorn, on an inherited socket."""
    import uvicorn

    from plantwatch.api import create_app
    from plantwatch.core.config import Settings
    from plantwatch.core.logging import configure_logging

    settings = Settings(
        data_dir=Path(tempfile.mkdtemp(prefix="plantwatch-bench-srv-")), database_url=url
    )
    configure_logging(settings.log_level, settings.log_format)
    sock = socket.socket(fileno=fd)  # family and type are read from the descriptor
    config = uvicorn.Config(
        create_app(settings),
        lifespan="on",
        log_config=None,  # as `plantwatch run api`: plantwatch's structured logging
        access_log=False,
        server_header=False,
    )
    uvicorn.Server(config).run(sockets=[sock])


def _start_server(url: str, sock: socket.socket, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(  # noqa: S603 (our own interpreter and script)
            [sys.executable, __file__, "--serve", url, "--fd", str(sock.fileno())],
            pass_fds=[sock.fileno()],
            stdout=log_file,
            stderr=log_file,
        )


class RawClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: one connection per
    concurrent caller, requests written with their body in one go, responses read by
    Content-Length. A few microseconds of CPU a request, so the client's share of the
    two cores stays small (httpx spends ~1 ms a request; see --client)."""

    def __init__(self, port: int, connections: int) -> None:
        self.port = port
        self.size = connections
        self.pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self.opened = 0

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: bytes = b""
    ) -> tuple[int, bytes]:
        if self.pool.empty() and self.opened < self.size:
            self.pool.put_nowait(await asyncio.open_connection("127.0.0.1", self.port))
            self.opened += 1
        reader, writer = await self.pool.get()
        if reader.at_eof():  # the server closed it while idle (keep-alive timeout)
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Length: {len(body)}\r\n"
        ).encode()
        writer.writelines([head, headers, b"\r\n", body])
        try:
            raw_head = await reader.readuntil(b"\r\n\r\n")
        except BaseException:
            writer.close()
            self.opened -= 1
            raise
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(":") for line in lines[1:] if line)
        }
        if "content-length" not in fields:
            raise RuntimeError(f"response without Content-Length: {raw_head!r}")
        content = await reader.readexactly(int(fields["content-length"]))
        if fields.get("connection", "").lower() == "close":
            writer.close()
            self.opened -= 1
        else:
            self.pool.put_nowait((reader, writer))
        return status, content

    async def close(self) -> None:
        while not self.pool.empty():
            _, writer = self.pool.get_nowait()
            writer.close()


class HttpxClient:
    def __init__(self, port: int, connections: int) -> None:
        import httpx

        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=120
        )

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: bytes = b""
    ) -> tuple[int, bytes]:
        pairs = [line.split(": ", 1) for line in headers.decode().split("\r\n") if line]
        response = await self.client.request(
            method, path, content=body or None, headers={k: v for k, v in pairs}
        )
        return response.status_code, response.content

    async def close(self) -> None:
        await self.client.aclose()


async def run_http(
    args: argparse.Namespace, url: str, work: Workload, before_timing: BeforeTiming
) -> dict[str, Any]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    log_path = Path(tempfile.mkdtemp(prefix="plantwatch-bench-log-")) / "server.log"
    child = _start_server(url, sock, log_path)
    sock.close()
    server = psutil.Process(child.pid)
    client: RawClient | HttpxClient = (
        RawClient(port, args.concurrency)
        if args.client == "raw"
        else HttpxClient(port, args.concurrency)
    )
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                if (await client.request("GET", "/health"))[0] == 200:
                    break
            if child.poll() is not None:
                raise RuntimeError(f"server exited; see {log_path}")
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError(f"server did not start; see {log_path}")
        headers = [
            f"X-Device-Key: {d.key}\r\nContent-Type: application/json\r\n".encode()
            for d in work.devices
        ]

        async def post(d: int, body: bytes) -> int:
            status, content = await client.request("POST", "/api/v1/ingest", body, headers[d])
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {content[:300]!r}")
            accepted: int = orjson.loads(content)["accepted"]
            return accepted

        sem = asyncio.Semaphore(args.concurrency)

        async def warm(d: int) -> None:
            async with sem:
                await post(d, work.warmup_body(d))

        await asyncio.gather(*(warm(d) for d in range(len(work.devices))))
        expected = work.points_per_request
        errors = 0
        accepted = 0
        if args.duration:
            deadline = time.perf_counter() + args.duration
            counter = itertools.count()

            async def worker() -> None:
                nonlocal errors, accepted
                while time.perf_counter() < deadline:
                    d, body = work.body(next(counter))
                    got = await post(d, body)
                    accepted += got
                    errors += got != expected
        else:
            bodies = [work.body(r) for r in range(args.requests)]
            queue = iter(bodies)

            async def worker() -> None:
                nonlocal errors, accepted
                for d, body in queue:
                    got = await post(d, body)
                    accepted += got
                    errors += got != expected

        await before_timing()
        profiler = start_profiler(args, child.pid)
        sampler = RssSampler(child.pid, args.rss_every).start()
        progress = asyncio.create_task(_progress(lambda: accepted, args))
        server_cpu0 = sum(server.cpu_times()[:2])
        pg0 = postgres_cpu_seconds()
        cpu0 = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        seconds = time.perf_counter() - started
        client_cpu = time.process_time() - cpu0
        server_cpu = sum(server.cpu_times()[:2]) - server_cpu0
        pg_cpu = postgres_cpu_seconds() - pg0
        progress.cancel()
        rss = sampler.stop()
        stop_profiler(profiler)
    finally:
        await client.close()
        child.terminate()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return {
        "points": accepted,
        "seconds": seconds,
        "requests": accepted // expected if expected else 0,
        "errors": errors,
        "concurrency": args.concurrency,
        "client": args.client,
        # The client is not the bottleneck when its CPU share stays well under one core
        # while the server's (one Python process) is near one core.
        "client_cpu_share": round(client_cpu / seconds, 3),
        "server_cpu_share": round(server_cpu / seconds, 3),
        "postgres_cpu_share": round(pg_cpu / seconds, 3),
        **{k.replace("rss_", "server_rss_"): v for k, v in rss.items()},
    }


async def _progress(accepted: Any, args: argparse.Namespace) -> None:
    if not args.duration:
        return
    last, t_last, t0 = 0, time.perf_counter(), time.perf_counter()
    while True:
        await asyncio.sleep(args.rss_every * 6)
        now, got = time.perf_counter(), accepted()
        emit(
            {
                "t_s": round(now - t0, 1),
                "points": got,
                "interval_points_per_s": round((got - last) / (now - t_last)),
                "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1)
                if args.mode == "pipeline"
                else None,
            }
        )
        last, t_last = got, now


# --- main ------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict[str, Any]:
    url = args.database_url
    async with throwaway_database(url) as db_url:
        devices = await seed_devices(db_url, args.devices)
        now = int(time.time() * 1000)
        t0 = now - args.start_ago_s * 1000
        work = Workload(devices, args.batch, t0 - t0 % MINUTE_MS, args.interval_ms)
        per_request = work.points_per_request
        if not args.duration:
            args.requests = max(1, args.points // per_request)
        raw_cap = args.raw_max_rows // per_request if args.raw_max_rows else 0
        raw: list[RawResult] = []

        async def raw_baseline(requests: int) -> None:
            sids = await series_ids(db_url)
            last = work.t0 + (requests // len(devices) + 1) * args.batch * work.interval_ms
            days = set(range(work.t0 - work.t0 % DAY_MS, last + 1, DAY_MS))
            raw.extend(
                await raw_insert_rate(
                    db_url, lambda: work.row_chunks(requests, sids, args.raw_chunk), days
                )
            )
            await checkpoint(db_url)

        async def before_timing() -> None:
            # After the warm-up (parameters discovered, caches and connections warm).
            await raw_baseline(min(args.requests, raw_cap) if raw_cap else args.requests)

        if args.duration:
            args.requests = raw_cap
        run = await (run_pipeline if args.mode == "pipeline" else run_http)(
            args, db_url, work, before_timing
        )
        requests = run["requests"]
        counts = await table_counts(db_url)
        warm = len(devices) * len(METRICS)
        stored = run["points"] + warm
        verified = (
            run["errors"] == 0
            and counts["raw"] == stored
            and counts["rollup_1m_points"] == stored
            and counts["rollup_1h_points"] == stored
            and counts["latest"] == warm
            and counts["dead_letters"] == 0
        )
        await checkpoint(db_url)
        await raw_baseline(min(requests, raw_cap) if raw_cap else requests)
    best = max(raw, key=lambda r: r.rows_per_s)
    points_per_s = run["points"] / run["seconds"]
    summary: dict[str, Any] = {
        "bench": "ingest",
        "points_per_s": round(points_per_s),
        "raw_rows_per_s": round(best.rows_per_s),
        "ratio": round(points_per_s / best.rows_per_s, 3),
        "database": backend_of(db_url),
        "mode": args.mode,
        "points": run["points"],
        "seconds": round(run["seconds"], 2),
        "devices": len(devices),
        "metrics_per_payload": len(METRICS),
        "payloads_per_request": args.batch,
        "points_per_request": per_request,
        "requests": requests,
        "concurrency": args.concurrency,
        "verified": verified,
        "stored": counts,
        "raw_method": best.method,
        # Every raw measurement (before and after the ingest run, each method); the
        # fastest is the baseline.
        "raw_runs": [
            {"method": r.method, "rows": r.rows, "rows_per_s": round(r.rows_per_s)} for r in raw
        ],
        "raw_chunk_rows": args.raw_chunk,
        **{k: v for k, v in run.items() if k not in ("points", "seconds", "requests")},
        "duration_s": args.duration,
        "machine": machine(),
    }
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--database-url",
        help="default: a SQLite temp file; a PostgreSQL URL names "
        "the server, where a throwaway database is created and dropped",
    )
    p.add_argument("--mode", choices=("pipeline", "http"), default="pipeline")
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--batch", type=int, default=100, help="payloads (entries) per request")
    p.add_argument("--points", type=int, default=2_000_000, help="points to send (timed)")
    p.add_argument("--duration", type=float, default=0, help="run this long (s) instead")
    p.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="concurrent callers / HTTP connections (default 64 / 16)",
    )
    p.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="HTTP client (http mode): a minimal keep-alive client on asyncio streams, or httpx",
    )
    p.add_argument("--interval-ms", type=int, default=1000, help="sample period of a device")
    p.add_argument(
        "--start-ago-s",
        type=int,
        default=2 * 86400,
        help="first timestamp this far before now (within the ingest skew)",
    )
    p.add_argument(
        "--raw-chunk",
        type=int,
        default=50_000,
        help="rows per transaction of the raw baseline (= ingest_batch_points)",
    )
    p.add_argument(
        "--raw-max-rows",
        type=int,
        default=0,
        help="cap the raw baseline to the first N rows (default: all; 5,000,000 with --duration)",
    )
    p.add_argument("--rss-every", type=float, default=5.0, help="RSS sample period (s)")
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="py-spy the ingesting process (this one, or the server) while timed",
    )
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.concurrency:
        args.concurrency = 64 if args.mode == "pipeline" else 16
    if args.duration and not args.raw_max_rows:
        args.raw_max_rows = 5_000_000
    return args


def _run() -> None:
    args = parse_args()
    if args.serve:
        serve(args.serve, args.fd)
        return
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        summary = runner.run(main(args))
    summary["loop"] = "uvloop" if "uvloop" in sys.modules else "asyncio"
    emit(summary)


if __name__ == "__main__":
    _run()
