"""The alerts API over HTTP: lifecycle, one open alert per (rule, device), auto-clear,
forbidden transitions, bad bodies, tenancy, permissions, the timeline and bus events."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import httpx
from sqlalchemy import func, select

from plantwatch.alerts import service
from plantwatch.alerts.models import Alert, AlertEvent
from plantwatch.app import Container
from plantwatch.core.db import utcnow
from plantwatch.tenancy.models import AuditEntry, Factory
from tests.alerts.conftest import (
    FACTS,
    SNAPSHOT,
    Recorder,
    clear_alert,
    make_rule,
    make_target,
    raise_alert,
)
from tests.conftest import LoggedIn, LoginAs, assert_problem

API = "/api/v1/alerts"


async def get(client: httpx.AsyncClient, user: LoggedIn, url: str, **params: Any) -> Any:
    response = await client.get(url, params=params, headers=user.headers)
    assert response.status_code == 200, response.text
    return response.json()


async def act(
    client: httpx.AsyncClient,
    user: LoggedIn,
    alert_id: int,
    action: str,
    body: dict[str, Any] | None = None,
    status: int = 200,
) -> dict[str, Any]:
    response = await client.post(f"{API}/{alert_id}/{action}", json=body, headers=user.headers)
    assert response.status_code == status, response.text
    data: dict[str, Any] = response.json().get("data", response.json())
    return data


async def test_lifecycle_through_http(
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    login_as: LoginAs,
    factory_a: Factory,
) -> None:
    tech = await login_as(factory_a, "technician")
    target = await make_target(client, container, admin_a)
    change = await raise_alert(container, target, received_ms=1234)
    assert change.subject == "alert.created"
    alert_id = change.payload["alert_id"]

    detail = (await get(client, admin_a, f"{API}/{alert_id}"))["data"]
    assert detail["status"] == "triggered" and detail["occurrences"] == 1
    assert detail["facts"] == FACTS and detail["snapshot"] == SNAPSHOT
    assert detail["message"] == "spindle_temp 82.5 > 80 for 5m"
    assert (detail["rule_name"], detail["device_key"]) == ("Spindle overheat", "M01")
    sla = detail["sla"]
    triggered = dt.datetime.fromisoformat(detail["triggered_at"])
    # Critical defaults: 15 min to acknowledge, 4 h to resolve.
    assert dt.datetime.fromisoformat(sla["ack_due_at"]) - triggered == dt.timedelta(minutes=15)
    assert dt.datetime.fromisoformat(sla["resolve_due_at"]) - triggered == dt.timedelta(hours=4)
    assert not sla["ack_breached"] and 0 < sla["ack_remaining_s"] <= 900
    assert [e["kind"] for e in detail["timeline"]] == ["created"]

    acked = await act(client, tech, alert_id, "acknowledge", {"note": "on my way"})
    assert acked["status"] == "acknowledged" and acked["acknowledged_by"] == tech.user_id
    assert acked["sla"]["ack_remaining_s"] is None
    assert acked["sla"]["next_check_at"] == acked["sla"]["resolve_due_at"]
    assigned = await act(client, admin_a, alert_id, "assign", {"user_id": tech.user_id})
    assert assigned["assigned_to"] == tech.user_id
    comment = await act(client, tech, alert_id, "comments", {"text": "bearing is hot"}, 201)
    assert comment["kind"] == "commented" and comment["actor_email"] == tech.email
    resolved = await act(client, tech, alert_id, "resolve", {"note": "replaced the bearing"})
    assert resolved["status"] == "resolved" and resolved["resolved_by"] == tech.user_id
    assert resolved["resolution_note"] == "replaced the bearing"
    assert resolved["sla"]["next_check_at"] is None
    assert [e["kind"] for e in resolved["timeline"]] == [
        "created",
        "acknowledged",
        "assigned",
        "commented",
        "resolved",
    ]
    assert [e["actor_id"] for e in resolved["timeline"]] == [
        None,
        tech.user_id,
        admin_a.user_id,
        tech.user_id,
        tech.user_id,
    ]
    assert resolved["timeline"][1]["data"] == {"note": "on my way"}

    # Forbidden transitions: 409 naming what is wrong, nothing changes.
    for action in ("acknowledge", "resolve", "assign", "escalate"):
        body = {"user_id": tech.user_id} if action == "assign" else None
        response = await client.post(
            f"{API}/{alert_id}/{action}", json=body, headers=admin_a.headers
        )
        problem = assert_problem(response, 409, "invalid_transition")
        assert "resolved" in problem["detail"] and problem["alert_status"] == "resolved"
    # Commenting on a resolved alert is fine; reopening it gives a fresh SLA.
    await act(client, tech, alert_id, "comments", {"text": "for the record"}, 201)
    reopened = await act(client, tech, alert_id, "reopen", {"reason": "came back"})
    assert reopened["status"] == "triggered"
    assert reopened["acknowledged_at"] is None and reopened["resolved_at"] is None
    assert reopened["sla"]["ack_due_at"] > detail["sla"]["ack_due_at"]
    problem = assert_problem(
        await client.post(f"{API}/{alert_id}/reopen", headers=admin_a.headers), 409
    )
    assert problem["code"] == "invalid_transition"
    timeline = await get(client, admin_a, f"{API}/{alert_id}/timeline")
    assert [e["kind"] for e in timeline["data"]][-2:] == ["commented", "reopened"]
    assert timeline["meta"]["total"] == 7

    # Every action is audited in its transaction.
    async with container.db.session() as session:
        actions = (
            await session.scalars(
                select(AuditEntry.action)
                .where(AuditEntry.entity_type == "alert", AuditEntry.entity_id == str(alert_id))
                .order_by(AuditEntry.id)
            )
        ).all()
    assert actions == [
        "alert.acknowledge",
        "alert.assign",
        "alert.comment",
        "alert.resolve",
        "alert.comment",
        "alert.reopen",
    ]


async def test_one_open_alert_per_rule_and_device(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    target = await make_target(client, container, admin_a)
    t0 = utcnow()
    first = await raise_alert(container, target, at=t0)
    again = await raise_alert(container, target, at=t0 + dt.timedelta(seconds=30))
    late = await raise_alert(container, target, at=t0 + dt.timedelta(seconds=10))
    assert (again.subject, late.subject) == ("alert.repeated", "alert.repeated")
    assert first.payload["alert_id"] == again.payload["alert_id"] == late.payload["alert_id"]
    assert late.payload["occurrences"] == 3
    detail = (await get(client, admin_a, f"{API}/{first.payload['alert_id']}"))["data"]
    assert detail["occurrences"] == 3
    # An out-of-order repeat never moves last_seen_at backwards.
    assert dt.datetime.fromisoformat(detail["last_seen_at"]) == t0 + dt.timedelta(seconds=30)
    assert [e["kind"] for e in detail["timeline"]] == ["created", "repeated", "repeated"]
    assert detail["timeline"][1]["data"]["occurrences"] == 2

    # Another device of the same rule: its own alert.
    other = await make_target(client, container, admin_a, "M02", rule_id=target.rule_id)
    second = await raise_alert(container, other)
    assert second.subject == "alert.created"
    assert second.payload["alert_id"] != first.payload["alert_id"]

    # Once resolved, the next raise opens a new alert.
    await act(client, admin_a, first.payload["alert_id"], "resolve")
    fresh = await raise_alert(container, target)
    assert fresh.subject == "alert.created" and fresh.payload["occurrences"] == 1
    listed = await get(client, admin_a, API, rule_id=target.rule_id, device_id=target.device_id)
    assert [a["occurrences"] for a in listed["data"]] == [1, 3]

    # The database itself refuses a second open alert for the pair.
    async with container.db.session() as session:
        session.add(
            Alert(
                factory_id=target.factory_id,
                rule_id=target.rule_id,
                device_id=target.device_id,
                open_key=service.open_key(target.rule_id, target.device_id),
                severity="low",
                status="triggered",
                title="dup",
                message="dup",
                triggered_at=utcnow(),
                last_seen_at=utcnow(),
            )
        )
        try:
            await session.commit()
            raise AssertionError("a second open alert was stored")
        except Exception as exc:  # IntegrityError, wrapped by the driver
            assert "unique" in str(exc).lower() or "UNIQUE" in str(exc)


async def test_concurrent_raises_never_open_two_alerts(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    """The first raise has inserted but not committed when the second starts: the
    second must end up bumping the first's alert, not opening another."""
    target = await make_target(client, container, admin_a)
    kwargs: dict[str, Any] = {
        "factory_id": target.factory_id,
        "rule_id": target.rule_id,
        "device_id": target.device_id,
        "severity": "high",
        "title": "t",
        "message": "m",
        "facts": [],
        "snapshot": {},
    }
    async with container.db.session() as first:
        created = await service.raise_alert(first, at=utcnow(), **kwargs)

        async def second() -> service.AlertChange:
            async with container.db.session() as session:
                change = await service.raise_alert(session, at=utcnow(), **kwargs)
                await session.commit()
                return change

        racing = asyncio.create_task(second())
        await asyncio.sleep(0.3)  # the second is now blocked on the first's row or lock
        assert not racing.done()
        await first.commit()
    bumped = await asyncio.wait_for(racing, 15)
    assert created.subject == "alert.created" and bumped.subject == "alert.repeated"
    assert bumped.payload["alert_id"] == created.payload["alert_id"]
    assert bumped.payload["occurrences"] == 2
    # Many at once: still one alert, every raise counted.
    changes = await asyncio.gather(
        *(raise_alert(container, target, severity="high", publish=False) for _ in range(6))
    )
    assert {c.payload["alert_id"] for c in changes} == {created.payload["alert_id"]}
    async with container.db.session() as session:
        alerts = (await session.scalars(select(Alert))).all()
    assert len(alerts) == 1 and alerts[0].occurrences == 8


