"""The live rule engine through the public surface: rules made with the HTTP API,
telemetry sent as a device to /api/v1/ingest, alerts read back from /api/v1/alerts.

The engine runs on the app's own bus and database with an injected clock and no
background loop, so each test decides when time passes (`tick`) and when state is
written (`flush`, `stop`).
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from plantwatch.app import Container
from plantwatch.core.bus import InProcessBus
from plantwatch.rules import detectors
from plantwatch.rules.engine import RuleEngine
from plantwatch.rules.models import Rule, RuleDeviceState
from plantwatch.tenancy.models import AuditEntry
from tests.conftest import LoggedIn, LoginAs, MakeFactory, assert_problem
from tests.telemetry.conftest import KeyedDevice, keyed_device, now_ms

S = 1000
M = 60 * S

HOT = {"parameter": "spindle_temp", "operator": "gt", "threshold": 80}


class FakeClock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
async def device_a(client: httpx.AsyncClient, admin_a: LoggedIn) -> KeyedDevice:
    return await keyed_device(client, admin_a)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(now_ms())


def make_engine(container: Container, clock: FakeClock) -> RuleEngine:
    return RuleEngine(container.db, container.bus, clock=clock, background=False)


@pytest.fixture
async def engine(
    client: httpx.AsyncClient, container: Container, clock: FakeClock
) -> AsyncIterator[RuleEngine]:
    running = make_engine(container, clock)
    await running.start()
    yield running
    await running.stop()


async def settle(container: Container) -> None:
    """Let every bus consumer finish, including what they published in turn."""
    bus = container.bus
    assert isinstance(bus, InProcessBus)
    for _ in range(4):
        await bus.drain()


async def create_rule(
    client: httpx.AsyncClient, user: LoggedIn, container: Container, **fields: Any
) -> dict[str, Any]:
    body = {"name": "Spindle overheat", "conditions": HOT, "severity": "critical", **fields}
    response = await client.post("/api/v1/rules", json=body, headers=user.headers)
    assert response.status_code == 201, response.text
    await settle(container)
    data: dict[str, Any] = response.json()["data"]
    return data


async def send(
    client: httpx.AsyncClient,
    container: Container,
    device: KeyedDevice,
    values: dict[str, float],
    ts: int | None = None,
) -> None:
    response = await client.post(
        "/api/v1/ingest",
        json={"ts": ts if ts is not None else now_ms(), "values": values},
        headers=device.headers,
    )
    assert response.status_code == 200, response.text
    assert response.json()["rejected"] == 0, response.text
    await settle(container)


async def alerts_of(
    client: httpx.AsyncClient, user: LoggedIn, **params: Any
) -> list[dict[str, Any]]:
    response = await client.get(
        "/api/v1/alerts", params={"sort": "triggered_at", **params}, headers=user.headers
    )
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def record_events(container: Container, pattern: str) -> list[tuple[str, dict[str, Any]]]:
    seen: list[tuple[str, dict[str, Any]]] = []

    async def handler(subject: str, payload: dict[str, Any]) -> None:
        seen.append((subject, payload))

    container.bus.subscribe(pattern, handler)
    return seen


# --- firing, facts, repeats, resolve ---------------------------------------------------------


async def test_a_point_over_the_threshold_raises_one_alert_with_its_facts(
    client: httpx.AsyncClient,
    container: Container,
    engine: RuleEngine,
    admin_a: LoggedIn,
    device_a: KeyedDevice,
) -> None:
    fired = record_events(container, "rule.>")
    rule = await create_rule(
        client,
        admin_a,
        container,
        conditions={
            "operator": "AND",
            "conditions": [HOT, {"parameter": "coolant_flow", "operator": "lt", "threshold": 5}],
        },
        actions={"work_order": True},
    )
    await send(client, container, device_a, {"spindle_temp": 82.5, "coolant_flow": 7.0})
    assert await alerts_of(client, admin_a) == []  # one leaf true is not enough
    await send(client, container, device_a, {"spindle_temp": 82.5, "coolant_flow": 4.1})
    [alert] = await alerts_of(client, admin_a)
    assert alert["rule_id"] == rule["id"] and alert["device_id"] == device_a.id
    assert alert["status"] == "triggered" and alert["severity"] == "critical"
    assert alert["occurrences"] == 1
    assert alert["message"] == "spindle_temp 82.5 > 80; coolant_flow 4.1 < 5"
    assert alert["facts"] == [
        {
            "path": "conditions.conditions[0]",
            "parameter": "spindle_temp",
            "operator": "gt",
            "threshold": 80,
            "value": 82.5,
            "text": "spindle_temp 82.5 > 80",
        },
        {
            "path": "conditions.conditions[1]",
            "parameter": "coolant_flow",
            "operator": "lt",
            "threshold": 5,
            "value": 4.1,
            "text": "coolant_flow 4.1 < 5",
        },
    ]
    assert alert["snapshot"]["values"] == {"spindle_temp": 82.5, "coolant_flow": 4.1}
    assert alert["snapshot"]["device_key"] == device_a.device_key
    # Still hot: the same alert, nothing new.
    await send(client, container, device_a, {"spindle_temp": 90.0, "coolant_flow": 4.0})
    [same] = await alerts_of(client, admin_a)
    assert same["occurrences"] == 1
    subjects = [s for s, _ in fired if s != "rule.changed"]
    assert subjects == ["rule.fired", "rule.work_order"]
    payload = fired[-1][1]
    assert payload["alert_id"] == alert["id"] and payload["device_id"] == device_a.id
    assert payload["message"] == alert["message"] and payload["severity"] == "critical"


async def test_auto_resolve_and_repeats(
    client: httpx.AsyncClient,
    container: Container,
    engine: RuleEngine,
    admin_a: LoggedIn,
    device_a: KeyedDevice,
) -> None:
    resolving = await create_rule(client, admin_a, container, name="resolves", cooldown=0)
    sticky = await create_rule(
        client,
        admin_a,
        container,
        name="sticky",
        auto_resolve=False,
        conditions={"parameter": "spindle_temp", "operator": "gte", "threshold": 85},
    )
    await send(client, container, device_a, {"spindle_temp": 86.0})
    await send(client, container, device_a, {"spindle_temp": 70.0})
    [resolved] = await alerts_of(client, admin_a, rule_id=resolving["id"])
    assert resolved["status"] == "resolved" and resolved["resolved_by"] is None
    [open_] = await alerts_of(client, admin_a, rule_id=sticky["id"])
    assert open_["status"] == "triggered"
    await send(client, container, device_a, {"spindle_temp": 88.0})
    # Without auto-resolve a new rising edge is a repeat of the open alert...
    [repeated] = await alerts_of(client, admin_a, rule_id=sticky["id"])
    assert repeated["id"] == open_["id"] and repeated["occurrences"] == 2
    # ...with it (and no cooldown), a new alert.
    first, second = await alerts_of(client, admin_a, rule_id=resolving["id"])
    assert first["id"] == resolved["id"] and second["status"] == "triggered"
    assert second["message"] == "spindle_temp 88 > 80"


async def test_cooldown_suppresses_a_new_alert(
    client: httpx.AsyncClient,
    container: Container,
    engine: RuleEngine,
    admin_a: LoggedIn,
    device_a: KeyedDevice,
) -> None:
    rule = await create_rule(client, admin_a, container, cooldown="15m")
    for value in (85.0, 70.0, 86.0, 71.0, 87.0):
        await send(client, container, device_a, {"spindle_temp": value})
    [alert] = await alerts_of(client, admin_a, rule_id=rule["id"])
    assert alert["status"] == "resolved"  # and nothing reopened within 15 minutes


async def test_a_manually_resolved_alert_lets_the_next_edge_open_a_new_one(
    client: httpx.AsyncClient,
    container: Container,
    engine: RuleEngine,
    admin_a: LoggedIn,
    device_a: KeyedDevice,
) -> None:
    created = record_events(container, "alert.created")
    rule = await create_rule(client, admin_a, container, auto_resolve=False, cooldown=0)
    await send(client, container, device_a, {"spindle_temp": 85.0})
    [alert] = await alerts_of(client, admin_a)
    done = await client.post(
        f"/api/v1/alerts/{alert['id']}/resolve", json={"note": "fixed"}, headers=admin_a.headers
    )
    assert done.status_code == 200, done.text
    await settle(container)
    await engine.flush()
    async with container.db.session() as session:
        row = await session.get(RuleDeviceState, (rule["id"], device_a.id))
        assert row is not None and row.state["open"] is False
    await send(client, container, device_a, {"spindle_temp": 70.0})
    await send(client, container, device_a, {"spindle_temp": 85.0})
    old, new = await alerts_of(client, admin_a)
    assert (old["id"], old["status"]) == (alert["id"], "resolved")
    assert new["status"] == "triggered" and new["occurrences"] == 1
    assert [p["alert_id"] for _, p in created] == [old["id"], new["id"]]


async def test_a_batch_of_timestamps_is_judged_in_time_order(
    client: httpx.AsyncClient,
    container: Container,
    engine: RuleEngine,
    admin_a: LoggedIn,
    device_a: KeyedDevice,
) -> None:
    await create_rule(
        client,
        admin_a,
        container,
        conditions={"parameter": "spindle_temp", "operator": "gt", "threshold": 80, "for": "1m"},
    )
    t = now_ms()
    batch = [
        {"ts": t, "values": {"spindle_temp": 91.0}},  # arrival order is not time order
        {"ts": t - 2 * M, "values": {"spindle_temp": 90.0}},
        {"ts": t - M, "values": {"spindle_temp": 95.0}},
    ]
    response = await client.post("/api/v1/ingest", json=batch, headers=device_a.headers)
    assert response.status_code == 200, response.text
    await settle(container)
    [alert] = await alerts_of(client, admin_a)
    assert alert["message"] == "spindle_temp 95 > 80 for 1m"  # met at t - 1m, not at t


# --- schedules and tenants ---------------------------------------------------------------


async def test_schedules_use_the_factory_timezone(
    client: httpx.AsyncClient,
    container: Container,
    engine: RuleEngine,
    make_factory: MakeFactory,
    login_as: LoginAs,
) -> None:
    factory = await make_factory("kolkata", timezone="Asia/Kolkata")
    user = await login_as(factory)
    device = await keyed_device(client, user, "K1")
    local = dt.datetime.now(zoneinfo.ZoneInfo("Asia/Kolkata"))

    def window(hours_ahead: int) -> dict[str, Any]:
        start = (local.hour + hours_ahead) % 24
        return {
            "type": "time_window",
            "windows": [
                {
                    "days": [local.isoweekday()],
                    "start": f"{start:02d}:00",
                    "end": f"{(start + 1) % 24:02d}:00",
                }
            ],
        }

    armed = await create_rule(client, user, container, name="now", schedule=window(0))
    later = await create_rule(client, user, container, name="later", schedule=window(2))
    past = await create_rule(
        client,
        user,
        container,
        name="last year",
        schedule={"type": "date_range", "start_date": "2020-01-01", "end_date": "2020-12-31"},
    )
    await send(client, container, device, {"spindle_temp": 99.0})
    fired = {a["rule_id"] for a in await alerts_of(client, user)}
    assert armed["id"] in fired  # 'now' in Kolkata's wall-clock time
    assert later["id"] not in fired and past["id"] not in fired


async def test_another_factorys_device_never_triggers_a_rule(
    client: httpx.AsyncClient,
    container: Container,
    engine: RuleEngine,
    admin_a: LoggedIn,
    admin_b: LoggedIn,
    device_a: KeyedDevice,
) -> None:
    theirs = await keyed_device(client, admin_b, device_a.device_key)  # same key, factory B
    await create_rule(client, admin_a, container, name="whole factory A")
    await create_rule(
        client,
        admin_a,
        container,
        name="listed device",
        scope={"type": "devices", "device_ids": [device_a.id]},
    )
    await send(client, container, theirs, {"spindle_temp": 150.0})
    assert await alerts_of(client, admin_a) == []
    assert await alerts_of(client, admin_b) == []
    await send(client, container, device_a, {"spindle_temp": 150.0})
    assert len(await alerts_of(client, admin_a)) == 2
    assert await alerts_of(client, admin_b) == []


async def test_scope_decides_which_devices_a_rule_watches(
    client: httpx.AsyncClient,
    container: Container,
    engine: RuleEngine,
    admin_a: LoggedIn,
    device_a: KeyedDevice,
) -> None:
    other = await keyed_device(client, admin_a, "M02")
    group = await client.post("/api/v1/groups", json={"name": "Presses"}, headers=admin_a.headers)
    assert group.status_code == 201, group.text
    members = f"/api/v1/groups/{group.json()['data']['id']}/devices"
    added = await client.post(members, json={"device_ids": [other.id]}, headers=admin_a.headers)
    assert added.status_code == 200, added.text
    rule = await create_rule(
        client, admin_a, container, scope={"type": "group", "group_id": group.json()["data"]["id"]}
    )
    await send(client, container, device_a, {"spindle_temp": 99.0})
    assert await alerts_of(client, admin_a) == []
    await send(client, container, other, {"spindle_temp": 99.0})
    [alert] = await alerts_of(client, admin_a)
    assert (alert["rule_id"], alert["device_id"]) == (rule["id"], other.id)
    # Membership changed: the periodic full reload picks it up.
    added = await client.post(members, json={"device_ids": [device_a.id]}, headers=admin_a.headers)
    assert added.status_code == 200, added.text
    await engine.load()
    await send(client, container, device_a, {"spindle_temp": 99.0})
    assert {a["device_id"] for a in await alerts_of(client, admin_a)} == {other.id, device_a.id}


# --- time: `for` and no_data fire on the clock ---------------------------------------------------


async def test_for_and_no_data_fire_from_the_tick(
    client: httpx.AsyncClient,
    container: Container,
    engine: RuleEngine,
    clock: FakeClock,
    admin_a: LoggedIn,
    device_a: KeyedDevice,
) -> None:
    start = clock.now
    held = await create_rule(
        client,
        admin_a,
        container,
        name="hot for 5m",
        conditions={**HOT, "for": "5m"},
    )
    silent = await create_rule(
        client,
        admin_a,
        container,
        name="silent",
        severity="high",
        conditions={"parameter": "heartbeat", "operator": "no_data", "duration": "5m"},
        scope={"type": "devices", "device_ids": [device_a.id]},
    )
    await send(client, container, device_a, {"spindle_temp": 90.0}, ts=start)
    assert await alerts_of(client, admin_a) == []
    clock.now = start + 4 * M
    await engine.tick()
    await settle(container)
    assert await alerts_of(client, admin_a) == []
    clock.now = start + 5 * M
    await engine.tick()
    await settle(container)
    by_rule = {a["rule_id"]: a for a in await alerts_of(client, admin_a)}
    assert by_rule[held["id"]]["message"] == "spindle_temp 90 > 80 for 5m"
    assert by_rule[held["id"]]["facts"][0]["for"] == "5m"
    assert by_rule[silent["id"]]["message"] == "no heartbeat data for 5m"
    assert by_rule[silent["id"]]["facts"][0]["operator"] == "no_data"
    # The heartbeat comes back: the no_data alert resolves itself.
    await send(client, container, device_a, {"heartbeat": 1.0}, ts=clock.now)
    by_rule = {a["rule_id"]: a for a in await alerts_of(client, admin_a)}
    assert by_rule[silent["id"]]["status"] == "resolved"
    assert by_rule[held["id"]]["status"] == "triggered"


async def test_state_survives_a_restart_and_a_new_version_discards_it(
    client: httpx.AsyncClient,
    container: Container,
    engine: RuleEngine,
    clock: FakeClock,
    admin_a: LoggedIn,
    device_a: KeyedDevice,
) -> None:
    start = clock.now
    rule = await create_rule(client, admin_a, container, conditions={**HOT, "for": "5m"})
    await send(client, container, device_a, {"spindle_temp": 90.0}, ts=start)
    clock.now = start + 2 * M
    await engine.tick()
    await engine.stop()  # writes what it holds
    async with container.db.session() as session:
        row = await session.get(RuleDeviceState, (rule["id"], device_a.id))
        assert row is not None and row.rule_version == rule["version"]
        assert row.state["condition"]["since"] == {"conditions": start}

    # A new process: same clock, 3 more minutes. The `for` kept counting from `start`.
    restarted = make_engine(container, clock)
    await restarted.start()
    try:
        clock.now = start + 4 * M
        await restarted.tick()
        await settle(container)
        assert await alerts_of(client, admin_a) == []
        clock.now = start + 5 * M
        await restarted.tick()
        await settle(container)
        [alert] = await alerts_of(client, admin_a)
        assert alert["message"] == "spindle_temp 90 > 80 for 5m"
    finally:
        await restarted.stop()

    # Saved for version 1, loaded for version 2: the clock starts again.
    second = await create_rule(
        client, admin_a, container, name="edited", conditions={**HOT, "for": "5m"}
    )
    again = make_engine(container, clock)
    await again.start()
    await send(client, container, device_a, {"spindle_temp": 91.0}, ts=clock.now)
    await again.stop()
    changed = await client.patch(
        f"/api/v1/rules/{second['id']}",
        json={"conditions": {**HOT, "threshold": 85, "for": "5m"}},
        headers=admin_a.headers,
    )
    assert changed.status_code == 200, changed.text
    base = clock.now
    fresh = make_engine(container, clock)
    await fresh.start()
    try:
        clock.now = base + 5 * M
        await fresh.tick()
        await settle(container)
        assert [a["rule_id"] for a in await alerts_of(client, admin_a)] == [rule["id"]]
        clock.now = base + 10 * M
        await fresh.tick()  # a full `for` under the new version
        await settle(container)
        assert {a["rule_id"] for a in await alerts_of(client, admin_a)} == {
            rule["id"],
            second["id"],
        }
    finally:
        await fresh.stop()


# --- changes without restart, and failures --------------------------------------------------


async def test_rule_changes_reindex_without_a_restart(
    client: httpx.AsyncClient,
    container: Container,
    engine: RuleEngine,
    admin_a: LoggedIn,
    device_a: KeyedDevice,
) -> None:
    rule = await create_rule(client, admin_a, container, cooldown=0)
    url = f"/api/v1/rules/{rule['id']}"
    await send(client, container, device_a, {"coolant_flow": 2.0, "spindle_temp": 20.0})
    assert await alerts_of(client, admin_a) == []
    changed = await client.patch(
        url,
        json={"conditions": {"parameter": "coolant_flow", "operator": "lt", "threshold": 5}},
        headers=admin_a.headers,
    )
    assert changed.status_code == 200
    await settle(container)
    await send(client, container, device_a, {"coolant_flow": 2.0})
    [alert] = await alerts_of(client, admin_a)
    assert alert["message"] == "coolant_flow 2 < 5"
    await send(client, container, device_a, {"coolant_flow": 9.0})  # resolves
    assert (await client.post(f"{url}/toggle", headers=admin_a.headers)).status_code == 200
    await settle(container)
    assert rule["id"] not in engine.rules
    await send(client, container, device_a, {"coolant_flow": 1.0})
    assert len(await alerts_of(client, admin_a)) == 1  # switched off: nothing new
    assert (await client.post(f"{url}/toggle", headers=admin_a.headers)).status_code == 200
    await settle(container)
    await send(client, container, device_a, {"coolant_flow": 9.0})
    await send(client, container, device_a, {"coolant_flow": 1.0})
    assert len(await alerts_of(client, admin_a)) == 2
    assert (await client.delete(url, headers=admin_a.headers)).status_code == 204
    await settle(container)
    assert rule["id"] not in engine.rules


async def test_a_rule_that_raises_is_disabled_and_the_others_keep_working(
    client: httpx.AsyncClient,
    container: Container,
    engine: RuleEngine,
    admin_a: LoggedIn,
    device_a: KeyedDevice,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def explode(self: detectors.RollingZScore, value: float) -> float:
        raise ZeroDivisionError("detector exploded")

    monkeypatch.setattr(detectors.RollingZScore, "score", explode)
    changes = record_events(container, "rule.changed")
    broken = await create_rule(
        client,
        admin_a,
        container,
        name="anomalous vibration",
        conditions={"parameter": "vibration", "operator": "anomaly"},
    )
    healthy = await create_rule(
        client,
        admin_a,
        container,
        name="vibration high",
        cooldown=0,
        conditions={"parameter": "vibration", "operator": "gt", "threshold": 7},
    )
    await send(client, container, device_a, {"vibration": 9.0})
    shown = (await client.get(f"/api/v1/rules/{broken['id']}", headers=admin_a.headers)).json()
    assert shown["data"]["is_active"] is False
    assert shown["data"]["error"] == "ZeroDivisionError: detector exploded"
    assert {"factory_id": admin_a.factory_id, "rule_id": broken["id"]} in [p for _, p in changes]
    async with container.db.session() as session:
        audit = await session.scalar(
            select(AuditEntry).where(
                AuditEntry.action == "rule.disable", AuditEntry.entity_id == str(broken["id"])
            )
        )
        assert audit is not None and audit.actor == "rules-engine"
    [alert] = await alerts_of(client, admin_a)
    assert alert["rule_id"] == healthy["id"]
    await send(client, container, device_a, {"vibration": 1.0})
    await send(client, container, device_a, {"vibration": 8.0})
    assert len(await alerts_of(client, admin_a, rule_id=healthy["id"])) == 2
    # Fixed and switched back on: the error is gone and the rule runs again.
    monkeypatch.undo()
    enabled = await client.post(f"/api/v1/rules/{broken['id']}/toggle", headers=admin_a.headers)
    assert enabled.json()["data"]["is_active"] is True
    assert enabled.json()["data"]["error"] is None
    await settle(container)
    assert broken["id"] in engine.rules


async def test_notify_channels_must_exist_in_the_factory(
    client: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    body = {"name": "r", "conditions": HOT, "actions": {"notify": [424242]}}
    response = await client.post("/api/v1/rules", json=body, headers=admin_a.headers)
    problem = assert_problem(response, 422, "validation_error")
    assert [e["path"] for e in problem["errors"]] == ["body.actions.notify[0]"]


async def test_an_engine_sees_only_its_partitions(
    client: httpx.AsyncClient,
    container: Container,
    clock: FakeClock,
    admin_a: LoggedIn,
    device_a: KeyedDevice,
) -> None:
    partial = RuleEngine(
        container.db,
        container.bus,
        clock=clock,
        background=False,
        partitions=[p for p in range(8) if p != device_a.id % 8],
    )
    await partial.start()
    try:
        await create_rule(client, admin_a, container)
        await send(client, container, device_a, {"spindle_temp": 99.0})
        assert await alerts_of(client, admin_a) == []
        assert partial.stats["points"] == 0
    finally:
        await partial.stop()


async def test_a_stored_rule_that_does_not_compile_is_disabled_at_load(
    client: httpx.AsyncClient,
    container: Container,
    engine: RuleEngine,
    admin_a: LoggedIn,
) -> None:
    async with container.db.session() as session:
        rule = Rule(
            factory_id=admin_a.factory_id,
            name="hand-made",
            conditions={"parameter": "t", "operator": "explode"},
            version=1,
        )
        session.add(rule)
        await session.commit()
    await engine.load()
    await settle(container)
    shown = await client.get(f"/api/v1/rules/{rule.id}", headers=admin_a.headers)
    assert shown.status_code == 200, shown.text
    assert shown.json()["data"]["is_active"] is False
    assert shown.json()["data"]["error"].startswith("ConditionError: conditions.operator")
    assert rule.id not in engine.rules


async def test_detector_memory_survives_a_restart(
    client: httpx.AsyncClient,
    container: Container,
    engine: RuleEngine,
    clock: FakeClock,
    admin_a: LoggedIn,
    device_a: KeyedDevice,
) -> None:
    rule = await create_rule(
        client,
        admin_a,
        container,
        name="odd vibration",
        conditions={"parameter": "vibration", "operator": "anomaly", "threshold": 4},
    )
    t = now_ms() - 60 * S
    calm = [{"ts": t + i * S, "values": {"vibration": 1.0 + (i % 5) * 0.01}} for i in range(40)]
    response = await client.post("/api/v1/ingest", json=calm, headers=device_a.headers)
    assert response.status_code == 200, response.text
    await settle(container)
    await engine.stop()
    async with container.db.session() as session:
        row = await session.get(RuleDeviceState, (rule["id"], device_a.id))
        assert row is not None
        [memory] = row.state["condition"]["detectors"].values()
        assert len(memory["values"]) == 40
    restarted = make_engine(container, clock)
    await restarted.start()
    try:
        await send(client, container, device_a, {"vibration": 1.5})
        [alert] = await alerts_of(client, admin_a)
        assert "anomalous (zscore score" in alert["message"]
    finally:
        await restarted.stop()


async def test_engine_alerts_enter_the_stream_log_with_the_alert_once(
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    device_a: KeyedDevice,
    clock: FakeClock,
) -> None:
    """With the live stream attached, an alert's stream-log entry commits in the alert's
    own transaction (an outbox): it is in the log exactly once, under the id the bus
    event names, and the recorder does not log it a second time."""
    from sqlalchemy import text

    running = RuleEngine(
        container.db, container.bus, clock=clock, background=False, stream=container.stream
    )
    await running.start()
    try:
        published = record_events(container, "alert.>")
        await create_rule(client, admin_a, container)
        await send(client, container, device_a, {"spindle_temp": 90})
    finally:
        await running.stop()
    async with container.db.engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT id, kind FROM stream_events WHERE kind LIKE 'alert.%' ORDER BY id")
            )
        ).all()
    assert [kind for _, kind in rows] == ["alert.created"]
    [(subject, payload)] = published
    assert subject == "alert.created" and payload["stream_id"] == rows[0][0]
