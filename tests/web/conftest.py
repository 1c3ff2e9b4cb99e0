"""Fixtures for the web UI.

Two kinds of test live here:
- HTTP tests of pages and fragments through the ASGI app (`as_browser`): fast,
  on SQLite and PostgreSQL, for rendering, permissions and tenant isolation;
- browser tests (`browser_page`) that drive Debian's Chromium with Playwright
  against one real `plantwatch up` process shared by the session (`live`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import PASSWORD, LoggedIn

CHROMIUM = os.environ.get("PLANTWATCH_TEST_CHROMIUM", "/usr/bin/chromium")
CSRF = "test-csrf-token"
START_TIMEOUT_S = 90.0


# --- HTTP: pages through the ASGI app ----------------------------------------------------

AsBrowser = Callable[[LoggedIn], Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def as_browser(app: Any) -> AsyncIterator[AsBrowser]:
    """A client that carries `who`'s session the way the browser does: in cookies,
    with the CSRF cookie echoed in X-CSRF-Token on every request."""
    clients: list[httpx.AsyncClient] = []

    async def make(who: LoggedIn) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, client=("203.0.113.8", 40001))
        c = httpx.AsyncClient(
            transport=transport,
            base_url="http://testserver",
            cookies={
                "pw_access": who.access_token,
                "pw_refresh": who.refresh_token,
                "pw_csrf": CSRF,
            },
            headers={"X-CSRF-Token": CSRF},
        )
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.aclose()


# --- browser: a live `plantwatch up` and Chromium --------------------------------------


@dataclass
class LiveUser:
    email: str
    role: str
    factory: str
    password: str = PASSWORD


@dataclass
class Live:
    """One `plantwatch up` process with two factories and a user per role we test."""

    base_url: str
    data_dir: Path
    process: subprocess.Popen[str]
    users: dict[str, LiveUser] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def api_login(self, who: str) -> httpx.Client:
        """An API client (bearer token) logged in as one of `users`."""
        user = self.users[who]
        token = httpx.post(
            f"{self.base_url}/api/v1/auth/login",
            json={"factory_slug": user.factory, "email": user.email, "password": user.password},
            timeout=10,
        )
        assert token.status_code == 200, token.text
        return httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token.json()['access_token']}"},
            timeout=20,
        )

    def output(self) -> str:
        return "\n".join(self.lines[-200:])


def _env(data_dir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PLANTWATCH_") or k.startswith("PLANTWATCH_TEST_")
    }
    env.update(
        PLANTWATCH_DATA_DIR=str(data_dir),
        PLANTWATCH_LOG_FORMAT="console",
        PLANTWATCH_MQTT_PORT="0",
        PLANTWATCH_USER_PASSWORD=PASSWORD,
        PYTHONUNBUFFERED="1",
    )
    return env


def _cli(data_dir: Path, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "plantwatch.cli", *args],
        env=_env(data_dir),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"plantwatch {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


USERS = {
    "admin": LiveUser("admin@acme.example", "super_admin", "acme"),
    "manager": LiveUser("manager@acme.example", "factory_manager", "acme"),
    "engineer": LiveUser("engineer@acme.example", "maintenance_engineer", "acme"),
    "viewer": LiveUser("viewer@acme.example", "viewer", "acme"),
    "other": LiveUser("admin@globex.example", "super_admin", "globex"),
}


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """`plantwatch up` on free ports, on its own SQLite file, with factories acme
    (Europe/Berlin) and globex and the users of USERS. Shared by all browser tests:
    each test makes its own devices and rules (unique names) and never assumes an
    empty factory."""
    data_dir = tmp_path_factory.mktemp("live")
    _cli(data_dir, "migrate")
    _cli(
        data_dir,
        "admin",
        "create-factory",
        "--name",
        "Acme Precision",
        "--slug",
        "acme",
        "--timezone",
        "Europe/Berlin",
    )
    _cli(data_dir, "admin", "create-factory", "--name", "Globex Plastics", "--slug", "globex")
    for user in USERS.values():
        _cli(
            data_dir,
            "admin",
            "create-user",
            "--factory",
            user.factory,
            "--email",
            user.email,
            "--role",
            user.role,
        )
    process = subprocess.Popen(
        [sys.executable, "-m", "plantwatch.cli", "up", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(data_dir),
    )
    lines: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if not found and (m := re.search(r"URL:\s+(http://127\.0\.0\.1:\d+)", line)):
                found.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(START_TIMEOUT_S)
    if not found:
        process.kill()
        pytest.fail("plantwatch up printed no URL:\n" + "\n".join(lines))
    base_url = found[0]
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server = Live(base_url, data_dir, process, dict(USERS), lines)
    yield server
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _chromium_available() -> bool:
    return Path(CHROMIUM).exists() or shutil.which("chromium") is not None


@pytest.fixture
def browser() -> Iterator[Any]:
    """Chromium for one test. Not shared by the session: Playwright's sync API keeps
    its own event loop marked running in this thread while it is alive, and the
    async tests that follow would fail to start theirs."""
    if not _chromium_available():  # pragma: no cover
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield b
        b.close()


BrowserPage = Callable[..., Any]


@pytest.fixture
def browser_page(browser: Any, live: Live) -> Iterator[BrowserPage]:
    """`browser_page("engineer")`: a fresh browser context logged in through the login
    form as that user, on the dashboard; `browser_page(None)` is logged out.
    `viewport` and `color_scheme` pass through to the context."""
    contexts: list[Any] = []

    def open_page(who: str | None = "admin", **context_args: Any) -> Any:
        context = browser.new_context(base_url=live.base_url, **context_args)
        context.set_default_timeout(15_000)
        contexts.append(context)
        page = context.new_page()
        if who is not None:
            user = live.users[who]
            page.goto("/login")
            page.get_by_label("Factory").select_option(user.factory)
            page.get_by_label("Email").fill(user.email)
            page.get_by_label("Password").fill(user.password)
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(re.compile(r"^(?!.*/login).*$"))
        return page

    yield open_page
    for context in contexts:
        context.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