async def test_auto_clear_resolves_without_an_actor(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    target = await make_target(client, container, admin_a)
    opened = await raise_alert(container, target)
    cleared = await clear_alert(container, target)
    assert cleared is not None and cleared.subject == "alert.resolved"
    assert cleared.payload["actor_id"] is None and cleared.payload["status"] == "resolved"
    assert await clear_alert(container, target) is None  # nothing open any more
    detail = (await get(client, admin_a, f"{API}/{opened.payload['alert_id']}"))["data"]
    assert detail["status"] == "resolved" and detail["resolved_by"] is None
    assert detail["timeline"][-1]["kind"] == "auto-resolved"
    assert detail["timeline"][-1]["data"] == {"message": "spindle_temp back to 71.0"}
    again = await raise_alert(container, target)
    assert again.subject == "alert.created"
    assert again.payload["alert_id"] != opened.payload["alert_id"]


async def test_bus_events_are_published_after_commit(
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    login_as: LoginAs,
    factory_a: Factory,
) -> None:
    recorder = Recorder(container)
    tech = await login_as(factory_a, "technician")
    target = await make_target(client, container, admin_a)
    alert_id = (await raise_alert(container, target, received_ms=42)).payload["alert_id"]
    await recorder.drained()
    await raise_alert(container, target)
    await recorder.drained()
    for action, body in [
        ("acknowledge", None),
        ("assign", {"user_id": tech.user_id}),
        ("comments", {"text": "looking"}),
        ("resolve", {"note": "done"}),
        ("reopen", None),
    ]:
        response = await client.post(
            f"{API}/{alert_id}/{action}", json=body, headers=admin_a.headers
        )
        assert response.status_code in (200, 201), response.text
        await recorder.drained()
    assert recorder.subjects() == [
        "alert.created",
        "alert.repeated",
        "alert.acknowledged",
        "alert.assigned",
        "alert.commented",
        "alert.resolved",
        "alert.reopened",
    ]
    # Each handler saw the change already committed (read in its own session).
    assert all(recorder.committed), recorder.committed
    created = recorder.events[0][1]
    assert created["received_ms"] == 42 and created["factory_id"] == admin_a.factory_id
    assert set(created) == {
        "event",
        "factory_id",
        "alert_id",
        "rule_id",
        "device_id",
        "severity",
        "status",
        "title",
        "message",
        "occurrences",
        "escalation_level",
        "assigned_to",
        "actor_id",
        "at",
        "received_ms",
        "recipients",
    }
    assert created["at"].endswith("Z")
    assigned = recorder.events[3][1]
    assert assigned["recipients"] == [tech.user_id] and assigned["actor_id"] == admin_a.user_id
    # A refused action publishes nothing.
    await client.post(f"{API}/{alert_id}/reopen", headers=admin_a.headers)
    assert len(await recorder.drained()) == 7


async def test_bad_bodies_and_queries_are_422_with_the_path(
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    admin_b: LoggedIn,
) -> None:
    target = await make_target(client, container, admin_a)
    alert_id = (await raise_alert(container, target)).payload["alert_id"]

    async def paths(method: str, url: str, **kwargs: Any) -> set[str]:
        response = await client.request(method, url, headers=admin_a.headers, **kwargs)
        problem = assert_problem(response, 422, "validation_error")
        return {e["path"] for e in problem["errors"]}

    assert await paths("POST", f"{API}/{alert_id}/assign", json={"user_id": "x"}) == {
        "body.user_id"
    }
    # A user of another factory does not exist here.
    assert await paths("POST", f"{API}/{alert_id}/assign", json={"user_id": admin_b.user_id}) == {
        "body.user_id"
    }
    assert await paths("POST", f"{API}/{alert_id}/comments", json={"text": ""}) == {"body.text"}
    assert await paths("POST", f"{API}/{alert_id}/comments", json={"text": "a\x00b"}) == {
        "body.text"
    }
    assert await paths("POST", f"{API}/{alert_id}/resolve", json={"note": "x", "by": 1}) == {
        "body.by"
    }
    assert await paths(
        "PUT",
        f"{API}/sla",
        json={
            "policies": [
                {"severity": "high", "ack_s": 600, "resolve_s": 60},
                {"severity": "high", "ack_s": 60, "resolve_s": 600},
                {"severity": "urgent", "ack_s": 60, "resolve_s": 600},
                {"severity": "low", "ack_s": 0, "resolve_s": 600, "remind_every_s": 5},
            ]
        },
    ) == {
        "body.policies[2].severity",
        "body.policies[3].ack_s",
        "body.policies[3].remind_every_s",
    }
    assert await paths(
        "PUT",
        f"{API}/sla",
        json={
            "policies": [
                {"severity": "high", "ack_s": 600, "resolve_s": 60},
                {"severity": "high", "ack_s": 60, "resolve_s": 600},
            ]
        },
    ) == {"body.policies[0].ack_s", "body.policies[1].severity"}
    assert await paths(
        "PUT",
        f"{API}/escalation-chain",
        json={
            "levels": [
                {"user_ids": [], "roles": []},
                {"user_ids": [admin_a.user_id, admin_b.user_id]},
            ]
        },
    ) == {"body.levels[0]", "body.levels[1].user_ids[1]"}
    assert await paths(
        "PUT", f"{API}/escalation-chain", json={"levels": [{"roles": ["wizard"]}]}
    ) == {"body.levels[0].roles[0]"}
    assert await paths("GET", API, params={"status": "open"}) == {"query.status[0]"}
    assert await paths("GET", API, params={"sort": "colour"}) == {"query.sort"}
    assert await paths(
        "GET", API, params={"from": "2026-03-02T00:00:00Z", "to": "2026-03-01T00:00:00Z"}
    ) == {"query.to"}
    assert await paths("GET", API, params={"from": "2026-03-02T00:00:00"}) == {"query.from"}
    assert await paths("GET", f"{API}/0") == {"path.alert_id"}
    # Nothing was changed by any of it.
    detail = (await get(client, admin_a, f"{API}/{alert_id}"))["data"]
    assert detail["assigned_to"] is None and len(detail["timeline"]) == 1
    sla = (await get(client, admin_a, f"{API}/sla"))["data"]
    assert {p["source"] for p in sla} == {"default"}


async def test_another_factory_gets_404_on_every_endpoint(
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    admin_b: LoggedIn,
) -> None:
    target = await make_target(client, container, admin_a)
    alert_id = (await raise_alert(container, target)).payload["alert_id"]
    for method, suffix, body in [
        ("GET", "", None),
        ("GET", "/timeline", None),
        ("POST", "/acknowledge", None),
        ("POST", "/assign", {"user_id": admin_b.user_id}),
        ("POST", "/resolve", {"note": "not mine"}),
        ("POST", "/reopen", None),
        ("POST", "/comments", {"text": "hello"}),
        ("POST", "/escalate", None),
    ]:
        response = await client.request(
            method, f"{API}/{alert_id}{suffix}", json=body, headers=admin_b.headers
        )
        assert_problem(response, 404, "alert_not_found")
    assert (await get(client, admin_b, API))["meta"]["total"] == 0
    counts = (await get(client, admin_b, f"{API}/counts"))["data"]
    assert counts["total"] == 0
    # Filters naming A's rule or device find nothing for B either.
    assert (await get(client, admin_b, API, rule_id=target.rule_id))["data"] == []
    # Configuration is per factory.
    put = await client.put(
        f"{API}/sla",
        json={"policies": [{"severity": "low", "ack_s": 60, "resolve_s": 120}]},
        headers=admin_a.headers,
    )
    assert put.status_code == 200, put.text
    chain = await client.put(
        f"{API}/escalation-chain",
        json={"levels": [{"user_ids": [admin_a.user_id]}]},
        headers=admin_a.headers,
    )
    assert chain.status_code == 200, chain.text
    theirs = (await get(client, admin_b, f"{API}/sla"))["data"]
    assert {p["source"] for p in theirs} == {"default"}
    assert (await get(client, admin_b, f"{API}/escalation-chain"))["data"]["levels"] == []
    # A's alert is untouched by B's attempts.
    detail = (await get(client, admin_a, f"{API}/{alert_id}"))["data"]
    assert detail["status"] == "triggered" and len(detail["timeline"]) == 1


async def test_permissions(
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    login_as: LoginAs,
    factory_a: Factory,
) -> None:
    viewer = await login_as(factory_a, "viewer")
    tech = await login_as(factory_a, "technician")
    target = await make_target(client, container, admin_a)
    alert_id = (await raise_alert(container, target)).payload["alert_id"]
    for url in (API, f"{API}/counts", f"{API}/{alert_id}", f"{API}/{alert_id}/timeline"):
        await get(client, viewer, url)
    await get(client, viewer, f"{API}/sla")
    await get(client, viewer, f"{API}/escalation-chain")
    writes: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", f"{API}/{alert_id}/acknowledge", None),
        ("POST", f"{API}/{alert_id}/assign", {"user_id": viewer.user_id}),
        ("POST", f"{API}/{alert_id}/resolve", None),
        ("POST", f"{API}/{alert_id}/reopen", None),
        ("POST", f"{API}/{alert_id}/comments", {"text": "hi"}),
        ("POST", f"{API}/{alert_id}/escalate", None),
        ("PUT", f"{API}/sla", {"policies": []}),
        ("PUT", f"{API}/escalation-chain", {"levels": []}),
    ]
    for method, url, body in writes:
        response = await client.request(method, url, json=body, headers=viewer.headers)
        assert_problem(response, 403)
    # A technician responds but does not manage.
    for method, url, body in writes[-3:]:
        response = await client.request(method, url, json=body, headers=tech.headers)
        assert_problem(response, 403)
    await act(client, tech, alert_id, "acknowledge")
    async with container.db.session() as session:
        kinds = (await session.scalars(select(AlertEvent.kind).order_by(AlertEvent.id))).all()
    assert kinds == ["created", "acknowledged"]


