"""The dashboard: its figures for seeded data, tenant isolation, fragments, permissions,
and (one browser test) live updates without a reload."""

from __future__ import annotations

import datetime as dt
import re
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from plantwatch.app import Container
from plantwatch.assets.models import Device
from plantwatch.tenancy import auth
from plantwatch.tenancy.models import Factory
from plantwatch.web.views.dashboard import visible_cards
from tests.alerts.conftest import Target, clear_alert, make_rule, raise_alert
from tests.conftest import LoggedIn, LoginAs, MakeFactory
from tests.telemetry.conftest import KeyedDevice, keyed_device, now_ms
from tests.web.conftest import AsBrowser, BrowserPage, Live


def value(html: str, name: str) -> str:
    """The text of the element marked data-value=name (numbers, labels)."""
    found = re.search(rf'data-value="{re.escape(name)}">([^<]*)<', html)
    assert found, f"no data-value={name} in the page"
    return found.group(1).strip()


def card(html: str, card_id: str) -> str:
    """One card's HTML (cards are <section> elements without nested sections)."""
    found = re.search(rf'<section[^>]*id="{card_id}".*?</section>', html, re.S)
    assert found, f"no #{card_id} in the page"
    return found.group(0)


async def set_status(container: Container, device_id: int, status: str) -> None:
    async with container.db.session() as session:
        await session.execute(update(Device).where(Device.id == device_id).values(status=status))
        await session.commit()


async def seed_factory(
    client: httpx.AsyncClient, container: Container, admin: LoggedIn, prefix: str
) -> dict[str, Any]:
    """Four machines (online, offline, offline, never seen) + one decommissioned; open
    alerts: two critical, one high (acknowledged); one low alert resolved."""
    devices = {
        name: await keyed_device(client, admin, f"{prefix}-{name}")
        for name in ("press", "lathe", "oven", "robot", "old")
    }
    await set_status(container, devices["press"].id, "online")
    await set_status(container, devices["lathe"].id, "offline")
    await set_status(container, devices["oven"].id, "offline")
    await set_status(container, devices["old"].id, "offline")
    gone = await client.delete(f"/api/v1/devices/{devices['old'].id}", headers=admin.headers)
    assert gone.status_code == 204, gone.text
    hot = await make_rule(container, admin.factory_id, f"{prefix} overheat")
    leak = await make_rule(container, admin.factory_id, f"{prefix} coolant leak")
    t0 = dt.datetime(2026, 1, 15, 10, 0, tzinfo=dt.UTC)
    critical_1 = await raise_alert(
        container, Target(admin.factory_id, hot, devices["press"].id), at=t0
    )
    await raise_alert(
        container,
        Target(admin.factory_id, hot, devices["lathe"].id),
        at=t0 + dt.timedelta(minutes=1),
    )
    high = await raise_alert(
        container,
        Target(admin.factory_id, leak, devices["press"].id),
        severity="high",
        at=t0 + dt.timedelta(minutes=2),
    )
    acked = await client.post(
        f"/api/v1/alerts/{high.payload['alert_id']}/acknowledge", json={}, headers=admin.headers
    )
    assert acked.status_code == 200, acked.text
    low = Target(admin.factory_id, leak, devices["robot"].id)
    await raise_alert(container, low, severity="low", at=t0 + dt.timedelta(minutes=3))
    await clear_alert(container, low, at=t0 + dt.timedelta(minutes=4))
    return {"devices": devices, "critical_1": critical_1.payload["alert_id"]}


