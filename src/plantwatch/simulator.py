"""The plant simulator: realistic telemetry for the demo, for trying plantwatch and for load.

Two halves:

- **The model** (`Simulation`) is pure: no I/O, no clock. `tick(now_ms)` advances
  every machine to `now_ms` and returns one reading per machine. Same seed, same
  machines and same timestamps give the same readings, byte for byte.
- **The runners** send those readings somewhere: the in-process ingest pipeline
  (`up --demo`), HTTP (`POST /api/v1/ingest` with each device's key) or MQTT
  (``factories/{slug}/devices/{key}/telemetry``, user = device key, password =
  the key), at a fixed rate.

The machines are the kinds of `plantwatch.demo` (nominal value, noise, bounds,
limits and wear per parameter all come from that catalogue). On top the model
adds physics:

- **Load** (0..1) follows the factory's shifts in its timezone (early 06-14 and
  late 14-22 at full load, night at reduced load), drops to idle in breaks and
  in random changeovers, and wanders a little (an Ornstein-Uhlenbeck process).
  Utilities (compressors, pumps, chillers) run through breaks at lower load.
- **Load drives the rest, with lags**: current and power follow in seconds,
  vibration in tens of seconds, temperatures over minutes; speeds drop to zero
  when a machine stops; controlled process values (barrel temperature,
  pressures) stay at their set points; counters (cycles, picks, running hours)
  count up while a machine runs. A `state` tag says RUNNING, IDLE or FAULT.
- **Degradation**: some machines wear out. Each parameter moves by its
  catalogue `wear_per_day`, on an accelerating curve compressed into
  `failure_after_s`, so the first limit reached is a critical one exactly then;
  vibration and temperatures trend up and cross their warning limits on the
  way. At the end the machine goes to FAULT (and stops); after `repair_after_s`
  it is repaired and starts wearing again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import httpx
import orjson
import structlog
from sqlalchemy import select

from plantwatch.demo import MACHINE_KINDS, MachineKind, ParameterSpec

if TYPE_CHECKING:
    from plantwatch.app import Container
    from plantwatch.telemetry.pipeline import DeviceRef

log = structlog.get_logger("plantwatch.simulator")

STATE_PARAMETER = "state"
RUNNING, IDLE, FAULT = "RUNNING", "IDLE", "FAULT"
UTILITY_KINDS = frozenset({"air_compressor", "pump", "chiller"})
SOURCE = "simulator"

NOMINAL_LOAD = 0.85  # the load at which the catalogue's nominal values hold
AMBIENT_C = 22.0
# Time constants (s) of the first-order lags between load and each kind of value.
TAU_ELECTRICAL = 2.0
TAU_SPEED = 3.0
TAU_VIBRATION = 20.0
TAU_THERMAL = 480.0
TAU_LOAD_NOISE = 300.0
LOAD_NOISE = 0.04
# Production machines stop for a changeover about every 40 minutes, for 1-4 minutes.
CHANGEOVER_EVERY_S = 40 * 60
CHANGEOVER_S = (60.0, 240.0)
# Wear follows progress**WEAR_EXPONENT: slow at first, accelerating towards failure.
WEAR_EXPONENT = 1.5
DEFAULT_FAILURE_AFTER_S = 2 * 3600.0
DEFAULT_REPAIR_AFTER_S = 15 * 60.0

# Local time of day (minutes) -> base load of production machines.
SHIFTS: tuple[tuple[int, int, float], ...] = (
    (6 * 60, 14 * 60, 0.88),  # early shift
    (14 * 60, 22 * 60, 0.85),  # late shift
    (22 * 60, 24 * 60, 0.75),  # night shift
    (0, 6 * 60, 0.75),
)
BREAKS: tuple[tuple[int, int], ...] = (
    (9 * 60, 9 * 60 + 15),
    (12 * 60, 12 * 60 + 30),
    (17 * 60, 17 * 60 + 15),
    (19 * 60 + 30, 19 * 60 + 45),
    (60, 90),
    (3 * 60 + 30, 3 * 60 + 45),
)


class Behaviour(StrEnum):
    ELECTRICAL = "electrical"  # current, power: follow load at once
    THERMAL = "thermal"  # temperatures heated by the machine: follow load slowly
    VIBRATION = "vibration"
    SPEED = "speed"  # speeds and flows: zero when stopped
    SETPOINT = "setpoint"  # controlled values: stay at nominal
    COUNTER = "counter"


# Temperatures held by a controller (heaters, chillers) rather than heated by load.
_CONTROLLED = frozenset({"barrel_temp", "mould_temp", "seal_temp", "supply_temp", "return_temp"})


def behaviour_of(spec: ParameterSpec) -> Behaviour:
    """How a catalogue parameter responds to load, from what it measures."""
    key = spec.key
    if spec.counter:
        return Behaviour.COUNTER
    if "vibration" in key:
        return Behaviour.VIBRATION
    if "current" in key or key == "power" or key.endswith("_power"):
        return Behaviour.ELECTRICAL
    if "temp" in key and key not in _CONTROLLED and spec.nominal > AMBIENT_C:
        return Behaviour.THERMAL
    if "rpm" in key or "speed" in key or key == "flow":
        return Behaviour.SPEED
    return Behaviour.SETPOINT


def days_to_failure(kind: MachineKind) -> float:
    """Days of catalogue wear until the first parameter reaches a critical limit."""
    best = math.inf
    for spec in kind.parameters:
        if spec.wear_per_day > 0:
            limit = spec.critical_high if spec.critical_high is not None else spec.warning_high
        elif spec.wear_per_day < 0:
            limit = spec.critical_low if spec.critical_low is not None else spec.warning_low
        else:
            continue
        if limit is not None:
            best = min(best, (limit - spec.nominal) / spec.wear_per_day)
    return best if math.isfinite(best) and best > 0 else 10.0


def _target(behaviour: Behaviour, load: float, running: bool) -> float:
    """The steady-state response (1.0 at nominal load) of a value to the load."""
    ratio = load / NOMINAL_LOAD
    if behaviour is Behaviour.ELECTRICAL:
        return 0.12 + 0.88 * ratio
    if behaviour is Behaviour.THERMAL:
        return 0.3 + 0.7 * ratio
    if behaviour is Behaviour.VIBRATION:
        return 0.15 + 0.85 * ratio if running else 0.05
    if behaviour is Behaviour.SPEED:
        return 1.0 + 0.35 * (load - NOMINAL_LOAD) if running else 0.0
    return 1.0


_TAU = {
    Behaviour.ELECTRICAL: TAU_ELECTRICAL,
    Behaviour.THERMAL: TAU_THERMAL,
    Behaviour.VIBRATION: TAU_VIBRATION,
    Behaviour.SPEED: TAU_SPEED,
}


@dataclass(frozen=True)
class SimDevice:
    device_key: str
    kind: str


@dataclass
class Reading:
    device_key: str
    ts: int
    values: dict[str, float | int | str]

    def payload(self) -> bytes:
        """The reading as a plantwatch payload: {"ts": epoch ms, "values": {...}}."""
        return orjson.dumps({"ts": self.ts, "values": self.values})


@dataclass
class _Channel:
    spec: ParameterSpec
    behaviour: Behaviour
    level: float = 1.0  # lagged response to load, 1.0 = nominal
    total: float = 0.0  # counters


# Counters start from what the machine would have counted since this epoch, at a pace
# no simulated run reaches: a restarted simulation never counts backwards.
_COUNTER_EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
_COUNTER_PACE = 1.2  # > the fastest simulated pace (load 1.0 / NOMINAL_LOAD)


def _counter_baseline(spec: ParameterSpec, now_ms: int, offset_min: float) -> float:
    minutes = max(0.0, (now_ms - _COUNTER_EPOCH_MS) / 60_000)
    pace = 1.0 if spec.unit == "h" else _COUNTER_PACE
    return float(int(spec.nominal * (minutes * pace + offset_min)))


class MachineSim:
    """One simulated machine. Advanced only by `Simulation.tick`."""

    def __init__(
        self,
        device: SimDevice,
        rng: random.Random,
        *,
        degrade_start_ms: int | None,
        failure_after_ms: int,
        repair_after_ms: int,
    ) -> None:
        self.device_key = device.device_key
        self.kind = MACHINE_KINDS[device.kind]
        self.utility = device.kind in UTILITY_KINDS
        self.rng = rng
        self.channels = [_Channel(s, behaviour_of(s)) for s in self.kind.parameters]
        self._counter_offset = rng.uniform(0, 10_000)  # minutes of earlier running
        self.bias = rng.uniform(-0.04, 0.04)  # this machine's own load level
        self.load = 0.0
        self.state = RUNNING
        self._noise = 0.0
        self._idle_until = 0
        self.days_to_failure = days_to_failure(self.kind)
        self.failure_after_ms = failure_after_ms
        self.repair_after_ms = repair_after_ms
        self.degrade_start_ms = degrade_start_ms
        self.wear_days = 0.0
        self.progress = 0.0
        self.failures = 0
        self._fault_until: int | None = None
        self._last: int | None = None

    @property
    def degrading(self) -> bool:
        return self.degrade_start_ms is not None

    @property
    def fails_at_ms(self) -> int | None:
        if self.degrade_start_ms is None:
            return None
        return self.degrade_start_ms + self.failure_after_ms

    def _advance_wear(self, now: int) -> None:
        start = self.degrade_start_ms
        if start is None:
            return
        if self._fault_until is not None:
            if now >= self._fault_until:  # repaired: as new, and wearing again
                self._fault_until = None
                self.wear_days = self.progress = 0.0
                self.degrade_start_ms = now
            return
        if now < start:
            return
        self.progress = min(1.0, (now - start) / self.failure_after_ms)
        self.wear_days = self.days_to_failure * self.progress**WEAR_EXPONENT
        if self.progress >= 1.0:
            self.failures += 1
            self._fault_until = now + self.repair_after_ms

    def _advance_load(self, now: int, dt_s: float, minute: int) -> None:
        decay = math.exp(-dt_s / TAU_LOAD_NOISE)
        self._noise = self._noise * decay + LOAD_NOISE * math.sqrt(
            1 - decay * decay
        ) * self.rng.gauss(0.0, 1.0)
        base = next(load for lo, hi, load in SHIFTS if lo <= minute < hi)
        on_break = any(lo <= minute < hi for lo, hi in BREAKS)
        if self._fault_until is not None:
            self.state, self.load = FAULT, 0.0
            return
        if self.utility:
            demand = 0.8 + 0.5 * (base - NOMINAL_LOAD) - (0.08 if on_break else 0.0)
            self.state, self.load = RUNNING, min(1.0, max(0.5, demand + self.bias + self._noise))
            return
        if self.state is RUNNING and self.rng.random() < dt_s / CHANGEOVER_EVERY_S:
            self._idle_until = now + int(self.rng.uniform(*CHANGEOVER_S) * 1000)
        if on_break or now < self._idle_until:
            self.state, self.load = IDLE, 0.0
            return
        self.state, self.load = RUNNING, min(1.0, max(0.3, base + self.bias + self._noise))

    def tick(self, now: int, minute: int) -> Reading:
        first = self._last is None
        dt_s = 0.0 if self._last is None else max(0.0, (now - self._last) / 1000)
        self._last = now
        self._advance_wear(now)
        self._advance_load(now, dt_s, minute)
        running = self.state == RUNNING
        values: dict[str, float | int | str] = {}
        rng = self.rng
        for channel in self.channels:
            spec, behaviour = channel.spec, channel.behaviour
            if behaviour is Behaviour.COUNTER:
                if first:
                    channel.total = _counter_baseline(spec, now, self._counter_offset)
                elif running:
                    # Running hours count time; cycles, picks and packs count throughput.
                    pace = 1.0 if spec.unit == "h" else self.load / NOMINAL_LOAD
                    channel.total += spec.nominal * dt_s / 60 * pace
                values[spec.key] = (
                    int(channel.total) if spec.data_type == "int" else round(channel.total, 4)
                )
                continue
            target = _target(behaviour, self.load, running)
            if first:
                channel.level = target  # start in steady state
            elif behaviour in _TAU:
                channel.level += (target - channel.level) * (1 - math.exp(-dt_s / _TAU[behaviour]))
            else:
                channel.level = target
            level = channel.level
            if behaviour is Behaviour.THERMAL:
                value = AMBIENT_C + (spec.nominal - AMBIENT_C) * level
            else:
                value = spec.nominal * level
            # Wear shows under load: a stopped machine's bearing is not hot.
            activity = 1.0 if behaviour is Behaviour.SETPOINT else level
            value += spec.wear_per_day * self.wear_days * activity
            noise = spec.noise
            if behaviour is Behaviour.VIBRATION:
                noise *= 1.0 + 2.0 * self.progress
            if behaviour is Behaviour.SPEED:
                noise *= min(1.0, level)  # a stopped spindle reads zero
            elif behaviour is not Behaviour.SETPOINT:
                noise *= 0.3 + 0.7 * min(1.0, level)
            value += rng.gauss(0.0, noise)
            if spec.minimum is not None:
                value = max(spec.minimum, value)
            if spec.maximum is not None:
                value = min(spec.maximum, value)
            values[spec.key] = round(value) if spec.data_type == "int" else round(value, 4)
        values[STATE_PARAMETER] = self.state
        return Reading(self.device_key, now, values)


class Simulation:
    """A set of machines advanced together; pure and deterministic for a seed."""

    def __init__(
        self,
        devices: Sequence[SimDevice],
        *,
        seed: int = 0,
        degrade: int | Sequence[str] = 0,
        failure_after_s: float = DEFAULT_FAILURE_AFTER_S,
        repair_after_s: float = DEFAULT_REPAIR_AFTER_S,
        timezone: str = "UTC",
    ) -> None:
        unknown = sorted({d.kind for d in devices} - set(MACHINE_KINDS))
        if unknown:
            raise ValueError(f"unknown machine kinds: {', '.join(unknown)}")
        if failure_after_s <= 0 or repair_after_s < 0:
            raise ValueError("failure_after_s must be > 0 and repair_after_s >= 0")
        self.seed = seed
        self.tz = ZoneInfo(timezone)
        self.failure_after_ms = int(failure_after_s * 1000)
        self.repair_after_ms = int(repair_after_s * 1000)
        keys = [d.device_key for d in devices]
        if len(set(keys)) != len(keys):
            raise ValueError("device keys must be unique")
        if isinstance(degrade, int):
            chooser = random.Random(f"{seed}/degrade")  # noqa: S311 (a simulation)
            chosen = chooser.sample(sorted(keys), min(max(0, degrade), len(keys)))
        else:
            missing = sorted(set(degrade) - set(keys))
            if missing:
                raise ValueError(f"cannot degrade unknown devices: {', '.join(missing)}")
            chosen = list(degrade)
        # Staggered starts, so failures do not all come at once.
        self._stagger_ms = [
            int(i * self.failure_after_ms / (2 * len(chosen))) for i in range(len(chosen))
        ]
        # device_key -> when (after the first tick) its wear starts
        self.degrade_offsets_ms = dict(zip(chosen, self._stagger_ms, strict=True))
        self.machines = [
            MachineSim(
                d,
                random.Random(f"{seed}/{d.device_key}"),  # noqa: S311 (a simulation)
                degrade_start_ms=None,
                failure_after_ms=self.failure_after_ms,
                repair_after_ms=self.repair_after_ms,
            )
            for d in devices
        ]
        self.start_ms: int | None = None
        self._last: int | None = None

    @property
    def degrading(self) -> list[MachineSim]:
        """The machines that wear out (chosen at construction, started on the first tick)."""
        return [m for m in self.machines if m.device_key in self.degrade_offsets_ms]

    def machine(self, device_key: str) -> MachineSim:
        for m in self.machines:
            if m.device_key == device_key:
                return m
        raise KeyError(device_key)

    def tick(self, now_ms: int) -> list[Reading]:
        """Advance every machine to `now_ms` (never backwards); one reading each."""
        if self._last is not None and now_ms < self._last:
            raise ValueError("time went backwards")
        if self.start_ms is None:
            self.start_ms = now_ms
            for m in self.machines:
                offset = self.degrade_offsets_ms.get(m.device_key)
                if offset is not None:
                    m.degrade_start_ms = now_ms + offset
        self._last = now_ms
        local = dt.datetime.fromtimestamp(now_ms / 1000, self.tz)
        minute = local.hour * 60 + local.minute
        return [m.tick(now_ms, minute) for m in self.machines]


# --- transports ------------------------------------------------------------------------


@dataclass
class RunStats:
    ticks: int = 0
    sent: int = 0  # messages delivered (acknowledged)
    failed: int = 0
    values: int = 0
    late_ticks: int = 0
    last_error: str | None = None


class Transport(Protocol):
    async def send(self, readings: Sequence[Reading], stats: RunStats) -> None: ...

    async def close(self) -> None: ...


class PipelineTransport:
    """Straight into this process's ingest pipeline (`up --demo`): no network."""

    def __init__(self, container: Container, refs: Mapping[str, DeviceRef]) -> None:
        self.pipeline = container.pipeline
        self.refs = dict(refs)

    async def send(self, readings: Sequence[Reading], stats: RunStats) -> None:
        results = await asyncio.gather(
            *(
                self.pipeline.ingest(self.refs[r.device_key], r.payload(), source=SOURCE)
                for r in readings
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                stats.failed += 1
                stats.last_error = str(result) or type(result).__name__
            else:
                stats.sent += 1
                stats.values += result.accepted

    async def close(self) -> None:
        return None


class HttpTransport:
    """`POST /api/v1/ingest` with each device's key."""

    def __init__(
        self,
        base_url: str,
        keys: Mapping[str, str],
        *,
        client: httpx.AsyncClient | None = None,
        concurrency: int = 16,
        timeout_s: float = 10.0,
    ) -> None:
        self.keys = dict(keys)
        self._own = client is None
        self.client = client or httpx.AsyncClient(base_url=base_url, timeout=timeout_s)
        self.url = "/api/v1/ingest"
        self._limit = asyncio.Semaphore(concurrency)

    async def _one(self, reading: Reading, stats: RunStats) -> None:
        async with self._limit:
            try:
                response = await self.client.post(
                    self.url,
                    content=reading.payload(),
                    headers={
                        "X-Device-Key": self.keys[reading.device_key],
                        "Content-Type": "application/json",
                    },
                )
            except httpx.HTTPError as exc:
                stats.failed += 1
                stats.last_error = f"{type(exc).__name__}: {exc}"
                return
        if response.status_code == 200:
            stats.sent += 1
            stats.values += int(response.json().get("accepted", 0))
        else:
            stats.failed += 1
            stats.last_error = f"HTTP {response.status_code}: {response.text[:200]}"

    async def send(self, readings: Sequence[Reading], stats: RunStats) -> None:
        await asyncio.gather(*(self._one(r, stats) for r in readings))

    async def close(self) -> None:
        if self._own:
            await self.client.aclose()


def parse_mqtt_url(url: str) -> tuple[str, int, bool]:
    """mqtt://host[:port] or mqtts://host[:port] -> (host, port, tls)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"not an MQTT URL (mqtt://host:port): {url}")
    tls = parts.scheme in ("mqtts", "ssl")
    if not parts.hostname:
        raise ValueError(f"no host in MQTT URL: {url}")
    return parts.hostname, parts.port or (8883 if tls else 1883), tls


def telemetry_topic(factory_slug: str, device_key: str) -> str:
    return f"factories/{factory_slug}/devices/{device_key}/telemetry"


class MqttTransport:
    """One MQTT connection per device (user = device key, password = its key), QoS 1."""

    def __init__(self, url: str, factory_slug: str, keys: Mapping[str, str]) -> None:
        self.host, self.port, self.tls = parse_mqtt_url(url)
        self.factory_slug = factory_slug
        self.keys = dict(keys)
        self._stack = contextlib.AsyncExitStack()
        self._clients: dict[str, Any] = {}

    async def connect(self) -> None:
        try:
            import aiomqtt
        except ImportError:
            raise RuntimeError("MQTT needs aiomqtt: install plantwatch[simulator]") from None
        for device_key, key in self.keys.items():
            client = aiomqtt.Client(
                self.host,
                self.port,
                username=device_key,
                password=key,
                identifier=f"plantwatch-sim-{device_key}"[:64],
                tls_params=aiomqtt.TLSParameters() if self.tls else None,
                timeout=10,
            )
            self._clients[device_key] = await self._stack.enter_async_context(client)

    async def _one(self, reading: Reading, stats: RunStats) -> None:
        client = self._clients[reading.device_key]
        try:
            await client.publish(
                telemetry_topic(self.factory_slug, reading.device_key),
                reading.payload(),
                qos=1,
            )
        except Exception as exc:  # aiomqtt.MqttError and friends
            stats.failed += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"
            return
        stats.sent += 1
        stats.values += len(reading.values)

    async def send(self, readings: Sequence[Reading], stats: RunStats) -> None:
        await asyncio.gather(*(self._one(r, stats) for r in readings))

    async def close(self) -> None:
        await self._stack.aclose()


# --- running ------------------------------------------------------------------------------


async def run(
    sim: Simulation,
    transport: Transport,
    *,
    rate_hz: float = 1.0,
    duration_s: float | None = None,
    max_ticks: int | None = None,
    stop: asyncio.Event | None = None,
    clock: Callable[[], float] = time.time,
    on_tick: Callable[[RunStats], Awaitable[None] | None] | None = None,
) -> RunStats:
    """Tick `rate_hz` times a second until `duration_s` passed, `max_ticks` were
    sent or `stop` is set.

    A tick that takes longer than the period is not made up for: the next one
    is simply later (`late_ticks` counts them), so a slow sink never builds a
    backlog.
    """
    if rate_hz <= 0:
        raise ValueError("rate_hz must be > 0")
    period = 1.0 / rate_hz
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    started = loop.time()
    next_at = started
    stats = RunStats()
    while not stop.is_set():
        if duration_s is not None and loop.time() - started >= duration_s:
            break
        readings = sim.tick(int(clock() * 1000))
        await transport.send(readings, stats)
        stats.ticks += 1
        if on_tick is not None:
            maybe = on_tick(stats)
            if maybe is not None:
                await maybe
        if max_ticks is not None and stats.ticks >= max_ticks:
            break
        next_at += period
        delay = next_at - loop.time()
        if delay <= 0:
            stats.late_ticks += 1
            next_at = loop.time()
            await asyncio.sleep(0)
            continue
        if duration_s is not None:
            delay = min(delay, max(0.0, started + duration_s - loop.time()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
    return stats


# --- the demo, in process --------------------------------------------------------------------

DEMO_RATE_HZ = 1.0
DEMO_DEGRADE = 2
DEMO_FAILURE_AFTER_S = 20 * 60.0
DEMO_REPAIR_AFTER_S = 10 * 60.0
DEMO_SEED = 1


async def demo_devices(container: Container, factory_slug: str) -> tuple[str, dict[str, Any]]:
    """(factory timezone, {device_key: (DeviceRef, kind)}) of the factory's catalogue machines."""
    from plantwatch.assets.models import Device
    from plantwatch.telemetry.pipeline import DeviceRef
    from plantwatch.tenancy.models import Factory

    async with container.db.session() as session:
        factory = await session.scalar(select(Factory).where(Factory.slug == factory_slug))
        if factory is None:
            raise LookupError(f"no factory '{factory_slug}'")
        rows = (
            await session.execute(
                select(Device.id, Device.device_key, Device.kind)
                .where(Device.factory_id == factory.id, Device.is_active.is_(True))
                .order_by(Device.device_key)
            )
        ).all()
    found = {
        key: (DeviceRef(factory.id, device_id, key), kind)
        for device_id, key, kind in rows
        if kind in MACHINE_KINDS
    }
    return factory.timezone, found


async def run_demo_simulation(
    container: Container,
    factory_slug: str,
    *,
    rate_hz: float = DEMO_RATE_HZ,
    degrade: int = DEMO_DEGRADE,
    failure_after_s: float = DEMO_FAILURE_AFTER_S,
    repair_after_s: float = DEMO_REPAIR_AFTER_S,
    seed: int = DEMO_SEED,
    duration_s: float | None = None,
    max_ticks: int | None = None,
    stop: asyncio.Event | None = None,
) -> RunStats:
    """Simulate the factory's machines straight into `container.pipeline` (no network)."""
    sim, transport = await _demo_setup(
        container, factory_slug, degrade, failure_after_s, repair_after_s, seed
    )
    await container.start()
    return await run(
        sim, transport, rate_hz=rate_hz, duration_s=duration_s, max_ticks=max_ticks, stop=stop
    )


async def _demo_setup(
    container: Container,
    factory_slug: str,
    degrade: int,
    failure_after_s: float,
    repair_after_s: float,
    seed: int,
) -> tuple[Simulation, PipelineTransport]:
    timezone, found = await demo_devices(container, factory_slug)
    if not found:
        raise LookupError(f"factory '{factory_slug}' has no machines of a simulated kind")
    sim = Simulation(
        [SimDevice(key, kind) for key, (_, kind) in found.items()],
        seed=seed,
        degrade=degrade,
        failure_after_s=failure_after_s,
        repair_after_s=repair_after_s,
        timezone=timezone,
    )
    return sim, PipelineTransport(container, {k: ref for k, (ref, _) in found.items()})


class DemoSimulationRole:
    """`up --demo`'s simulator as a role (RoleRunner protocol of `plantwatch.cli`)."""

    name = "simulator"

    def __init__(
        self,
        container: Container,
        factory_slug: str,
        *,
        rate_hz: float = DEMO_RATE_HZ,
        degrade: int = DEMO_DEGRADE,
        failure_after_s: float = DEMO_FAILURE_AFTER_S,
        repair_after_s: float = DEMO_REPAIR_AFTER_S,
        seed: int = DEMO_SEED,
    ) -> None:
        self.container = container
        self.factory_slug = factory_slug
        self.rate_hz = rate_hz
        self.degrade = degrade
        self.failure_after_s = failure_after_s
        self.repair_after_s = repair_after_s
        self.seed = seed
        self._stop = asyncio.Event()
        self._task: asyncio.Task[RunStats] | None = None
        self._sim: Simulation | None = None

    async def start(self) -> None:
        try:
            sim, transport = await _demo_setup(
                self.container,
                self.factory_slug,
                self.degrade,
                self.failure_after_s,
                self.repair_after_s,
                self.seed,
            )
        except LookupError as exc:
            # No machines to simulate is no reason to stop the platform.
            log.warning("demo_simulation_disabled", reason=str(exc))
            self._task = asyncio.create_task(self._idle(), name="role:simulator")
            return
        self._sim = sim
        await self.container.start()
        self._task = asyncio.create_task(
            run(sim, transport, rate_hz=self.rate_hz, stop=self._stop), name="role:simulator"
        )

    async def _idle(self) -> RunStats:
        await self._stop.wait()
        return RunStats()

    def endpoints(self) -> list[tuple[str, str]]:
        sim = self._sim
        if sim is None:
            return [("Simulator", f"off (no machines to simulate in '{self.factory_slug}')")]
        degrading = ", ".join(m.device_key for m in sim.degrading) or "none"
        return [
            (
                "Simulator",
                f"{len(sim.machines)} machines at {self.rate_hz:g} Hz; degrading: {degrading} "
                f"(failure after {self.failure_after_s / 60:g} min)",
            )
        ]

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    def request_stop(self, force: bool = False) -> None:
        self._stop.set()
        if force and self._task is not None:
            self._task.cancel()


# --- keys for the network transports ---------------------------------------------------------

KEY_NAME = "plantwatch-simulator"


@dataclass
class SimKey:
    device_key: str
    kind: str
    key: str


@dataclass
class KeysFile:
    factory: str
    url: str
    timezone: str = "UTC"
    devices: list[SimKey] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """Write atomically, readable by the owner only (the keys are credentials)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(
                {
                    "factory": self.factory,
                    "url": self.url,
                    "timezone": self.timezone,
                    "devices": [d.__dict__ for d in self.devices],
                },
                fh,
                indent=2,
            )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> KeysFile:
        try:
            data = json.loads(path.read_text())
            devices = [
                SimKey(str(d["device_key"]), str(d["kind"]), str(d["key"])) for d in data["devices"]
            ]
            return cls(
                str(data["factory"]),
                str(data.get("url", "")),
                str(data.get("timezone") or "UTC"),
                devices,
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read keys file {path}: {exc}") from None


class ProvisionError(Exception):
    pass


def _problem(response: httpx.Response) -> str:
    try:
        body = response.json()
        return f"{response.status_code} {body.get('code', '')}: {body.get('detail', '')}"
    except ValueError:
        return f"{response.status_code}: {response.text[:200]}"


async def provision(
    client: httpx.AsyncClient,
    factory_slug: str,
    email: str,
    password: str,
    *,
    devices: int | None = None,
) -> KeysFile:
    """Log in as an admin and issue a fresh simulator key for each simulated device.

    Uses the factory's devices of a catalogue kind (the demo machines); when
    `devices` asks for more, registers `sim-<kind>-NNN` devices to make up the
    number. Earlier simulator keys of those devices are revoked.
    """
    login = await client.post(
        "/api/v1/auth/login",
        json={"factory_slug": factory_slug, "email": email, "password": password},
    )
    if login.status_code != 200:
        raise ProvisionError(f"login failed: {_problem(login)}")
    auth = {"Authorization": f"Bearer {login.json()['access_token']}"}
    me = await client.get("/api/v1/auth/me", headers=auth)
    if me.status_code != 200:
        raise ProvisionError(f"cannot read the factory: {_problem(me)}")
    timezone = str(me.json()["data"]["factory"]["timezone"])

    existing: list[tuple[int, str, str]] = []
    page = 1
    while True:
        listed = await client.get(
            "/api/v1/devices",
            params={"page": page, "per_page": 500, "is_active": "true"},
            headers=auth,
        )
        if listed.status_code != 200:
            raise ProvisionError(f"cannot list devices: {_problem(listed)}")
        body = listed.json()
        existing += [
            (d["id"], d["device_key"], d["kind"])
            for d in body["data"]
            if d.get("kind") in MACHINE_KINDS and d.get("is_active", True)
        ]
        if page * 500 >= body["meta"]["total"]:
            break
        page += 1
    existing.sort(key=lambda d: d[1])
    wanted = len(existing) if devices is None else devices
    chosen = existing[:wanted]
    kinds = sorted(MACHINE_KINDS)
    taken = {d[1] for d in existing}
    n = 0
    while len(chosen) < wanted:
        n += 1
        kind = kinds[(n - 1) % len(kinds)]
        key = f"sim-{kind.replace('_', '-')}-{n:03d}"
        if key in taken:
            continue
        created = await client.post(
            "/api/v1/devices",
            json={
                "device_key": key,
                "name": f"Simulated {MACHINE_KINDS[kind].label} {n}",
                "kind": kind,
            },
            headers=auth,
        )
        if created.status_code == 409:
            continue  # registered, but inactive or of another kind: leave it alone
        if created.status_code != 201:
            raise ProvisionError(f"cannot register device {key}: {_problem(created)}")
        chosen.append((created.json()["data"]["id"], key, kind))

    keys: list[SimKey] = []
    for device_id, device_key, kind in chosen:
        old = await client.get(
            f"/api/v1/devices/{device_id}/keys", params={"per_page": 500}, headers=auth
        )
        if old.status_code != 200:
            raise ProvisionError(f"cannot list keys of {device_key}: {_problem(old)}")
        for issued in old.json()["data"]:
            if issued.get("name") == KEY_NAME and issued.get("revoked_at") is None:
                await client.delete(
                    f"/api/v1/devices/{device_id}/keys/{issued['id']}", headers=auth
                )
        new = await client.post(
            f"/api/v1/devices/{device_id}/keys", json={"name": KEY_NAME}, headers=auth
        )
        if new.status_code != 201:
            raise ProvisionError(f"cannot issue a key for {device_key}: {_problem(new)}")
        keys.append(SimKey(device_key, kind, new.json()["data"]["key"]))
    await client.post("/api/v1/auth/logout", headers=auth)
    return KeysFile(factory_slug, str(client.base_url).rstrip("/"), timezone, keys)