async def test_timeline_is_immutable_and_ordered(
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
) -> None:
    target = await make_target(client, container, admin_a)
    alert_id = (await raise_alert(container, target)).payload["alert_id"]
    await act(client, admin_a, alert_id, "comments", {"text": "first"}, 201)
    before = (await get(client, admin_a, f"{API}/{alert_id}/timeline"))["data"]
    await raise_alert(container, target)
    await act(client, admin_a, alert_id, "acknowledge")
    await act(client, admin_a, alert_id, "resolve", {"note": "fixed"})
    await act(client, admin_a, alert_id, "reopen")
    after = (await get(client, admin_a, f"{API}/{alert_id}/timeline"))["data"]
    assert after[: len(before)] == before  # earlier entries never change
    ids = [e["id"] for e in after]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    stamps = [dt.datetime.fromisoformat(e["at"]) for e in after]
    assert stamps == sorted(stamps)
    # Paging walks the same order.
    page2 = await get(client, admin_a, f"{API}/{alert_id}/timeline", page=2, per_page=2)
    assert [e["id"] for e in page2["data"]] == ids[2:4]
    assert page2["meta"]["total"] == len(ids)
    # There is no way to edit or delete an entry through the API.
    entry = after[0]["id"]
    for method in ("PUT", "PATCH", "DELETE"):
        response = await client.request(
            method, f"{API}/{alert_id}/timeline", json={"id": entry}, headers=admin_a.headers
        )
        assert response.status_code == 405
        response = await client.request(
            method, f"{API}/{alert_id}/timeline/{entry}", headers=admin_a.headers
        )
        assert response.status_code in (404, 405)