async def test_the_dashboard_shows_the_factorys_figures(
    client: httpx.AsyncClient,
    container: Container,
    as_browser: AsBrowser,
    admin_a: LoggedIn,
    admin_b: LoggedIn,
) -> None:
    seeded = await seed_factory(client, container, admin_a, "A")
    # Factory B has more of everything, under names that must never show in A.
    b = await seed_factory(client, container, admin_b, "Globex")
    await raise_alert(
        container,
        Target(
            admin_b.factory_id,
            await make_rule(container, admin_b.factory_id),
            b["devices"]["oven"].id,
        ),
    )

    page = await (await as_browser(admin_a)).get("/")
    assert page.status_code == 200
    html = page.text
    assert "Globex" not in html

    assert [value(html, f"devices-{k}") for k in ("total", "online", "offline", "never-seen")] == [
        "4",
        "1",
        "2",
        "1",
    ]
    assert "1 decommissioned, not counted" in html
    assert [value(html, f"alerts-{k}") for k in ("open", "critical", "high", "medium", "low")] == [
        "3",
        "2",
        "1",
        "0",
        "0",
    ]
    assert (value(html, "alerts-triggered"), value(html, "alerts-acknowledged")) == ("2", "1")

    # 100 - 2 critical x 5 - 1 high x 2 - 2 offline x 1 = 86: "fair", and why.
    health = card(html, "dash-health")
    assert value(html, "health-score") == "86"
    assert value(html, "health-label") == "fair"
    assert '<a href="/alerts?severity=critical">2 critical alerts open</a>' in health
    assert '<a href="/alerts?severity=high">1 high alert open</a>' in health
    assert '<a href="/machines?status=offline">2 devices offline</a>' in health

    # Worst first: the press (critical + high open) 55, the lathe (critical, offline) 50.
    worst = card(html, "dash-worst")
    devices: dict[str, KeyedDevice] = seeded["devices"]
    rows = re.findall(r'data-device-id="(\d+)"', worst)
    assert rows == [str(devices[n].id) for n in ("lathe", "press", "oven")]
    assert "critical alert open (\N{MINUS SIGN}30); offline (\N{MINUS SIGN}20)" in worst
    assert "1 critical alert open (\N{MINUS SIGN}30); 1 high alert open (\N{MINUS SIGN}15)" in worst
    assert str(devices["robot"].id) not in rows  # never seen, nothing open: 100

    # Latest alerts: newest first, linked, in the factory's time zone (UTC here).
    latest = card(html, "dash-latest")
    ids = re.findall(r'href="/alerts/(\d+)"', latest)
    assert len(ids) == 4 and ids[-1] == str(seeded["critical_1"])
    assert "2026-01-15 10:00:00" in latest
    assert f'href="/machines/{devices["press"].id}">Machine A-press</a>' in latest

    # Every card links to its list.
    for link in (
        'href="/machines"',
        'href="/machines?sort=health"',
        'href="/machines?status=never_seen"',
        'href="/machines?status=offline"',
        'href="/machines?status=online"',
        'href="/alerts"',
        'href="/alerts?severity=critical"',
        f'href="/machines/{devices["lathe"].id}"',
    ):
        assert link in html, link
    # The page subscribes to the live stream and loads its script.
    assert 'data-stream="alert,device,kpi"' in html
    assert "/static/js/dashboard.js" in html


async def test_times_are_in_the_factory_timezone(
    client: httpx.AsyncClient,
    container: Container,
    as_browser: AsBrowser,
    make_factory: MakeFactory,
    login_as: LoginAs,
) -> None:
    factory = await make_factory("kolkata", timezone="Asia/Kolkata")
    admin = await login_as(factory)
    device = await keyed_device(client, admin, "K1")
    rule = await make_rule(container, factory.id)
    at = dt.datetime(2026, 1, 15, 10, 0, tzinfo=dt.UTC)
    await raise_alert(container, Target(factory.id, rule, device.id), at=at)
    html = (await (await as_browser(admin)).get("/")).text
    latest = card(html, "dash-latest")
    assert "2026-01-15 15:30:00" in latest
    assert 'datetime="2026-01-15T10:00:00+00:00"' in latest


