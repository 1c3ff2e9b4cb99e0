"""The internal event bus: a small protocol with an in-process backend.

Subjects are dot-separated (`device.online`, `telemetry.3`); a subscription
pattern may use `*` for one token and `>` for the rest, as in NATS, so the
JetStream backend can take the same subjects. A handler that raises is
retried with backoff (at-least-once), then the failure is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

Handler = Callable[[str, dict[str, Any]], Awaitable[None]]
log = structlog.get_logger("plantwatch.bus")


def subject_matches(pattern: str, subject: str) -> bool:
    want = pattern.split(".")
    have = subject.split(".")
    for i, part in enumerate(want):
        if part == ">":
            return len(have) > i
        if i >= len(have) or (part != "*" and part != have[i]):
            return False
    return len(want) == len(have)


class Bus(Protocol):
    async def publish(self, subject: str, payload: dict[str, Any]) -> None: ...

    def subscribe(self, pattern: str, handler: Handler) -> Subscription: ...

    async def close(self) -> None: ...


@dataclass(eq=False)
class Subscription:
    pattern: str
    handler: Handler
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = field(
        default_factory=lambda: asyncio.Queue(maxsize=100_000)
    )
    task: asyncio.Task[None] | None = None
    dropped: int = 0


class InProcessBus:
    """Each subscription gets its own queue and worker, so a slow consumer never
    blocks the publisher or the other consumers."""

    def __init__(self, max_attempts: int = 5, base_delay_s: float = 0.05) -> None:
        self._subs: list[Subscription] = []
        self.max_attempts = max_attempts
        self.base_delay_s = base_delay_s

    async def publish(self, subject: str, payload: dict[str, Any]) -> None:
        for sub in self._subs:
            if subject_matches(sub.pattern, subject):
                try:
                    sub.queue.put_nowait((subject, payload))
                except asyncio.QueueFull:
                    sub.dropped += 1
                    log.warning("bus_queue_full", pattern=sub.pattern, subject=subject)

    def subscribe(self, pattern: str, handler: Handler) -> Subscription:
        sub = Subscription(pattern, handler)
        sub.task = asyncio.get_running_loop().create_task(self._run(sub))
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
        if sub.task is not None:
            sub.task.cancel()

    async def _run(self, sub: Subscription) -> None:
        while True:
            subject, payload = await sub.queue.get()
            for attempt in range(1, self.max_attempts + 1):
                try:
                    await sub.handler(subject, payload)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception:
                    if attempt == self.max_attempts:
                        log.exception(
                            "bus_handler_failed",
                            pattern=sub.pattern,
                            subject=subject,
                            attempts=attempt,
                        )
                    else:
                        await asyncio.sleep(self.base_delay_s * 2 ** (attempt - 1))
            sub.queue.task_done()

    async def drain(self) -> None:
        """Wait until every queued event has been handled (tests, shutdown)."""
        await asyncio.gather(*(s.queue.join() for s in self._subs))

    async def close(self) -> None:
        for sub in list(self._subs):
            self.unsubscribe(sub)
            if sub.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await sub.task
