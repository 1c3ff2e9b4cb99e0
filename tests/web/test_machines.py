"""Machines list and machine page: search, filters, sorting, paging, health, tenant
isolation, KPI cards and times in the factory's timezone; in a real browser, a KPI
card following live telemetry and the history chart zooming to a finer resolution."""

from __future__ import annotations

import datetime as dt
import re
import time
import uuid
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from plantwatch.alerts.models import Alert
from plantwatch.app import Container
from plantwatch.assets.models import Device, DeviceGroup, device_group_members
from plantwatch.assets.schemas import LineOut
from plantwatch.core.db import utcnow
from plantwatch.tenancy.models import Factory
from tests.conftest import LoggedIn, LoginAs, MakeFactory
from tests.web.conftest import AsBrowser, BrowserPage, Live

ROW = re.compile(r'<tr data-device-id="(\d+)"')


def row_ids(html: str) -> list[int]:
    return [int(x) for x in ROW.findall(html)]


def row_of(html: str, device_id: int) -> str:
    start = html.index(f'<tr data-device-id="{device_id}"')
    return html[start : html.index("</tr>", start)]


async def add_devices(
    container: Container, factory: Factory, specs: list[dict[str, Any]]
) -> list[int]:
    """Insert devices straight into the database (fast); returns their ids in order."""
    async with container.db.session() as session:
        devices = [Device(factory_id=factory.id, **spec) for spec in specs]
        session.add_all(devices)
        await session.commit()
        return [d.id for d in devices]


async def add_alert(
    container: Container,
    factory: Factory,
    device_id: int,
    severity: str,
    status: str = "triggered",
    title: str = "Spindle overheating",
) -> int:
    now = utcnow()
    async with container.db.session() as session:
        alert = Alert(
            factory_id=factory.id,
            device_id=device_id,
            open_key=None if status == "resolved" else f"x{uuid.uuid4().hex[:10]}:{device_id}",
            severity=severity,
            status=status,
            title=title,
            message=f"{title} ({severity})",
            triggered_at=now - dt.timedelta(minutes=5),
            last_seen_at=now,
            resolved_at=now if status == "resolved" else None,
        )
        session.add(alert)
        await session.commit()
        return alert.id


@pytest.fixture
async def fleet(
    container: Container, factory_a: Factory, admin_a: LoggedIn, client: httpx.AsyncClient
) -> dict[str, Any]:
    """55 presses, a lathe on a line and in a group, a never-seen pump."""
    now = utcnow()
    line = await client.post("/api/v1/sites", json={"name": "North"}, headers=admin_a.headers)
    area = await client.post(
        "/api/v1/areas",
        json={"site_id": line.json()["data"]["id"], "name": "Machining"},
        headers=admin_a.headers,
    )
    created = await client.post(
        "/api/v1/lines",
        json={"area_id": area.json()["data"]["id"], "name": "Line 1"},
        headers=admin_a.headers,
    )
    line_out = LineOut.model_validate(created.json()["data"])
    presses = [
        {
            "device_key": f"P{i:02d}",
            "name": f"Press {i:02d}",
            "kind": "press",
            "status": "offline" if i % 5 == 0 else "online",
            "last_seen": now - dt.timedelta(minutes=i),
        }
        for i in range(55)
    ]
    ids = await add_devices(container, factory_a, presses)
    lathe, pump = await add_devices(
        container,
        factory_a,
        [
            {
                "device_key": "LX-7",
                "name": "Lathe Alpha",
                "kind": "lathe",
                "status": "online",
                "last_seen": now,
                "line_id": line_out.id,
            },
            {"device_key": "PU-1", "name": "Pump Zeta", "kind": "pump"},
        ],
    )
    async with container.db.session() as session:
        group = DeviceGroup(factory_id=factory_a.id, name="Critical machines")
        session.add(group)
        await session.flush()
        await session.execute(
            device_group_members.insert(), [{"group_id": group.id, "device_id": lathe}]
        )
        await session.commit()
        group_id = group.id
    return {"presses": ids, "lathe": lathe, "pump": pump, "group": group_id, "line": line_out.id}