async def test_power_energy_and_limits(
    client: httpx.AsyncClient, container: Container, as_browser: AsBrowser, admin_a: LoggedIn
) -> None:
    press = await keyed_device(client, admin_a, "PRESS")
    for fields in (
        {"key": "power", "unit": "kW", "is_power": True},
        {"key": "temp", "unit": "°C", "warning_high": 70, "critical_high": 90},
    ):
        created = await client.post(
            f"/api/v1/devices/{press.id}/parameters", json=fields, headers=admin_a.headers
        )
        assert created.status_code == 201, created.text
    sent = await client.post(
        "/api/v1/ingest",
        json=[{"ts": now_ms() - 1000, "values": {"power": 12.5, "temp": 75.0}}],
        headers=press.headers,
    )
    assert sent.status_code == 200 and sent.json()["rejected"] == 0, sent.text
    browser = await as_browser(admin_a)
    html = (await browser.get("/")).text
    # Energy today takes a while to add up with thousands of power series: the page
    # leaves the card to load itself, then it is the fragment's (cached for seconds).
    energy = card(html, "dash-energy")
    assert 'data-pending="true"' in energy and value(energy, "power-kw") == "…"
    energy = card(
        (await browser.get("/dashboard/cards", params={"card": "energy"})).text, "dash-energy"
    )
    assert value(energy, "power-kw") == "12.5"
    assert f'href="/machines/{press.id}">Machine PRESS' in energy
    assert "data-pending" not in card((await browser.get("/")).text, "dash-energy")
    # The press is online with one parameter at its warning limit: 96.
    worst = card(html, "dash-worst")
    assert re.findall(r'data-device-id="(\d+)"', worst) == [str(press.id)]
    assert (
        "<strong>96</strong>" in worst and "1 parameter at warning limit (\N{MINUS SIGN}4)" in worst
    )
    assert value(html, "devices-online") == "1"


async def test_energy_without_power_parameters_says_how_to_get_them(
    as_browser: AsBrowser, admin_a: LoggedIn
) -> None:
    browser = await as_browser(admin_a)
    html = (await browser.get("/dashboard/cards?card=energy")).text
    assert "No power parameters yet" in html and value(html, "power-kw") == "—"
    # An empty factory: zeros and friendly empty states, not errors.
    page = await browser.get("/")
    assert page.status_code == 200
    assert value(page.text, "devices-total") == "0" and value(page.text, "health-score") == "100"
    assert "Every machine scores 100" in page.text and "No alerts yet." in page.text


async def test_fragments_render_the_same_cards_for_out_of_band_swaps(
    client: httpx.AsyncClient, container: Container, as_browser: AsBrowser, admin_a: LoggedIn
) -> None:
    await seed_factory(client, container, admin_a, "A")
    browser = await as_browser(admin_a)
    page = (await browser.get("/")).text
    whole = await browser.get("/dashboard/cards")
    assert whole.status_code == 200
    ids = re.findall(r'<section[^>]*id="(dash-\w+)"[^>]*hx-swap-oob="true"', whole.text)
    assert ids == [
        f"dash-{c}" for c in ("devices", "alerts", "energy", "health", "worst", "latest")
    ]
    # The same markup as the page, apart from the swap marker (the page's energy card
    # loads itself, see test_power_energy_and_limits).
    for card_id in ids[:2] + ids[3:]:
        assert card(whole.text, card_id).replace(' hx-swap-oob="true"', "") == card(page, card_id)
    some = await browser.get("/dashboard/cards", params={"card": ["devices", "health"]})
    assert re.findall(r'id="(dash-\w+)"', some.text) == ["dash-devices", "dash-health"]
    assert value(some.text, "devices-offline") == "2"
    assert "<html" not in some.text  # a fragment, not a page
    bad = await browser.get("/dashboard/cards", params={"card": "nope"})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["path"] == "query.card"
    # Without a session, htmx is told to go to the login page.
    anonymous = await client.get("/dashboard/cards", headers={"HX-Request": "true"})
    assert anonymous.status_code == 401 and anonymous.headers["HX-Redirect"].startswith("/login")


