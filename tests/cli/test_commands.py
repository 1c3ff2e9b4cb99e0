"""`plantwatch --version`, `migrate`, `run` and configuration errors."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from plantwatch import __version__
from plantwatch.cli import ROLES
from plantwatch.core import migrate
from plantwatch.core.db import make_engine
from tests.cli.conftest import Cli


def _revision(cli: Cli) -> str | None:
    async def read() -> str | None:
        engine = make_engine(cli.settings.resolved_database_url)
        try:
            return await migrate.current_revision(engine)
        finally:
            await engine.dispose()

    return asyncio.run(read())


def test_version(fresh_cli: Cli) -> None:
    for flag in ("--version", "-V"):
        result = fresh_cli(flag)
        assert result.exit_code == 0
        assert result.stdout.strip() == f"plantwatch {__version__}"


def test_help_lists_the_commands(fresh_cli: Cli) -> None:
    result = fresh_cli("--help")
    assert result.exit_code == 0
    for command in ("up", "run", "migrate", "admin"):
        assert command in result.stdout
    admin = fresh_cli("admin", "--help")
    for command in ("create-factory", "create-user", "reset-password"):
        assert command in admin.stdout


def test_migrate_check_upgrade_and_revision(fresh_cli: Cli) -> None:
    head = migrate.head_revision()
    check = fresh_cli("migrate", "--check")
    assert check.exit_code == 1
    assert "plantwatch migrate" in check.stderr

    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    base_revision = list(script.walk_revisions())[-1].revision
    partial = fresh_cli("migrate", "--revision", base_revision)
    assert partial.exit_code == 0, partial.stderr
    assert _revision(fresh_cli) == base_revision
    if base_revision != head:
        assert fresh_cli("migrate", "--check").exit_code == 1

    full = fresh_cli("migrate")
    assert full.exit_code == 0, full.stderr
    assert f"{head} (head)" in full.stdout
    assert _revision(fresh_cli) == head
    assert (fresh_cli.data_dir / "plantwatch.db").exists()  # default: SQLite in the data dir

    again = fresh_cli("migrate")
    assert again.exit_code == 0
    assert "already at revision" in again.stdout
    ok = fresh_cli("migrate", "--check")
    assert ok.exit_code == 0
    assert "at head" in ok.stdout


def test_migrate_downgrade_to_base(fresh_cli: Cli) -> None:
    assert fresh_cli("migrate").exit_code == 0
    down = fresh_cli("migrate", "--downgrade", "base")
    assert down.exit_code == 0, down.stderr
    assert _revision(fresh_cli) is None


def test_migrate_unknown_revision_is_a_clean_error(fresh_cli: Cli) -> None:
    result = fresh_cli("migrate", "--revision", "doesnotexist")
    assert result.exit_code == 1
    assert "doesnotexist" in result.stderr
    assert "Traceback" not in result.stderr


def test_migrate_on_the_configured_database(cli: Cli) -> None:
    """`cli` already points at a migrated SQLite or PostgreSQL database."""
    result = cli("migrate", "--check")
    assert result.exit_code == 0, result.stderr
    assert "schema at head" in result.stdout


def test_run_offers_only_the_roles_that_exist(fresh_cli: Cli) -> None:
    assert {"api", "scheduler"} <= set(ROLES)
    result = fresh_cli("run", "dashboard")
    assert result.exit_code == 2
    assert "dashboard" in result.stderr


def test_run_refuses_a_schema_not_at_head(fresh_cli: Cli) -> None:
    result = fresh_cli("run", "api", "--port", "0")
    assert result.exit_code == 1
    assert "plantwatch migrate" in result.stderr
    assert "Traceback" not in result.stderr
    # `run` never migrates by itself.
    assert _revision(fresh_cli) is None


def test_invalid_configuration_is_exit_2(fresh_cli: Cli) -> None:
    result = fresh_cli("migrate", "--check", env={"PLANTWATCH_PORT": "not-a-port"})
    assert result.exit_code == 2
    assert "port" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_exit_2(fresh_cli: Cli, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    result = fresh_cli("migrate", "--check", env={"PLANTWATCH_CONFIG": str(missing)})
    assert result.exit_code == 2
    assert str(missing) in result.stderr


def test_toml_config_is_honoured_by_commands(fresh_cli: Cli, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    config = tmp_path / "pw.toml"
    config.write_text(f'data_dir = "{elsewhere}"\n')
    result = fresh_cli(
        "migrate", env={"PLANTWATCH_CONFIG": str(config), "PLANTWATCH_DATA_DIR": None}
    )
    assert result.exit_code == 0, result.stderr
    assert (elsewhere / "plantwatch.db").exists()


@pytest.mark.parametrize("port", ["-1", "70000"])
def test_up_rejects_bad_ports(fresh_cli: Cli, port: str) -> None:
    result = fresh_cli("up", "--port", port)
    assert result.exit_code == 2


def test_up_rejects_a_short_demo_password_before_touching_anything(fresh_cli: Cli) -> None:
    result = fresh_cli("up", "--demo", "--port", "0", env={"PLANTWATCH_DEMO_PASSWORD": "short"})
    assert result.exit_code == 2
    assert "PLANTWATCH_DEMO_PASSWORD" in result.stderr
    assert not (fresh_cli.data_dir / "plantwatch.db").exists()


def test_a_database_url_without_its_driver_is_a_clean_error(fresh_cli: Cli) -> None:
    result = fresh_cli(
        "migrate", env={"PLANTWATCH_DATABASE_URL": "mysql+nosuchdriver://u@127.0.0.1/x"}
    )
    assert result.exit_code in (1, 2)
    assert result.stderr.startswith("Error:")
    assert "Traceback" not in result.stderr


def test_an_unreachable_database_is_a_clean_error(fresh_cli: Cli) -> None:
    pytest.importorskip("asyncpg")
    with socket.socket() as closed:  # a port nobody listens on: bound, never listening
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        result = fresh_cli(
            "admin", "create-factory", "--name", "A", "--slug", "a",
            env={"PLANTWATCH_DATABASE_URL": f"postgresql+asyncpg://u@127.0.0.1:{port}/x"},
        )  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.startswith("Error:")
    assert "Traceback" not in result.stderr
