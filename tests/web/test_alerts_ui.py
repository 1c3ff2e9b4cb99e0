"""Alerts pages over HTTP: the feed (filters, counters, pagination, fragments), the
detail (facts, snapshot, SLA, timeline), permissions and tenancy; and in a browser,
an alert raised by telemetry appearing live and being handled in place."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from typing import Any

import httpx

from plantwatch.alerts import service
from plantwatch.app import Container
from plantwatch.core.db import utcnow
from plantwatch.tenancy.models import Factory
from tests.alerts.conftest import Target, make_device, make_rule, make_target, raise_alert
from tests.conftest import LoggedIn, LoginAs, MakeFactory, assert_problem
from tests.web.conftest import AsBrowser, BrowserPage, Live

API = "/api/v1/alerts"


def row_ids(html: str) -> list[int]:
    """The alert ids of the feed's rows, in order."""
    return [int(x) for x in re.findall(r'<tr id="alert-row-(\d+)"', html)]


def open_count(html: str, severity: str) -> int:
    pattern = rf'data-severity="{severity}"(?: aria-current="true")?>.*?data-count>([\d,]+)<'
    m = re.search(pattern, html, flags=re.DOTALL)
    assert m, f"no counter for {severity}"
    return int(m.group(1).replace(",", ""))


async def act(
    client: httpx.AsyncClient,
    user: LoggedIn,
    alert_id: int,
    action: str,
    body: dict[str, Any] | None = None,
) -> None:
    response = await client.post(f"{API}/{alert_id}/{action}", json=body, headers=user.headers)
    assert response.status_code in (200, 201), response.text


async def test_feed_filters_counters_sorting_and_fragments(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn, as_browser: AsBrowser
) -> None:
    fid = admin_a.factory_id
    hot = await make_rule(container, fid, "al hot")
    cold = await make_rule(container, fid, "al cold")
    m1 = await make_target(client, container, admin_a, "M01", hot)
    m2 = await make_target(client, container, admin_a, "M02", cold)
    now = utcnow()
    crit = await raise_alert(container, m1, severity="critical", at=now - dt.timedelta(minutes=3))
    high = await raise_alert(container, m2, severity="high", at=now - dt.timedelta(minutes=2))
    other = Target(fid, hot, m2.device_id)
    done = await raise_alert(container, other, severity="medium", at=now - dt.timedelta(minutes=1))
    crit_id, high_id, done_id = (c.payload["alert_id"] for c in (crit, high, done))
    await act(client, admin_a, done_id, "resolve", {"note": "fixed"})
    await act(client, admin_a, high_id, "assign", {"user_id": admin_a.user_id})

    browser = await as_browser(admin_a)

    async def ids(query: str = "") -> list[int]:
        page = await browser.get("/alerts" + query)
        assert page.status_code == 200, page.text
        return row_ids(page.text)

    # Default: open alerts (triggered + acknowledged), newest first.
    page = await browser.get("/alerts")
    assert row_ids(page.text) == [high_id, crit_id]
    assert 'data-stream="alert"' in page.text
    assert open_count(page.text, "critical") == 1
    assert open_count(page.text, "high") == 1
    assert open_count(page.text, "medium") == 0  # resolved: not open
    assert "spindle_temp 82.5 &gt; 80 for 5m" in page.text
    assert f'href="/machines/{m1.device_id}"' in page.text
    assert admin_a.email in page.text  # assigned to
    assert "Ack " in page.text and " left" in page.text  # SLA time left

    assert await ids("?status=resolved") == [done_id]
    assert await ids("?status=all") == [done_id, high_id, crit_id]
    assert await ids("?status=triggered") == [high_id, crit_id]
    assert await ids("?severity=critical") == [crit_id]
    assert await ids("?severity=critical&severity=high") == [high_id, crit_id]
    assert await ids("?device=M02&status=all") == [done_id, high_id]
    assert await ids(f"?rule_id={cold}") == [high_id]
    assert await ids(f"?rule_id={hot}&status=all") == [done_id, crit_id]
    assert await ids(f"?assigned={admin_a.user_id}") == [high_id]
    assert await ids("?sort=-severity") == [crit_id, high_id]
    assert await ids("?sort=severity") == [high_id, crit_id]
    # A link by device id (machine pages) fills in the machine's key.
    by_id = await browser.get(f"/alerts?device_id={m1.device_id}")
    assert row_ids(by_id.text) == [crit_id]
    assert 'name="device" value="M01"' in by_id.text
    # Unknown machine: said so, nothing listed; garbage values are ignored, not a 500.
    unknown = await browser.get("/alerts?device=NOPE")
    assert row_ids(unknown.text) == [] and "No machine with the key" in unknown.text
    junk = await browser.get("/alerts?severity=bad&status=bad&sort=bad&page=x&rule_id=-3")
    assert junk.status_code == 200 and row_ids(junk.text) == [high_id, crit_id]
    bad_time = await browser.get("/alerts?from=yesterday")
    assert bad_time.status_code == 200 and "not a date and time" in bad_time.text
    assert (await browser.get("/alerts?from=0001-01-01T00:00")).status_code == 200
    # A machine id that is not ours matches nothing, also for the live refresh's query.
    gone = await browser.get("/alerts?device_id=999999")
    assert row_ids(gone.text) == [] and 'data-query="device_id=999999"' in gone.text
    # No inline script anywhere (CSP: script-src 'self').
    assert "<script>" not in page.text and "onclick" not in page.text
    # Counters keep the other filters (device) but ignore severity and status.
    m2_page = await browser.get("/alerts?device=M02&severity=high")
    assert open_count(m2_page.text, "critical") == 0 and open_count(m2_page.text, "high") == 1

    # The htmx fragment: just the feed, and the canonical URL to push.
    feed = await browser.get("/alerts/feed", params={"severity": "high", "status": "open"})
    assert feed.status_code == 200
    assert "<html" not in feed.text and 'id="alerts-feed"' in feed.text
    assert feed.headers["HX-Push-Url"] == "/alerts?severity=high"
    assert row_ids(feed.text) == [high_id]
    # One row, re-rendered in place while it matches the filters; 204 when it no longer does.
    row = await browser.get(f"/alerts/{crit_id}/row")
    assert row.status_code == 200 and row_ids(row.text) == [crit_id]
    assert (await browser.get(f"/alerts/{crit_id}/row?status=resolved")).status_code == 204
    assert (await browser.get(f"/alerts/{crit_id}/row?device=M02")).status_code == 204


