"""The delivery worker: claims due deliveries, sends them, records every attempt.

Claiming is safe with several workers (several `jobs` processes): a due row is
claimed by `UPDATE ... SET status='sending', attempts=attempts+1 WHERE id IN
(...) AND status IN ('pending','failed')`, which only one transaction can win
(on PostgreSQL the candidates are also picked `FOR UPDATE SKIP LOCKED`, so
workers do not even wait on each other). The outcome is written by one UPDATE
guarded by `status='sending' AND attempts=<the claimed attempt>`: `sent` (never
claimable again), `failed` with the next attempt time (exponential backoff with
jitter), or `dead` after `max_attempts` or a permanent error.

Each delivery is sent by its own task, at most `notify_concurrency` at once, and
a new one is claimed as soon as a slot frees, so a slow or failing peer holds one
slot, never the queue.

At-least-once: a worker that dies between a peer accepting a message and the
`sent` commit leaves the row `sending`; when its lease lapses the row is retried
(recorded as an attempt with an unknown outcome), so that message may arrive
twice. Webhook receivers can drop the repeat by its `X-Plantwatch-Delivery` id.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import structlog
from sqlalchemy import select, update

from plantwatch.core.config import Settings
from plantwatch.core.db import Database, utcnow
from plantwatch.notify import channels
from plantwatch.notify.models import (
    CLAIMABLE,
    DEAD,
    FAILED,
    SENDING,
    SENT,
    NotificationChannel,
)
from plantwatch.notify.models import NotificationDelivery as Delivery
from plantwatch.notify.render import Renderer

log = structlog.get_logger("plantwatch.notify")

ATTEMPT_LOG_MAX = 50
RECOVER_EVERY_S = 15.0
LOST_MESSAGE = "outcome unknown: the worker stopped while sending (lease expired); retried"


def backoff_s(attempt: int, base_s: float, max_s: float, rng: Callable[[], float]) -> float:
    """Delay before the attempt after `attempt` (1-based): exponential, capped, with
    "equal jitter" (half fixed, half random) so retries of many deliveries spread out."""
    delay = min(max_s, base_s * 2.0 ** max(0, attempt - 1))
    return delay / 2 + rng() * delay / 2


def alert_link(settings: Settings, alert_id: Any) -> str | None:
    if settings.public_url and alert_id is not None:
        return f"{settings.public_url.rstrip('/')}/alerts/{alert_id}"
    return None


def _facts(payload: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for label, key in (
        ("Severity", "severity"),
        ("Status", "status"),
        ("Occurrences", "occurrences"),
    ):
        if payload.get(key) is not None:
            out.append((label, str(payload[key])))
    return out


class DeliveryWorker:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        renderer: Renderer,
        *,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.db = db
        self.settings = settings
        self.renderer = renderer
        self.clock = clock
        self.rng = rng
        self.concurrency = settings.notify_concurrency
        self.lease = dt.timedelta(seconds=settings.notify_send_timeout_s * 3 + 30)
        self._client = client
        self._owns_client = client is None
        self._wake = asyncio.Event()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = channels.http_client(self.settings)
        return self._client

    async def close(self) -> None:
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    def wake(self) -> None:
        """Something was queued: look now rather than at the next poll."""
        self._wake.set()

    # --- claim ---------------------------------------------------------------------------

    async def recover(self) -> int:
        """Rows left `sending` by a worker that died: retry them (or give up)."""
        now = self.clock()
        async with self.db.session() as session:
            lost = (
                await session.scalars(
                    select(Delivery).where(Delivery.status == SENDING, Delivery.lease_until < now)
                )
            ).all()
            for row in lost:
                entry = {"at": now.isoformat(), "ok": False, "error": LOST_MESSAGE, "ms": 0.0}
                done = row.attempts >= row.max_attempts
                await session.execute(
                    update(Delivery)
                    .where(
                        Delivery.id == row.id,
                        Delivery.status == SENDING,
                        Delivery.attempts == row.attempts,
                    )
                    .values(
                        status=DEAD if done else FAILED,
                        lease_until=None,
                        next_attempt_at=now,
                        last_error=LOST_MESSAGE,
                        attempt_log=[*row.attempt_log, entry][-ATTEMPT_LOG_MAX:],
                        updated_at=now,
                    )
                )
            await session.commit()
        if lost:
            log.warning("notify_recovered", deliveries=[r.id for r in lost])
        return len(lost)

    async def claim(self, limit: int) -> list[int]:
        """Claim up to `limit` due deliveries for this worker; their ids."""
        if limit <= 0:
            return []
        now = self.clock()
        async with self.db.session() as session:
            candidates = (
                select(Delivery.id)
                .where(Delivery.status.in_(CLAIMABLE), Delivery.next_attempt_at <= now)
                .order_by(Delivery.next_attempt_at, Delivery.id)
                .limit(limit)
            )
            if session.get_bind().dialect.name == "postgresql":
                candidates = candidates.with_for_update(skip_locked=True)
            ids = list((await session.scalars(candidates)).all())
            claimed: Sequence[int] = []
            if ids:
                claimed = (
                    await session.scalars(
                        update(Delivery)
                        .where(Delivery.id.in_(ids), Delivery.status.in_(CLAIMABLE))
                        .values(
                            status=SENDING,
                            attempts=Delivery.attempts + 1,
                            lease_until=now + self.lease,
                            updated_at=now,
                        )
                        .returning(Delivery.id)
                    )
                ).all()
            await session.commit()
        return sorted(claimed)

    # --- send ----------------------------------------------------------------------------

    async def process(self, delivery_id: int) -> str:
        """Send one claimed delivery and record the outcome; the new status."""
        async with self.db.session() as session:
            delivery = await session.get(Delivery, delivery_id)
            if delivery is None or delivery.status != SENDING:
                return "lost"
            claimed_attempt = delivery.attempts
            target: channels.Target | None = None
            problem: channels.SendError | None = None
            try:
                target = await self._target(session, delivery)
            except channels.SendError as exc:
                problem = exc
            message = self._message(delivery)
            await session.commit()
        started = time.perf_counter()
        info: str | None = None
        if problem is None and target is not None:
            try:
                async with asyncio.timeout(self.settings.notify_send_timeout_s * 2):
                    info = await channels.send(self.settings, self.client, target, message)
            except channels.SendError as exc:
                problem = exc
            except TimeoutError:
                problem = channels.SendError("timed out")
            except Exception as exc:  # a bug or an unexpected library error: retry it
                log.exception("notify_send_crashed", delivery_id=delivery_id)
                problem = channels.SendError(f"{type(exc).__name__}: {exc}")
        ms = round((time.perf_counter() - started) * 1000, 1)
        return await self._finish(delivery_id, claimed_attempt, problem, info, ms)

    async def _target(self, session: Any, delivery: Delivery) -> channels.Target:
        if delivery.channel_id is None:
            if delivery.kind == "email" and delivery.user_id is not None:
                return channels.Target("email", {}, delivery.recipient)
            raise channels.PermanentSendError("its channel was deleted")
        channel = await session.get(NotificationChannel, delivery.channel_id)
        if channel is None or channel.factory_id != delivery.factory_id:
            raise channels.PermanentSendError("its channel was deleted")
        if not channel.is_active:
            raise channels.PermanentSendError("its channel is disabled")
        return channels.Target(delivery.kind, dict(channel.config), delivery.recipient)

    def _message(self, delivery: Delivery) -> channels.Message:
        payload = delivery.payload or {}
        link = alert_link(self.settings, payload.get("alert_id"))
        severity = str(payload.get("severity", "medium"))
        return channels.Message(
            event=delivery.event,
            subject=delivery.subject,
            body=delivery.body,
            short=delivery.short_body,
            html=self.renderer.email_html(delivery.subject, delivery.body, link, severity),
            severity=severity,
            link=link,
            payload=payload,
            facts=_facts(payload),
            delivery_id=str(delivery.id),
        )

    async def _finish(
        self,
        delivery_id: int,
        claimed_attempt: int,
        problem: channels.SendError | None,
        info: str | None,
        ms: float,
    ) -> str:
        now = self.clock()
        async with self.db.session() as session:
            row = await session.get(Delivery, delivery_id)
            if row is None or row.status != SENDING or row.attempts != claimed_attempt:
                await session.commit()
                return "lost"
            entry: dict[str, Any] = {"at": now.isoformat(), "ok": problem is None, "ms": ms}
            values: dict[str, Any] = {"lease_until": None, "updated_at": now}
            if problem is None:
                entry["info"] = info
                status = SENT
                values.update(sent_at=now, last_error=None)
            else:
                entry["error"] = str(problem)[:1000]
                values["last_error"] = str(problem)[:2000]
                if problem.permanent or row.attempts >= row.max_attempts:
                    status = DEAD
                else:
                    status = FAILED
                    delay = backoff_s(
                        row.attempts,
                        self.settings.notify_backoff_base_s,
                        self.settings.notify_backoff_max_s,
                        self.rng,
                    )
                    values["next_attempt_at"] = now + dt.timedelta(seconds=delay)
            values["status"] = status
            values["attempt_log"] = [*row.attempt_log, entry][-ATTEMPT_LOG_MAX:]
            # Release the claim and record the outcome in one guarded statement.
            result = await session.execute(
                update(Delivery)
                .where(
                    Delivery.id == delivery_id,
                    Delivery.status == SENDING,
                    Delivery.attempts == claimed_attempt,
                )
                .values(**values)
            )
            await session.commit()
        if getattr(result, "rowcount", 1) != 1:
            return "lost"
        if problem is not None:
            log.warning(
                "notify_attempt_failed",
                delivery_id=delivery_id,
                attempt=claimed_attempt,
                status=status,
                error=str(problem)[:300],
            )
        return status

    async def _process_safe(self, delivery_id: int) -> None:
        try:
            await self.process(delivery_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # the row stays `sending`; recover() retries it after the lease
            log.exception("notify_process_failed", delivery_id=delivery_id)

    # --- loops ---------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Recover, claim every due delivery (in rounds of `concurrency`), send them
        concurrently and wait for the outcomes. For tests and one-shot use."""
        await self.recover()
        total = 0
        while True:
            ids = await self.claim(self.concurrency)
            if not ids:
                return total
            total += len(ids)
            await asyncio.gather(*(self._process_safe(i) for i in ids))

    async def run(self, stop: asyncio.Event) -> None:
        inflight: set[asyncio.Task[None]] = set()
        stopping = asyncio.ensure_future(stop.wait())
        next_recover = 0.0
        try:
            while not stop.is_set():
                self._wake.clear()
                free = self.concurrency - len(inflight)
                if free > 0:
                    try:
                        if time.monotonic() >= next_recover:  # lapsed leases are rare
                            next_recover = time.monotonic() + RECOVER_EVERY_S
                            await self.recover()
                        for delivery_id in await self.claim(free):
                            task = asyncio.create_task(self._process_safe(delivery_id))
                            inflight.add(task)
                            task.add_done_callback(inflight.discard)
                    except Exception:
                        log.exception("notify_claim_failed")
                if len(inflight) >= self.concurrency:
                    await asyncio.wait({*inflight, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    continue
                woken = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait(
                        {woken, stopping},
                        timeout=self.settings.notify_poll_interval_s,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    woken.cancel()
        finally:
            stopping.cancel()
            if inflight:
                # Let sends in progress finish (bounded); a cancelled one is retried later.
                _, pending = await asyncio.wait(
                    inflight, timeout=self.settings.notify_send_timeout_s
                )
                for task in pending:
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(*pending, return_exceptions=True)
