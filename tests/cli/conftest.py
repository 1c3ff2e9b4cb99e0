"""Fixtures for driving the `plantwatch` command in-process (click's CliRunner).

CLI tests are plain (sync) functions: the commands run their own event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import structlog
from click.testing import CliRunner, Result

from plantwatch.api import create_app
from plantwatch.app import Container
from plantwatch.cli import main
from plantwatch.core.config import Settings

T = TypeVar("T")


@pytest.fixture(autouse=True)
def _isolated_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No PLANTWATCH_* setting of the machine running the tests leaks into a command."""
    for name in list(os.environ):
        if name.startswith("PLANTWATCH_") and not name.startswith("PLANTWATCH_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Commands configure logging for the process; undo it so other tests are unaffected
    (their handlers would otherwise write to CliRunner's closed streams)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access = logging.getLogger("uvicorn.access")
    access_disabled = access.disabled
    config = structlog.get_config()
    yield
    root.handlers = handlers
    root.setLevel(level)
    access.disabled = access_disabled
    structlog.configure(**config)


@dataclass
class Cli:
    """Runs `plantwatch ...` with a data dir and database of the test's own."""

    data_dir: Path
    database_url: str | None

    @property
    def env(self) -> dict[str, str | None]:
        env: dict[str, str | None] = {
            "PLANTWATCH_DATA_DIR": str(self.data_dir),
            "PLANTWATCH_LOG_FORMAT": "console",
        }
        if self.database_url is not None:
            env["PLANTWATCH_DATABASE_URL"] = self.database_url
        return env

    def __call__(
        self, *args: str, input: str | None = None, env: dict[str, str | None] | None = None
    ) -> Result:
        """`env` adds to (or, with None values, removes from) the command's environment."""
        runner = _runner()
        return runner.invoke(main, list(args), input=input, env={**self.env, **(env or {})})

    @property
    def settings(self) -> Settings:
        return Settings(data_dir=self.data_dir, database_url=self.database_url)


def _runner() -> CliRunner:
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


@pytest.fixture
def fresh_cli(tmp_path: Path) -> Cli:
    """A new data dir and nothing else: the database is the default SQLite file there."""
    return Cli(data_dir=tmp_path / "data", database_url=None)


@pytest.fixture
def cli(tmp_path: Path, database_url: str) -> Cli:
    """A migrated, empty database: SQLite, and PostgreSQL when configured."""
    return Cli(data_dir=tmp_path / "data", database_url=database_url)


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    async def wrapper() -> T:
        return await fn()

    return asyncio.run(wrapper())


async def api_call(settings: Settings, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request to a fresh app over the same database the CLI used."""
    container = Container.build(settings)
    app = create_app(settings, container=container)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=("198.51.100.9", 40000))
            async with httpx.AsyncClient(transport=transport, base_url="http://cli.test") as c:
                return await c.request(method, url, **kwargs)
    finally:
        await container.close()


def login(settings: Settings, factory: str, email: str, password: str) -> httpx.Response:
    return run_async(
        lambda: api_call(
            settings,
            "POST",
            "/api/v1/auth/login",
            json={"factory_slug": factory, "email": email, "password": password},
        )
    )