async def test_feed_pages_on_the_server(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn, as_browser: AsBrowser
) -> None:
    device_id = await make_device(client, admin_a, "P01")
    start = utcnow() - dt.timedelta(hours=2)
    made = []
    for i in range(55):
        rule_id = await make_rule(container, admin_a.factory_id, f"al rule {i:02d}")
        change = await raise_alert(
            container,
            Target(admin_a.factory_id, rule_id, device_id),
            severity="low",
            at=start + dt.timedelta(seconds=i),
            publish=False,
        )
        made.append(change.payload["alert_id"])
    browser = await as_browser(admin_a)
    first = await browser.get("/alerts")
    assert row_ids(first.text) == list(reversed(made))[:50]
    assert "55 in all · page 1 of 2" in first.text
    assert 'href="/alerts?page=2"' in first.text
    second = await browser.get("/alerts?page=2")
    assert row_ids(second.text) == list(reversed(made))[50:]
    assert open_count(second.text, "low") == 55
    beyond = await browser.get("/alerts?page=9")  # past the end: the last page
    assert row_ids(beyond.text) == list(reversed(made))[50:]


async def test_another_factorys_alerts_are_never_shown(
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    admin_b: LoggedIn,
    as_browser: AsBrowser,
) -> None:
    mine = await raise_alert(container, await make_target(client, container, admin_a, "A01"))
    theirs_target = await make_target(client, container, admin_b, "B01")
    theirs = (await raise_alert(container, theirs_target)).payload["alert_id"]
    browser = await as_browser(admin_a)
    feed = await browser.get("/alerts?status=all")
    assert row_ids(feed.text) == [mine.payload["alert_id"]]
    assert "B01" not in feed.text
    # Filtering by their device or rule finds nothing either.
    assert row_ids((await browser.get("/alerts?device=B01")).text) == []
    by_id = await browser.get(f"/alerts?device_id={theirs_target.device_id}")
    assert row_ids(by_id.text) == [] and "B01" not in by_id.text
    assert row_ids((await browser.get(f"/alerts?rule_id={theirs_target.rule_id}")).text) == []

    page = await browser.get(f"/alerts/{theirs}")
    assert page.status_code == 404
    assert "Not found" in page.text and "B01" not in page.text
    for garbage in ("999999", "abc", "0"):
        missing = await browser.get(f"/alerts/{garbage}")
        assert missing.status_code == 404 and "Not found" in missing.text
    assert (await browser.get(f"/alerts/{theirs}/row")).status_code == 204
    assert (await browser.get(f"/alerts/{theirs}/body")).status_code == 404
    assert (await browser.get(f"/alerts/{theirs}/actions")).status_code == 404
    assert_problem(await browser.post(f"{API}/{theirs}/acknowledge"), 404)


