"""The notifications API: channels (validation per kind, masked secrets, tests through
real peers), preferences, the delivery log, permissions and tenant isolation."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from plantwatch.app import Container
from plantwatch.notify.dispatch import Dispatcher
from plantwatch.notify.models import NotificationDelivery
from plantwatch.tenancy.models import AuditEntry, Factory
from tests.conftest import LoggedIn, LoginAs, assert_problem
from tests.notify.conftest import (
    HOOK_SECRET,
    TWILIO_SID,
    TWILIO_TOKEN,
    channel_configs,
    create_channel,
)
from tests.notify.peers import HttpPeer, SmtpPeer

URL = "/api/v1/notifications"


async def test_create_read_update_delete_with_secrets_masked(
    client: httpx.AsyncClient, admin_a: LoggedIn, http_peer: HttpPeer, container: Container
) -> None:
    configs = channel_configs(http_peer)
    made = {kind: await create_channel(client, admin_a, kind, cfg) for kind, cfg in configs.items()}
    assert made["webhook"]["config"]["secret"] == "****cdef"
    assert made["sms"]["config"]["auth_token"] == "****6789"
    assert made["slack"]["config"]["webhook_url"] == "http://127.0.0.1/****XXXX"
    assert made["email"]["config"] == configs["email"]  # nothing secret in an e-mail list
    assert made["email"]["events"] == ["created", "escalated", "resolved"]
    listed = await client.get(f"{URL}/channels", headers=admin_a.headers)
    assert listed.json()["meta"]["total"] == 6
    text = listed.text
    for c in made.values():
        text += (await client.get(f"{URL}/channels/{c['id']}", headers=admin_a.headers)).text
    for secret in (HOOK_SECRET, TWILIO_TOKEN, "XXXXXXXXXXXXXXXX"):
        assert secret not in text
    # Secrets never reach the audit log either.
    async with container.db.session() as session:
        audit = (await session.scalars(select(AuditEntry.after))).all()
    assert all(
        HOOK_SECRET not in json.dumps(a) and TWILIO_TOKEN not in json.dumps(a) for a in audit
    )

    # PATCH merges config: a secret need not (and its mask may) be sent again.
    hook = made["webhook"]
    changed = await client.patch(
        f"{URL}/channels/{hook['id']}",
        json={"config": {"secret": hook["config"]["secret"]}, "events": ["created"]},
        headers=admin_a.headers,
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["data"]["events"] == ["created"]
    sms = made["sms"]
    renumbered = await client.patch(
        f"{URL}/channels/{sms['id']}",
        json={"config": {"to_numbers": ["+4930123456"]}, "name": "Night shift SMS"},
        headers=admin_a.headers,
    )
    assert renumbered.json()["data"]["config"]["to_numbers"] == ["+4930123456"]
    # The stored secrets are the originals, so tests still authenticate (below).
    tested = await client.post(f"{URL}/channels/{sms['id']}/test", headers=admin_a.headers)
    assert tested.json()["data"]["ok"] is True, tested.text
    tested = await client.post(f"{URL}/channels/{hook['id']}/test", headers=admin_a.headers)
    assert tested.json()["data"]["ok"] is True, tested.text

    taken = await client.patch(
        f"{URL}/channels/{hook['id']}", json={"name": "Night shift SMS"}, headers=admin_a.headers
    )
    assert_problem(taken, 409, "channel_exists")
    assert (
        await client.delete(f"{URL}/channels/{hook['id']}", headers=admin_a.headers)
    ).status_code == 204
    assert_problem(await client.get(f"{URL}/channels/{hook['id']}", headers=admin_a.headers), 404)


@pytest.mark.parametrize(
    ("kind", "config", "paths"),
    [
        ("email", {"recipients": []}, {"body.config.recipients"}),
        ("email", {"recipients": ["not-an-address"]}, {"body.config.recipients[0]"}),
        ("slack", {"webhook_url": "ftp://x"}, {"body.config.webhook_url"}),
        ("teams", {"webhook_url": "https://t.example", "format": "x"}, {"body.config.format"}),
        ("webhook", {"url": "https://h.example", "secret": "short"}, {"body.config.secret"}),
        ("webhook", {"secret": "0123456789abcdef0"}, {"body.config.url"}),
        (
            "sms",
            {"account_sid": "XX1", "auth_token": "t0k3n-long", "from_number": "0151", "x": 1},
            {"body.config.account_sid", "body.config.from_number", "body.config.x"},
        ),
        (
            "whatsapp",
            {
                "account_sid": TWILIO_SID,
                "auth_token": TWILIO_TOKEN,
                "from_number": "+14155238886",
                "to_numbers": ["+49 151"],
            },
            {"body.config.to_numbers[0]"},
        ),
    ],
)
async def test_config_is_checked_per_kind_with_paths(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    kind: str,
    config: dict[str, Any],
    paths: set[str],
) -> None:
    response = await client.post(
        f"{URL}/channels",
        json={"name": "bad", "kind": kind, "config": config},
        headers=admin_a.headers,
    )
    problem = assert_problem(response, 422, "validation_error")
    assert {e["path"] for e in problem["errors"]} == paths
    assert (await client.get(f"{URL}/channels", headers=admin_a.headers)).json()["meta"][
        "total"
    ] == 0


async def test_bad_kind_events_and_update_config_are_422(
    client: httpx.AsyncClient, admin_a: LoggedIn, http_peer: HttpPeer
) -> None:
    bad = await client.post(
        f"{URL}/channels",
        json={"name": "x", "kind": "pigeon", "config": {}, "events": ["exploded"]},
        headers=admin_a.headers,
    )
    problem = assert_problem(bad, 422)
    assert {e["path"] for e in problem["errors"]} == {"body.kind", "body.events[0]"}
    channel = await create_channel(client, admin_a, "slack", channel_configs(http_peer)["slack"])
    worse = await client.patch(
        f"{URL}/channels/{channel['id']}",
        json={"config": {"webhook_url": "not a url"}},
        headers=admin_a.headers,
    )
    assert {e["path"] for e in assert_problem(worse, 422)["errors"]} == {"body.config.webhook_url"}
    kind_change = await client.patch(
        f"{URL}/channels/{channel['id']}", json={"kind": "teams"}, headers=admin_a.headers
    )
    assert_problem(kind_change, 422)


async def test_channel_test_sends_through_every_real_transport(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    http_peer: HttpPeer,
    smtp_peer: SmtpPeer,
) -> None:
    configs = channel_configs(http_peer, "test-all")
    for kind, config in configs.items():
        channel = await create_channel(client, admin_a, kind, config, name=f"Test {kind}")
        result = await client.post(f"{URL}/channels/{channel['id']}/test", headers=admin_a.headers)
        assert result.status_code == 200, result.text
        assert result.json()["data"]["ok"] is True, (kind, result.json())
    mail = smtp_peer.mails[-1]
    assert sorted(mail.rcpt_tos) == ["lead@plant.example", "ops@plant.example"]
    assert mail.subject == "plantwatch test message (Test email)"
    assert 'test of the notification channel "Test email"' in mail.text()
    assert http_peer.ok("/slack/") and http_peer.ok("/teams/") and http_peer.ok("/hook/test-all")
    sms = [r for r in http_peer.ok("/2010-04-01/") if not r.form["To"][0].startswith("whatsapp")]
    whatsapp = [r for r in http_peer.ok("/2010-04-01/") if r.form["To"][0].startswith("whatsapp")]
    assert sms[0].form["To"] == ["+4915112345678"] and sms[0].form["From"] == ["+15005550006"]
    assert whatsapp[0].form["To"] == ["whatsapp:+4917612345678"]
    assert whatsapp[0].form["From"] == ["whatsapp:+14155238886"]

    # `to` overrides the channel's recipients, checked against the kind.
    email_id = (
        await client.get(f"{URL}/channels", params={"kind": "email"}, headers=admin_a.headers)
    ).json()["data"][0]["id"]
    override = await client.post(
        f"{URL}/channels/{email_id}/test",
        json={"to": "me@plant.example"},
        headers=admin_a.headers,
    )
    assert override.json()["data"]["targets"] == ["me@plant.example"]
    assert smtp_peer.mails[-1].rcpt_tos == ["me@plant.example"]
    wrong = await client.post(
        f"{URL}/channels/{email_id}/test", json={"to": "+4915112345678"}, headers=admin_a.headers
    )
    assert {e["path"] for e in assert_problem(wrong, 422)["errors"]} == {"body.to"}


async def test_a_failing_test_reports_the_error(
    client: httpx.AsyncClient, admin_a: LoggedIn, http_peer: HttpPeer, smtp_peer: SmtpPeer
) -> None:
    configs = channel_configs(http_peer, "flaky")
    hook = await create_channel(client, admin_a, "webhook", configs["webhook"])
    http_peer.fail_next["/hook/flaky"] = 1
    result = await client.post(f"{URL}/channels/{hook['id']}/test", headers=admin_a.headers)
    body = result.json()["data"]
    assert body["ok"] is False and "HTTP 500" in body["error"]
    wrong_token = {**configs["sms"], "auth_token": "not-the-token"}
    sms = await create_channel(client, admin_a, "sms", wrong_token)
    denied = await client.post(f"{URL}/channels/{sms['id']}/test", headers=admin_a.headers)
    assert denied.json()["data"]["ok"] is False
    assert "HTTP 401" in denied.json()["data"]["error"]
    email = await create_channel(client, admin_a, "email", configs["email"])
    smtp_peer.handler.refuse_next = 1
    refused = await client.post(f"{URL}/channels/{email['id']}/test", headers=admin_a.headers)
    assert refused.json()["data"]["ok"] is False and "451" in refused.json()["data"]["error"]


async def test_preferences_are_the_callers_own(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    login_as: LoginAs,
    factory_a: Factory,
    http_peer: HttpPeer,
) -> None:
    tech = await login_as(factory_a, "technician")
    initial = await client.get(f"{URL}/preferences", headers=tech.headers)
    assert initial.status_code == 200
    data = initial.json()["data"]
    assert data["saved"] is False and data["channels"] == [
        {"kind": "email", "address": None, "phone": None}
    ]
    body = {
        "channels": [{"kind": "email"}, {"kind": "sms", "phone": "+4915112345678"}],
        "min_severity": "medium",
        "quiet_hours": {"start": "22:00", "end": "06:00"},
        "digest": True,
        "digest_hour": 6,
    }
    # No SMS channel to send through yet: said, with the path.
    no_provider = await client.put(f"{URL}/preferences", json=body, headers=tech.headers)
    assert {e["path"] for e in assert_problem(no_provider, 422)["errors"]} == {
        "body.channels[1].kind"
    }
    await create_channel(client, admin_a, "sms", channel_configs(http_peer)["sms"])
    saved = await client.put(f"{URL}/preferences", json=body, headers=tech.headers)
    assert saved.status_code == 200, saved.text
    out = saved.json()["data"]
    assert out["saved"] is True and out["quiet_hours"] == {"start": "22:00", "end": "06:00"}
    assert out["digest_hour"] == 6 and out["min_severity"] == "medium"
    assert out["user_id"] == tech.user_id
    # Another user of the same factory sees their own (defaults), not the technician's.
    mine = (await client.get(f"{URL}/preferences", headers=admin_a.headers)).json()["data"]
    assert mine["saved"] is False and mine["user_id"] == admin_a.user_id

    for bad, path in [
        ({"quiet_hours": {"start": "25:00", "end": "06:00"}}, "body.quiet_hours.start"),
        ({"quiet_hours": {"start": "06:00", "end": "06:00"}}, "body.quiet_hours"),
        ({"min_severity": "urgent"}, "body.min_severity"),
        ({"channels": [{"kind": "sms"}]}, "body.channels[0]"),
        ({"channels": [{"kind": "email", "address": "nope"}]}, "body.channels[0].address"),
        ({"digest_hour": 24}, "body.digest_hour"),
        ({"user_id": admin_a.user_id}, "body.user_id"),
    ]:
        response = await client.put(f"{URL}/preferences", json=bad, headers=tech.headers)
        paths = {e["path"] for e in assert_problem(response, 422)["errors"]}
        assert path in paths, (bad, paths)


async def test_permissions(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    login_as: LoginAs,
    factory_a: Factory,
    http_peer: HttpPeer,
) -> None:
    viewer = await login_as(factory_a, "viewer")
    channel = await create_channel(client, admin_a, "slack", channel_configs(http_peer)["slack"])
    assert (await client.get(f"{URL}/channels", headers=viewer.headers)).status_code == 200
    assert (await client.get(f"{URL}/deliveries", headers=viewer.headers)).status_code == 200
    for method, path, body in [
        ("POST", f"{URL}/channels", {"name": "x", "kind": "slack", "config": {}}),
        ("PATCH", f"{URL}/channels/{channel['id']}", {"name": "y"}),
        ("DELETE", f"{URL}/channels/{channel['id']}", None),
        ("POST", f"{URL}/channels/{channel['id']}/test", None),
        ("POST", f"{URL}/deliveries/1/retry", None),
    ]:
        response = await client.request(method, path, json=body, headers=viewer.headers)
        assert_problem(response, 403, "permission_denied")
    # Preferences are everyone's own business.
    assert (
        await client.put(f"{URL}/preferences", json={"digest": True}, headers=viewer.headers)
    ).status_code == 200
    assert_problem(await client.get(f"{URL}/channels"), 401)


async def test_another_factory_gets_404_everywhere(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    admin_b: LoggedIn,
    http_peer: HttpPeer,
    container: Container,
    dispatcher: Dispatcher,
) -> None:
    channel = await create_channel(client, admin_a, "slack", channel_configs(http_peer)["slack"])
    await client.put(f"{URL}/preferences", json={"min_severity": "low"}, headers=admin_a.headers)
    await dispatcher.dispatch(
        {
            "event": "created",
            "factory_id": admin_a.factory_id,
            "alert_id": 1,
            "rule_id": None,
            "device_id": None,
            "severity": "high",
            "status": "triggered",
            "title": "T",
            "message": "m",
            "occurrences": 1,
            "escalation_level": 0,
            "assigned_to": None,
            "actor_id": None,
            "at": "2026-02-19T10:30:00Z",
            "received_ms": None,
            "recipients": [],
        }
    )
    async with container.db.session() as session:
        delivery_id = await session.scalar(select(NotificationDelivery.id))
    assert delivery_id is not None
    cid = channel["id"]
    for method, path, body in [
        ("GET", f"{URL}/channels/{cid}", None),
        ("PATCH", f"{URL}/channels/{cid}", {"name": "mine now"}),
        ("DELETE", f"{URL}/channels/{cid}", None),
        ("POST", f"{URL}/channels/{cid}/test", None),
        ("GET", f"{URL}/deliveries/{delivery_id}", None),
        ("POST", f"{URL}/deliveries/{delivery_id}/retry", None),
    ]:
        response = await client.request(method, path, json=body, headers=admin_b.headers)
        assert_problem(response, 404)
    for path in (f"{URL}/channels", f"{URL}/deliveries"):
        listed = await client.get(path, headers=admin_b.headers)
        assert listed.json()["meta"]["total"] == 0
    filtered = await client.get(
        f"{URL}/deliveries", params={"channel_id": cid, "alert_id": 1}, headers=admin_b.headers
    )
    assert filtered.json()["data"] == []
    theirs = (await client.get(f"{URL}/preferences", headers=admin_b.headers)).json()["data"]
    assert theirs["saved"] is False and theirs["user_id"] == admin_b.user_id
    # And it is all still there for its owner.
    assert (await client.get(f"{URL}/channels/{cid}", headers=admin_a.headers)).status_code == 200
    assert (await client.get(f"{URL}/deliveries", headers=admin_a.headers)).json()["meta"][
        "total"
    ] == 1
