"""Alert test helpers: rules and devices to hang alerts on, and raising alerts the way
the rule engine does (service.raise_alert in a transaction, publish after commit)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import httpx

from plantwatch.alerts import service
from plantwatch.alerts.service import AlertChange
from plantwatch.app import Container
from plantwatch.core.db import utcnow
from plantwatch.rules.models import Rule
from tests.conftest import LoggedIn

FACTS = [
    {
        "parameter": "spindle_temp",
        "operator": "gt",
        "value": 82.5,
        "threshold": 80,
        "text": "spindle_temp 82.5 > 80 for 5m",
    }
]
SNAPSHOT = {"spindle_temp": 82.5, "coolant_flow": 4.1}


@dataclass
class Target:
    """A rule and a device of one factory: what an engine alert is about."""

    factory_id: int
    rule_id: int
    device_id: int


async def make_rule(container: Container, factory_id: int, name: str = "Spindle overheat") -> int:
    async with container.db.session() as session:
        rule = Rule(
            factory_id=factory_id,
            name=name,
            conditions={"parameter": "spindle_temp", "operator": "gt", "threshold": 80},
            severity="critical",
        )
        session.add(rule)
        await session.commit()
        return rule.id


async def make_device(client: httpx.AsyncClient, owner: LoggedIn, key: str = "M01") -> int:
    created = await client.post(
        "/api/v1/devices",
        json={"device_key": key, "name": f"Machine {key}"},
        headers=owner.headers,
    )
    assert created.status_code == 201, created.text
    device_id: int = created.json()["data"]["id"]
    return device_id


async def make_target(
    client: httpx.AsyncClient,
    container: Container,
    owner: LoggedIn,
    key: str = "M01",
    rule_id: int | None = None,
) -> Target:
    device_id = await make_device(client, owner, key)
    if rule_id is None:
        rule_id = await make_rule(container, owner.factory_id)
    return Target(owner.factory_id, rule_id, device_id)


async def raise_alert(
    container: Container,
    target: Target,
    *,
    severity: str = "critical",
    at: dt.datetime | None = None,
    message: str = "spindle_temp 82.5 > 80 for 5m",
    received_ms: int | None = None,
    publish: bool = True,
) -> AlertChange:
    async with container.db.session() as session:
        change = await service.raise_alert(
            session,
            factory_id=target.factory_id,
            rule_id=target.rule_id,
            device_id=target.device_id,
            severity=severity,
            title="Spindle overheat",
            message=message,
            facts=FACTS,
            snapshot=SNAPSHOT,
            at=at or utcnow(),
            received_ms=received_ms,
        )
        await session.commit()
    if publish:
        await service.publish(container.bus, [change])
    return change


async def clear_alert(
    container: Container, target: Target, at: dt.datetime | None = None
) -> AlertChange | None:
    async with container.db.session() as session:
        change = await service.clear_alert(
            session,
            factory_id=target.factory_id,
            rule_id=target.rule_id,
            device_id=target.device_id,
            at=at or utcnow(),
            message="spindle_temp back to 71.0",
        )
        await session.commit()
    if change is not None:
        await service.publish(container.bus, [change])
    return change


class Recorder:
    """Collects bus events; each handler checks the change is visible in a new session."""

    def __init__(self, container: Container, pattern: str = "alert.>") -> None:
        self.container = container
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.committed: list[bool] = []
        container.bus.subscribe(pattern, self._handle)

    async def _handle(self, subject: str, payload: dict[str, Any]) -> None:
        from plantwatch.alerts.models import Alert

        async with self.container.db.session() as session:
            alert = await session.get(Alert, payload["alert_id"])
            self.committed.append(
                alert is not None
                and alert.status == payload["status"]
                and alert.occurrences == payload["occurrences"]
                and alert.escalation_level == payload["escalation_level"]
                and alert.assigned_to == payload["assigned_to"]
            )
            await session.rollback()
        self.events.append((subject, payload))

    async def drained(self) -> list[tuple[str, dict[str, Any]]]:
        await self.container.bus.drain()  # type: ignore[attr-defined]
        return self.events

    def subjects(self) -> list[str]:
        return [s for s, _ in self.events]