async def test_cards_follow_permissions(
    client: httpx.AsyncClient,
    container: Container,
    as_browser: AsBrowser,
    admin_a: LoggedIn,
    login_as: LoginAs,
    factory_a: Factory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await seed_factory(client, container, admin_a, "A")
    # A technician may not see analytics (health): no health card, no worst machines.
    technician = await as_browser(await login_as(factory_a, "technician"))
    html = (await technician.get("/")).text
    assert 'id="dash-devices"' in html and 'id="dash-alerts"' in html
    assert 'id="dash-health"' not in html and 'id="dash-worst"' not in html
    refused = await technician.get("/dashboard/cards", params={"card": "health"})
    assert refused.status_code == 403 and refused.json()["permission"] == "analytics:read"
    assert 'id="dash-health"' not in (await technician.get("/dashboard/cards")).text

    # Roles without alerts:read / assets:read (none of the built-in ones): grants are
    # read fresh, so narrowing the role's set shows what such a user would get.
    original = auth.effective_permissions

    def narrowed(role: str, grants: Any) -> frozenset[str]:
        perms = original(role, grants)
        if role == "viewer":
            return perms - {"alerts:read"}
        if role == "data_scientist":
            return perms - {"assets:read"}
        return perms

    monkeypatch.setattr(auth, "effective_permissions", narrowed)
    viewer = await as_browser(await login_as(factory_a, "viewer"))
    html = (await viewer.get("/")).text
    assert 'id="dash-devices"' in html and 'id="dash-energy"' in html
    for hidden in ("dash-alerts", "dash-health", "dash-worst", "dash-latest"):
        assert f'id="{hidden}"' not in html
    assert "A overheat" not in html
    assert (await viewer.get("/dashboard/cards", params={"card": "latest"})).status_code == 403

    scientist = await as_browser(await login_as(factory_a, "data_scientist"))
    denied = await scientist.get("/")
    assert denied.status_code == 403
    assert "does not include the dashboard" in denied.text and 'id="dashboard"' not in denied.text
    assert (await scientist.get("/dashboard/cards")).status_code == 403


def test_visible_cards() -> None:
    def principal(*perms: str) -> auth.Principal:
        return auth.Principal(1, 1, "acme", "UTC", "x@acme.example", "viewer", frozenset(perms), 1)

    assert visible_cards(principal("alerts:read")) == []
    assert visible_cards(principal("assets:read")) == ["devices"]
    assert visible_cards(principal("assets:read", "telemetry:read", "alerts:read")) == [
        "devices",
        "alerts",
        "energy",
        "latest",
    ]


# --- browser ----------------------------------------------------------------------------


def test_the_dashboard_fills_and_updates_live(browser_page: BrowserPage, live: Live) -> None:
    from playwright.sync_api import expect

    api = live.api_login("admin")
    tag = uuid.uuid4().hex[:6]
    created = api.post("/api/v1/devices", json={"device_key": f"dash-{tag}", "name": f"Dash {tag}"})
    assert created.status_code == 201, created.text
    device_id = created.json()["data"]["id"]
    key = api.post(f"/api/v1/devices/{device_id}/keys").json()["data"]["key"]
    rule = api.post(
        "/api/v1/rules",
        json={
            "name": f"Dash overheat {tag}",
            "conditions": {"parameter": "dash_temp", "operator": "gt", "threshold": 80},
            "scope": {"type": "devices", "device_ids": [device_id]},
            "severity": "critical",
            "cooldown": "1m",
        },
    )
    assert rule.status_code == 201, rule.text

    page: Any = browser_page("admin")
    page.goto("/")
    page.wait_for_selector("#live-status[data-state=live]")
    numbers = {
        name: int(page.locator(f'[data-value="{name}"]').inner_text().replace(",", ""))
        for name in ("devices-never-seen", "alerts-critical")
    }
    assert numbers["devices-never-seen"] >= 1  # ours, at least
    expect(page.locator("#dash-devices")).to_contain_text("never seen")
    page.evaluate("window.__noReload = true")

    # A point brings the device online; one over the threshold raises a critical alert.
    for temp in (20.0, 95.0):
        sent = httpx.post(
            f"{live.base_url}/api/v1/ingest",
            json={"ts": int(time.time() * 1000), "values": {"dash_temp": temp}},
            headers={"X-Device-Key": key},
            timeout=10,
        )
        assert sent.status_code == 200 and sent.json()["rejected"] == 0, sent.text
        time.sleep(0.05)

    latest = page.locator("#dash-latest")
    expect(latest).to_contain_text(f"Dash overheat {tag}")
    expect(latest.get_by_role("link", name=f"Dash {tag}")).to_have_attribute(
        "href", f"/machines/{device_id}"
    )
    # Other tests' devices may go offline meanwhile (the server is shared), but nothing
    # else leaves "never seen" during this test: ours did, by coming online.
    page.wait_for_function(
        "([unseen, critical]) => {"
        "  const n = (name) => +document.querySelector(`[data-value=${name}]`)"
        "    .textContent.replace(/,/g, '');"
        "  return n('devices-never-seen') <= unseen - 1 && n('alerts-critical') >= critical + 1;"
        "}",
        arg=[numbers["devices-never-seen"], numbers["alerts-critical"]],
    )
    assert page.evaluate("window.__noReload") is True  # patched in place, not reloaded
