"""The scheduler role: clocks that must run once per deployment, not once per process.

Today: device offline detection, alert SLA deadlines and reminders (every
second), raw-table partitions created a week ahead, retention of every
time-series tier, and cleanup of data whose parameter was deleted. On PostgreSQL
only the holder of an advisory lock runs the jobs, so several `plantwatch run
scheduler` processes give a hot standby, not double work.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from plantwatch.alerts.sla import sweep_sla
from plantwatch.app import Container
from plantwatch.core.db import utcnow
from plantwatch.notify.digest import queue_digests
from plantwatch.notify.service import renderer_for
from plantwatch.telemetry.partitions import Retention
from plantwatch.telemetry.service import purge_orphans, sweep_offline

if TYPE_CHECKING:
    from plantwatch.cli import RoleContext

log = structlog.get_logger("plantwatch.scheduler")

# Any constant both processes agree on; "plantwatch" in ASCII.
LEADER_LOCK_KEY = 0x706C616E747761


@dataclass
class Job:
    name: str
    every_s: float
    run: Callable[[], Awaitable[Any]]
    next_at: float = 0.0


def jobs_for(container: Container) -> list[Job]:
    settings = container.settings
    retention = Retention(
        raw_days=settings.retention_raw_days,
        minute_days=settings.retention_1m_days,
        hour_days=settings.retention_1h_days,
    )

    async def offline() -> Any:
        return await sweep_offline(container.db, container.bus, container.pipeline)

    async def partitions_ahead() -> Any:
        return await container.partitions.create_ahead(int(time.time() * 1000), days=7)

    async def retain() -> Any:
        removed = await container.partitions.apply_retention(int(time.time() * 1000), retention)
        removed["orphan_series"] = await purge_orphans(container.db.engine)
        return removed

    async def stream_retention() -> Any:
        return await container.stream.purge()

    async def digests() -> Any:
        renderer = renderer_for(settings.notify_templates_dir)
        return await queue_digests(container.db, settings, renderer, utcnow())

    async def sla() -> Any:
        return len(await sweep_sla(container.db, container.bus))

    return [
        Job("offline_sweep", settings.offline_sweep_interval_s, offline),
        Job("partitions_ahead", 3600, partitions_ahead),
        Job("retention", 3600, retain),
        Job("alert_sla", 1.0, sla),
        Job("notify_digest", 300, digests),
        Job("stream_retention", 600, stream_retention),
    ]


class SchedulerRole:
    name = "scheduler"

    def __init__(self, ctx: RoleContext, standby_poll_s: float = 15.0) -> None:
        self.container = ctx.container
        self.standby_poll_s = standby_poll_s
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.is_leader = False

    async def start(self) -> None:
        await self.container.start()
        self._task = asyncio.create_task(self._run(), name="role:scheduler")

    def endpoints(self) -> list[tuple[str, str]]:
        return [("Scheduler", "offline detection, partitions, retention")]

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    def request_stop(self, force: bool = False) -> None:
        self._stop.set()
        if force and self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            lock_conn = await self._leadership(stack)
            if lock_conn is None:
                return
            jobs = jobs_for(self.container)
            while not self._stop.is_set():
                now = time.monotonic()
                for job in jobs:
                    if now >= job.next_at:
                        job.next_at = now + job.every_s
                        await run_job(job)
                await self._sleep(1.0)

    async def _leadership(self, stack: contextlib.AsyncExitStack) -> AsyncConnection | None:
        """Block until this process may run the jobs; None if asked to stop first."""
        engine = self.container.db.engine
        if engine.dialect.name != "postgresql":
            self.is_leader = True
            return await stack.enter_async_context(engine.connect())
        announced = False
        while not self._stop.is_set():
            conn = await engine.connect()
            got = await conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": LEADER_LOCK_KEY})
            if got:
                await conn.commit()  # the session-level lock outlives the transaction
                stack.push_async_callback(conn.close)
                # Unlock explicitly: closing returns the connection to the pool, lock and all.
                stack.push_async_callback(self._unlock, conn)
                self.is_leader = True
                log.info("scheduler_leader")
                return conn
            await conn.close()
            if not announced:
                log.info("scheduler_standby")
                announced = True
            await self._sleep(self.standby_poll_s)
        return None

    async def _unlock(self, conn: AsyncConnection) -> None:
        await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LEADER_LOCK_KEY})
        await conn.commit()
        self.is_leader = False

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)


async def run_job(job: Job) -> Any:
    """Run one job; a failure is logged and retried on its next turn, never fatal."""
    started = time.perf_counter()
    try:
        result = await job.run()
    except Exception:
        log.exception("scheduler_job_failed", job=job.name)
        return None
    elapsed = round((time.perf_counter() - started) * 1000, 1)
    did_something = any(result.values()) if isinstance(result, dict) else bool(result)
    if did_something:
        log.info("scheduler_job", job=job.name, result=result, ms=elapsed)
    return result
