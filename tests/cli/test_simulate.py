"""The simulator: a pure, deterministic, physically sane model; its HTTP and MQTT
transports; `plantwatch simulate`; and `up --demo` producing telemetry by itself."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from plantwatch import simulator
from plantwatch.app import Container
from plantwatch.demo import MACHINE_KINDS, MACHINES
from plantwatch.simulator import FAULT, IDLE, RUNNING, Behaviour, SimDevice, Simulation
from plantwatch.telemetry import payloads
from tests.cli.conftest import Cli
from tests.cli.test_up import Server, _env, _wait_healthy
from tests.conftest import PASSWORD, LoggedIn

DEMO_DEVICES = [SimDevice(m.device_key, m.kind) for m in MACHINES]
TICK_MS = 10_000
# Monday 2026-03-02 07:00 in Berlin (06:00 UTC): the early shift; 09:00 brings a break.
START_MS = int(dt.datetime(2026, 3, 2, 6, 0, tzinfo=dt.UTC).timestamp() * 1000)
HOURS = 3
FAILURE_AFTER_S = 3600.0
DEGRADE = 4


@functools.cache
def _three_hours() -> tuple[Simulation, list[list[simulator.Reading]]]:
    """All demo machines, 4 of them wearing out within an hour, at 10 s steps."""
    sim = Simulation(
        DEMO_DEVICES,
        seed=7,
        degrade=DEGRADE,
        failure_after_s=FAILURE_AFTER_S,
        repair_after_s=900,
        timezone="Europe/Berlin",
    )
    ticks = [sim.tick(START_MS + i * TICK_MS) for i in range(HOURS * 3600 * 1000 // TICK_MS)]
    return sim, ticks


def _series(device_key: str) -> list[dict[str, Any]]:
    _, ticks = _three_hours()
    return [next(r.values for r in tick if r.device_key == device_key) for tick in ticks]


def _corr(xs: list[float], ys: list[float]) -> float:
    return statistics.correlation(xs, ys)


# --- the model ---------------------------------------------------------------------------


def test_same_seed_same_data_other_seed_other_data() -> None:
    def run(seed: int) -> list[bytes]:
        sim = Simulation(DEMO_DEVICES, seed=seed, degrade=3, failure_after_s=600)
        return [r.payload() for i in range(120) for r in sim.tick(START_MS + i * 1000)]

    first = run(42)
    assert first == run(42)
    assert first != run(43)
    # Every payload is one a device may send, and all of it is accepted.
    for raw in first[:200]:
        parsed = payloads.parse(raw, START_MS, payloads.Limits(max_past_ms=None))
        assert not parsed.rejects and parsed.fatal is None
    with pytest.raises(ValueError, match="backwards"):
        sim = Simulation(DEMO_DEVICES[:1])
        sim.tick(START_MS)
        sim.tick(START_MS - 1)
    with pytest.raises(ValueError, match="unknown machine kinds"):
        Simulation([SimDevice("x", "teapot")])


def test_values_stay_within_the_catalogue_bounds_and_types() -> None:
    sim, _ = _three_hours()
    states: set[str] = set()
    for machine in sim.machines:
        series = _series(machine.device_key)
        for spec in machine.kind.parameters:
            values = [v[spec.key] for v in series]
            if spec.minimum is not None:
                assert min(values) >= spec.minimum, (machine.device_key, spec.key)
            if spec.maximum is not None:
                assert max(values) <= spec.maximum, (machine.device_key, spec.key)
            if spec.data_type == "int":
                assert all(type(v) is int for v in values), spec.key
            if spec.counter:  # counters only ever count up, and do while running
                assert values == sorted(values) and values[-1] > values[0], spec.key
        states |= {v["state"] for v in series}
    assert states == {RUNNING, IDLE, FAULT}


def test_load_drives_current_power_vibration_and_temperature_with_lags() -> None:
    sim, _ = _three_hours()
    mill = next(m for m in sim.machines if m.kind.kind == "cnc_mill" and m not in sim.degrading)
    series = _series(mill.device_key)
    current = [v["motor_current"] for v in series]
    power = [v["power"] for v in series]
    vibration = [v["vibration"] for v in series]
    assert _corr(current, power) > 0.9
    assert _corr(current, vibration) > 0.8
    # The 09:00 break (08:00 UTC): current falls at once, the spindle cools over minutes.
    brk = (3600 * 2 * 1000) // TICK_MS  # 09:00 local
    before, after = series[brk - 1], series[brk + 1]
    assert before["state"] == RUNNING and after["state"] == IDLE
    assert after["motor_current"] < 0.3 * before["motor_current"]
    assert after["spindle_rpm"] < 0.02 * before["spindle_rpm"]  # spun down
    hot, ambient = before["spindle_temp"], simulator.AMBIENT_C
    assert after["spindle_temp"] > hot - 0.1 * (hot - ambient)  # 10 s later: still hot
    cooled = series[brk + 12 * 60_000 // TICK_MS]["spindle_temp"]  # 12 minutes later
    assert cooled < hot - 0.4 * (hot - ambient) * 0.7
    # Utilities keep running through the break.
    compressor = _series("compressor-01")
    assert compressor[brk + 1]["state"] == RUNNING and compressor[brk + 1]["flow"] > 4.8


def test_degrading_machines_cross_warning_limits_then_fail_and_healthy_ones_do_not() -> None:
    sim, _ = _three_hours()
    assert len(sim.degrading) == DEGRADE
    for machine in sim.machines:
        series = _series(machine.device_key)
        steady = [
            v
            for i, v in enumerate(series)
            if i > 60 and all(series[j]["state"] == RUNNING for j in (i - 2, i - 1, i))
        ]
        if machine not in sim.degrading:
            # No false alarms: a healthy running machine stays inside its warning limits.
            assert {v["state"] for v in series} <= {RUNNING, IDLE}
            for spec in machine.kind.parameters:
                values = [v[spec.key] for v in steady]
                if spec.warning_high is not None:
                    assert max(values) < spec.warning_high, (machine.device_key, spec.key)
                if spec.warning_low is not None:
                    assert min(values) > spec.warning_low, (machine.device_key, spec.key)
            continue
        first_fault = next(i for i, v in enumerate(series) if v["state"] == FAULT)
        worn = [v for v in series[:first_fault] if v["state"] == RUNNING]
        days = machine.days_to_failure
        crossed = []
        for spec in machine.kind.parameters:
            wear = spec.wear_per_day
            limit = spec.warning_high if wear > 0 else spec.warning_low
            if not wear or limit is None or (limit - spec.nominal) / wear > 0.8 * days:
                continue
            values = [v[spec.key] for v in worn]
            hit = max(values) > limit if wear > 0 else min(values) < limit
            assert hit, (machine.device_key, spec.key, limit)
            crossed.append(spec.key)
            # ... and it was inside them while the machine was new.
            early = values[:30]
            assert (max(early) < limit) if wear > 0 else (min(early) > limit)
        assert crossed, machine.device_key
        if "vibration" in {s.key for s in machine.kind.parameters}:
            assert "vibration" in crossed
        # Failure comes exactly the configured time after the degradation started.
        started = sim.degrade_offsets_ms[machine.device_key]
        assert started + FAILURE_AFTER_S * 1000 <= first_fault * TICK_MS
        assert first_fault * TICK_MS < started + FAILURE_AFTER_S * 1000 + TICK_MS
        # After the repair it runs again, as new.
        repaired = first_fault + 900_000 // TICK_MS + 2
        if repaired < len(series):
            assert series[repaired]["state"] != FAULT


def test_counters_never_count_backwards_across_a_restart() -> None:
    first = Simulation(DEMO_DEVICES, seed=11)
    before = [first.tick(START_MS + i * 60_000) for i in range(120)][-1]  # two hours
    # Restarted (same seed) right where the first run stopped.
    after = Simulation(DEMO_DEVICES, seed=11).tick(START_MS + 120 * 60_000)
    checked = 0
    for old, new in zip(before, after, strict=True):
        for spec in MACHINE_KINDS[first.machine(old.device_key).kind.kind].parameters:
            if spec.counter:
                assert new.values[spec.key] >= old.values[spec.key], (old.device_key, spec.key)
                checked += 1
    assert checked >= 10


def test_behaviours_cover_the_catalogue() -> None:
    seen = {simulator.behaviour_of(s) for k in MACHINE_KINDS.values() for s in k.parameters}
    assert seen == set(Behaviour)
    for kind in MACHINE_KINDS.values():
        assert 0 < simulator.days_to_failure(kind) < 100, kind.kind


# --- transports ---------------------------------------------------------------------------


async def _machines(client: httpx.AsyncClient, owner: LoggedIn, kinds: list[str]) -> None:
    for i, kind in enumerate(kinds):
        created = await client.post(
            "/api/v1/devices",
            json={"device_key": f"{kind}-{i}", "name": f"{kind} {i}", "kind": kind},
            headers=owner.headers,
        )
        assert created.status_code == 201, created.text


async def test_provision_and_http_transport_store_points_through_the_app(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    await _machines(client, admin_a, ["cnc_mill", "pump"])
    plain = await client.post(
        "/api/v1/devices", json={"device_key": "no-kind", "name": "x"}, headers=admin_a.headers
    )
    assert plain.status_code == 201
    keys = await simulator.provision(client, admin_a.factory_slug, admin_a.email, PASSWORD)
    assert [k.device_key for k in keys.devices] == ["cnc_mill-0", "pump-1"]
    assert keys.timezone == "UTC"
    # More than the factory has: simulated devices are registered to make up the number.
    keys = await simulator.provision(
        client, admin_a.factory_slug, admin_a.email, PASSWORD, devices=4
    )
    assert len(keys.devices) == 4 and keys.devices[2].device_key.startswith("sim-")
    sim = Simulation([SimDevice(k.device_key, k.kind) for k in keys.devices], seed=1)
    transport = simulator.HttpTransport(
        "http://testserver", {k.device_key: k.key for k in keys.devices}, client=client
    )
    stats = await simulator.run(sim, transport, rate_hz=50, max_ticks=3)
    assert (stats.ticks, stats.sent, stats.failed) == (3, 12, 0), stats
    async with container.db.engine.connect() as conn:
        raw = (await conn.execute(text("SELECT count(*) FROM telemetry_raw"))).scalar_one()
        state = (
            await conn.execute(
                text("SELECT DISTINCT text FROM series_latest WHERE text IS NOT NULL")
            )
        ).all()
    assert raw == stats.values - 4 * stats.ticks  # every number stored (states are latest only)
    assert {s[0] for s in state} <= {RUNNING, IDLE}
    # Provisioning again revokes the simulator's earlier keys.
    old = keys.devices[0].key
    await simulator.provision(client, admin_a.factory_slug, admin_a.email, PASSWORD, devices=4)
    container.devices.invalidate()
    refused = await client.post(
        "/api/v1/ingest", json={"values": {"x": 1}}, headers={"X-Device-Key": old}
    )
    assert refused.status_code == 401
    with pytest.raises(simulator.ProvisionError, match="login failed"):
        await simulator.provision(client, admin_a.factory_slug, admin_a.email, "wrong-password")


async def test_in_process_demo_simulation_feeds_the_pipeline(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    await _machines(client, admin_a, ["conveyor", "chiller", "robot"])
    stats = await simulator.run_demo_simulation(
        container, admin_a.factory_slug, rate_hz=50, max_ticks=3, degrade=1
    )
    assert (stats.ticks, stats.sent, stats.failed) == (3, 9, 0), stats
    async with container.db.engine.connect() as conn:
        per_device = (
            await conn.execute(
                text(
                    "SELECT d.device_key, count(*) FROM telemetry_raw r JOIN device_parameters p "
                    "ON p.id = r.series_id JOIN devices d ON d.id = p.device_id "
                    "GROUP BY d.device_key ORDER BY d.device_key"
                )
            )
        ).all()
        sources = (await conn.execute(text("SELECT count(*) FROM dead_letters"))).scalar_one()
    assert [k for k, _ in per_device] == ["chiller-1", "conveyor-0", "robot-2"]
    assert sources == 0
    with pytest.raises(LookupError):
        await simulator.run_demo_simulation(container, "no-such-factory", duration_s=0.1)

    # As `up --demo`'s role: started, reports itself, stops when asked.
    role = simulator.DemoSimulationRole(container, admin_a.factory_slug, rate_hz=50)
    await role.start()
    assert "3 machines at 50 Hz" in role.endpoints()[0][1]
    await asyncio.sleep(0.1)
    role.request_stop()
    await asyncio.wait_for(role.wait(), timeout=5)
    # A factory without machines to simulate leaves the simulator off, not `up` failed.
    idle = simulator.DemoSimulationRole(container, "no-such-factory")
    await idle.start()
    assert "off" in idle.endpoints()[0][1]
    idle.request_stop()
    await asyncio.wait_for(idle.wait(), timeout=5)


MQTT_URL = os.environ.get("PLANTWATCH_TEST_MQTT_URL")


@pytest.mark.skipif(not MQTT_URL, reason="PLANTWATCH_TEST_MQTT_URL not set")
async def test_mqtt_transport_publishes_on_the_device_topic() -> None:
    import aiomqtt

    assert MQTT_URL is not None
    host, port, _ = simulator.parse_mqtt_url(MQTT_URL)
    slug = f"simtest{os.getpid()}"
    sim = Simulation([SimDevice("cnc-a", "cnc_mill"), SimDevice("pump-b", "pump")], seed=5)
    transport = simulator.MqttTransport(MQTT_URL, slug, {"cnc-a": "key-a", "pump-b": "key-b"})
    received: list[tuple[str, bytes]] = []
    async with aiomqtt.Client(host, port, identifier=f"{slug}-listener") as listener:
        await listener.subscribe(f"factories/{slug}/devices/+/telemetry", qos=1)
        await transport.connect()
        try:
            stats = await simulator.run(sim, transport, rate_hz=50, max_ticks=3)
        finally:
            await transport.close()

        async def collect() -> None:
            async for message in listener.messages:
                assert isinstance(message.payload, bytes)
                received.append((str(message.topic), message.payload))
                if len(received) == stats.sent:
                    return

        await asyncio.wait_for(collect(), timeout=10)
    assert (stats.sent, stats.failed) == (6, 0)
    assert {t for t, _ in received} == {
        f"factories/{slug}/devices/cnc-a/telemetry",
        f"factories/{slug}/devices/pump-b/telemetry",
    }
    parsed = payloads.parse(received[0][1], int(time.time() * 1000))
    assert parsed.fatal is None and not parsed.rejects and parsed.states["state"]


def test_mqtt_url_parsing() -> None:
    assert simulator.parse_mqtt_url("mqtt://broker") == ("broker", 1883, False)
    assert simulator.parse_mqtt_url("mqtts://broker:8884") == ("broker", 8884, True)
    with pytest.raises(ValueError):
        simulator.parse_mqtt_url("http://broker")


# --- end to end: `up --demo` simulates by itself; `simulate` over HTTP -------------------


@pytest.fixture
def processes() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
        server.reader.join(timeout=10)
        if server.process.stdout is not None:
            server.process.stdout.close()


def _telemetry(data_dir: Path) -> tuple[int, set[str]]:
    engine = create_engine(f"sqlite:///{data_dir / 'plantwatch.db'}")
    try:
        with engine.connect() as conn:
            raw = conn.execute(text("SELECT count(*) FROM telemetry_raw")).scalar_one()
            states = conn.execute(text("SELECT DISTINCT text FROM series_latest")).all()
            return int(raw), {s[0] for s in states if s[0]}
    finally:
        engine.dispose()


def test_up_demo_simulates_and_simulate_publishes_over_http(
    processes: list[Server], fresh_cli: Cli, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    process = subprocess.Popen(
        [sys.executable, "-m", "plantwatch.cli", "up", "--demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(data_dir),
    )
    server = Server(process)
    processes.append(server)
    base_url = server.wait_for_line(r"URL:\s+(http://127\.0\.0\.1:\d+)").group(1)
    server.wait_for_line(r"Simulator:\s+21 machines at 1 Hz; degrading: \S+")
    password = server.wait_for_line(r"^\s+Password:\s+(\S+)\s+\(kept in").group(1)
    server.wait_for_line(r"Press Ctrl\+C to stop")
    _wait_healthy(base_url)

    deadline = time.monotonic() + 10
    points, states = 0, set()
    while time.monotonic() < deadline and not points:
        time.sleep(0.3)
        points, states = _telemetry(data_dir)
    assert points > 0, "no telemetry within 10 s of `up --demo` starting"
    assert states & {RUNNING, IDLE}

    # `plantwatch simulate --provision` against the running server, over HTTP.
    keys_file = tmp_path / "keys.json"
    env = {
        "PLANTWATCH_SIM_ADMIN_EMAIL": "admin@demo.plantwatch.example",
        "PLANTWATCH_SIM_ADMIN_PASSWORD": password,
    }
    args = ["--url", base_url, "--keys-file", str(keys_file), "--rate", "10", "--seed", "3"]
    result = fresh_cli(
        "simulate", *args, "--provision", "--devices", "3", "--duration", "0.5", env=env
    )
    assert result.exit_code == 0, result.stderr
    assert "Issued keys for 3 devices" in result.stdout
    assert " 0 failed" in result.stdout
    stored = json.loads(keys_file.read_text())
    assert len(stored["devices"]) == 3 and stored["timezone"] == "Europe/Berlin"
    assert oct(keys_file.stat().st_mode & 0o777) == "0o600"
    metrics = httpx.get(f"{base_url}/metrics", timeout=5).text
    http_points = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('plantwatch_ingest_points_total{source="http"}')
    ]
    assert http_points and http_points[0] > 0

    # Without --provision the saved keys are used; a wrong factory is refused.
    again = fresh_cli("simulate", *args, "--duration", "0.3")
    assert again.exit_code == 0, again.stderr
    assert "Simulating 3 machines of factory 'demo' at 10 Hz over HTTP" in again.stdout
    wrong = fresh_cli("simulate", *args, "--factory", "other")
    assert wrong.exit_code == 1 and "keys of factory 'demo'" in wrong.stderr
    missing = fresh_cli("simulate", "--keys-file", str(tmp_path / "none.json"))
    assert missing.exit_code == 1 and "run once with --provision" in missing.stderr
    both = fresh_cli("simulate", *args, "--devices", "2", "--all")
    assert both.exit_code == 2

    assert server.stop(signal.SIGINT) == 0, server.output()