async def test_list_pages_searches_and_filters(
    as_browser: AsBrowser, admin_a: LoggedIn, fleet: dict[str, Any]
) -> None:
    web = await as_browser(admin_a)
    page = await web.get("/machines")
    assert page.status_code == 200
    assert "<h1>Machines</h1>" in page.text
    assert "57 in all · page 1 of 2" in page.text
    ids = row_ids(page.text)
    assert len(ids) == 50
    assert ids[0] == fleet["lathe"]  # by name: Lathe, Press 00..., Pump
    assert 'aria-sort="ascending"' in page.text
    # Filters offered from what the factory has.
    assert "Critical machines" in page.text and "North \u203a Machining \u203a Line 1" in page.text
    assert '<option value="lathe"' in page.text

    second = await web.get("/machines", params={"page": "2"})
    assert len(row_ids(second.text)) == 7
    assert fleet["pump"] in row_ids(second.text)
    assert not set(row_ids(second.text)) & set(ids)

    async def only(**params: str) -> list[int]:
        r = await web.get("/machines", params=params)
        assert r.status_code == 200
        return row_ids(r.text)

    assert await only(q="lathe") == [fleet["lathe"]]
    assert await only(q="pu-1") == [fleet["pump"]]  # by key, any case
    assert await only(status="never_seen") == [fleet["pump"]]
    offline = await only(status="offline")
    assert offline == [fleet["presses"][i] for i in range(0, 55, 5)]
    assert await only(group=str(fleet["group"])) == [fleet["lathe"]]
    assert await only(line=str(fleet["line"])) == [fleet["lathe"]]
    assert await only(kind="pump") == [fleet["pump"]]
    assert await only(kind="press", q="Press 1", status="offline") == [
        fleet["presses"][10],
        fleet["presses"][15],
    ]
    empty = await web.get("/machines", params={"q": "no such thing"})
    assert "No machine matches these filters." in empty.text
    # Nonsense is ignored, never an error page.
    odd = await web.get("/machines", params={"sort": "bogus", "page": "x", "group": "-1"})
    assert odd.status_code == 200 and len(row_ids(odd.text)) == 50
    # Status pills carry text.
    assert 'class="pill status-never-seen">never seen</span>' in second.text


async def test_decommissioned_machines_are_listed_only_under_their_filter(
    as_browser: AsBrowser, admin_a: LoggedIn, fleet: dict[str, Any], client: httpx.AsyncClient
) -> None:
    retired = fleet["presses"][3]
    gone = await client.delete(f"/api/v1/devices/{retired}", headers=admin_a.headers)
    assert gone.status_code == 204, gone.text
    web = await as_browser(admin_a)
    page = await web.get("/machines", params={"per_page": "100", "q": "Press"})
    assert "54 in all" in page.text  # as the dashboard counts: active machines only
    assert retired not in row_ids(page.text)
    online = await web.get("/machines", params={"status": "online", "q": "Press 03"})
    assert row_ids(online.text) == []
    listed = await web.get("/machines", params={"status": "decommissioned"})
    assert row_ids(listed.text) == [retired]
    assert 'class="pill status-decommissioned">decommissioned</span>' in listed.text
    assert '<option value="decommissioned" selected>' in listed.text