async def test_list_filters_sort_paging_and_counts(
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    login_as: LoginAs,
    factory_a: Factory,
) -> None:
    tech = await login_as(factory_a, "technician")
    rule_1 = await make_rule(container, admin_a.factory_id, "Overheat")
    rule_2 = await make_rule(container, admin_a.factory_id, "Vibration")
    t0 = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.UTC)
    targets = [
        await make_target(client, container, admin_a, f"M0{i}", rule_id=rule)
        for i, rule in enumerate([rule_1, rule_1, rule_2, rule_2])
    ]
    ids = []
    for i, (target, severity) in enumerate(
        zip(targets, ["low", "critical", "high", "critical"], strict=True)
    ):
        change = await raise_alert(
            container, target, severity=severity, at=t0 + dt.timedelta(hours=i)
        )
        ids.append(change.payload["alert_id"])
    await act(client, admin_a, ids[0], "resolve")
    await act(client, admin_a, ids[1], "acknowledge")
    await act(client, admin_a, ids[2], "assign", {"user_id": tech.user_id})

    async def listed(**params: Any) -> list[int]:
        return [a["id"] for a in (await get(client, admin_a, API, **params))["data"]]

    assert await listed() == [ids[3], ids[2], ids[1], ids[0]]  # newest first
    assert await listed(severity="critical") == [ids[3], ids[1]]
    assert await listed(severity=["critical", "low"], sort="triggered_at") == [
        ids[0],
        ids[1],
        ids[3],
    ]
    assert await listed(status=["triggered", "acknowledged"]) == [ids[3], ids[2], ids[1]]
    assert await listed(status="resolved") == [ids[0]]
    assert await listed(device_id=targets[2].device_id) == [ids[2]]
    assert await listed(rule_id=rule_1) == [ids[1], ids[0]]
    assert await listed(assigned_to=tech.user_id) == [ids[2]]
    window = {
        "from": (t0 + dt.timedelta(hours=1)).isoformat(),
        "to": (t0 + dt.timedelta(hours=3)).isoformat(),
    }
    assert await listed(**window) == [ids[2], ids[1]]
    assert await listed(sort="-severity,triggered_at") == [ids[1], ids[3], ids[2], ids[0]]
    page = await get(client, admin_a, API, per_page=3, page=2)
    assert [a["id"] for a in page["data"]] == [ids[0]]
    assert page["meta"] == {"page": 2, "per_page": 3, "total": 4}

    counts = (await get(client, admin_a, f"{API}/counts"))["data"]
    assert counts == {
        "total": 4,
        "open": 3,
        "by_severity": {"low": 1, "medium": 0, "high": 1, "critical": 2},
        "by_status": {"triggered": 2, "acknowledged": 1, "resolved": 1},
        "open_by_severity": {"low": 0, "medium": 0, "high": 1, "critical": 2},
    }
    only_rule_2 = (await get(client, admin_a, f"{API}/counts", rule_id=rule_2))["data"]
    assert only_rule_2["open_by_severity"] == {"low": 0, "medium": 0, "high": 1, "critical": 1}


