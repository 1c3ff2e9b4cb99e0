"""Server render time of the web UI's pages in a factory of 10,000 devices.

    python bench/ui.py                                  # SQLite temp file, 10,000 devices
    python bench/ui.py --devices 500 --runs 5           # a quick check that it works
    python bench/ui.py --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/postgres

Target (the product requirement): a page's first render < 200 ms of server time
with 10,000 devices.

Seeds a throwaway database (bench.common.seed_devices + seed_plant; bulk inserts):
one factory with `--devices` devices on lines and in groups, mostly online, some
offline, never seen or decommissioned; 5 parameters each with a latest value (one
is power in kW, marked as power, so the dashboard's energy card integrates every
device's power over the last `--energy-minutes` of 1-minute rollups), some at a
warning or critical limit; 50 rules; 300 open alerts across severities (through the
alerts service) and 5,000 resolved ones; users, dead letters, audit entries; and a
super_admin who may see every page. On PostgreSQL the database is then ANALYZEd,
as autovacuum would soon do (`--no-analyze`: tables as right after a bulk load).

Runs the real product, `plantwatch up --port 0`, in a child process on that
database, logs in through the login form (GET /login, POST /login: the pw_access,
pw_refresh and pw_csrf cookies) and GETs each page of `pages_of` over one kept-alive
connection with httpx: the dashboard and the card fragments its script fetches, the
machines list (page 2 sorted by health, filtered, the table fragment a search swaps
in), a machine and its fragments, the alerts feed (and its fragment, and every
alert sorted by severity), an alert and its fragment, the rules list, the rule
builder for a new and an existing rule, a rule's activity fragment, dead letters,
users and the audit log.

Cold and warm. Right after /ready the server is busy for a while: its scheduler's
retention job runs at start (and then hourly) and deletes old rows series by
series, 3 statements per parameter in short write transactions (about 40 s of a
core with 50,000 parameters); the rules engine loads its rules. `settle_s` says how
long, and the "ready" line has the server's CPU every 0.5 s. By default (`--settle
auto`) the bench waits until the server is idle, then fetches each page once in
order (`cold_ms`: that page's first render by this process), then `--runs` rounds
visit every page once each (warm: `p50_ms`, `p95_ms`, `max_ms`). `--settle 0`
starts at once, so the first pages compete with that work (on SQLite they wait for
its write lock between its transactions).

Checks. Every response must be 200 and show the seeded figures (device count,
open alert count, a pager's total, the machine's or alert's name...): a redirect
to /login, a 401, a 403/404 page or a page without its data stops the bench with an
error (the page is saved to a temp file). A 303 to the same URL (the 15-minute
access token was rotated) is followed and not counted (`session_refreshes`).

Times. plantwatch sends no Server-Timing or X-Response-Time header, so the times
are measured client-side: from sending the request to having read the body, on
127.0.0.1 over a kept-alive connection; they include HTTP parsing and the loopback
(about a millisecond). They are what the targets are judged on. The server's own
figure is reported beside them (`server_cold_ms`, `server_p50_ms`): the product's
request log (core/http.py logs `duration_ms` of every request, from its ASGI
middleware's start to its end, with the X-Request-ID the bench sends), read from
the child's stderr at log level info.

Energy: the dashboard renders its energy card empty and its script fetches the card
right after (`/dashboard/cards?card=energy`). The product computes those figures
at most every 5 s per process (the finished hours of today at most every 60 s), so
most warm runs of that fragment read the cache: its cold and max figures are the
computation.

Prints JSON lines; the last line is the summary: `pages` (per page `cold_ms`,
`p50_ms`, `p95_ms`, `max_ms`, `server_cold_ms`, `server_p50_ms`, `bytes`),
`worst_p50_ms`, `worst_cold_ms` (and their pages), `target_ms` (200),
`targets_met_warm` (every page's p50 < 200), `targets_met_cold` (every page's first
render < 200), `over_target_warm`, `over_target_cold`, `devices`, `database`,
`seed_s`, `settle_s`, `machine`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    SeededPlant,
    analyze,
    backend_of,
    emit,
    machine,
    seed_devices,
    seed_plant,
    throwaway_database,
)

from plantwatch.core.db import Database
from plantwatch.tenancy.service import SystemActor, add_user

TARGET_MS = 200.0
EMAIL = "bench-admin@example.com"
PASSWORD = "bench-password-123"  # noqa: S105 (a throwaway database's user)
START_TIMEOUT_S = 180.0
SLUG = "bench"
SETTLE_MAX_S = 300.0
SETTLE_STEP_S = 0.5
IDLE_SHARE = 0.05  # of one core
IDLE_FOR_S = 2.0
PAGER = re.compile(r"([\d,]+) in all")


@dataclass
class Page:
    name: str
    path: str
    expect: list[str]  # every one must be in the body
    headers: dict[str, str] = field(default_factory=dict)
    at_least: int | None = None  # the pager's total must reach this (it grows meanwhile)
    cold_ms: float | None = None
    warm_ms: list[float] = field(default_factory=list)
    request_ids: dict[str, str] = field(default_factory=dict)  # request id -> cold/warm
    bytes: int = 0


def pager(total: int) -> str:
    """What the pager macro prints (web/templates/_macros.html)."""
    return f"{total:,} in all"


def pages_of(plant: SeededPlant) -> list[Page]:
    """The pages a visitor opens, with what each must show (from the seeded data)."""
    table = {"HX-Request": "true", "HX-Target": "machines-table"}
    fragment = {"HX-Request": "true"}
    devices_total = f'data-value="devices-total">{plant.devices:,}<'
    alerts_open = f'data-value="alerts-open">{plant.open_alerts:,}<'
    machine = f"/machines/{plant.device_id}"
    alert = f"/alerts/{plant.alert_id}"
    rule = f"/rules/{plant.rule_id}"
    search = "Machine 12"
    return [
        Page("login", "/login", [f'value="{plant.slug}"']),
        Page("dashboard", "/", [devices_total, alerts_open, 'id="dash-worst"']),
        Page(
            "dashboard_cards_energy",
            "/dashboard/cards?card=energy",
            ['id="dash-energy"', 'data-value="energy-kwh"'],
            fragment,
        ),
        Page(
            "dashboard_cards_all",
            "/dashboard/cards",
            [devices_total, alerts_open, 'data-value="energy-kwh"', 'id="dash-latest"'],
            fragment,
        ),
        Page("machines", "/machines", [pager(plant.devices), "page 1 of"]),
        Page(
            "machines_p2_by_health",
            "/machines?sort=health&page=2",
            [pager(plant.devices), "page 2 of"],
        ),
        Page(
            "machines_offline_by_alerts",
            "/machines?status=offline&sort=-alerts",
            [pager(plant.offline)],
        ),
        Page(
            "machines_table_search",
            f"/machines?q={quote(search)}",
            ['id="machines-table"', search],
            {**table, "HX-Current-URL": f"/machines?q={quote(search)}"},
        ),
        Page("machine", machine, [plant.device_name, "temperature", plant.alert_title]),
        Page(
            "machine_health",
            f"{machine}/health",
            ['id="machine-health"', "<summary>Why "],
            fragment,
        ),
        Page("machine_alerts", f"{machine}/alerts", [plant.alert_title], fragment),
        Page("alerts", "/alerts", [pager(plant.open_alerts)]),
        Page(
            "alerts_feed", "/alerts/feed", ['id="alerts-feed"', pager(plant.open_alerts)], fragment
        ),
        Page(
            "alerts_all_by_severity",
            "/alerts?status=all&sort=-severity",
            [pager(plant.open_alerts + plant.resolved_alerts)],
        ),
        Page("alert", alert, [plant.alert_title]),
        Page("alert_body", f"{alert}/body", [plant.alert_title], fragment),
        Page("rules", "/rules", [pager(len(plant.rule_ids))]),
        Page("rule_new", "/rules/new", ['<option value="temperature">', "Group 01"]),
        Page("rule", rule, [plant.rule_name]),
        Page(
            "rule_activity",
            f"{rule}/activity",
            ['id="rule-open-alerts"', 'href="/alerts/'],
            fragment,
        ),
        Page("dead_letters", "/dead-letters", [pager(plant.dead_letters_open)]),
        Page("users", "/users", [pager(plant.users)]),
        # Logging in adds audit entries: at least the seeded ones.
        Page("audit", "/audit", ["user.update"], at_least=plant.audit_entries),
    ]


class BenchBroken(SystemExit):
    pass


# --- seeding ------------------------------------------------------------------------


async def seed(url: str, args: argparse.Namespace) -> SeededPlant:
    devices = await seed_devices(url, args.devices, slug=SLUG)
    db = Database(url)
    try:
        async with db.session() as session:
            await add_user(
                session,
                devices[0].factory_id,
                email=EMAIL,
                role="super_admin",
                password=PASSWORD,
                full_name="Bench Admin",
                actor=SystemActor(devices[0].factory_id, email="bench"),
            )
            await session.commit()
    finally:
        await db.dispose()
    plant = await seed_plant(
        url,
        devices,
        rules=args.rules,
        open_alerts=args.open_alerts,
        resolved_alerts=args.resolved_alerts,
        energy_minutes=args.energy_minutes,
    )
    if not args.no_analyze:
        plant.seconds["analyzed"] = await analyze(url)
    return plant


# --- the product ----------------------------------------------------------------------


def start_plantwatch(url: str, data_dir: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANTWATCH_")}
    env.update(
        PLANTWATCH_DATABASE_URL=url,
        PLANTWATCH_DATA_DIR=str(data_dir),
        PLANTWATCH_MQTT_PORT="0",
        PLANTWATCH_LOG_LEVEL="info",  # the request log carries the server's duration_ms
        PLANTWATCH_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    binary = shutil.which("plantwatch") or "plantwatch"
    return subprocess.Popen(  # noqa: S603 (our own command)
        [binary, "up", "--port", "0"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=(data_dir / "stdout.log").open("wb"),
        stderr=(data_dir / "stderr.log").open("wb"),
        start_new_session=True,
    )


def stop_plantwatch(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def log_tail(data_dir: Path, name: str = "stderr.log", size: int = 3000) -> str:
    path = data_dir / name
    return path.read_bytes()[-size:].decode(errors="replace") if path.exists() else ""


async def wait_url(process: subprocess.Popen[bytes], data_dir: Path) -> str:
    """The URL `plantwatch up` prints once it serves (it picked the port)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        banner = (data_dir / "stdout.log").read_text(errors="replace")
        found = re.search(r"URL:\s+(http://[\w.\[\]:]+)", banner)
        if found:
            return found.group(1)
        if process.poll() is not None:
            break
        await asyncio.sleep(0.2)
    raise BenchBroken(
        "plantwatch up printed no URL:\n"
        + log_tail(data_dir, "stdout.log")
        + "\n"
        + log_tail(data_dir)
    )