async def test_list_sorts_by_each_column(
    container: Container,
    factory_a: Factory,
    as_browser: AsBrowser,
    admin_a: LoggedIn,
    fleet: dict[str, Any],
) -> None:
    presses = fleet["presses"]
    await add_alert(container, factory_a, presses[3], "critical")
    await add_alert(container, factory_a, presses[7], "low")
    await add_alert(container, factory_a, presses[7], "low", title="Vibration")
    await add_alert(container, factory_a, presses[8], "high", status="resolved")
    web = await as_browser(admin_a)

    by_name_desc = row_ids((await web.get("/machines", params={"sort": "-name"})).text)
    assert by_name_desc[:2] == [fleet["pump"], presses[54]]

    page = (await web.get("/machines", params={"sort": "health"})).text
    worst_first = row_ids(page)
    # critical alert (-30) < offline presses (-20) < two low alerts (-6) < the rest.
    assert worst_first[0] == presses[3]
    assert worst_first[1:12] == [presses[i] for i in range(0, 55, 5)]
    assert worst_first[12] == presses[7]
    scores = [int(s) for s in re.findall(r'class="health-score"[^>]*>(\d+)<', page)]
    assert scores == sorted(scores) and scores[0] == 70
    assert "1 critical alert open: -30" in row_of(page, presses[3])
    assert '<th scope="col" aria-sort="ascending" class="num">' in page
    best_first = (await web.get("/machines", params={"sort": "-health", "page": "2"})).text
    assert row_ids(best_first)[-1] == presses[3]

    alerts = (await web.get("/machines", params={"sort": "-alerts"})).text
    assert row_ids(alerts)[:2] == [presses[7], presses[3]]  # 2 open, then 1 (resolved: 0)
    assert 'aria-sort="descending"' in alerts
    assert "critical</span>" in row_of(alerts, presses[3])  # worst severity, with text
    assert ">2<" in row_of(alerts, presses[7])

    by_status = row_ids((await web.get("/machines", params={"sort": "status"})).text)
    assert by_status[:11] == [presses[i] for i in range(0, 55, 5)]  # offline first
    never_last = row_ids((await web.get("/machines", params={"sort": "status", "page": "2"})).text)
    assert never_last[-1] == fleet["pump"]

    seen = row_ids((await web.get("/machines", params={"sort": "-last_seen"})).text)
    assert seen[:2] == [fleet["lathe"], presses[0]]
    # The header links flip the direction of the column sorted by and keep filters.
    page = (await web.get("/machines", params={"sort": "health", "q": "press"})).text
    assert 'href="/machines?q=press&amp;sort=-health"' in page
    assert 'href="/machines?q=press&amp;sort=-alerts"' in page


async def test_htmx_gets_the_table_fragment(
    as_browser: AsBrowser, admin_a: LoggedIn, fleet: dict[str, Any]
) -> None:
    web = await as_browser(admin_a)
    hx = {"HX-Request": "true", "HX-Target": "machines-table"}
    fragment = await web.get("/machines", params={"q": "lathe"}, headers=hx)
    assert fragment.status_code == 200
    assert "<html" not in fragment.text and 'id="machines-table"' in fragment.text
    assert row_ids(fragment.text) == [fleet["lathe"]]
    # The sort travels with the filter form.
    assert 'name="sort" value="name" form="machines-filters"' in fragment.text
    # A history restore needs the whole page.
    restore = await web.get(
        "/machines", params={"q": "lathe"}, headers={**hx, "HX-History-Restore-Request": "true"}
    )
    assert "<html" in restore.text


async def test_another_factorys_machines_are_never_shown(
    container: Container,
    factory_a: Factory,
    factory_b: Factory,
    admin_a: LoggedIn,
    admin_b: LoggedIn,
    as_browser: AsBrowser,
) -> None:
    (mine,) = await add_devices(container, factory_a, [{"device_key": "A1", "name": "Acme Mill"}])
    (theirs,) = await add_devices(
        container, factory_b, [{"device_key": "G1", "name": "Globex Mill"}]
    )
    await add_alert(container, factory_b, theirs, "critical", title="Globex secret alert")
    web = await as_browser(admin_a)
    page = await web.get("/machines", params={"q": "mill"})
    assert row_ids(page.text) == [mine]
    assert "Globex" not in page.text
    for sort in ("health", "-alerts"):
        assert row_ids((await web.get("/machines", params={"sort": sort})).text) == [mine]
    for path in (f"/machines/{theirs}", f"/machines/{theirs}/health", f"/machines/{theirs}/alerts"):
        response = await web.get(path)
        assert response.status_code == 404, path
        assert "Not found" in response.text and "Globex" not in response.text
    for bogus in ("abc", "0", "99999999999999999999", "-1", "\uff11"):
        assert (await web.get(f"/machines/{bogus}")).status_code == 404
    assert (await web.get(f"/machines/{mine}")).status_code == 200
    other = await as_browser(admin_b)
    assert row_ids((await other.get("/machines")).text) == [theirs]