async def test_manual_escalation_walks_the_chain(
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    login_as: LoginAs,
    factory_a: Factory,
) -> None:
    recorder = Recorder(container, "alert.escalated")
    tech = await login_as(factory_a, "technician")
    manager = await login_as(factory_a, "maintenance_manager")
    target = await make_target(client, container, admin_a)
    alert_id = (await raise_alert(container, target)).payload["alert_id"]
    problem = assert_problem(
        await client.post(f"{API}/{alert_id}/escalate", headers=admin_a.headers), 409
    )
    assert problem["code"] == "escalation_chain_end" and "no escalation chain" in problem["detail"]
    chain = await client.put(
        f"{API}/escalation-chain",
        json={
            "levels": [
                {"user_ids": [tech.user_id, tech.user_id]},
                {"user_ids": [admin_a.user_id], "roles": ["maintenance_manager"]},
            ]
        },
        headers=admin_a.headers,
    )
    assert chain.status_code == 200, chain.text
    assert chain.json()["data"]["levels"] == [
        {"level": 1, "user_ids": [tech.user_id], "roles": [], "users": [tech.user_id]},
        {
            "level": 2,
            "user_ids": [admin_a.user_id],
            "roles": ["maintenance_manager"],
            "users": sorted([admin_a.user_id, manager.user_id]),
        },
    ]
    one = await act(client, admin_a, alert_id, "escalate", {"reason": "nobody is looking"})
    assert one["escalation_level"] == 1
    two = await act(client, manager, alert_id, "escalate")
    assert two["escalation_level"] == 2
    problem = assert_problem(
        await client.post(f"{API}/{alert_id}/escalate", headers=admin_a.headers), 409
    )
    assert "last escalation level (2)" in problem["detail"]
    events = await recorder.drained()
    assert [p["recipients"] for _, p in events] == [
        [tech.user_id],
        sorted([admin_a.user_id, manager.user_id]),
    ]
    assert [p["escalation_level"] for _, p in events] == [1, 2]
    entry = two["timeline"][-2]
    assert entry["kind"] == "escalated" and entry["data"]["reason"] == "nobody is looking"
    assert entry["data"]["manual"] is True and entry["data"]["from_level"] == 0