async def test_viewer_sees_alerts_without_action_controls_and_the_api_refuses(
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    factory_a: Factory,
    login_as: LoginAs,
    as_browser: AsBrowser,
) -> None:
    alert_id = (
        await raise_alert(container, await make_target(client, container, admin_a))
    ).payload["alert_id"]
    viewer = await as_browser(await login_as(factory_a, "viewer"))
    feed = await viewer.get("/alerts")
    assert row_ids(feed.text) == [alert_id]
    for control in ("data-quick-action", "data-open-actions", "alert-actions-dialog"):
        assert control not in feed.text
    detail = await viewer.get(f"/alerts/{alert_id}")
    assert detail.status_code == 200
    assert "data-alert-action" not in detail.text and "Respond" not in detail.text
    assert (await viewer.get(f"/alerts/{alert_id}/actions")).status_code == 204
    assert_problem(await viewer.post(f"{API}/{alert_id}/acknowledge"), 403, "permission_denied")

    # A technician responds but may not escalate (alerts:manage).
    tech = await as_browser(await login_as(factory_a, "technician"))
    actions = await tech.get(f"/alerts/{alert_id}/actions")
    assert actions.status_code == 200
    for action in ("acknowledge", "assign", "resolve", "comments"):
        assert f'data-alert-action="{action}"' in actions.text
    assert 'data-alert-action="escalate"' not in actions.text
    assert (
        'data-alert-action="escalate"'
        in (await (await as_browser(admin_a)).get(f"/alerts/{alert_id}/actions")).text
    )
    # The cookie session acknowledges through the API (CSRF header from as_browser).
    acked = await tech.post(f"{API}/{alert_id}/acknowledge", json={"note": "on it"})
    assert acked.status_code == 200, acked.text
    row = await tech.get(f"/alerts/{alert_id}/row")
    assert "status-acknowledged" in row.text and "data-quick-action" not in row.text


async def test_times_and_time_filters_use_the_factory_timezone(
    client: httpx.AsyncClient,
    container: Container,
    make_factory: MakeFactory,
    login_as: LoginAs,
    as_browser: AsBrowser,
) -> None:
    tokyo = await make_factory("tokyo", "Tokyo Works", timezone="Asia/Tokyo")
    boss = await login_as(tokyo, "factory_manager")
    target = await make_target(client, container, boss, "T01")
    at = dt.datetime(2026, 1, 15, 10, 0, tzinfo=dt.UTC)
    alert_id = (await raise_alert(container, target, at=at)).payload["alert_id"]
    browser = await as_browser(boss)
    feed = await browser.get("/alerts")
    assert "2026-01-15 19:00:00" in feed.text  # 10:00 UTC is 19:00 in Tokyo
    assert "times in Asia/Tokyo" in feed.text
    # Long past its deadlines: the SLA says breached, in words.
    assert "Ack breached" in feed.text
    # From/To are wall-clock times of the factory.
    assert row_ids((await browser.get("/alerts?from=2026-01-15T18:30")).text) == [alert_id]
    assert row_ids((await browser.get("/alerts?from=2026-01-15T19:30")).text) == []
    assert row_ids((await browser.get("/alerts?to=2026-01-15T19:30")).text) == [alert_id]
    filtered = await browser.get("/alerts?from=2026-01-15T18:30&to=2026-01-15T19:30")
    assert row_ids(filtered.text) == [alert_id]
    assert 'value="2026-01-15T18:30"' in filtered.text
    backwards = await browser.get("/alerts?from=2026-01-15T19:30&to=2026-01-15T18:30")
    assert row_ids(backwards.text) == [] and "To must be after From" in backwards.text
    detail = await browser.get(f"/alerts/{alert_id}")
    assert "2026-01-15 19:00:00" in detail.text  # first seen and the timeline
    assert "2026-01-15 19:15:00" in detail.text  # critical: acknowledge within 15 min
    assert "breached" in detail.text