async def test_machine_page_shows_kpis_health_alerts_in_factory_time(
    client: httpx.AsyncClient,
    container: Container,
    make_factory: MakeFactory,
    login_as: LoginAs,
    as_browser: AsBrowser,
) -> None:
    factory = await make_factory("tokyo", "Tokyo Works", timezone="Asia/Tokyo")
    admin = await login_as(factory, "super_admin")
    viewer = await login_as(factory, "viewer")
    created = await client.post(
        "/api/v1/devices",
        json={"device_key": "CNC-9", "name": "CNC Nine", "kind": "cnc", "location": "Bay 3"},
        headers=admin.headers,
    )
    device_id = created.json()["data"]["id"]
    key = (
        await client.post(f"/api/v1/devices/{device_id}/keys", json={}, headers=admin.headers)
    ).json()["data"]["key"]
    now_ms = int(time.time() * 1000)
    first, second = now_ms - 120_000, now_ms - 60_000
    sent = await client.post(
        "/api/v1/ingest",
        json=[
            {"ts": first, "values": {"spindle_temp": 61.5, "mode": "AUTO"}},
            {"ts": second, "values": {"spindle_temp": 72.5}},
        ],
        headers={"X-Device-Key": key},
    )
    assert sent.status_code == 200, sent.text
    params = (
        await client.get(f"/api/v1/devices/{device_id}/parameters", headers=admin.headers)
    ).json()["data"]
    temp = next(p for p in params if p["key"] == "spindle_temp")
    patched = await client.patch(
        f"/api/v1/devices/{device_id}/parameters/{temp['id']}",
        json={
            "unit": "°C",
            "display_name": "Spindle temperature",
            "is_kpi": True,
            "warning_high": 70,
            "critical_high": 85,
        },
        headers=admin.headers,
    )
    assert patched.status_code == 200, patched.text
    alert_id = await add_alert(container, factory, device_id, "high", title="Spindle hot")
    await add_alert(container, factory, device_id, "low", status="resolved", title="Old news")

    for who in (admin, viewer):
        web = await as_browser(who)
        page = await web.get(f"/machines/{device_id}")
        assert page.status_code == 200
        html = page.text
        assert "CNC Nine" in html and "Bay 3" in html
        card = html[html.index('data-key="spindle_temp"') :]
        card = card[: card.index("</article>")]
        assert '<span class="kpi-number">72.5</span><span class="unit">°C</span>' in card
        assert 'data-level="warning"' in html and ">warning</span>" in card
        assert "rising" in card and 'data-stale="false"' in html
        assert "warning at or above 70" in card
        local = dt.datetime.fromtimestamp(second / 1000, ZoneInfo("Asia/Tokyo"))
        assert local.strftime("%Y-%m-%d %H:%M:%S") in card
        assert "AUTO" in html  # a state parameter shows its text
        # Health: the open high alert and the parameter at its warning limit.
        assert '1 high alert open: <span class="num">\u221215</span>' in html
        assert "1 parameter at warning limit" in html
        assert f'href="/alerts/{alert_id}"' in html and "Spindle hot" in html
        assert "Old news" in html  # recently resolved
        # The live stream narrows KPI values to this machine; the chart's data block.
        assert 'data-stream="alert,device,kpi"' in html
        assert f'data-stream-devices="{device_id}"' in html
        assert '"key": "spindle_temp"' in html and '"default": true' in html
        assert "<script>" not in html  # CSP: no inline code
        # Created, last seen: factory time too.
        assert "Asia/Tokyo" in html

    web = await as_browser(admin)
    health = await web.get(f"/machines/{device_id}/health")
    assert health.status_code == 200 and 'id="machine-health"' in health.text
    assert "<html" not in health.text
    alerts = await web.get(f"/machines/{device_id}/alerts")
    assert 'id="alerts"' in alerts.text and "Spindle hot" in alerts.text
    # The list agrees with the page.
    listed = (await web.get("/machines")).text
    assert row_ids(listed) == [device_id]
    assert re.search(r'class="health-score"[^>]*>81<', listed)
    assert "81" in (await web.get(f"/machines/{device_id}")).text


# --- in a browser ---------------------------------------------------------------------------


def _device_with_key(api: httpx.Client, name: str) -> tuple[int, str]:
    tag = uuid.uuid4().hex[:6]
    created = api.post(
        "/api/v1/devices", json={"device_key": f"mach-{tag}", "name": f"{name} {tag}"}
    )
    assert created.status_code == 201, created.text
    device_id = created.json()["data"]["id"]
    key = api.post(f"/api/v1/devices/{device_id}/keys", json={})
    assert key.status_code == 201, key.text
    return device_id, key.json()["data"]["key"]


