"""`plantwatch import telemetry`, `plantwatch export telemetry` and `plantwatch simulate`.

Registered on the main group by `plantwatch.cli` (`COMMANDS`). The shared CLI
helpers (settings, error conventions, signal handling) are imported from
`plantwatch.cli` inside the commands, because `plantwatch.cli` imports this
module while it loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

import click
import httpx

from plantwatch import simulator
from plantwatch.app import Container
from plantwatch.core.config import Settings
from plantwatch.telemetry import transfer
from plantwatch.tenancy import audit
from plantwatch.tenancy import service as tenancy_service

ADMIN_EMAIL_ENV = "PLANTWATCH_SIM_ADMIN_EMAIL"
ADMIN_PASSWORD_ENV = "PLANTWATCH_SIM_ADMIN_PASSWORD"  # noqa: S105 (a variable name)


def _instant(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """--start/--end: ISO-8601 (no offset = UTC) or epoch ms, as epoch ms."""
    if value is None:
        return None
    ms = transfer.parse_time(value)
    if ms is None:
        raise click.BadParameter(
            f"{value!r} is not ISO-8601 (e.g. 2026-02-19T10:30:00Z) nor epoch ms"
        )
    return ms


async def _factory_id(container: Container, slug: str) -> int:
    async with container.db.session() as session:
        factory = await tenancy_service.factory_by_slug(session, slug)  # NotFound -> CliError
        return factory.id


async def _audit(container: Container, factory_id: int, action: str, after: dict[str, Any]) -> None:
    from plantwatch.cli import CLI_ACTOR

    async with container.db.session() as session:
        actor = tenancy_service.SystemActor(factory_id, email=CLI_ACTOR)
        audit.record(session, actor, action, "telemetry", None, after=after)
        await session.commit()


@contextlib.asynccontextmanager
async def _container(settings: Settings) -> AsyncIterator[Container]:
    """A container on the configured database, checked to be at the schema head."""
    from plantwatch.cli import _require_schema

    settings.ensure_data_dir()
    await _require_schema(settings.resolved_database_url)
    container = Container.build(settings)
    try:
        yield container
    finally:
        await container.close()


# --- import ------------------------------------------------------------------------------


@click.group("import")
def import_group() -> None:
    """Load data into plantwatch (works without the API running)."""


@import_group.command("telemetry")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--factory", "factory_slug", required=True, metavar="SLUG", help="Factory slug.")
def import_telemetry(file: Path, factory_slug: str) -> None:
    """Import (backfill) telemetry of any age from a CSV or Parquet FILE.

    Layouts: `device_key,timestamp,<one column per parameter>` or
    `device_key,parameter,timestamp,value` (what `export telemetry` writes).
    Timestamps: ISO-8601 (no offset = UTC) or epoch milliseconds. Every row
    goes through the ingest pipeline; rows of unknown devices and bad cells
    become dead letters (source `import`). Exit 1 if nothing could be stored.
    """
    from plantwatch.cli import CliError, _run, load_settings

    settings = load_settings()
    report = _run(_import(settings, file, factory_slug))
    _print_report(report, file, factory_slug)
    if report.values_stored == 0:
        raise CliError("nothing was stored (see the rejects above and the dead letters)")


def _progress(report: transfer.ImportReport) -> None:
    click.echo(
        f"\r  ... {report.rows} rows, {report.values_stored} values stored", nl=False, err=True
    )


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


async def _import(settings: Settings, path: Path, factory_slug: str) -> transfer.ImportReport:
    async with _container(settings) as container:
        factory_id = await _factory_id(container, factory_slug)
        await container.start()
        tty = _stderr_is_tty()
        with path.open("rb") as fh:
            report = await transfer.import_file(
                container.db,
                container.pipeline,
                factory_id,
                fh,
                progress=_progress if tty else None,
            )
        if tty:
            click.echo("", err=True)
        summary = report.as_dict()
        await _audit(
            container,
            factory_id,
            "telemetry.import",
            {"file": path.name, **{k: summary[k] for k in ("rows", "values_stored", "rejected")}},
        )
        return report


def _print_report(report: transfer.ImportReport, path: Path, factory_slug: str) -> None:
    echo = click.echo
    echo(f"Imported {path.name} into factory '{factory_slug}' ({report.format}, {report.layout})")
    rows = [
        ("Rows", str(report.rows)),
        ("Stored", f"{report.values_stored} values of {report.devices} devices"),
        ("Rejected", f"{report.rejected_total} (dead letters, source 'import')"),
    ]
    for label, value in rows:
        echo(f"  {label + ':':<12}{value}")
    for reason, count in sorted(report.rejected.items()):
        echo(f"    {reason:<24}{count}")
    if report.unknown_devices:
        echo(f"  {'Unknown:':<12}{', '.join(report.unknown_devices)}")
    if report.first_ts is not None and report.last_ts is not None:
        span = f"{transfer.iso_ms(report.first_ts)} .. {transfer.iso_ms(report.last_ts)}"
        echo(f"  {'Time range:':<12}{span}")


# --- export ------------------------------------------------------------------------------


@click.group("export")
def export_group() -> None:
    """Write data out of plantwatch (works without the API running)."""


@export_group.command("telemetry")
@click.option("--factory", "factory_slug", required=True, metavar="SLUG", help="Factory slug.")
@click.option(
    "--start", callback=_instant, metavar="TIME", help="From (inclusive): ISO-8601 or epoch ms."
)
@click.option(
    "--end", callback=_instant, metavar="TIME", help="Until (exclusive): ISO-8601 or epoch ms."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "json", "parquet"]),
    help="csv, json (NDJSON) or parquet [default: from --out's extension, else csv].",
)
@click.option("--device", "devices", multiple=True, metavar="KEY", help="Only this device.")
@click.option("--parameter", "parameters", multiple=True, metavar="KEY", help="Only this one.")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="File to write; '-' writes to stdout.",
)
def export_telemetry(
    factory_slug: str,
    start: int | None,
    end: int | None,
    fmt: str | None,
    devices: tuple[str, ...],
    parameters: tuple[str, ...],
    out: str,
) -> None:
    """Export raw telemetry of a factory as CSV, NDJSON or Parquet, streamed.

    Columns: device_key, parameter, timestamp (ISO-8601 UTC), value. The output
    imports back with `plantwatch import telemetry`.
    """
    from plantwatch.cli import _run, load_settings

    if start is not None and end is not None and start >= end:
        raise click.BadParameter("must be after --start", param_hint="'--end'")
    if fmt is None:
        suffix = Path(out).suffix.lower().lstrip(".")
        fmt = {"parquet": "parquet", "json": "json", "ndjson": "json"}.get(suffix, "csv")
    settings = load_settings()
    points, series = _run(
        _export(
            settings,
            factory_slug,
            fmt,
            start,
            end,
            list(devices) or None,
            list(parameters) or None,
            out,
        )
    )
    where = "stdout" if out == "-" else out
    click.echo(f"Exported {points} points of {series} series to {where} ({fmt})", err=out == "-")


@contextlib.contextmanager
def _output(out: str) -> Iterator[IO[bytes]]:
    """stdout, or a file that appears only once complete (no half-written exports)."""
    if out == "-":
        yield click.get_binary_stream("stdout")
        return
    target = Path(out)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            yield fh
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


async def _export(
    settings: Settings,
    factory_slug: str,
    fmt: str,
    start: int | None,
    end: int | None,
    devices: list[str] | None,
    parameters: list[str] | None,
    out: str,
) -> tuple[int, int]:
    async with _container(settings) as container:
        async with container.db.session() as session:
            factory = await tenancy_service.factory_by_slug(session, factory_slug)
            factory_id = factory.id
            series = await transfer.export_series(
                session, factory_id, device_keys=devices, parameters=parameters
            )
        count = transfer.ExportCount()
        export_format: transfer.ExportFormat = (
            "parquet" if fmt == "parquet" else "json" if fmt == "json" else "csv"
        )
        with _output(out) as fh:
            async for chunk in transfer.export_stream(
                container.db, series, export_format, start, end, count=count
            ):
                fh.write(chunk)
            fh.flush()
        await _audit(
            container,
            factory_id,
            "telemetry.export",
            {"format": fmt, "series": len(count.series), "points": count.points},
        )
        return count.points, len(count.series)


# --- simulate ----------------------------------------------------------------------------


@click.command()
@click.option(
    "--url",
    default="http://127.0.0.1:8000",
    show_default=True,
    envvar="PLANTWATCH_SIM_URL",
    help="plantwatch's base URL (HTTP transport and --provision).",
)
@click.option("--factory", "factory_slug", default="demo", show_default=True, metavar="SLUG")
@click.option("--devices", type=click.IntRange(1, 100_000), help="Simulate N devices.")
@click.option("--all", "all_devices", is_flag=True, help="Every device with a key (default).")
@click.option(
    "--rate",
    type=click.FloatRange(0.01, 100),
    default=1.0,
    show_default=True,
    help="Messages per device per second.",
)
@click.option("--transport", type=click.Choice(["http", "mqtt"]), default="http", show_default=True)
@click.option(
    "--mqtt-url",
    default="mqtt://127.0.0.1:1883",
    show_default=True,
    envvar="PLANTWATCH_SIM_MQTT_URL",
    help="Broker for --transport mqtt (mqtts:// for TLS).",
)
@click.option("--duration", type=click.FloatRange(0, min_open=True), help="Seconds to run.")
@click.option(
    "--degrade",
    type=click.IntRange(0),
    default=1,
    show_default=True,
    help="How many machines wear out to failure.",
)
@click.option(
    "--failure-after",
    type=click.FloatRange(0.1),
    default=simulator.DEFAULT_FAILURE_AFTER_S / 60,
    show_default=True,
    help="Minutes until a degrading machine fails (then FAULT, repair, again).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same data.")
@click.option("--timezone", help="Timezone of the shifts [default: the factory's].")
@click.option(
    "--keys-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Device keys [default: <data dir>/simulator-<factory>.json].",
)
@click.option("--provision", is_flag=True, help="Log in as an admin, issue keys, save them.")
@click.option("--admin-email", envvar=ADMIN_EMAIL_ENV, show_envvar=True)
@click.option("--admin-password", envvar=ADMIN_PASSWORD_ENV, show_envvar=True)
def simulate(
    url: str,
    factory_slug: str,
    devices: int | None,
    all_devices: bool,
    rate: float,
    transport: str,
    mqtt_url: str,
    duration: float | None,
    degrade: int,
    failure_after: float,
    seed: int,
    timezone: str | None,
    keys_file: Path | None,
    provision: bool,
    admin_email: str | None,
    admin_password: str | None,
) -> None:
    """Publish realistic telemetry of a factory's machines over HTTP or MQTT.

    Machines of the demo catalogue with correlated parameters, shifts, noise,
    counters, a RUNNING/IDLE/FAULT state and machines that degrade to failure.
    Devices authenticate with their own keys: `--provision` logs in as an
    admin and issues them (and registers `sim-*` devices when --devices asks
    for more than the factory has); otherwise they are read from --keys-file.
    Runs until Ctrl+C or --duration. See docs/simulator.md.
    """
    from plantwatch.cli import CliError, load_settings

    if devices is not None and all_devices:
        raise click.UsageError("give --devices N or --all, not both")
    if transport == "mqtt":
        try:
            simulator.parse_mqtt_url(mqtt_url)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--mqtt-url'") from None
    if keys_file is None:
        keys_file = load_settings().data_dir / f"simulator-{factory_slug}.json"
    if provision:
        if not admin_email:
            raise click.UsageError(f"--provision needs --admin-email (or {ADMIN_EMAIL_ENV})")
        if not admin_password:
            if not sys.stdin.isatty():
                raise click.UsageError(
                    f"--provision needs --admin-password (or {ADMIN_PASSWORD_ENV})"
                )
            admin_password = click.prompt("Admin password", hide_input=True)
        keys = _provision(url, factory_slug, admin_email, admin_password or "", devices)
        keys.save(keys_file)
        click.echo(f"Issued keys for {len(keys.devices)} devices; saved in {keys_file}")
    else:
        if not keys_file.exists():
            raise CliError(
                f"no keys file {keys_file}: run once with --provision (and an admin login)"
            )
        try:
            keys = simulator.KeysFile.load(keys_file)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        if keys.factory != factory_slug:
            raise CliError(f"{keys_file} holds keys of factory '{keys.factory}'")
    chosen = keys.devices if devices is None else keys.devices[:devices]
    if devices is not None and len(chosen) < devices:
        raise CliError(
            f"only {len(chosen)} devices have keys; run with --provision --devices {devices}"
        )
    if not chosen:
        raise CliError(f"no devices of a simulated kind in factory '{factory_slug}'")
    try:
        sim = simulator.Simulation(
            [simulator.SimDevice(k.device_key, k.kind) for k in chosen],
            seed=seed,
            degrade=degrade,
            failure_after_s=failure_after * 60,
            timezone=timezone or keys.timezone,
        )
    except (ValueError, KeyError) as exc:
        raise click.BadParameter(str(exc)) from None
    degrading = ", ".join(m.device_key for m in sim.degrading) or "none"
    click.echo(
        f"Simulating {len(chosen)} machines of factory '{factory_slug}' at {rate:g} Hz over "
        f"{transport.upper()} ({url if transport == 'http' else mqtt_url}); degrading: "
        f"{degrading}. Ctrl+C stops."
    )
    key_map = {k.device_key: k.key for k in chosen}
    stats = _run_simulation(sim, transport, url, mqtt_url, factory_slug, key_map, rate, duration)
    click.echo(
        f"Sent {stats.sent} messages ({stats.values} values) in {stats.ticks} ticks; "
        f"{stats.failed} failed, {stats.late_ticks} late"
    )
    if stats.sent == 0:
        raise CliError(f"nothing was delivered: {stats.last_error or 'no ticks'}")


def _provision(
    url: str, factory_slug: str, email: str, password: str, devices: int | None
) -> simulator.KeysFile:
    from plantwatch.cli import CliError, _run

    async def go() -> simulator.KeysFile:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await simulator.provision(client, factory_slug, email, password, devices=devices)

    try:
        return _run(go())
    except simulator.ProvisionError as exc:
        raise CliError(str(exc)) from None
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach {url}: {exc}") from None


def _run_simulation(
    sim: simulator.Simulation,
    transport: str,
    url: str,
    mqtt_url: str,
    factory_slug: str,
    keys: dict[str, str],
    rate: float,
    duration: float | None,
) -> simulator.RunStats:
    from plantwatch.cli import CliError, Shutdown, _run

    async def go() -> simulator.RunStats:
        sink: simulator.HttpTransport | simulator.MqttTransport
        if transport == "mqtt":
            sink = simulator.MqttTransport(mqtt_url, factory_slug, keys)
            try:
                await sink.connect()
            except Exception as exc:
                await sink.close()
                raise CliError(f"cannot connect to {mqtt_url}: {exc}") from None
        else:
            sink = simulator.HttpTransport(url, keys)
        reported = [0, 0.0]  # failures reported, when
        loop = asyncio.get_running_loop()

        def report(stats: simulator.RunStats) -> None:
            if stats.ticks == 1 and stats.sent == 0:
                raise CliError(f"the first messages failed: {stats.last_error}")
            if stats.failed > reported[0] and loop.time() - reported[1] >= 10:
                reported[:] = [stats.failed, loop.time()]
                click.echo(f"warning: {stats.failed} failed; last: {stats.last_error}", err=True)

        with Shutdown() as shutdown:
            try:
                return await simulator.run(
                    sim,
                    sink,
                    rate_hz=rate,
                    duration_s=duration,
                    stop=shutdown.event,
                    on_tick=report,
                )
            finally:
                await sink.close()

    return _run(go())


COMMANDS: list[click.Command] = [import_group, export_group, simulate]