async def test_detail_shows_facts_snapshot_sla_and_timeline(
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    factory_a: Factory,
    login_as: LoginAs,
    as_browser: AsBrowser,
) -> None:
    target = await make_target(client, container, admin_a, "CNC-A")
    # The engine's shape of facts and snapshot (values with the time each was read).
    async with container.db.session() as session:
        change = await service.raise_alert(
            session,
            factory_id=target.factory_id,
            rule_id=target.rule_id,
            device_id=target.device_id,
            severity="high",
            title="Spindle overheat",
            message="spindle_temp 82.5 > 80 for 5m; avg(vibration, 10m) 7.4 > 7",
            facts=[
                {
                    "path": "conditions[0]",
                    "parameter": "spindle_temp",
                    "operator": "gt",
                    "value": 82.5,
                    "threshold": 80,
                    "for": "5m",
                    "text": "spindle_temp 82.5 > 80 for 5m",
                },
                {
                    "path": "conditions[1]",
                    "parameter": "vibration",
                    "operator": "gt",
                    "value": 7.4,
                    "threshold": 7,
                    "aggregate": "avg",
                    "window": "10m",
                    "text": "avg(vibration, 10m) 7.4 > 7",
                },
            ],
            snapshot={
                "device_key": "CNC-A",
                "values": {"spindle_temp": 82.5, "coolant_flow": 4.125},
                "at": {"spindle_temp": "2026-02-19T14:30:00+00:00"},
                "rule_version": 1,
            },
            at=utcnow(),
        )
        await session.commit()
    alert_id = change.payload["alert_id"]
    tech = await login_as(factory_a, "technician")
    await act(client, tech, alert_id, "acknowledge", {"note": "on my way"})
    await act(client, admin_a, alert_id, "assign", {"user_id": tech.user_id})
    await act(client, tech, alert_id, "comments", {"text": "bearing runs hot"})

    browser = await as_browser(admin_a)
    page = await browser.get(f"/alerts/{alert_id}")
    assert page.status_code == 200
    html = page.text
    assert "spindle_temp &gt; 80 for 5m" in html  # the condition of each true leaf
    assert "avg(vibration, 10m) &gt; 7" in html
    assert "82.5" in html and "7.4" in html
    assert "coolant_flow" in html and "4.125" in html  # the snapshot
    assert "2026-02-19 14:30:00" in html  # when the snapshot value was read (UTC factory)
    kinds = re.findall(r'<li data-kind="([a-z-]+)"', html)
    assert kinds == ["created", "acknowledged", "assigned", "commented"]
    assert "on my way" in html and "bearing runs hot" in html
    assert f"by {tech.email}" in html and f"by {admin_a.email}" in html
    assert "Resolve " in html and " left" in html  # the resolve clock runs
    assert 'data-deadline="' in html
    assert re.search(r"Acknowledge by</dt>.*?is-met", html, flags=re.DOTALL)
    assert f'href="/rules/{target.rule_id}"' in html
    # Acknowledged: no acknowledge form any more; the others are there.
    assert 'data-alert-action="acknowledge"' not in html
    assert 'data-alert-action="resolve"' in html

    await act(client, tech, alert_id, "resolve", {"note": "replaced the bearing"})
    body = await browser.get(f"/alerts/{alert_id}/body")
    assert body.status_code == 200 and "<html" not in body.text
    assert "status-resolved" in body.text and "replaced the bearing" in body.text
    actions = await browser.get(f"/alerts/{alert_id}/actions?context=detail")
    assert 'data-alert-action="reopen"' in actions.text
    assert 'data-alert-action="resolve"' not in actions.text


