"""`plantwatch import telemetry` and `plantwatch export telemetry` on both backends."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
from sqlalchemy import text

from plantwatch.assets.models import Device
from plantwatch.core.db import Database
from plantwatch.tenancy import service as tenancy_service
from tests.cli.conftest import Cli, run_async

T0 = 1_262_304_000_000  # 2010-01-01T00:00:00Z: history from long ago
STEP = 600_000  # 10 minutes


def _setup(cli: Cli, slug: str, keys: list[str]) -> None:
    created = cli("admin", "create-factory", "--name", slug.title(), "--slug", slug)
    assert created.exit_code == 0, created.stderr

    async def add() -> None:
        db = Database(cli.settings.resolved_database_url)
        try:
            async with db.session() as session:
                factory = await tenancy_service.factory_by_slug(session, slug)
                session.add_all(Device(factory_id=factory.id, device_key=k, name=k) for k in keys)
                await session.commit()
        finally:
            await db.dispose()

    run_async(add)


def _scalar(cli: Cli, sql: str) -> int:
    async def query() -> int:
        db = Database(cli.settings.resolved_database_url)
        try:
            async with db.engine.connect() as conn:
                return int((await conn.execute(text(sql))).scalar_one())
        finally:
            await db.dispose()

    return run_async(query)


def _points(path: Path) -> set[tuple[str, ...]]:
    with path.open(newline="") as fh:
        return {tuple(row) for row in csv.reader(fh)} - {
            ("device_key", "parameter", "timestamp", "value")
        }


def test_import_export_round_trip_between_factories(cli: Cli, tmp_path: Path) -> None:
    _setup(cli, "north", ["M1", "M2"])
    _setup(cli, "south", ["M1", "M2"])
    source = tmp_path / "history.csv"
    lines = ["device_key,timestamp,temp,count,mode"]
    for i in range(2_000):  # spans chunks of 5,000 values and two weeks
        lines.append(f"M1,{T0 + i * STEP},{20 + i % 7 * 0.5},{i},RUN")
        lines.append(f"M2,{T0 + i * STEP},{30 - i % 5 * 0.25},{i * 2},")
    lines.append(f"GHOST,{T0},1,1,RUN")
    source.write_text("\n".join(lines) + "\n")

    result = cli("import", "telemetry", str(source), "--factory", "north")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "Imported history.csv into factory 'north' (csv, wide)" in out
    assert "Rows:       4001" in out
    assert "8001 values of 2 devices" in out  # 8,000 samples + M1's latest mode
    assert "unknown_device" in out and "Unknown:    GHOST" in out
    assert "2010-01-01T00:00:00.000Z .. 2010-01-14T21:10:00.000Z" in out
    assert _scalar(cli, "SELECT count(*) FROM telemetry_raw") == 8_000

    exported = tmp_path / "north.csv"
    result = cli("export", "telemetry", "--factory", "north", "--out", str(exported))
    assert result.exit_code == 0, result.stderr
    assert "Exported 8000 points of 4 series" in result.stdout
    north = _points(exported)
    assert len(north) == 8_000
    assert ("M1", "count", "2010-01-01T00:10:00.000Z", "1") in north

    # Parquet (format from the extension) -> import into south -> CSV export: equal.
    parquet = tmp_path / "north.parquet"
    result = cli("export", "telemetry", "--factory", "north", "--out", str(parquet))
    assert result.exit_code == 0, result.stderr
    assert pq.read_metadata(parquet).num_rows == 8_000
    result = cli("import", "telemetry", str(parquet), "--factory", "south")
    assert result.exit_code == 0, result.stderr
    assert "(parquet, long)" in result.stdout
    south = tmp_path / "south.csv"
    assert cli("export", "telemetry", "--factory", "south", "--out", str(south)).exit_code == 0
    assert _points(south) == north

    # Filters, a window, NDJSON on stdout.
    result = cli(
        "export", "telemetry", "--factory", "north", "--device", "M2", "--parameter", "count",
        "--start", "2010-01-01T10:00:00Z", "--end", str(T0 + 120 * STEP),
        "--format", "json", "--out", "-",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in io.StringIO(result.stdout)]
    assert [r["value"] for r in records] == [i * 2 for i in range(60, 120)]
    assert "Exported 60 points of 1 series to stdout" in result.stderr


def test_import_reports_what_it_could_not_store(cli: Cli, tmp_path: Path) -> None:
    _setup(cli, "acme", ["M1"])
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("device_key,timestamp,x\nNOPE,2020-01-01T00:00:00Z,1\n")
    result = cli("import", "telemetry", str(unknown), "--factory", "acme")
    assert result.exit_code == 1
    assert "nothing was stored" in result.stderr and "Traceback" not in result.stderr
    assert "unknown_device" in result.stdout
    assert (
        _scalar(cli, "SELECT count(*) FROM dead_letters WHERE source = 'import' AND "
                "reason = 'unknown_device' AND device_key = 'NOPE'")
        == 1
    )  # fmt: skip

    bad = tmp_path / "bad.csv"
    bad.write_text("device,ts\nM1,1\n")
    result = cli("import", "telemetry", str(bad), "--factory", "acme")
    assert result.exit_code == 1 and "no 'device_key' column" in result.stderr

    good = tmp_path / "good.csv"
    good.write_text("device_key,timestamp,x\nM1,2020-01-01T00:00:00Z,1\n")
    result = cli("import", "telemetry", str(good), "--factory", "nope")
    assert result.exit_code == 1 and "no factory 'nope'" in result.stderr

    result = cli("export", "telemetry", "--factory", "acme", "--device", "B9", "--out", "-")
    assert result.exit_code == 1 and "no devices ['B9']" in result.stderr
    result = cli("export", "telemetry", "--factory", "acme", "--start", "soon", "--out", "-")
    assert result.exit_code == 2 and "'soon' is not ISO-8601" in result.stderr
    result = cli(
        "export", "telemetry", "--factory", "acme", "--start", "2020-01-02", "--end",
        "2020-01-01", "--out", "-",
    )  # fmt: skip
    assert result.exit_code == 2


def test_import_needs_a_migrated_database(fresh_cli: Cli, tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text("device_key,timestamp,x\nM1,2020-01-01T00:00:00Z,1\n")
    result = fresh_cli("import", "telemetry", str(good), "--factory", "acme")
    assert result.exit_code == 1
    assert "run `plantwatch migrate` first" in result.stderr
