"""`plantwatch admin ...`: factories, users and password resets, and their errors.

Each runs on SQLite and, when PLANTWATCH_TEST_DATABASE_URL is set, on PostgreSQL.
"""

from __future__ import annotations

import re

import pytest
from sqlalchemy import func, select

from plantwatch.core.db import Database
from plantwatch.tenancy.models import AuditEntry, Factory, User
from tests.cli.conftest import Cli, api_call, login, run_async

PASSWORD = "first-Password-1"


def _count(cli: Cli, model: type[Factory] | type[User]) -> int:
    async def count() -> int:
        db = Database(cli.settings.resolved_database_url)
        try:
            async with db.session() as session:
                return int(await session.scalar(select(func.count()).select_from(model)) or 0)
        finally:
            await db.dispose()

    return run_async(count)


def _audit_actions(cli: Cli) -> list[tuple[str, str]]:
    async def read() -> list[tuple[str, str]]:
        db = Database(cli.settings.resolved_database_url)
        try:
            async with db.session() as session:
                rows = await session.execute(
                    select(AuditEntry.action, AuditEntry.actor).order_by(AuditEntry.id)
                )
                return [(a, b) for a, b in rows.all()]
        finally:
            await db.dispose()

    return run_async(read)


def _setup_factory(cli: Cli, slug: str = "acme") -> None:
    result = cli("admin", "create-factory", "--name", "Acme Precision", "--slug", slug)
    assert result.exit_code == 0, result.output + result.stderr


def _setup_user(cli: Cli, email: str = "ops@acme.example", role: str = "super_admin") -> None:
    result = cli(
        "admin", "create-user", "--factory", "acme", "--email", email,
        "--role", role, "--password", PASSWORD,
    )  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr


def test_create_factory(cli: Cli) -> None:
    result = cli(
        "admin", "create-factory", "--name", "Acme Precision", "--slug", "acme",
        "--timezone", "Europe/Berlin",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "Created factory 'acme'" in result.stdout
    response = run_async(lambda: api_call(cli.settings, "GET", "/api/v1/factories"))
    assert [f["slug"] for f in response.json()["data"]] == ["acme"]
    assert any(action == "factory.create" for action, _ in _audit_actions(cli))


def test_duplicate_slug_is_exit_1_without_traceback(cli: Cli) -> None:
    _setup_factory(cli)
    result = cli("admin", "create-factory", "--name", "Other", "--slug", "acme")
    assert result.exit_code == 1
    assert "acme" in result.stderr and "exists" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert _count(cli, Factory) == 1


def test_bad_slug_and_timezone_are_usage_errors(cli: Cli) -> None:
    bad_slug = cli("admin", "create-factory", "--name", "X", "--slug", "Not A Slug")
    assert bad_slug.exit_code == 2
    assert "--slug" in bad_slug.stderr
    bad_tz = cli("admin", "create-factory", "--name", "X", "--slug", "x", "--timezone", "Mars/Base")
    assert bad_tz.exit_code == 2
    assert "Mars/Base" in bad_tz.stderr
    missing = cli("admin", "create-factory", "--slug", "x")
    assert missing.exit_code == 2
    assert _count(cli, Factory) == 0


def test_create_user_then_log_in_through_the_api(cli: Cli) -> None:
    _setup_factory(cli)
    result = cli(
        "admin", "create-user", "--factory", "acme", "--email", "Ops@Acme.example",
        "--role", "maintenance_manager", "--password", PASSWORD, "--full-name", "Olga Ops",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "ops@acme.example" in result.stdout
    # The password is never echoed back.
    assert PASSWORD not in result.stdout + result.stderr
    response = login(cli.settings, "acme", "ops@acme.example", PASSWORD)
    assert response.status_code == 200, response.text
    user = response.json()["user"]
    assert (user["role"], user["full_name"]) == ("maintenance_manager", "Olga Ops")
    actions = _audit_actions(cli)
    assert ("user.create", "cli") in actions


def test_create_user_errors(cli: Cli) -> None:
    _setup_factory(cli)
    _setup_user(cli)

    unknown_factory = cli(
        "admin", "create-user", "--factory", "nope", "--email", "a@b.example",
        "--role", "viewer", "--password", PASSWORD,
    )  # fmt: skip
    assert unknown_factory.exit_code == 1
    assert "no factory 'nope'" in unknown_factory.stderr

    bad_role = cli(
        "admin", "create-user", "--factory", "acme", "--email", "a@acme.example",
        "--role", "overlord", "--password", PASSWORD,
    )  # fmt: skip
    assert bad_role.exit_code == 2
    assert "overlord" in bad_role.stderr and "--role" in bad_role.stderr

    weak = cli(
        "admin", "create-user", "--factory", "acme", "--email", "a@acme.example",
        "--role", "viewer", "--password", "short",
    )  # fmt: skip
    assert weak.exit_code == 2
    assert "--password" in weak.stderr and "8 characters" in weak.stderr
    assert "short" not in weak.stderr.replace("too weak", "")

    bad_email = cli(
        "admin", "create-user", "--factory", "acme", "--email", "not-an-email",
        "--role", "viewer", "--password", PASSWORD,
    )  # fmt: skip
    assert bad_email.exit_code == 2
    assert "--email" in bad_email.stderr

    duplicate = cli(
        "admin", "create-user", "--factory", "acme", "--email", "OPS@acme.example",
        "--role", "viewer", "--password", PASSWORD,
    )  # fmt: skip
    assert duplicate.exit_code == 1
    assert "exists" in duplicate.stderr

    for result in (unknown_factory, bad_role, weak, bad_email, duplicate):
        assert "Traceback" not in result.stdout + result.stderr
    assert _count(cli, User) == 1


def test_create_user_password_from_env_or_stdin(cli: Cli) -> None:
    _setup_factory(cli)
    from_env = cli(
        "admin", "create-user", "--factory", "acme", "--email", "env@acme.example",
        "--role", "viewer", env={"PLANTWATCH_USER_PASSWORD": "from-the-env-1"},
    )  # fmt: skip
    assert from_env.exit_code == 0, from_env.stderr
    piped = cli(
        "admin", "create-user", "--factory", "acme", "--email", "pipe@acme.example",
        "--role", "viewer", input="from-a-pipe-1\n",
    )  # fmt: skip
    assert piped.exit_code == 0, piped.stderr
    nothing = cli(
        "admin", "create-user", "--factory", "acme", "--email", "none@acme.example",
        "--role", "viewer", input="",
    )  # fmt: skip
    assert nothing.exit_code == 2
    assert "no password given" in nothing.stderr
    assert login(cli.settings, "acme", "env@acme.example", "from-the-env-1").status_code == 200
    assert login(cli.settings, "acme", "pipe@acme.example", "from-a-pipe-1").status_code == 200


def test_create_user_prompts_hidden_on_a_terminal(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("plantwatch.cli._stdin_is_interactive", lambda: True)
    _setup_factory(cli)
    result = cli(
        "admin", "create-user", "--factory", "acme", "--email", "tty@acme.example",
        "--role", "viewer", input="typed-secret-1\ntyped-secret-1\n",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "Password" in result.stdout
    assert "typed-secret-1" not in result.stdout  # hidden input is not echoed
    assert login(cli.settings, "acme", "tty@acme.example", "typed-secret-1").status_code == 200


def test_reset_password_switches_passwords_and_ends_sessions(cli: Cli) -> None:
    _setup_factory(cli)
    _setup_user(cli)
    before = login(cli.settings, "acme", "ops@acme.example", PASSWORD)
    assert before.status_code == 200
    tokens = before.json()

    result = cli(
        "admin", "reset-password", "--factory", "acme", "--email", "ops@acme.example",
        "--password", "second-Password-2",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "second-Password-2" not in result.stdout + result.stderr

    assert login(cli.settings, "acme", "ops@acme.example", PASSWORD).status_code == 401
    assert login(cli.settings, "acme", "ops@acme.example", "second-Password-2").status_code == 200
    # The sessions opened with the old password are over: access and refresh tokens fail.
    me = run_async(
        lambda: api_call(
            cli.settings,
            "GET",
            "/api/v1/auth/me",
            headers={"Authorization": f"Bearer {tokens['access_token']}"},
        )
    )
    assert me.status_code == 401
    refreshed = run_async(
        lambda: api_call(
            cli.settings,
            "POST",
            "/api/v1/auth/refresh",
            json={"refresh_token": tokens["refresh_token"]},
        )
    )
    assert refreshed.status_code == 401
    assert ("user.password_reset", "cli") in _audit_actions(cli)


def test_reset_password_generates_a_strong_one_and_prints_it_once(cli: Cli) -> None:
    _setup_factory(cli)
    _setup_user(cli)
    result = cli("admin", "reset-password", "--factory", "acme", "--email", "ops@acme.example")
    assert result.exit_code == 0, result.stderr
    match = re.search(r"New password \(shown once\): (\S+)", result.stdout)
    assert match, result.stdout
    generated = match.group(1)
    assert len(generated) >= 20
    assert result.stdout.count(generated) == 1
    assert login(cli.settings, "acme", "ops@acme.example", generated).status_code == 200
    assert login(cli.settings, "acme", "ops@acme.example", PASSWORD).status_code == 401
    again = cli("admin", "reset-password", "--factory", "acme", "--email", "ops@acme.example")
    second = re.search(r"shown once\): (\S+)", again.stdout)
    assert second is not None and second.group(1) != generated


def test_reset_password_errors(cli: Cli) -> None:
    _setup_factory(cli)
    _setup_user(cli)
    unknown_user = cli(
        "admin", "reset-password", "--factory", "acme", "--email", "ghost@acme.example",
        "--password", "whatever-123",
    )  # fmt: skip
    assert unknown_user.exit_code == 1
    assert "no user 'ghost@acme.example'" in unknown_user.stderr
    unknown_factory = cli(
        "admin", "reset-password", "--factory", "nope", "--email", "ops@acme.example"
    )
    assert unknown_factory.exit_code == 1
    assert "no factory 'nope'" in unknown_factory.stderr
    weak = cli(
        "admin", "reset-password", "--factory", "acme", "--email", "ops@acme.example",
        "--password", "1234567",
    )  # fmt: skip
    assert weak.exit_code == 2
    for result in (unknown_user, unknown_factory, weak):
        assert "Traceback" not in result.stdout + result.stderr
    # Nothing changed: the original password still works.
    assert login(cli.settings, "acme", "ops@acme.example", PASSWORD).status_code == 200


def test_admin_commands_refuse_an_unmigrated_database(fresh_cli: Cli) -> None:
    result = fresh_cli("admin", "create-factory", "--name", "Acme", "--slug", "acme")
    assert result.exit_code == 1
    assert "plantwatch migrate" in result.stderr
    assert "Traceback" not in result.stderr
