"""The `jobs` role: background work off the request and telemetry paths.

Today it runs notifications: the dispatcher (a bus subscriber on `alert.>` that
queues deliveries) and the delivery worker (claims, sends, retries). Several
`plantwatch run jobs` processes may run at once: claims are exclusive (see
notify.worker). The daily digest is queued by the scheduler role and sent here.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog

from plantwatch.app import Container
from plantwatch.notify.dispatch import SUBJECT, Dispatcher
from plantwatch.notify.render import Renderer
from plantwatch.notify.worker import DeliveryWorker

if TYPE_CHECKING:
    from plantwatch.cli import RoleContext

log = structlog.get_logger("plantwatch.notify")


class Notifications:
    """The dispatcher and worker of one process, wired to the container's backends."""

    def __init__(self, container: Container) -> None:
        settings = container.settings
        self.container = container
        self.renderer = Renderer(settings.notify_templates_dir)
        self.worker = DeliveryWorker(container.db, settings, self.renderer)
        self.dispatcher = Dispatcher(
            container.db, settings, self.renderer, on_queued=self.worker.wake
        )
        self._subscription: Any = None

    def subscribe(self) -> None:
        self._subscription = self.container.bus.subscribe(SUBJECT, self.dispatcher.handle)

    def unsubscribe(self) -> None:
        unsubscribe = getattr(self.container.bus, "unsubscribe", None)
        if self._subscription is not None and unsubscribe is not None:
            unsubscribe(self._subscription)
        self._subscription = None


class JobsRole:
    name = "jobs"

    def __init__(self, ctx: RoleContext) -> None:
        self.container = ctx.container
        self.notifications = Notifications(ctx.container)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.container.start()
        self.notifications.subscribe()
        self._task = asyncio.create_task(self._run(), name="role:jobs")

    async def _run(self) -> None:
        try:
            await self.notifications.worker.run(self._stop)
        finally:
            self.notifications.unsubscribe()
            await self.notifications.worker.close()

    def endpoints(self) -> list[tuple[str, str]]:
        return [("Jobs", "notifications: dispatcher and delivery worker")]

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    def request_stop(self, force: bool = False) -> None:
        self._stop.set()
        if force and self._task is not None:
            self._task.cancel()