async def wait_ready(base: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise BenchBroken("plantwatch did not become ready")


async def login(client: httpx.AsyncClient, plant: SeededPlant) -> None:
    """The browser's way in: the login form (its page was fetched first), then the
    cookies it sets."""
    answer = await client.post(
        "/login",
        data={"factory_slug": plant.slug, "email": EMAIL, "password": PASSWORD, "next": "/"},
    )
    if answer.status_code != 303 or answer.headers.get("location") != "/":
        raise BenchBroken(f"POST /login: {answer.status_code} {answer.text[:500]}")
    missing = {"pw_access", "pw_refresh", "pw_csrf"} - set(client.cookies.keys())
    if missing:
        raise BenchBroken(f"POST /login set no {sorted(missing)} cookie")


def cpu_seconds(pid: int) -> float:
    """CPU time of the process and its children so far."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
    return total


async def settle(pid: int, how: str, trace: list[float]) -> float:
    """Wait before the first page; the seconds waited. A number: that long. "auto": until
    the server has been idle (under IDLE_SHARE of a core) for IDLE_FOR_S in a row, at
    most SETTLE_MAX_S. `plantwatch up` answers /ready before its start-up work is done
    (the retention job, the rules engine's first load), and a page rendered meanwhile
    waits for that work (on SQLite, for its write lock)."""
    started = time.monotonic()
    if how != "auto":
        await asyncio.sleep(float(how))
        return round(time.monotonic() - started, 1)
    quiet_since = None
    last = cpu_seconds(pid)
    while time.monotonic() - started < SETTLE_MAX_S:
        await asyncio.sleep(SETTLE_STEP_S)
        now_cpu = cpu_seconds(pid)
        busy = (now_cpu - last) / SETTLE_STEP_S
        last = now_cpu
        trace.append(round(busy, 2))
        if busy < IDLE_SHARE:
            quiet_since = quiet_since or time.monotonic() - SETTLE_STEP_S
            if time.monotonic() - quiet_since >= IDLE_FOR_S:
                break
        else:
            quiet_since = None
    return round(time.monotonic() - started, 1)


# --- measuring ------------------------------------------------------------------------


class Fetcher:
    def __init__(self, client: httpx.AsyncClient, base: str) -> None:
        self.client = client
        self.base = base
        self.count = 0
        self.refreshes = 0

    async def fetch(self, page: Page, phase: str) -> float:
        """GET the page once; check it; the client-side milliseconds."""
        for _ in range(3):
            self.count += 1
            request_id = f"bench-{self.count}"
            headers = {**page.headers, "X-Request-ID": request_id}
            if "HX-Current-URL" in headers:
                headers["HX-Current-URL"] = self.base + headers["HX-Current-URL"]
            started = time.perf_counter()
            response = await self.client.get(page.path, headers=headers)
            body = response.content
            elapsed = (time.perf_counter() - started) * 1000
            location = response.headers.get("location", "")
            if response.status_code == 303 and not location.startswith("/login"):
                # The access token expired (15 min): page_principal rotated the pair and
                # sends us to the same URL. Not a render: measure again.
                self.refreshes += 1
                continue
            check(page, response, body)
            page.request_ids[request_id] = phase
            page.bytes = len(body)
            return elapsed
        raise BenchBroken(f"{page.path}: redirected again and again")


def check(page: Page, response: httpx.Response, body: bytes) -> None:
    status = response.status_code
    if status in (301, 302, 303, 307, 308) or status == 401:
        where = response.headers.get("location") or response.headers.get("hx-redirect")
        raise BenchBroken(f"{page.path}: {status} to {where!r}: the login did not hold")
    if status != 200:
        raise BenchBroken(f"{page.path}: status {status}: {body[:600].decode(errors='replace')}")
    text = body.decode()
    missing = [e for e in page.expect if e not in text]
    if page.at_least is not None:
        found = PAGER.search(text)
        total = int(found.group(1).replace(",", "")) if found else -1
        if total < page.at_least:
            missing.append(f"a total of at least {page.at_least:,} (found {total:,})")
    if missing:
        dump = Path(tempfile.mkstemp(prefix="plantwatch-bench-ui-", suffix=".html")[1])
        dump.write_text(text)
        raise BenchBroken(
            f"{page.path}: rendered without {missing!r} (seeded data not shown); "
            f"the page is in {dump}"
        )


def server_durations(data_dir: Path) -> dict[str, float]:
    """request id -> duration_ms, from plantwatch's request log (JSON lines)."""
    out: dict[str, float] = {}
    path = data_dir / "stderr.log"
    if not path.exists():
        return out
    for line in path.read_bytes().splitlines():
        if b'"request"' not in line or b"bench-" not in line:
            continue
        with contextlib.suppress(orjson.JSONDecodeError):
            entry = orjson.loads(line)
            if entry.get("event") == "request" and "duration_ms" in entry:
                out[str(entry.get("request_id"))] = float(entry["duration_ms"])
    return out


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[min(len(ordered), int(rank)) - 1]


def summary_of(page: Page, server: dict[str, float]) -> dict[str, Any]:
    warm = page.warm_ms
    server_warm = [
        server[r] for r, phase in page.request_ids.items() if phase == "warm" and r in server
    ]
    server_cold = [
        server[r] for r, phase in page.request_ids.items() if phase == "cold" and r in server
    ]
    out: dict[str, Any] = {
        "path": page.path,
        "cold_ms": round(page.cold_ms or 0.0, 1),
        "p50_ms": round(percentile(warm, 50), 1) if warm else None,
        "p95_ms": round(percentile(warm, 95), 1) if warm else None,
        "max_ms": round(max(warm), 1) if warm else None,
        "server_cold_ms": round(server_cold[0], 1) if server_cold else None,
        "server_p50_ms": round(percentile(server_warm, 50), 1) if server_warm else None,
        "bytes": page.bytes,
    }
    return out


async def measure(base: str, plant: SeededPlant, runs: int) -> tuple[list[Page], int]:
    pages = pages_of(plant)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(
        base_url=base, timeout=120, follow_redirects=False, limits=limits
    ) as client:
        fetcher = Fetcher(client, base)
        for page in pages:
            page.cold_ms = await fetcher.fetch(page, "cold")
            emit({"page": page.name, "phase": "cold", "ms": round(page.cold_ms, 1)})
            if page.name == "login":  # the login page first, as a browser would see it
                await login(client, plant)
        for run in range(runs):
            for page in pages:
                page.warm_ms.append(await fetcher.fetch(page, "warm"))
            emit(
                {
                    "run": run + 1,
                    "ms": {p.name: round(p.warm_ms[-1], 1) for p in pages},
                }
            )
        return pages, fetcher.refreshes


async def main(args: argparse.Namespace) -> dict[str, Any]:
    async with throwaway_database(args.database_url, keep=args.keep_database) as url:
        if args.keep_database:
            emit({"database_url": url})
        started = time.perf_counter()
        plant = await seed(url, args)
        seed_s = time.perf_counter() - started
        seeded = {
            "active_devices": plant.devices,
            "online": plant.online,
            "offline": plant.offline,
            "never_seen": plant.never_seen,
            "decommissioned": plant.decommissioned,
            "parameters": plant.parameters,
            "power_series": plant.power_series,
            "rules": len(plant.rule_ids),
            "open_alerts": plant.open_alerts,
            "open_by_severity": plant.open_by_severity,
            "resolved_alerts": plant.resolved_alerts,
            "users": plant.users,
            "audit_entries": plant.audit_entries,
        }
        emit({"seeded": {**seeded, "seconds": plant.seconds}})
        data_dir = Path(tempfile.mkdtemp(prefix="plantwatch-bench-ui-"))
        process = start_plantwatch(url, data_dir)
        try:
            base = await wait_url(process, data_dir)
            await wait_ready(base)
            busy: list[float] = []  # the server's CPU (cores) every SETTLE_STEP_S
            settle_s = await settle(process.pid, args.settle, busy)
            emit({"ready": base, "settle_s": settle_s, "server_cpu": busy})
            try:
                pages, refreshes = await measure(base, plant, args.runs)
            except (BenchBroken, httpx.HTTPError) as exc:
                raise BenchBroken(
                    f"{exc}\n--- plantwatch log (tail) ---\n{log_tail(data_dir)}"
                ) from exc
        finally:
            stop_plantwatch(process)
            server = server_durations(data_dir)
            if not args.keep_logs:
                shutil.rmtree(data_dir, ignore_errors=True)
            else:
                emit({"logs": str(data_dir)})
    per_page = {p.name: summary_of(p, server) for p in pages}
    p50s = {name: s["p50_ms"] for name, s in per_page.items() if s["p50_ms"] is not None}
    colds = {name: s["cold_ms"] for name, s in per_page.items()}
    worst_p50 = max(p50s, key=lambda k: p50s[k]) if p50s else None
    worst_cold = max(colds, key=lambda k: colds[k])
    return {
        "bench": "ui",
        "devices": args.devices,
        "database": backend_of(url),
        "pages": per_page,
        "worst_p50_ms": p50s[worst_p50] if worst_p50 else None,
        "worst_p50_page": worst_p50,
        "worst_cold_ms": colds[worst_cold],
        "worst_cold_page": worst_cold,
        "target_ms": TARGET_MS,
        "targets_met_warm": bool(p50s) and all(v < TARGET_MS for v in p50s.values()),
        "targets_met_cold": all(v < TARGET_MS for v in colds.values()),
        "over_target_warm": sorted(k for k, v in p50s.items() if v >= TARGET_MS),
        "over_target_cold": sorted(k for k, v in colds.items() if v >= TARGET_MS),
        "seeded": seeded,
        "runs": args.runs,
        "session_refreshes": refreshes,
        "server_times_from_log": bool(server),
        "seed_s": round(seed_s, 1),
        "settle_s": settle_s,
        "analyzed": bool(plant.seconds.get("analyzed")),
        "machine": machine(),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=30, help="warm renders of each page")
    parser.add_argument("--rules", type=int, default=50)
    parser.add_argument("--open-alerts", type=int, default=300)
    parser.add_argument("--resolved-alerts", type=int, default=5000)
    parser.add_argument(
        "--energy-minutes", type=int, default=60, help="1-minute rollups of each power series"
    )
    parser.add_argument(
        "--settle",
        default="auto",
        help="after /ready, before the first page: 'auto' (until the server is idle) "
        "or seconds (0: at once)",
    )
    parser.add_argument(
        "--no-analyze",
        action="store_true",
        help="PostgreSQL: skip ANALYZE after seeding (tables as right after a bulk load)",
    )
    parser.add_argument(
        "--keep-database", action="store_true", help="keep the seeded database (to profile)"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep plantwatch's logs")
    return parser.parse_args(argv)


if __name__ == "__main__":
    emit(asyncio.run(main(parse_args())))