def test_kpi_card_follows_live_telemetry(live: Live, browser_page: BrowserPage) -> None:
    from playwright.sync_api import expect

    api = live.api_login("admin")
    device_id, key = _device_with_key(api, "Machines live")
    ingest = httpx.post(
        f"{live.base_url}/api/v1/ingest",
        json={"values": {"pressure": 1.25}},
        headers={"X-Device-Key": key},
        timeout=10,
    )
    assert ingest.status_code == 200, ingest.text
    page: Any = browser_page("admin")
    page.goto(f"/machines/{device_id}")
    card = page.locator('.kpi[data-key="pressure"]')
    expect(card.locator(".kpi-number")).to_have_text("1.25")
    page.wait_for_selector("#live-status[data-state=live]")
    page.evaluate("window.__same_page = true")
    ingest = httpx.post(
        f"{live.base_url}/api/v1/ingest",
        json={"values": {"pressure": 2.5, "flow": 7}},
        headers={"X-Device-Key": key},
        timeout=10,
    )
    assert ingest.status_code == 200, ingest.text
    expect(card.locator(".kpi-number")).to_have_text("2.5", timeout=10_000)
    expect(card.locator(".trend-text")).to_have_text("rising")
    # A parameter first seen while the page is open gets a card of its own.
    expect(page.locator('.kpi[data-key="flow"] .kpi-number')).to_have_text("7")
    assert page.evaluate("window.__same_page") is True  # no reload


def test_history_chart_draws_and_zooms_to_a_finer_resolution(
    live: Live, browser_page: BrowserPage
) -> None:
    from playwright.sync_api import expect

    api = live.api_login("admin")
    device_id, key = _device_with_key(api, "Machines chart")
    now_ms = int(time.time() * 1000)
    # A day of readings, one every 2 minutes.
    points = [{"ts": now_ms - i * 120_000, "values": {"temp": 50 + (i % 30)}} for i in range(720)]
    ingest = httpx.post(
        f"{live.base_url}/api/v1/ingest", json=points, headers={"X-Device-Key": key}, timeout=20
    )
    assert ingest.status_code == 200, ingest.text
    page: Any = browser_page("admin", viewport={"width": 1280, "height": 900})
    page.goto(f"/machines/{device_id}")
    chart = page.locator("#machine-chart")
    expect(chart.locator("canvas")).to_have_count(1)
    expect(chart).to_have_attribute("data-interval", re.compile(r".+"))
    coarse = chart.get_attribute("data-interval")
    assert page.evaluate("window.pwMachineChart.data[0].length") > 100
    assert page.evaluate("window.pwMachineChart.data[1].filter(v => v !== null).length") > 100
    resolution = page.locator("#chart-resolution")
    expect(resolution).to_have_text(re.compile(r"^\S+ avg$"))

    # Drag across a tenth of the plot: uPlot zooms, the page fetches that range again.
    page.locator("#machine-chart .u-over").scroll_into_view_if_needed()
    over = page.locator("#machine-chart .u-over").bounding_box()
    y = over["y"] + over["height"] / 2
    x0 = over["x"] + over["width"] * 0.45
    with page.expect_request(lambda r: "/kpis/history" in r.url) as fetched:
        page.mouse.move(x0, y)
        page.mouse.down()
        page.mouse.move(x0 + over["width"] * 0.05, y, steps=5)
        page.mouse.move(x0 + over["width"] * 0.1, y, steps=5)
        page.mouse.up()
    start = re.search(r"start=([^&]+)", fetched.value.url)
    assert start is not None
    expect(chart).not_to_have_attribute("data-interval", coarse)
    fine = chart.get_attribute("data-interval")
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def step(label: str) -> int:
        return int(label[:-1]) * seconds[label[-1]]

    assert step(fine) < step(coarse)
    expect(resolution).to_have_text(f"{fine} avg")
    expect(page.locator("#chart-reset")).to_be_enabled()
    page.locator("#chart-reset").click()
    expect(chart).to_have_attribute("data-interval", coarse)