async def test_reopen_refuses_when_the_pair_has_a_new_open_alert(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    target = await make_target(client, container, admin_a)
    old = (await raise_alert(container, target)).payload["alert_id"]
    await act(client, admin_a, old, "resolve")
    new = (await raise_alert(container, target)).payload["alert_id"]
    problem = assert_problem(await client.post(f"{API}/{old}/reopen", headers=admin_a.headers), 409)
    assert problem["code"] == "alert_already_open" and problem["open_alert_id"] == new
    async with container.db.session() as session:
        n = await session.scalar(
            select(func.count()).select_from(Alert).where(Alert.open_key.is_not(None))
        )
    assert n == 1


async def test_sla_config_round_trip_and_new_alerts_use_it(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    defaults = (await get(client, admin_a, f"{API}/sla"))["data"]
    assert [p["severity"] for p in defaults] == ["low", "medium", "high", "critical"]
    assert defaults[3] == {
        "severity": "critical",
        "ack_s": 900,
        "resolve_s": 14400,
        "remind_every_s": 900,
        "source": "default",
    }
    put = await client.put(
        f"{API}/sla",
        json={
            "policies": [
                {"severity": "critical", "ack_s": 120, "resolve_s": 3600, "remind_every_s": 300},
                {"severity": "low", "ack_s": None, "resolve_s": None},
            ]
        },
        headers=admin_a.headers,
    )
    assert put.status_code == 200, put.text
    by_severity = {p["severity"]: p for p in put.json()["data"]}
    assert (
        by_severity["critical"]["ack_s"] == 120 and by_severity["critical"]["source"] == "factory"
    )
    assert by_severity["low"]["resolve_s"] is None
    assert by_severity["high"]["source"] == "default"
    target = await make_target(client, container, admin_a)
    alert_id = (await raise_alert(container, target)).payload["alert_id"]
    sla = (await get(client, admin_a, f"{API}/{alert_id}"))["data"]["sla"]
    due = dt.datetime.fromisoformat(sla["ack_due_at"])
    assert 119 <= (due - utcnow()).total_seconds() <= 120
    low = await make_target(client, container, admin_a, "M02")
    low_id = (await raise_alert(container, low, severity="low")).payload["alert_id"]
    low_sla = (await get(client, admin_a, f"{API}/{low_id}"))["data"]["sla"]
    assert low_sla["ack_due_at"] is None and low_sla["next_check_at"] is None
    # PUT replaces: what is not listed goes back to the default.
    put = await client.put(f"{API}/sla", json={"policies": []}, headers=admin_a.headers)
    assert {p["source"] for p in put.json()["data"]} == {"default"}
    async with container.db.session() as session:
        audited = await session.scalar(
            select(func.count())
            .select_from(AuditEntry)
            .where(AuditEntry.action == "alert_sla.update")
        )
    assert audited == 2
