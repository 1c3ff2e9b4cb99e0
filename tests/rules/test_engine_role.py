"""The `rules` role: registered for `plantwatch up` / `plantwatch run rules`, runs the
engine on the container's bus with its own clock, and stops cleanly."""

from __future__ import annotations

import asyncio

import httpx

from plantwatch.app import Container
from plantwatch.cli import ROLES, RoleContext
from plantwatch.rules.engine import RulesRole
from tests.conftest import LoggedIn
from tests.rules.test_engine import alerts_of, create_rule, send, settle
from tests.telemetry.conftest import keyed_device


async def test_the_rules_role_runs_the_engine_until_stopped(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    assert "rules" in ROLES
    role = ROLES["rules"](RoleContext(container, "127.0.0.1", 0))
    assert isinstance(role, RulesRole)
    await role.start()
    assert role.engine.rules == {}
    assert "telemetry partitions 0-7" in role.endpoints()[0][1]
    device = await keyed_device(client, admin_a)
    await create_rule(
        client,
        admin_a,
        container,
        conditions={"parameter": "spindle_temp", "operator": "gt", "threshold": 80},
    )
    await send(client, container, device, {"spindle_temp": 95.0})
    [alert] = await alerts_of(client, admin_a)
    assert alert["message"] == "spindle_temp 95 > 80"
    role.request_stop()
    await asyncio.wait_for(role.wait(), timeout=10)
    await settle(container)
    # Stopped: nothing listens any more.
    await send(client, container, device, {"spindle_temp": 10.0})
    [still] = await alerts_of(client, admin_a)
    assert still["status"] == "triggered"  # a running engine would have auto-resolved it
