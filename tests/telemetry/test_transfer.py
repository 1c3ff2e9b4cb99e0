"""Telemetry import (CSV/Parquet backfill through the pipeline) and streamed export."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import text

from plantwatch.app import Container
from plantwatch.telemetry import transfer
from plantwatch.tenancy.models import Factory
from tests.conftest import LoggedIn, LoginAs, assert_problem
from tests.telemetry.conftest import keyed_device

# 2019: far outside the live skew limit (7 days), so only a backfill can store it.
T0 = 1_546_300_800_000  # 2019-01-01T00:00:00Z
MINUTE = 60_000


async def _rows(container: Container, sql: str) -> list[Any]:
    async with container.db.engine.connect() as conn:
        return [tuple(r) for r in await conn.execute(text(sql))]


async def _import(
    client: httpx.AsyncClient, user: LoggedIn, body: bytes, *, multipart: bool = True, **kw: Any
) -> httpx.Response:
    if multipart:
        return await client.post(
            "/api/v1/telemetry/import",
            files={"file": ("data.csv", body, "text/csv")},
            headers=user.headers,
        )
    return await client.post(
        "/api/v1/telemetry/import",
        content=body,
        headers={**user.headers, "Content-Type": kw.get("content_type", "text/csv")},
    )


async def _export(client: httpx.AsyncClient, user: LoggedIn, **params: Any) -> httpx.Response:
    return await client.get("/api/v1/telemetry/export", params=params, headers=user.headers)


def _csv_points(body: bytes) -> set[tuple[str, str, str, str]]:
    reader = csv.DictReader(io.StringIO(body.decode()))
    assert reader.fieldnames == ["device_key", "parameter", "timestamp", "value"]
    return {(r["device_key"], r["parameter"], r["timestamp"], r["value"]) for r in reader}


async def test_wide_csv_import_backfills_through_the_pipeline(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    m01 = await keyed_device(client, admin_a, "M01")
    await keyed_device(client, admin_a, "M02")
    body = (
        "device_key,timestamp,temp,cycles,running,mode,pressure\n"
        # ISO with Z, with an offset, naive (= UTC), epoch ms
        "M01,2019-01-01T00:00:00Z,61.5,100,true,AUTO,\n"
        "M01,2019-01-01T01:00:00+01:00,61.5,100,true,AUTO,\n"  # same instant: a duplicate
        f"M01,2019-01-01T00:01:00,62.25,101,false,MANUAL,4.5\n"
        f"M02,{T0 + 2 * MINUTE},70,7,TRUE,AUTO,n/a\n"
        f"M02,{T0 + 3 * MINUTE},nan,8,false,,\n"
        f"X9,{T0},1,2,true,AUTO,3\n"
        f"X9,{T0 + MINUTE},1,2,true,AUTO,3\n"
        "M01,not-a-time,1,1,true,AUTO,1\n"
        ",,,,,,\n"  # an empty row: skipped
    ).encode()
    response = await _import(client, admin_a, body)
    assert response.status_code == 200, response.text
    report = response.json()["data"]
    assert report["format"] == "csv" and report["layout"] == "wide"
    assert report["rows"] == 8
    assert report["rejected_by_reason"] == {
        "unknown_device": 2,  # X9's two rows
        "invalid_value_type": 1,  # 'n/a' in the numeric column pressure
        "non_finite_value": 1,  # nan
        "invalid_timestamp": 1,
    }
    assert report["unknown_devices"] == ["X9"]
    assert report["devices"] == 2
    assert report["first_timestamp"] == "2019-01-01T00:00:00.000Z"
    assert report["last_timestamp"] == "2019-01-01T00:03:00.000Z"
    # M01: 2 instants x (temp, cycles, running) + pressure once = 7; M02: 3 + 2 (not
    # nan) = 5; states: the newest per parameter per message (M01 mode, M02 mode).
    assert await _rows(container, "SELECT count(*) FROM telemetry_raw") == [(12,)]
    assert report["values_stored"] == 12 + 2
    # Rollups and discovery behave as for live ingest.
    assert await _rows(container, "SELECT sum(cnt) FROM telemetry_1h") == [(12,)]
    params = await client.get(f"/api/v1/devices/{m01.id}/parameters", headers=admin_a.headers)
    kinds = {p["key"]: p["data_type"] for p in params.json()["data"]}
    assert kinds == {
        "temp": "float",
        "cycles": "int",
        "running": "bool",
        "mode": "string",
        "pressure": "float",
    }
    latest = await _rows(
        container,
        "SELECT l.text FROM series_latest l JOIN device_parameters p ON p.id = l.series_id "
        "JOIN devices d ON d.id = p.device_id WHERE d.device_key = 'M01' AND p.key = 'mode'",
    )
    assert latest == [("MANUAL",)]
    dead = await client.get(
        "/api/v1/dead-letters", params={"source": "import"}, headers=admin_a.headers
    )
    letters = dead.json()["data"]
    assert sorted(d["reason"] for d in letters) == [
        "invalid_timestamp",
        "invalid_value_type",
        "non_finite_value",
        "unknown_device",
    ]
    unknown = next(d for d in letters if d["reason"] == "unknown_device")
    assert unknown["device_key"] == "X9"
    # The unknown device's rows are kept whole, as a payload that can be replayed.
    assert [e["ts"] for e in json.loads(unknown["payload"])] == [T0, T0 + MINUTE]

    # Importing the same file again stores nothing twice.
    again = await _import(client, admin_a, body)
    assert again.status_code == 200
    assert await _rows(container, "SELECT count(*) FROM telemetry_raw") == [(12,)]
    assert await _rows(container, "SELECT sum(cnt) FROM telemetry_1m") == [(12,)]


async def test_round_trip_csv_json_and_parquet_into_another_factory(
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    admin_b: LoggedIn,
) -> None:
    for key in ("P1", "P2"):
        await keyed_device(client, admin_a, key)
        await keyed_device(client, admin_b, key)
    lines = ["device_key,timestamp,flow,count,on"]
    for i in range(300):
        lines.append(f"P1,{T0 + i * 1000},{i * 0.1 + 1 / 3!r},{i},{'true' if i % 2 else 'false'}")
        lines.append(f"P2,{T0 + i * 1500},{-i * 2.5e-7},{i * 3},")
    imported = await _import(client, admin_a, "\n".join(lines).encode(), multipart=False)
    assert imported.status_code == 200, imported.text
    assert imported.json()["data"]["values_stored"] == 300 * 3 + 300 * 2

    exported = await _export(client, admin_a)
    assert exported.status_code == 200, exported.text
    assert exported.headers["content-type"].startswith("text/csv")
    assert "attachment" in exported.headers["content-disposition"]
    points_a = _csv_points(exported.content)
    assert len(points_a) == 1500
    assert ("P1", "on", "2019-01-01T00:00:01.000Z", "true") in points_a
    assert ("P1", "count", "2019-01-01T00:00:05.000Z", "5") in points_a

    # CSV export -> import into factory B -> export from B: the same points.
    into_b = await _import(client, admin_b, exported.content)
    assert into_b.status_code == 200, into_b.text
    assert into_b.json()["data"]["layout"] == "long"
    assert _csv_points((await _export(client, admin_b)).content) == points_a
    async with container.db.engine.begin() as conn:
        await conn.execute(
            text(
                "DELETE FROM telemetry_raw WHERE series_id IN (SELECT p.id FROM "
                "device_parameters p JOIN devices d ON d.id = p.device_id "
                f"WHERE d.factory_id = {admin_b.factory_id})"
            )
        )

    # Parquet export -> raw-body import into B.
    parquet = await _export(client, admin_a, format="parquet")
    assert parquet.status_code == 200
    assert parquet.headers["content-type"] == "application/vnd.apache.parquet"
    table = pq.read_table(io.BytesIO(parquet.content))
    assert table.num_rows == 1500
    assert table.schema.field("timestamp").type == pa.timestamp("ms", tz="UTC")
    into_b = await _import(
        client,
        admin_b,
        parquet.content,
        multipart=False,
        content_type="application/vnd.apache.parquet",
    )
    assert into_b.status_code == 200, into_b.text
    assert into_b.json()["data"]["format"] == "parquet"
    assert into_b.json()["data"]["values_stored"] == 1500
    assert _csv_points((await _export(client, admin_b)).content) == points_a

    # NDJSON: one point per line, typed values.
    ndjson = await _export(client, admin_a, format="json", parameters="on,count")
    assert ndjson.headers["content-type"].startswith("application/x-ndjson")
    records = [json.loads(line) for line in ndjson.text.splitlines()]
    assert len(records) == 300 + 600
    assert {r["parameter"] for r in records} == {"on", "count"}
    assert records[0] == {
        "device_key": "P1",
        "parameter": "count",
        "timestamp": "2019-01-01T00:00:00.000Z",
        "value": 0,
    }
    assert {type(r["value"]) for r in records if r["parameter"] == "on"} == {bool}


async def test_wide_parquet_with_typed_columns(
    client: httpx.AsyncClient, container: Container, admin_a: LoggedIn
) -> None:
    await keyed_device(client, admin_a, "Q1")
    table = pa.table(
        {
            "device_key": ["Q1", "Q1", "Q1", "NOPE"],
            "timestamp": pa.array([T0, T0 + 1000, T0 + 2000, T0], pa.timestamp("ms", tz="UTC")),
            "speed": pa.array([1.5, None, float("inf"), 1.0], pa.float64()),
            "count": pa.array([1, 2, 3, 4], pa.int32()),
            "state": ["RUN", "RUN", "STOP", "RUN"],
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    response = await _import(client, admin_a, sink.getvalue())
    assert response.status_code == 200, response.text
    report = response.json()["data"]
    assert report["format"] == "parquet"
    assert report["rejected_by_reason"] == {"non_finite_value": 1, "unknown_device": 1}
    assert await _rows(container, "SELECT count(*) FROM telemetry_raw") == [(4,)]
    kinds = dict(await _rows(container, "SELECT key, data_type FROM device_parameters"))
    assert kinds == {"speed": "float", "count": "int", "state": "string"}


async def test_export_is_tenant_scoped_filtered_and_paged(
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    admin_b: LoggedIn,
    login_as: LoginAs,
    factory_a: Factory,
) -> None:
    a1 = await keyed_device(client, admin_a, "A1")
    b1 = await keyed_device(client, admin_b, "B1")
    rows_a = "\n".join(f"A1,{T0 + i * 1000},{i},{i * 2}" for i in range(50))
    rows_b = "\n".join(f"B1,{T0 + i * 1000},{i},{i * 2}" for i in range(50))
    head = "device_key,timestamp,x,y\n"
    assert (await _import(client, admin_a, (head + rows_a).encode())).status_code == 200
    assert (await _import(client, admin_b, (head + rows_b).encode())).status_code == 200

    everything = _csv_points((await _export(client, admin_a)).content)
    assert len(everything) == 100 and {p[0] for p in everything} == {"A1"}
    # Another factory's device id is not found, never exported.
    missing = await _export(client, admin_a, device_ids=f"{a1.id},{b1.id}")
    assert_problem(missing, 404, "device_not_found")
    # Filters: device, parameter and [start, end).
    window = await _export(
        client,
        admin_a,
        device_ids=str(a1.id),
        parameters="y",
        start="2019-01-01T00:00:10Z",
        end="2019-01-01T00:00:20Z",
    )
    points = _csv_points(window.content)
    assert len(points) == 10 and {p[1] for p in points} == {"y"}
    assert min(p[2] for p in points) == "2019-01-01T00:00:10.000Z"
    assert_problem(
        await _export(client, admin_a, start="2019-01-02T00:00:00Z", end="2019-01-01T00:00:00Z"),
        422,
    )
    assert_problem(await _export(client, admin_a, start="2019-01-02T00:00:00"), 422)
    # A viewer may export (telemetry:read) but not import (telemetry:write).
    viewer = await login_as(factory_a, "viewer")
    assert (await _export(client, viewer)).status_code == 200
    assert_problem(await _import(client, viewer, b"device_key,timestamp\n"), 403)

    # Keyset paging: tiny pages cross series boundaries, each point exactly once, in order.
    async with container.db.session() as session:
        series = await transfer.export_series(session, admin_a.factory_id)
    pages = [p async for p in transfer.iter_points(container.db, series, page_rows=7)]
    assert max(len(p) for p in pages) <= 7 and len(pages) == 15
    flat = [(info.parameter, ts) for page in pages for info, ts, _ in page]
    assert flat == sorted(flat) and len(set(flat)) == 100


async def test_bad_files_are_refused_whole(
    client: httpx.AsyncClient,
    container: Container,
    admin_a: LoggedIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for body, fragment in [
        (b"", "empty"),
        (b"device,ts,x\nM1,1,2\n", "no 'device_key' column"),
        (b"device_key,timestamp,x,x\n", "twice"),
        (b"\xff\xfe\x00binary", "not UTF-8"),
        (b"PAR1 not really parquet", "Parquet"),
    ]:
        response = await _import(client, admin_a, body)
        problem = assert_problem(response, 422, "invalid_import_file")
        assert fragment in problem["detail"]
    no_file = await client.post(
        "/api/v1/telemetry/import", files={"note": (None, "x")}, headers=admin_a.headers
    )
    assert "without a file" in assert_problem(no_file, 422, "invalid_import_file")["detail"]
    monkeypatch.setattr("plantwatch.telemetry.transfer_routes.MAX_IMPORT_BYTES", 64)
    too_big = await _import(client, admin_a, b"device_key,timestamp,x\n" + b"M,1,1\n" * 20)
    assert_problem(too_big, 413, "payload_too_large")
    too_big_raw = await _import(client, admin_a, b"device_key,timestamp,x\n" * 10, multipart=False)
    assert_problem(too_big_raw, 413, "payload_too_large")
    assert await _rows(container, "SELECT count(*) FROM telemetry_raw") == [(0,)]
