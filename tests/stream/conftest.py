"""Stream test helpers: the API served by a real uvicorn on an ephemeral port (the
`api` role itself), and a small SSE reader on top of httpx's streaming client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from plantwatch.app import Container
from plantwatch.cli import ApiRole, RoleContext
from plantwatch.core.jsonutil import loads
from plantwatch.stream.models import StreamEvent


@dataclass
class Event:
    event: str | None = None
    id: str | None = None
    data: str = ""
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> Any:
        return loads(self.data)


class SseReader:
    """Reads one text/event-stream response event by event (per the SSE spec's parsing
    rules for the fields we use)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def block(self, wait_s: float = 5.0) -> Event | None:
        """The next block up to a blank line (comments and retry included); None at EOF."""
        event = Event()
        data: list[str] = []
        seen = False

        async def read() -> str | None:
            with contextlib.suppress(StopAsyncIteration):
                return await anext(self._lines)
            return None

        while True:
            line = await asyncio.wait_for(read(), wait_s)
            if line is None:
                return event if seen else None
            if line == "":
                if seen:
                    event.data = "\n".join(data)
                    return event
                continue
            seen = True
            if line.startswith(":"):
                event.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event.event = value
            elif name == "id":
                event.id = value
            elif name == "data":
                data.append(value)
            elif name == "retry":
                event.retry = int(value)

    async def next(self, wait_s: float = 5.0) -> Event:
        """The next dispatched event (blocks with data); comments are skipped."""
        while True:
            block = await self.block(wait_s)
            assert block is not None, "the stream ended"
            if block.data or block.event:
                return block

    async def events(self, count: int, wait_s: float = 5.0) -> list[Event]:
        return [await self.next(wait_s) for _ in range(count)]

    async def nothing_for(self, seconds: float) -> None:
        """No event arrives within `seconds` (comments may)."""
        with contextlib.suppress(TimeoutError):
            event = await self.next(wait_s=seconds)
            raise AssertionError(f"unexpected event {event}")


@dataclass
class Server:
    base_url: str
    role: ApiRole

    @contextlib.asynccontextmanager
    async def stream(
        self,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | list[tuple[str, Any]] | None = None,
        expect_status: int = 200,
    ) -> AsyncIterator[SseReader]:
        async with (
            httpx.AsyncClient(base_url=self.base_url, timeout=httpx.Timeout(10.0)) as client,
            client.stream("GET", "/api/v1/stream", headers=headers, params=params) as response,
        ):
            if response.status_code != expect_status:
                await response.aread()
                raise AssertionError(f"{response.status_code}: {response.text}")
            reader = SseReader(response)
            if expect_status == 200:
                first = await reader.block()
                assert first is not None and first.retry is not None, first
            yield reader


@pytest.fixture
async def server(container: Container) -> AsyncIterator[Server]:
    """The `api` role on 127.0.0.1 and a free port, sharing the test's container."""
    role = ApiRole(RoleContext(container=container, host="127.0.0.1", port=0))
    await role.start()
    try:
        yield Server(role.base_url, role)
    finally:
        role.request_stop()
        await asyncio.wait_for(role.wait(), 10)


async def recorded(container: Container, count: int, wait_s: float = 5.0) -> None:
    """Wait until the log holds `count` events (the recorder writes asynchronously)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        async with container.db.engine.connect() as conn:
            have = await conn.scalar(select(func.count()).select_from(StreamEvent))
        if have == count:
            return
        assert loop.time() < deadline, f"{have} events recorded, expected {count}"
        await asyncio.sleep(0.02)


def alert_payload(
    factory_id: int, alert_id: int, event: str = "created", **extra: Any
) -> dict[str, Any]:
    """An AlertEvent as ALERTS publishes it (CONTRACTS.md)."""
    return {
        "event": event,
        "factory_id": factory_id,
        "alert_id": alert_id,
        "rule_id": None,
        "device_id": None,
        "severity": "high",
        "status": "triggered",
        "title": f"alert {alert_id}",
        "message": "spindle_temp 82.5 > 80 for 5m",
        "occurrences": 1,
        "escalation_level": 0,
        "assigned_to": None,
        "actor_id": None,
        "at": "2026-02-19T10:30:00+00:00",
        "received_ms": None,
        "recipients": [7],
        **extra,
    }


def device_payload(factory_id: int, device_id: int, key: str = "M01") -> dict[str, Any]:
    return {"factory_id": factory_id, "device_id": device_id, "device_key": key}
