"""The KPI API through HTTP: devices made through the API, points sent through
POST /api/v1/ingest. Live values (stale, levels), history (shapes, 422 paths),
factory-wide latest values (filters), energy (known power profiles, DST days),
tenant isolation and permissions."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import httpx
import pytest

from plantwatch.app import Container
from plantwatch.telemetry import kpis, queries, store
from plantwatch.telemetry.partitions import Partitions
from plantwatch.tenancy import permissions
from plantwatch.tenancy.models import Factory
from plantwatch.tenancy.permissions import Role
from tests.conftest import LoggedIn, LoginAs, MakeFactory, assert_problem
from tests.telemetry.conftest import KeyedDevice, keyed_device, now_ms

MINUTE = 60_000
HOUR = 3_600_000


async def _param(client: httpx.AsyncClient, device: KeyedDevice, **fields: Any) -> dict[str, Any]:
    response = await client.post(
        f"/api/v1/devices/{device.id}/parameters", json=fields, headers=device.owner.headers
    )
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def _send(client: httpx.AsyncClient, device: KeyedDevice, entries: list[Any]) -> None:
    for i in range(0, len(entries), 5000):
        chunk = entries[i : i + 5000]
        response = await client.post("/api/v1/ingest", json=chunk, headers=device.headers)
        assert response.status_code == 200, response.text
        assert response.json()["rejected"] == 0, response.text


async def _get(
    client: httpx.AsyncClient, user: LoggedIn, url: str, status: int = 200, **params: Any
) -> Any:
    response = await client.get(url, params=params, headers=user.headers)
    assert response.status_code == status, response.text
    return response.json()


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat()


def _error_paths(response: httpx.Response) -> list[str]:
    body = assert_problem(response, 422)
    return [e["path"] for e in body["errors"]]


# --- live -------------------------------------------------------------------------------


async def test_live_kpis_values_staleness_and_levels(
    client: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    device = await keyed_device(client, admin_a, "M10", offline_after_s=60)
    await _param(
        client,
        device,
        key="spindle_temp",
        display_name="Spindle temperature",
        unit="°C",
        is_kpi=True,
        warning_high=70,
        critical_high=85,
    )
    await _param(client, device, key="vibration", unit="mm/s", is_kpi=True, warning_high=5)
    await _param(client, device, key="pressure", unit="bar", is_kpi=True, critical_low=2)
    await _param(client, device, key="never_sent", is_kpi=True)
    now = now_ms()
    await _send(
        client,
        device,
        [
            {"ts": now - 120_000, "values": {"coolant": 20.5}},  # older than the 60 s limit
            {
                "ts": now - 1000,
                "values": {"spindle_temp": 72.5, "vibration": 1.25, "mode": "AUTO"},
            },
            {"ts": now - 500, "values": {"pressure": 1.5, "load": 40}},
        ],
    )
    body = await _get(client, admin_a, f"/api/v1/devices/{device.id}/kpis/live")
    data = body["data"]
    assert data["device_id"] == device.id and data["device_key"] == "M10"
    assert data["status"] == "online" and data["last_seen"] is not None
    assert data["offline_after_s"] == 60
    by_key = {k["key"]: k for k in data["kpis"]}
    # KPIs first (by key), then the rest (by key)
    assert [k["key"] for k in data["kpis"]] == [
        "never_sent",
        "pressure",
        "spindle_temp",
        "vibration",
        "coolant",
        "load",
        "mode",
    ]
    temp = by_key["spindle_temp"]
    assert (temp["value"], temp["unit"], temp["display_name"]) == (
        72.5,
        "°C",
        "Spindle temperature",
    )
    assert (temp["level"], temp["stale"], temp["warning_high"]) == ("warning", False, 70)
    assert temp["ts"].endswith("Z")
    parsed = dt.datetime.fromisoformat(temp["ts"].replace("Z", "+00:00"))
    assert int(parsed.timestamp() * 1000) == now - 1000
    assert by_key["vibration"]["level"] == "ok"
    assert by_key["pressure"]["level"] == "critical"
    assert by_key["load"]["level"] is None and by_key["load"]["value"] == 40
    assert by_key["coolant"]["stale"] is True and by_key["coolant"]["value"] == 20.5
    assert by_key["mode"] == {**by_key["mode"], "value": None, "text": "AUTO", "level": None}
    never = by_key["never_sent"]
    assert (never["value"], never["ts"], never["stale"], never["level"]) == (
        None,
        None,
        True,
        None,
    )
    kpi_only = await _get(
        client, admin_a, f"/api/v1/devices/{device.id}/kpis/live", kpi_only="true"
    )
    assert [k["key"] for k in kpi_only["data"]["kpis"]] == [
        "never_sent",
        "pressure",
        "spindle_temp",
        "vibration",
    ]
    # A newer point moves the level; an older one does not replace the latest.
    await _send(
        client,
        device,
        [
            {"ts": now, "values": {"spindle_temp": 90}},
            {"ts": now - 5000, "values": {"vibration": 9}},
        ],
    )
    again = await _get(client, admin_a, f"/api/v1/devices/{device.id}/kpis/live")
    by_key = {k["key"]: k for k in again["data"]["kpis"]}
    assert (by_key["spindle_temp"]["value"], by_key["spindle_temp"]["level"]) == (90, "critical")
    assert (by_key["vibration"]["value"], by_key["vibration"]["level"]) == (1.25, "ok")


async def test_stale_uses_the_factory_limit_when_the_device_has_none(
    client: httpx.AsyncClient, admin_a: LoggedIn, device_a: KeyedDevice
) -> None:
    now = now_ms()
    await _send(
        client,
        device_a,
        [{"ts": now - 200_000, "values": {"a": 1}}, {"ts": now - 400_000, "values": {"b": 2}}],
    )
    data = (await _get(client, admin_a, f"/api/v1/devices/{device_a.id}/kpis/live"))["data"]
    assert data["offline_after_s"] == 300
    assert {k["key"]: k["stale"] for k in data["kpis"]} == {"a": False, "b": True}


def test_level_and_staleness_rules() -> None:
    assert kpis.level_of(None, 1, 2, 0, 3) is None
    assert kpis.level_of(5.0, None, None, None, None) is None
    assert kpis.level_of(70.0, None, 70, None, 85) == "warning"  # at the limit counts
    assert kpis.level_of(69.9, None, 70, None, 85) == "ok"
    assert kpis.level_of(85.0, None, 70, None, 85) == "critical"
    assert kpis.level_of(4.0, 5, None, 2, None) == "warning"
    assert kpis.level_of(2.0, 5, None, 2, None) == "critical"
    assert kpis.is_stale(None, 1000, 10) is True
    assert kpis.is_stale(0, 9_999, 10) is False
    assert kpis.is_stale(0, 10_000, 10) is True


# --- history ----------------------------------------------------------------------------


async def test_history_buckets_raw_points_and_tiers(
    client: httpx.AsyncClient, admin_a: LoggedIn, device_a: KeyedDevice
) -> None:
    base = now_ms() // HOUR * HOUR - 2 * HOUR  # an hour boundary, two hours ago
    entries = [
        {"ts": base + i * 1000, "values": {"spindle_temp": float(i % 60), "vibration": 1.0}}
        for i in range(0, 3 * 60 * 60, 10)  # every 10 s for 3 hours (some in the future)
        if base + i * 1000 <= now_ms()
    ]
    await _send(client, device_a, entries)
    url = f"/api/v1/devices/{device_a.id}/kpis/history"
    start, end = base + 30_500, base + 90 * MINUTE + 1500  # mid-minute at both ends
    body = await _get(
        client,
        admin_a,
        url,
        parameters="spindle_temp,vibration",
        start=_iso(start),
        end=_iso(end),
        interval="1h",
        agg="count",
    )
    data = body["data"]
    assert (data["interval"], data["interval_ms"], data["agg"]) == ("1h", HOUR, "count")
    assert data["tiers"] == ["raw", "1m"]
    assert [p["key"] for p in data["parameters"]] == ["spindle_temp", "vibration"]
    counts = data["parameters"][0]["points"]
    # [start, end) holds the points at 40 s ... 5400 s, every 10 s
    assert counts == [[base, 356], [base + HOUR, 181]]
    # the same over whole hours comes from the hour tier
    hourly = await _get(
        client,
        admin_a,
        url,
        parameters="vibration",
        start=_iso(base),
        end=_iso(base + 2 * HOUR),
        interval="1h",
        agg="sum",
    )
    assert hourly["data"]["tiers"] == ["1h"]
    assert hourly["data"]["parameters"][0]["points"] == [[base, 360.0], [base + HOUR, 360.0]]
    # minutes, every aggregate
    for agg, value in (("avg", 25.0), ("min", 0.0), ("max", 50.0), ("first", 0.0), ("last", 50.0)):
        minute = await _get(
            client,
            admin_a,
            url,
            parameters=["spindle_temp"],
            start=_iso(base),
            end=_iso(base + 3 * MINUTE),
            interval="1m",
            agg=agg,
        )
        points = minute["data"]["parameters"][0]["points"]
        assert points == [[base + m * MINUTE, value] for m in range(3)], agg
    raw = await _get(
        client,
        admin_a,
        url,
        parameters="spindle_temp",
        start=_iso(base),
        end=_iso(base + MINUTE),
        interval="raw",
    )
    assert (raw["data"]["interval"], raw["data"]["agg"], raw["data"]["tiers"]) == (
        "raw",
        None,
        ["raw"],
    )
    assert raw["data"]["parameters"][0]["points"] == [
        [base + s * 1000, float(s)] for s in range(0, 60, 10)
    ]
    auto = await _get(
        client,
        admin_a,
        url,
        parameters="spindle_temp",
        start=_iso(base),
        end=_iso(base + 2 * HOUR),
        points=24,
    )
    assert auto["data"]["interval"] == "5m" and auto["data"]["agg"] == "avg"
    assert len(auto["data"]["parameters"][0]["points"]) == 24
    # default range: the last 24 hours
    default = await _get(client, admin_a, url, parameters="vibration", interval="1h")
    default_points = default["data"]["parameters"][0]["points"]
    assert len(default_points) >= 2 and {p[1] for p in default_points} == {1.0}
    got_start = dt.datetime.fromisoformat(default["data"]["start"].replace("Z", "+00:00"))
    got_end = dt.datetime.fromisoformat(default["data"]["end"].replace("Z", "+00:00"))
    assert got_end - got_start == dt.timedelta(hours=24)


async def test_history_validation_errors(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    device_a: KeyedDevice,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = now_ms()
    await _send(client, device_a, [{"ts": now - i * 1000, "values": {"x": 1.0}} for i in range(50)])
    url = f"/api/v1/devices/{device_a.id}/kpis/history"
    h = admin_a.headers

    async def paths(**params: Any) -> list[str]:
        return _error_paths(await client.get(url, params=params, headers=h))

    assert await paths(parameters="x,nope") == ["query.parameters"]
    assert await paths() == ["query.parameters"]
    assert await paths(parameters=" , ") == ["query.parameters"]
    assert await paths(parameters="x;drop") == ["query.parameters"]
    assert await paths(parameters="x", start=_iso(now), end=_iso(now - 1000)) == ["query.end"]
    assert await paths(parameters="x", start=_iso(now), end=_iso(now)) == ["query.end"]
    assert await paths(parameters="x", start="2026-02-19T10:00:00") == ["query.start"]
    assert await paths(parameters="x", end="yesterday") == ["query.end"]
    assert await paths(parameters="x", interval="2m") == ["query.interval"]
    assert await paths(parameters="x", agg="median") == ["query.agg"]
    assert await paths(parameters="x", points=0) == ["query.points"]
    assert await paths(parameters=",".join(f"p{i}" for i in range(21))) == ["query.parameters"]
    # A minute interval over ten years is too many buckets.
    ten_years = {"start": "2016-01-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"}
    response = await client.get(
        url, params={"parameters": "x", "interval": "1m", **ten_years}, headers=h
    )
    assert assert_problem(response, 422, "query_too_large")["errors"][0]["path"] == (
        "query.interval"
    )
    # Raw points past the limit: the caller is told to pick an interval.
    monkeypatch.setattr(queries, "MAX_RAW_POINTS", 10)
    response = await client.get(url, params={"parameters": "x", "interval": "raw"}, headers=h)
    problem = assert_problem(response, 422, "query_too_large")
    assert "interval" in problem["detail"] and problem["errors"][0]["path"] == "query.interval"
    ok = await client.get(url, params={"parameters": "x", "interval": "1m"}, headers=h)
    assert ok.status_code == 200
    # another device id, or none at all
    assert_problem(
        await client.get(
            f"/api/v1/devices/{device_a.id + 1000}/kpis/history",
            params={"parameters": "x"},
            headers=h,
        ),
        404,
        "device_not_found",
    )


# --- latest -----------------------------------------------------------------------------


async def test_latest_values_with_filters(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    m1 = await keyed_device(client, admin_a, "M1")
    m2 = await keyed_device(client, admin_a, "M2", offline_after_s=30)
    await _param(client, m1, key="temp", unit="°C", is_kpi=True, warning_high=50)
    await _param(client, m2, key="temp", unit="°C", is_kpi=True)
    now = now_ms()
    await _send(
        client, m1, [{"ts": now - 1000, "values": {"temp": 55, "rpm": 1200, "mode": "RUN"}}]
    )
    await _send(client, m2, [{"ts": now - 60_000, "values": {"temp": 21.5, "rpm": 0}}])
    url = "/api/v1/telemetry/latest"
    body = await _get(client, admin_a, url)
    assert body["meta"] == {"page": 1, "per_page": 10_000, "total": 5}
    rows = [(r["device_key"], r["key"]) for r in body["data"]]
    assert rows == [("M1", "temp"), ("M1", "mode"), ("M1", "rpm"), ("M2", "temp"), ("M2", "rpm")]
    first = body["data"][0]
    assert first == {
        "device_id": m1.id,
        "device_key": "M1",
        "device_name": "Machine M1",
        "parameter_id": first["parameter_id"],
        "key": "temp",
        "display_name": None,
        "unit": "°C",
        "is_kpi": True,
        "value": 55.0,
        "text": None,
        "ts": first["ts"],
        "stale": False,
        "level": "warning",
    }
    assert first["ts"].endswith("Z")
    assert {r["key"]: r["text"] for r in body["data"] if r["device_key"] == "M1"}["mode"] == "RUN"
    assert [r["stale"] for r in body["data"] if r["device_key"] == "M2"] == [True, True]

    async def keys(**params: Any) -> list[tuple[str, str]]:
        got = await _get(client, admin_a, url, **params)
        return [(r["device_key"], r["key"]) for r in got["data"]]

    assert await keys(device_ids=str(m2.id)) == [("M2", "temp"), ("M2", "rpm")]
    assert await keys(device_ids=f"{m1.id},{m2.id}", parameters="rpm") == [
        ("M1", "rpm"),
        ("M2", "rpm"),
    ]
    assert await keys(kpi_only="true") == [("M1", "temp"), ("M2", "temp")]
    assert await keys(parameters=["temp", "mode"], device_ids=[str(m1.id)]) == [
        ("M1", "temp"),
        ("M1", "mode"),
    ]
    assert await keys(device_ids="999999") == []
    paged = await _get(client, admin_a, url, page=2, per_page=2)
    assert paged["meta"] == {"page": 2, "per_page": 2, "total": 5}
    assert [(r["device_key"], r["key"]) for r in paged["data"]] == [("M1", "rpm"), ("M2", "temp")]
    for bad in ("abc", "1,-2", "0"):
        response = await client.get(url, params={"device_ids": bad}, headers=admin_a.headers)
        assert _error_paths(response) == ["query.device_ids"]
    response = await client.get(url, params={"per_page": 10_001}, headers=admin_a.headers)
    assert _error_paths(response) == ["query.per_page"]

    # A parameter discovered after the directory was loaded shows at once; a changed
    # unit shows once the directory's few seconds have passed.
    await _send(client, m1, [{"ts": now, "values": {"brand_new": 1.0}}])
    assert ("M1", "brand_new") in await keys()
    params = await _get(client, admin_a, f"/api/v1/devices/{m2.id}/parameters")
    rpm = next(p for p in params["data"] if p["key"] == "rpm")
    patched = await client.patch(
        f"/api/v1/devices/{m2.id}/parameters/{rpm['id']}",
        json={"unit": "1/min"},
        headers=admin_a.headers,
    )
    assert patched.status_code == 200
    container.series.ttl_s = 0
    fresh = await _get(client, admin_a, url, device_ids=str(m2.id), parameters="rpm")
    assert fresh["data"][0]["unit"] == "1/min"


# --- energy -----------------------------------------------------------------------------


def _noon_timezone() -> str:
    """A fixed-offset zone where it is about noon now, so 'today' holds the last hours."""
    hour = dt.datetime.now(dt.UTC).hour
    offset = 12 - hour  # -11 .. +12
    return "Etc/GMT" + (f"-{offset}" if offset > 0 else f"+{-offset}" if offset < 0 else "")


async def test_energy_known_power_profiles(
    client: httpx.AsyncClient, make_factory: MakeFactory, login_as: LoginAs
) -> None:
    factory = await make_factory("powerco", timezone=_noon_timezone())
    admin = await login_as(factory, "super_admin")
    press = await keyed_device(client, admin, "PRESS")
    oven = await keyed_device(client, admin, "OVEN")
    await _param(client, press, key="power", unit="kW", is_power=True)
    await _param(client, press, key="aux_power", unit="hp", is_power=True)
    await _param(client, oven, key="power_w", unit="W", is_power=True)
    now = now_ms()
    t0 = now // MINUTE * MINUTE - 40 * MINUTE
    # The press draws 10 kW for exactly 30 minutes, then stops (0 kW) ten minutes ago.
    await _send(
        client,
        press,
        [{"ts": t0 + i * 10_000, "values": {"power": 10.0, "aux_power": 3.0}} for i in range(180)]
        + [{"ts": t0 + 30 * MINUTE, "values": {"power": 0.0}}],
    )
    # The oven draws 2000 W, a point a minute, for the last 20 minutes, still running.
    t1 = now // MINUTE * MINUTE - 20 * MINUTE
    oven_points = [{"ts": t1 + i * MINUTE, "values": {"power_w": 2000}} for i in range(21)]
    await _send(client, oven, [p for p in oven_points if p["ts"] <= now])
    summary = (await _get(client, admin, "/api/v1/energy/summary"))["data"]
    assert summary["timezone"] == factory.timezone
    day_start = dt.datetime.fromisoformat(summary["day_start"].replace("Z", "+00:00"))
    assert day_start.astimezone(kpis.ZoneInfo(factory.timezone)).time() == dt.time(0)
    devices = {d["device_key"]: d for d in summary["devices"]}
    assert devices["PRESS"]["energy_today_kwh"] == pytest.approx(5.0, abs=1e-9)
    assert devices["PRESS"]["current_power_kw"] == 0.0  # its last value is 0 (and stale)
    aux = next(p for p in devices["PRESS"]["parameters"] if p["key"] == "aux_power")
    assert (aux["counted"], aux["power_kw"], aux["energy_today_kwh"]) == (False, None, 0.0)
    assert devices["OVEN"]["current_power_kw"] == pytest.approx(2.0)
    # 2 kW from t1 until now (the last minute's value is held up to now).
    elapsed_h = (now_ms() - t1) / HOUR
    assert devices["OVEN"]["energy_today_kwh"] == pytest.approx(2.0 * elapsed_h, abs=0.01)
    assert summary["current_power_kw"] == pytest.approx(2.0)
    assert summary["energy_today_kwh"] == pytest.approx(5.0 + 2.0 * elapsed_h, abs=0.01)
    one = (await _get(client, admin, f"/api/v1/devices/{press.id}/energy"))["data"]
    assert one["device_key"] == "PRESS" and one["energy_today_kwh"] == pytest.approx(5.0)
    assert one["timezone"] == factory.timezone
    assert {p["key"] for p in one["parameters"]} == {"power", "aux_power"}


async def test_energy_without_power_parameters_is_zero(
    client: httpx.AsyncClient, admin_a: LoggedIn, device_a: KeyedDevice
) -> None:
    summary = (await _get(client, admin_a, "/api/v1/energy/summary"))["data"]
    assert (summary["current_power_kw"], summary["energy_today_kwh"], summary["devices"]) == (
        0.0,
        0.0,
        [],
    )
    one = (await _get(client, admin_a, f"/api/v1/devices/{device_a.id}/energy"))["data"]
    assert (one["current_power_kw"], one["energy_today_kwh"], one["parameters"]) == (0, 0, [])


async def _power_series(client: httpx.AsyncClient, device: KeyedDevice, unit: str = "kW") -> int:
    created = await _param(client, device, key="power", unit=unit, is_power=True)
    series_id: int = created["id"]
    return series_id


async def _write(container: Container, points: list[tuple[int, int, float]]) -> None:
    await Partitions(container.db.engine).ensure(p[1] for p in points)
    async with container.db.engine.begin() as conn:
        await store.write_points(conn, points)


def _utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).astimezone(dt.UTC)


@pytest.mark.parametrize(
    ("now", "day_start", "hours"),
    [
        # spring forward: the local day has 23 hours; noon CEST is 11 h after midnight CET
        ("2026-03-29T12:00:00+02:00", "2026-03-28T23:00:00+00:00", 11),
        # fall back: 25-hour day; noon CET is 13 h after midnight CEST
        ("2026-10-25T12:00:00+01:00", "2026-10-24T22:00:00+00:00", 13),
        ("2026-07-01T12:00:00+02:00", "2026-06-30T22:00:00+00:00", 12),
    ],
)
async def test_energy_today_follows_the_local_day_across_dst(
    client: httpx.AsyncClient,
    container: Container,
    make_factory: MakeFactory,
    login_as: LoginAs,
    now: str,
    day_start: str,
    hours: int,
) -> None:
    factory = await make_factory("berlin", timezone="Europe/Berlin")
    admin = await login_as(factory)
    device = await keyed_device(client, admin, "P1")
    sid = await _power_series(client, device)
    at = _utc(now)
    end = int(at.timestamp() * 1000)
    start = end - (hours + 3) * HOUR  # from before midnight: only today's part counts
    await _write(container, [(sid, ts, 10.0) for ts in range(start, end, MINUTE)])
    async with container.db.engine.begin() as conn:
        row = store.LatestRow(sid, factory.id, device.id, end - MINUTE, 10.0, None)
        await store.write_latest(conn, [row])
    assert kpis.day_start(at, "Europe/Berlin") == _utc(day_start)
    async with container.db.session() as session:
        summary = await kpis.energy_summary(session, factory.id, now=at)
    assert summary.day_start == _utc(day_start)
    assert summary.energy_today_kwh == pytest.approx(10.0 * hours)
    assert summary.current_power_kw == 10.0


def test_day_start_when_midnight_is_skipped() -> None:
    # Chile moves clocks from 00:00 to 01:00 on 2026-09-06: the day starts at 01:00 local.
    at = _utc("2026-09-06T12:00:00-03:00")
    start = kpis.day_start(at, "America/Santiago")
    assert start == _utc("2026-09-06T04:00:00+00:00")
    assert start.astimezone(kpis.ZoneInfo("America/Santiago")).hour == 1
    assert kpis.day_start(at, "Not/AZone") == _utc("2026-09-06T00:00:00+00:00")


async def test_energy_holds_sparse_data_and_caps_silence(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    """A point every 5 minutes counts fully; a silence counts only up to the offline limit."""
    device = await keyed_device(client, admin_a, "SPARSE", offline_after_s=600)
    sid = await _power_series(client, device, unit="MW")
    at = _utc("2026-05-04T12:00:00+00:00")
    noon = int(at.timestamp() * 1000)
    day0 = noon - 12 * HOUR
    points = [(sid, day0 + 30_000 + i * 5 * MINUTE, 0.5) for i in range(12)]  # 00:00:30-00:55:30
    points += [(sid, day0 + 3 * HOUR + 20_000, 1.0)]  # one reading at 03:00:20, then silence
    await _write(container, points)
    async with container.db.session() as session:
        summary = await kpis.energy_summary(session, admin_a.factory_id, now=at)
        one = await kpis.device_energy(session, admin_a.factory_id, device.id, now=at)
    # 0.5 MW from 00:00 to 01:05:30 (the last reading at 00:55:30 held 10 minutes), then
    # 1 MW from 03:00 to 03:10:20 (held 10 minutes after the reading).
    expected = 500 * (65.5 / 60) + 1000 * (10 + 20 / 60) / 60
    assert summary.energy_today_kwh == pytest.approx(expected)
    assert one.energy_today_kwh == pytest.approx(expected)
    assert summary.current_power_kw == 0.0  # nine hours silent: stale
    assert one.parameters[0].stale is True and one.parameters[0].power_kw is None


# --- tenancy and permissions ------------------------------------------------------------


async def test_other_factories_see_nothing(
    client: httpx.AsyncClient, admin_a: LoggedIn, admin_b: LoggedIn
) -> None:
    device = await keyed_device(client, admin_a, "SECRET")
    await _param(client, device, key="power", unit="kW", is_power=True)
    await _send(client, device, [{"ts": now_ms(), "values": {"power": 7.0, "t": 1.0}}])
    for url, params in (
        (f"/api/v1/devices/{device.id}/kpis/live", {}),
        (f"/api/v1/devices/{device.id}/kpis/history", {"parameters": "t"}),
        (f"/api/v1/devices/{device.id}/energy", {}),
    ):
        response = await client.get(url, params=params, headers=admin_b.headers)
        assert_problem(response, 404, "device_not_found")
        assert (await client.get(url, params=params, headers=admin_a.headers)).status_code == 200
    latest = await _get(client, admin_b, "/api/v1/telemetry/latest", device_ids=str(device.id))
    assert latest["data"] == [] and latest["meta"]["total"] == 0
    assert (await _get(client, admin_b, "/api/v1/telemetry/latest"))["data"] == []
    energy = (await _get(client, admin_b, "/api/v1/energy/summary"))["data"]
    assert energy["devices"] == [] and energy["current_power_kw"] == 0.0
    mine = (await _get(client, admin_a, "/api/v1/energy/summary"))["data"]
    assert mine["current_power_kw"] == 7.0


def _all_urls(device_id: int) -> list[tuple[str, dict[str, str]]]:
    return [
        (f"/api/v1/devices/{device_id}/kpis/live", {}),
        (f"/api/v1/devices/{device_id}/kpis/history", {"parameters": "t"}),
        ("/api/v1/telemetry/latest", {}),
        ("/api/v1/energy/summary", {}),
        (f"/api/v1/devices/{device_id}/energy", {}),
    ]


async def test_viewer_reads_and_a_role_without_telemetry_read_is_refused(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    login_as: LoginAs,
    factory_a: Factory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    device = await keyed_device(client, admin_a, "M7")
    await _send(client, device, [{"ts": now_ms(), "values": {"t": 1.0}}])
    viewer = await login_as(factory_a, "viewer")
    for url, params in _all_urls(device.id):
        response = await client.get(url, params=params, headers=viewer.headers)
        assert response.status_code == 200, (url, response.text)
    # Every built-in role may read telemetry; a role without the permission gets 403.
    monkeypatch.setitem(
        permissions.ROLE_PERMISSIONS,
        Role.VIEWER,
        permissions.ROLE_PERMISSIONS[Role.VIEWER] - {"telemetry:read"},
    )
    for url, params in _all_urls(device.id):
        response = await client.get(url, params=params, headers=viewer.headers)
        problem = assert_problem(response, 403, "permission_denied")
        assert problem["permission"] == "telemetry:read"
    anonymous = await client.get("/api/v1/telemetry/latest")
    assert_problem(anonymous, 401)


async def test_energy_today_from_a_kept_prefix_is_exact(container: Container) -> None:
    """Today's integral is (a kept prefix up to a settled minute, extended as minutes
    settle) + (the rest, afresh): the sum equals the integral in one piece, whatever
    the gaps and caps; a late point shows once the prefix is rebuilt."""
    rng = random.Random(5)
    day0 = int(_utc("2026-05-04T00:00:00+00:00").timestamp() * 1000)
    points = []
    for sid in (1, 2, 3):
        ts = day0 - 20 * MINUTE
        while ts < day0 + 14 * HOUR:
            points.append((sid, ts, round(rng.uniform(0, 50), 2)))
            ts += rng.choice([7_000, 45_000, 4 * MINUTE, 13 * MINUTE, 2 * HOUR])
    await _write(container, points)
    caps = {1: 300_000, 2: 600_000, 3: 3_600_000}

    async def check(now: int) -> None:
        whole = await queries.energy_integrals(conn, caps, day0, now)
        for _ in range(2):  # computed, then from the kept prefix
            split = await kpis._energy_today(conn, caps, day0, now)
            for sid in caps:
                assert split[sid] == pytest.approx(whole.get(sid, 0.0)), (sid, now)

    async with container.db.engine.connect() as conn:
        # Forward in time (the prefix grows), then back (answered without it).
        for now in (
            day0 + 30 * MINUTE,
            day0 + 9 * HOUR + 5,
            day0 + 9 * HOUR + 3 * MINUTE + 7,
            day0 + 13 * HOUR + 17 * MINUTE + 5,
            day0 + 2 * HOUR,
        ):
            await check(now)
        now = day0 + 13 * HOUR + 20 * MINUTE
        before = await kpis._energy_today(conn, caps, day0, now)
    # A late point inside the kept prefix: counted after the background rebuild.
    await _write(container, [(1, day0 + 6 * HOUR + 30_000, 5_000.0)])
    async with container.db.engine.connect() as conn:
        assert (await kpis._energy_today(conn, caps, day0, now))[1] == pytest.approx(before[1])
        [prefix] = kpis._prefixes[container.db.engine.sync_engine].values()
        prefix.built -= kpis.ENERGY_REBUILD_S + 1
        await kpis._energy_today(conn, caps, day0, now)
        assert prefix.rebuild is not None
        await prefix.rebuild
        await check(now)
        assert (await kpis._energy_today(conn, caps, day0, now))[1] > before[1]


async def test_latest_values_come_from_memory_and_see_other_processes(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    """The dashboard read is answered from memory: this process's points show at once,
    points another process committed (here written straight to the table) show once the
    cache's refresh interval has passed, and a reload never steps back to an older value."""
    device = await keyed_device(client, admin_a, "M1")
    now = now_ms()
    url = "/api/v1/telemetry/latest"

    async def temp() -> float:
        rows = (await _get(client, admin_a, url))["data"]
        return float({r["key"]: r["value"] for r in rows}["temp"])

    await _send(client, device, [{"ts": now - 5000, "values": {"temp": 20}}])
    assert await temp() == 20.0
    await _send(client, device, [{"ts": now - 4000, "values": {"temp": 21}}])
    assert await temp() == 21.0  # written through by this process's ingest

    sid = (await _get(client, admin_a, url))["data"][0]["parameter_id"]
    other = [store.LatestRow(sid, device.owner.factory_id, device.id, now - 3000, 22.0, None)]
    async with container.db.engine.begin() as conn:  # another process's commit
        await store.write_latest(conn, other)
    container.latest.refresh_s = 0.0
    assert await temp() == 22.0

    # A point applied in memory that the table does not have yet survives a reload.
    container.latest.apply([(sid, device.owner.factory_id, device.id, now - 1000, 23.0, None)])
    assert await temp() == 23.0
