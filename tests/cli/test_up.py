"""End to end: `plantwatch up --demo` and `plantwatch run api` as real processes.

Each starts on a free port (port 0: the server picks one and prints it), is
checked over HTTP, stopped with a signal (it must exit 0 within seconds), and
`up --demo` is started again on the same data dir to prove it is idempotent.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from plantwatch.assets.models import Device
from plantwatch.tenancy.models import User

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0


@dataclass
class Server:
    """A `plantwatch` process whose stdout is read line by line in the background."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match[str]:
        regex = re.compile(pattern)
        for seen in self.lines:
            if match := regex.search(seen):
                return match
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is None:
                pytest.fail(f"process exited before printing {pattern!r}:\n{self.output()}")
            self.lines.append(item)
            if match := regex.search(item):
                return match
        pytest.fail(f"no line matching {pattern!r} within {timeout}s:\n{self.output()}")

    def drain(self) -> None:
        while True:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                return
            if line is None:
                return
            self.lines.append(line)

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig: signal.Signals) -> int:
        self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"did not stop within {STOP_TIMEOUT_S}s of {sig.name}")
        self.drain()
        return code


Start = Callable[..., Server]


def _env(data_dir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PLANTWATCH_") or k.startswith("PLANTWATCH_TEST_")
    }
    env.update(
        PLANTWATCH_DATA_DIR=str(data_dir),
        PLANTWATCH_LOG_FORMAT="console",
        PLANTWATCH_MQTT_PORT="0",  # never a fixed port, once the embedded broker exists
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    started: list[Server] = []
    stderr_files: list[IO[str]] = []

    def start_process(*args: str, data_dir: Path) -> Server:
        stderr = (tmp_path / f"stderr-{len(stderr_files)}.log").open("w")
        stderr_files.append(stderr)
        process = subprocess.Popen(
            [sys.executable, "-m", "plantwatch.cli", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            env=_env(data_dir),
        )
        server = Server(process)
        started.append(server)
        return server

    yield start_process
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
        server.reader.join(timeout=10)  # EOF once the process is gone
        if server.process.stdout is not None and not server.reader.is_alive():
            server.process.stdout.close()
    for stderr in stderr_files:
        stderr.close()


def _wait_healthy(base_url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/health", timeout=5)
            if response.status_code == 200 and response.json()["status"] == "ok":
                return
            last = response.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    pytest.fail(f"{base_url}/health never became ok: {last}")


def _count(data_dir: Path, model: type[Device] | type[User]) -> int:
    engine = create_engine(f"sqlite:///{data_dir / 'plantwatch.db'}")
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(model)).scalar_one())
    finally:
        engine.dispose()


def _demo_login(server: Server) -> tuple[str, str]:
    password = server.wait_for_line(r"^\s+Password:\s+(\S+)\s+\(kept in").group(1)
    email = server.wait_for_line(r"^\s+super_admin\s+(\S+@\S+)$").group(1)
    server.wait_for_line(r"Press Ctrl\+C to stop")
    return email, password


def test_up_demo_serves_logs_in_and_restarts_idempotently(start: Start, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"

    first = start("up", "--demo", "--port", "0", data_dir=data_dir)
    base_url = first.wait_for_line(r"URL:\s+(http://127\.0\.0\.1:(\d+))").group(1)
    assert not base_url.endswith(":0")
    first.wait_for_line(r"API docs:\s+http://127\.0\.0\.1:\d+/api/docs")
    first.wait_for_line(r"Demo factory: demo .*created")
    email, password = _demo_login(first)
    _wait_healthy(base_url)

    login = httpx.post(
        f"{base_url}/api/v1/auth/login",
        json={"factory_slug": "demo", "email": email, "password": password},
        timeout=10,
    )
    assert login.status_code == 200, login.text
    me = httpx.get(
        f"{base_url}/api/v1/auth/me",
        headers={"Authorization": f"Bearer {login.json()['access_token']}"},
        timeout=10,
    )
    assert me.status_code == 200, me.text
    assert me.json()["data"]["user"]["role"] == "super_admin"
    assert me.json()["data"]["factory"]["slug"] == "demo"
    assert httpx.get(f"{base_url}/ready", timeout=5).json()["status"] == "ready"
    assert httpx.get(f"{base_url}/api/docs", timeout=5).status_code == 200

    devices, users = _count(data_dir, Device), _count(data_dir, User)
    assert devices >= 10
    assert users == 8

    assert first.stop(signal.SIGINT) == 0, first.output()
    assert "plantwatch stopped." in first.output()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base_url}/health", timeout=2)
    # The password is printed for the operator, never written to the log.
    assert password not in (tmp_path / "stderr-0.log").read_text()

    # Same data dir again: nothing duplicated, same demo password, still works.
    second = start("up", "--demo", "--port", "0", data_dir=data_dir)
    base_url = second.wait_for_line(r"URL:\s+(http://127\.0\.0\.1:\d+)").group(1)
    second.wait_for_line(r"Demo factory: demo .*already present")
    assert _demo_login(second) == (email, password)
    _wait_healthy(base_url)
    again = httpx.post(
        f"{base_url}/api/v1/auth/login",
        json={"factory_slug": "demo", "email": email, "password": password},
        timeout=10,
    )
    assert again.status_code == 200, again.text
    assert (_count(data_dir, Device), _count(data_dir, User)) == (devices, users)
    assert second.stop(signal.SIGTERM) == 0, second.output()


def test_run_api_serves_a_migrated_database_and_stops_on_sigterm(
    start: Start, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    env = _env(data_dir)
    migrated = subprocess.run(
        [sys.executable, "-m", "plantwatch.cli", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr
    server = start("run", "api", "--port", "0", data_dir=data_dir)
    base_url = server.wait_for_line(r"URL:\s+(http://127\.0\.0\.1:\d+)").group(1)
    _wait_healthy(base_url)
    assert httpx.get(f"{base_url}/ready", timeout=5).json()["status"] == "ready"
    # No demo unless asked for.
    factories = httpx.get(f"{base_url}/api/v1/factories", timeout=5).json()["data"]
    assert factories == []
    assert server.stop(signal.SIGTERM) == 0, server.output()


def test_up_reports_a_port_in_use(start: Start, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "plantwatch.cli", "up", "--port", str(port)],
            env=_env(tmp_path / "data"),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