# --- in a browser ------------------------------------------------------------------------


def test_alert_appears_live_and_is_handled_in_place(live: Live, browser_page: BrowserPage) -> None:
    from playwright.sync_api import expect

    tag = uuid.uuid4().hex[:8]
    api = live.api_login("admin")
    made = api.post("/api/v1/devices", json={"device_key": f"al-{tag}", "name": f"al-press {tag}"})
    assert made.status_code == 201, made.text
    device_id = made.json()["data"]["id"]
    issued = api.post(f"/api/v1/devices/{device_id}/keys", json={"name": "al-test"})
    assert issued.status_code == 201, issued.text
    key = issued.json()["data"]["key"]
    rule = api.post(
        "/api/v1/rules",
        json={
            "name": f"al-overheat {tag}",
            "conditions": {"parameter": "al_temp", "operator": "gt", "threshold": 80},
            "scope": {"type": "devices", "device_ids": [device_id]},
            "severity": "critical",
        },
    )
    assert rule.status_code == 201, rule.text

    page: Any = browser_page("admin")
    page.goto(f"/alerts?device=al-{tag}")
    page.wait_for_selector("#live-status[data-state=live]")
    expect(page.get_by_text("No alerts match these filters.")).to_be_visible()
    page.evaluate("window.alNoReload = true")

    sent = httpx.post(
        f"{live.base_url}/api/v1/ingest",
        headers={"X-Device-Key": key},
        json={"values": {"al_temp": 91.5}},
        timeout=10,
    )
    assert sent.status_code == 200, sent.text
    row = page.locator("#alerts-rows tr[data-alert-id]")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("al_temp 91.5 > 80")
    expect(row.locator(".pill.status-triggered")).to_have_text("triggered")
    expect(page.locator('.al-counter[data-severity="critical"] [data-count]')).not_to_have_text("0")
    assert page.evaluate("window.alNoReload") is True  # it came without a reload
    alert_id = row.get_attribute("data-alert-id")

    row.get_by_role("button", name=re.compile("^Acknowledge")).click()
    expect(page.locator(f"#alert-row-{alert_id} .pill.status-acknowledged")).to_have_text(
        "acknowledged"
    )
    expect(page.locator(f"#alert-row-{alert_id} [data-quick-action]")).to_have_count(0)
    assert page.evaluate("window.alNoReload") is True

    # Assign to me from the row's dialog.
    page.locator(f"#alert-row-{alert_id} [data-open-actions]").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Assign to me").click()
    expect(dialog).to_be_hidden()
    expect(page.locator(f"#alert-row-{alert_id}")).to_contain_text(live.users["admin"].email)

    # The detail page: the acknowledgement is in the timeline; comment and resolve in place.
    page.locator(f"#alert-row-{alert_id} a.al-title").click()
    page.wait_for_url(f"**/alerts/{alert_id}")
    timeline = page.locator("#alert-timeline")
    expect(timeline.locator('li[data-kind="acknowledged"]')).to_contain_text(
        live.users["admin"].email
    )
    expect(page.locator(".al-countdown").first).to_contain_text("left")
    page.get_by_label("Comment").fill("al- bearing runs hot")
    page.get_by_role("button", name="Add comment").click()
    expect(timeline.locator('li[data-kind="commented"]')).to_contain_text("al- bearing runs hot")
    page.get_by_label(re.compile("^Resolution note")).fill("al- replaced the bearing")
    page.get_by_role("button", name="Resolve").click()
    expect(page.locator("#alert-body .pill.status-resolved")).to_have_text("resolved")
    expect(timeline.locator('li[data-kind="resolved"]')).to_contain_text("al- replaced the bearing")
    expect(page.get_by_role("button", name="Reopen")).to_be_visible()
