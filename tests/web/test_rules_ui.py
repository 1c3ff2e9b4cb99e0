"""Rules pages: the list with its switches, the rule builder, the backtest panel.

HTTP tests through the ASGI app on both databases (rendering, tenancy, permissions,
filters, the factory's timezone), and two browser tests against the live server: build
a nested rule in the editor with live validation, save it and make it fire with real
telemetry; switch a rule off in the list and backtest it on its page.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
import uuid
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from plantwatch.app import Container
from plantwatch.rules import service as rules_service
from plantwatch.rules.models import RuleDeviceState
from plantwatch.tenancy.models import Factory
from tests.conftest import LoggedIn, LoginAs, MakeFactory, assert_problem
from tests.telemetry.conftest import keyed_device
from tests.web.conftest import AsBrowser, BrowserPage, Live

HOT = {
    "operator": "AND",
    "conditions": [
        {"parameter": "spindle_temp", "operator": "gt", "threshold": 80, "for": "2m"},
        {
            "operator": "OR",
            "conditions": [
                {"parameter": "coolant_flow", "operator": "between", "low": 1, "high": 5},
                {"parameter": "vibration", "operator": "gt", "threshold": 7},
            ],
        },
    ],
}


async def _rule(client: httpx.AsyncClient, user: LoggedIn, name: str, **fields: Any) -> Any:
    body = {"name": name, "conditions": HOT, "severity": "high", **fields}
    response = await client.post("/api/v1/rules", json=body, headers=user.headers)
    assert response.status_code == 201, response.text
    return response.json()["data"]


def _rule_data(html: str) -> Any:
    found = re.search(r'<script type="application/json" id="rule-data">(.*?)</script>', html, re.S)
    assert found, "no editor data on the page"
    return json.loads(found.group(1))


# --- HTTP ------------------------------------------------------------------------------------


async def test_list_shows_only_own_rules_with_switches(
    client: httpx.AsyncClient, admin_a: LoggedIn, admin_b: LoggedIn, as_browser: AsBrowser
) -> None:
    mine = await _rule(client, admin_a, "Spindle overheat")
    await _rule(client, admin_b, "Globex extruder rule")
    browser = await as_browser(admin_a)
    page = await browser.get("/rules")
    assert page.status_code == 200
    html = page.text
    assert "Spindle overheat" in html and "Globex extruder rule" not in html
    assert f'href="/rules/{mine["id"]}"' in html
    # the severity has its text, the switch is a labelled checkbox, the scope is said
    assert 'class="badge sev-high"' in html and ">high</span>" in html
    assert f'data-rule-toggle="{mine["id"]}"' in html and 'role="switch"' in html
    assert "Rule Spindle overheat enabled" in html
    assert "All devices" in html and 'href="/rules/new"' in html
    assert "spindle_temp &gt; 80 for 2m AND (coolant_flow between 1..5 OR vibration &gt; 7)" in html


async def test_other_factorys_rule_is_the_404_page(
    client: httpx.AsyncClient, admin_a: LoggedIn, admin_b: LoggedIn, as_browser: AsBrowser
) -> None:
    theirs = await _rule(client, admin_b, "Globex extruder rule")
    browser = await as_browser(admin_a)
    for path in (f"/rules/{theirs['id']}", "/rules/999999", "/rules/not-a-number"):
        page = await browser.get(path)
        assert page.status_code == 404, path
        assert "Not found" in page.text and "Globex extruder rule" not in page.text
    assert (await browser.get(f"/rules/{theirs['id']}/activity")).status_code == 404


async def test_rule_page_has_the_builder_with_the_rule(
    client: httpx.AsyncClient, admin_a: LoggedIn, as_browser: AsBrowser
) -> None:
    lathe = await keyed_device(client, admin_a, "L1")
    await client.post(
        "/api/v1/ingest", json={"values": {"spindle_temp": 60.0}}, headers=lathe.headers
    )
    rule = await _rule(
        client,
        admin_a,
        "Lathe overheat",
        scope={"type": "devices", "device_ids": [lathe.id]},
        schedule={
            "type": "time_window",
            "windows": [{"days": [1, 2, 3, 4, 5], "start": "06:00", "end": "22:00"}],
        },
        cooldown="5m",
    )
    browser = await as_browser(admin_a)
    page = await browser.get(f"/rules/{rule['id']}")
    assert page.status_code == 200
    html = page.text
    assert 'id="rule-form"' in html and 'id="backtest"' in html and 'id="rule-delete"' in html
    assert 'value="Lathe overheat"' in html and 'value="5m"' in html
    assert "Mon\u2013Fri 06:00\u201322:00 (UTC)" in html and "1 device" in html
    assert '<option value="spindle_temp">' in html  # the parameter suggestions
    data = _rule_data(html)
    assert data["rule_id"] == rule["id"] and data["conditions"] == HOT
    assert data["devices"] == [{"id": lathe.id, "key": "L1", "name": "Machine L1"}]
    assert data["timezone"] == "UTC"
    new = await browser.get("/rules/new")
    assert new.status_code == 200 and "Create rule" in new.text
    assert _rule_data(new.text)["rule_id"] is None


async def test_viewer_sees_no_edit_controls_and_the_api_refuses(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    factory_a: Factory,
    login_as: LoginAs,
    as_browser: AsBrowser,
) -> None:
    rule = await _rule(client, admin_a, "Spindle overheat")
    viewer = await login_as(factory_a, "viewer")
    browser = await as_browser(viewer)
    listing = await browser.get("/rules")
    assert listing.status_code == 200 and "Spindle overheat" in listing.text
    for control in ("data-rule-toggle", 'href="/rules/new"', "New rule"):
        assert control not in listing.text
    assert '<span class="pill status-ok">On</span>' in listing.text
    page = await browser.get(f"/rules/{rule['id']}")
    assert page.status_code == 200 and "Spindle overheat" in page.text
    for control in (
        'id="rule-form"',
        'id="backtest"',
        "rule-delete",
        "data-rule-toggle",
        "rule_builder.js",
    ):
        assert control not in page.text
    assert "coolant_flow between 1..5" in page.text  # the read-only summary
    assert (await browser.get("/rules/new")).status_code == 403
    url = f"/api/v1/rules/{rule['id']}"
    for method, path, body in [
        ("POST", "/api/v1/rules", {"name": "x", "conditions": HOT}),
        ("PATCH", url, {"name": "x"}),
        ("POST", f"{url}/toggle", None),
        ("DELETE", url, None),
        ("POST", "/api/v1/rules/validate", {"name": "x", "conditions": HOT}),
    ]:
        denied = await browser.request(method, path, json=body)
        assert assert_problem(denied, 403)["permission"] == "rules:write", (method, path)
    still = await client.get(url, headers=admin_a.headers)
    assert still.json()["data"]["name"] == "Spindle overheat" and still.json()["data"]["is_active"]


async def test_filters_search_and_the_engine_error(
    client: httpx.AsyncClient, admin_a: LoggedIn, as_browser: AsBrowser, container: Container
) -> None:
    hot = await _rule(client, admin_a, "Spindle overheat", severity="critical")
    await _rule(client, admin_a, "Coolant low", severity="low")
    async with container.db.session() as session:
        assert await rules_service.disable_for_error(
            session, admin_a.factory_id, hot["id"], "ZeroDivisionError: float division by zero"
        )
    browser = await as_browser(admin_a)

    def names(html: str) -> list[str]:
        return re.findall(r'class="rule-name">([^<]+)<', html)

    assert names((await browser.get("/rules")).text) == ["Coolant low", "Spindle overheat"]
    assert names((await browser.get("/rules?sort=-name")).text) == [
        "Spindle overheat",
        "Coolant low",
    ]
    assert names((await browser.get("/rules?q=COOL")).text) == ["Coolant low"]
    assert names((await browser.get("/rules?severity=critical")).text) == ["Spindle overheat"]
    off = (await browser.get("/rules?enabled=off")).text
    assert names(off) == ["Spindle overheat"]
    assert "Switched off by the rule engine:" in off
    assert "ZeroDivisionError: float division by zero" in off
    assert names((await browser.get("/rules?enabled=on")).text) == ["Coolant low"]
    assert "No rule matches" in (await browser.get("/rules?q=nothing-like-it")).text
    # junk in the query string is ignored, not an error page
    assert (
        await browser.get("/rules?enabled=maybe&severity=x&sort=evil&page=-3")
    ).status_code == 200
    # htmx asks for the table only
    fragment = await browser.get(
        "/rules?q=spindle", headers={"HX-Request": "true", "HX-Target": "rules-table"}
    )
    assert fragment.text.lstrip().startswith('<div id="rules-table"')
    assert "<html" not in fragment.text and names(fragment.text) == ["Spindle overheat"]
    page = await browser.get(f"/rules/{hot['id']}")
    assert "The rule engine switched this rule off" in page.text
    assert "ZeroDivisionError: float division by zero" in page.text


async def test_times_are_in_the_factory_timezone(
    client: httpx.AsyncClient,
    make_factory: MakeFactory,
    login_as: LoginAs,
    as_browser: AsBrowser,
    container: Container,
) -> None:
    tokyo = await make_factory("tokyo", "Tokyo Works", timezone="Asia/Tokyo")
    admin = await login_as(tokyo, "super_admin")
    press = await keyed_device(client, admin, "P1")
    rule = await _rule(client, admin, "Press overheat")
    fired = dt.datetime(2026, 1, 15, 20, 30, tzinfo=dt.UTC)  # 05:30 next day in Tokyo
    async with container.db.session() as session:
        session.add(
            RuleDeviceState(
                rule_id=rule["id"],
                device_id=press.id,
                rule_version=1,
                state={},
                condition_true=True,
                last_fired_at=fired,
                updated_at=fired,
            )
        )
        await session.commit()
    browser = await as_browser(admin)
    listing = (await browser.get("/rules")).text
    assert "2026-01-16 05:30:00" in listing
    page = (await browser.get(f"/rules/{rule['id']}")).text
    assert "2026-01-16 05:30:00" in page and "Times in {}".format("Asia/Tokyo") in page
    assert _rule_data(page)["timezone"] == "Asia/Tokyo"
    activity = await browser.get(f"/rules/{rule['id']}/activity")
    assert activity.status_code == 200 and "2026-01-16 05:30:00" in activity.text


# --- browser ---------------------------------------------------------------------------------


def _device(api: httpx.Client, key: str) -> tuple[int, str]:
    created = api.post("/api/v1/devices", json={"device_key": key, "name": f"Lathe {key}"})
    assert created.status_code == 201, created.text
    device_id = created.json()["data"]["id"]
    secret = api.post(f"/api/v1/devices/{device_id}/keys")
    assert secret.status_code == 201, secret.text
    return device_id, secret.json()["data"]["key"]


def _ingest(live: Live, key: str, values: dict[str, float], ts_ms: int | None = None) -> None:
    entry: dict[str, Any] = {"values": values}
    if ts_ms is not None:
        entry["ts"] = ts_ms
    sent = httpx.post(
        f"{live.base_url}/api/v1/ingest", json=[entry], headers={"X-Device-Key": key}, timeout=10
    )
    assert sent.status_code == 200 and sent.json()["rejected"] == 0, sent.text


def test_build_a_nested_rule_with_live_validation_then_it_fires(
    live: Live, browser_page: BrowserPage
) -> None:
    from playwright.sync_api import expect

    tag = uuid.uuid4().hex[:8]
    api = live.api_login("admin")
    device_key = f"rb-{tag}"
    device_id, secret = _device(api, device_key)
    temp, flow, vib = f"rb_temp_{tag}", f"rb_flow_{tag}", f"rb_vib_{tag}"
    _ingest(live, secret, {temp: 20.0, flow: 10.0, vib: 1.0})  # the parameters exist

    page: Any = browser_page("admin")
    page.goto("/rules/new")
    page.get_by_label("Name", exact=True).fill(f"rb-rule-{tag}")
    page.get_by_label("Severity").select_option("critical")
    root = page.locator("#cond-root > fieldset.cgroup")
    first = root.locator("fieldset.cleaf").first
    first.get_by_label("Parameter").fill(temp)
    first.get_by_label("Operator").select_option("gt")
    first.get_by_label("Threshold").fill("80")
    # a nested OR group with two leaves
    page.get_by_role("button", name="Add a group", exact=True).click()
    group = root.locator("fieldset.cgroup").first
    expect(group.locator("legend").first).to_have_text("Group 2")
    leaves = group.locator("fieldset.cleaf")
    expect(leaves).to_have_count(2)
    leaves.nth(0).get_by_label("Parameter").fill(flow)
    leaves.nth(0).get_by_label("Operator").select_option("between")
    leaves.nth(0).get_by_label("Low").fill("20")
    leaves.nth(0).get_by_label("High").fill("5")
    leaves.nth(1).get_by_label("Parameter").fill(vib)
    leaves.nth(1).get_by_label("Threshold").fill("50")
    # the live check marks the bad leaf's field, with the API's message beside it
    low = leaves.nth(0).get_by_label("Low")
    expect(low).to_have_attribute("aria-invalid", "true")
    expect(leaves.nth(0).locator(".cfield-low .error-text")).to_have_text("must not be above high")
    expect(page.locator("#rule-problems")).to_contain_text("Condition 2.1, low")
    expect(leaves.nth(1).get_by_label("Threshold")).not_to_have_attribute("aria-invalid", "true")
    low.fill("1")
    high = leaves.nth(0).get_by_label("High")
    high.fill("20")
    expect(low).not_to_have_attribute("aria-invalid", "true")
    expect(page.locator("#rule-problems")).to_be_hidden()
    expect(page.locator("#rule-check")).to_have_text("Valid")
    # only the listed device
    page.get_by_label("Listed devices").check()
    page.get_by_label("Find devices by name or key").fill(device_key)
    page.locator("#device-results").get_by_label(re.compile(device_key)).check()
    expect(page.locator("#device-count")).to_have_text("1")
    # the JSON view shows exactly what goes to the API
    page.get_by_text("JSON sent to the API").click()
    body = json.loads(page.locator("#rule-json").text_content())
    assert body["conditions"] == {
        "operator": "AND",
        "conditions": [
            {"parameter": temp, "operator": "gt", "threshold": 80},
            {
                "operator": "OR",
                "conditions": [
                    {"parameter": flow, "operator": "between", "low": 1, "high": 20},
                    {"parameter": vib, "operator": "gt", "threshold": 50},
                ],
            },
        ],
    }
    assert body["scope"] == {"type": "devices", "device_ids": [device_id]}
    page.get_by_role("button", name="Create rule").click()
    page.wait_for_url(re.compile(r"/rules/\d+$"))
    rule_id = int(page.url.rsplit("/", 1)[1])
    expect(page.get_by_role("heading", name=f"rb-rule-{tag}")).to_be_visible()
    saved = api.get(f"/api/v1/rules/{rule_id}").json()["data"]
    assert saved["conditions"] == body["conditions"] and saved["severity"] == "critical"

    # telemetry that satisfies it: the live engine raises an alert, the page shows it
    deadline = time.monotonic() + 20
    alerts: list[Any] = []
    while not alerts and time.monotonic() < deadline:
        _ingest(live, secret, {temp: 91.5, flow: 3.0, vib: 1.0})
        for _ in range(10):
            alerts = api.get("/api/v1/alerts", params={"rule_id": rule_id}).json()["data"]
            if alerts:
                break
            time.sleep(0.2)
    assert alerts, live.output()
    assert alerts[0]["device_id"] == device_id and alerts[0]["severity"] == "critical"
    assert f"{temp} 91.5 > 80" in alerts[0]["message"]
    expect(page.locator("#rule-last-fired time")).to_be_visible()
    expect(page.locator("#rule-activity .rule-alerts")).to_contain_text(f"Lathe {device_key}")


def test_switch_a_rule_off_in_the_list_and_backtest_it(
    live: Live, browser_page: BrowserPage
) -> None:
    from playwright.sync_api import expect

    tag = uuid.uuid4().hex[:8]
    api = live.api_login("admin")
    device_key = f"rb-bt-{tag}"
    device_id, secret = _device(api, device_key)
    param = f"rb_load_{tag}"
    now = int(time.time() * 1000)
    start = now - 3 * 3600 * 1000
    # an hour of points a minute apart, over 90 between minute 20 and 29
    for minute in range(60):
        _ingest(live, secret, {param: 95.0 if 20 <= minute < 30 else 50.0}, start + minute * 60_000)
    name = f"rb-bt-rule-{tag}"
    created = api.post(
        "/api/v1/rules",
        json={
            "name": name,
            "conditions": {"parameter": param, "operator": "gt", "threshold": 90},
            "scope": {"type": "devices", "device_ids": [device_id]},
            "severity": "low",
            "is_active": True,
        },
    )
    assert created.status_code == 201, created.text
    rule_id = created.json()["data"]["id"]

    page: Any = browser_page("engineer")
    page.goto(f"/rules?q={name}")
    switch = page.get_by_role("switch", name=f"Rule {name} enabled")
    expect(switch).to_be_checked()
    switch.click()
    expect(page.locator(f"#rule-state-{rule_id}")).to_have_text("Off")
    expect(switch).not_to_be_checked()
    assert api.get(f"/api/v1/rules/{rule_id}").json()["data"]["is_active"] is False

    page.get_by_role("link", name=name).click()
    page.wait_for_url(re.compile(rf"/rules/{rule_id}$"))
    expect(page.locator("#bt-device option")).to_have_count(1)
    page.get_by_role("button", name="Last 7 days").click()
    page.get_by_role("button", name="Run backtest").click()
    expect(page.locator("#bt-status")).to_contain_text("Would have fired 1 time")
    rows = page.locator("#bt-firings tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(f"{param} 95 > 90")
    fired_utc = dt.datetime.fromtimestamp((start + 20 * 60_000) / 1000, dt.UTC)
    berlin = fired_utc.astimezone(ZoneInfo("Europe/Berlin"))
    expect(rows.first).to_contain_text(berlin.strftime("%Y-%m-%d %H:%M"))
    expect(page.locator("#bt-chart canvas")).to_have_count(1)
    expect(page.locator("#bt-chart")).to_have_attribute("aria-label", re.compile("1 firing period"))
