"""The live stream behind `GET /api/v1/stream`: a durable event log and its fan-out.

- `StreamRecorder` (one per process, started with the Container) subscribes to the
  bus's `alert.>` and `device.>` and appends every event to `stream_events`, so the
  events of every process land in one ordered log. Appends take a lock held until
  commit (an advisory lock on PostgreSQL; SQLite has one writer anyway), so the
  ids a reader can see are always a prefix: nothing commits behind a reader's back.
- `EventHub` (one per process) reads the log once for all of this process's
  connections: at once when the local recorder committed (an asyncio wake-up, so
  a push costs milliseconds) and every `poll_s` for what other processes wrote.
  It keeps the newest events in memory; a connection that resumes from further
  back reads its factory's events from the table itself.
- `KpiFeed` (one per factory with listeners) reads the factory's latest values
  every `kpi_interval_s` and remembers which series changed, so a hundred
  dashboards cost one query a second, not a hundred.
- `StreamConnection` is one client: it merges the three, filters by factory,
  permissions and the requested types, and yields the SSE bytes.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime as dt
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from sqlalchemy import Connection, delete, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from plantwatch.core.bus import Bus, Subscription
from plantwatch.core.db import Database, utcnow
from plantwatch.core.jsonutil import dumps
from plantwatch.stream.models import StreamEvent
from plantwatch.telemetry import queries
from plantwatch.telemetry.kpis import SeriesDirectory, level_of

log = structlog.get_logger("plantwatch.stream")

# What the log records, and who may see each type of event.
SUBJECTS = ("alert.>", "device.>")
TYPE_PERMISSIONS: dict[str, str] = {
    "alert": "alerts:read",
    "device": "assets:read",
    "kpi": "telemetry:read",
}
STREAM_TYPES = tuple(TYPE_PERMISSIONS)
# Fields of a bus payload that are for other consumers, not for screens.
# Set on a bus payload whose event is already in the log (StreamService.record_in).
RECORDED_MARK = "stream_id"
PRIVATE_FIELDS = frozenset({"recipients", RECORDED_MARK})

# "plstrm": any constant all processes agree on (see scheduler.LEADER_LOCK_KEY).
APPEND_LOCK_KEY = 0x706C7374726D
DEFAULT_RETENTION_S = 24 * 3600
DEFAULT_MAX_ROWS = 500_000


class StreamClosed(Exception):
    """The caller may no longer stream (token expired, session revoked, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- the log ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: int
    factory_id: int
    type: str  # alert | device
    data: bytes  # the JSON of the SSE `data:` line, rendered once for every connection


def event_row(subject: str, payload: dict[str, Any], now: dt.datetime) -> dict[str, Any] | None:
    """The stream_events row for a bus event; None if it names no factory."""
    factory_id = payload.get("factory_id")
    if not isinstance(factory_id, int) or isinstance(factory_id, bool):
        return None
    # JSON-safe whatever the publisher put in (a datetime, a set): the log must not
    # refuse an event over a field no screen reads.
    clean = orjson.loads(orjson.dumps(payload, default=str, option=orjson.OPT_NON_STR_KEYS))
    return {"factory_id": factory_id, "kind": subject[:64], "payload": clean, "created_at": now}


def render(
    event_id: int, factory_id: int, kind: str, payload: dict[str, Any], at: Any
) -> StoredEvent:
    kind_type, _, name = kind.partition(".")
    body = {"subject": kind, "event": name}
    body.update((k, v) for k, v in payload.items() if k not in PRIVATE_FIELDS)
    body["recorded_at"] = at
    return StoredEvent(event_id, factory_id, kind_type, dumps(body))


_COLUMNS = (
    StreamEvent.id,
    StreamEvent.factory_id,
    StreamEvent.kind,
    StreamEvent.payload,
    StreamEvent.created_at,
)


async def append_rows(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> list[int]:
    """`append_rows_sync` on an async connection."""
    return await conn.run_sync(append_rows_sync, rows)


def append_rows_sync(conn: Connection, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Append rows in order inside the caller's transaction, under the append lock;
    returns their ids, in order."""
    if conn.dialect.name == "postgresql":
        # Held to commit: the next writer draws its ids only after ours are visible,
        # so no reader ever sees id N+1 while N is still in flight. (SQLite: the
        # insert takes the database's one write lock, held to commit as well.)
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": APPEND_LOCK_KEY})
    result = conn.execute(
        insert(StreamEvent).returning(StreamEvent.id, sort_by_parameter_order=True), list(rows)
    )
    return list(result.scalars())


async def append_events(engine: AsyncEngine, rows: Sequence[dict[str, Any]]) -> list[StoredEvent]:
    """Append rows in one transaction; the events as readers will see them."""
    async with engine.begin() as conn:
        ids = await append_rows(conn, rows)
    return [
        render(i, r["factory_id"], r["kind"], r["payload"], r["created_at"])
        for i, r in zip(ids, rows, strict=True)
    ]


async def read_events(
    engine: AsyncEngine, after: int, *, factory_id: int | None = None, limit: int = 1000
) -> list[StoredEvent]:
    stmt = select(*_COLUMNS).where(StreamEvent.id > after).order_by(StreamEvent.id).limit(limit)
    if factory_id is not None:
        stmt = stmt.where(StreamEvent.factory_id == factory_id)
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return [render(*row) for row in rows]


async def id_range(engine: AsyncEngine) -> tuple[int | None, int | None]:
    async with engine.connect() as conn:
        row = (await conn.execute(select(func.min(StreamEvent.id), func.max(StreamEvent.id)))).one()
    return row[0], row[1]


async def purge_events(
    engine: AsyncEngine,
    *,
    now: dt.datetime | None = None,
    keep_s: float = DEFAULT_RETENTION_S,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> int:
    """Delete events older than `keep_s` and beyond the newest `max_rows`. Always a
    prefix of the ids, and never the newest row: it marks where the log stands, so
    a resume from an id the log no longer holds is told apart from one it never had."""
    cutoff = (now or utcnow()) - dt.timedelta(seconds=keep_s)
    async with engine.begin() as conn:
        newest = await conn.scalar(select(func.max(StreamEvent.id)))
        if newest is None:
            return 0
        first_kept = await conn.scalar(
            select(func.min(StreamEvent.id)).where(StreamEvent.created_at >= cutoff)
        )
        floor = max(first_kept if first_kept is not None else newest, newest - max_rows + 1)
        floor = min(floor, newest)
        result = await conn.execute(delete(StreamEvent).where(StreamEvent.id < floor))
    removed: int = result.rowcount
    return removed


class StreamRecorder:
    """Appends this process's alert and device events to the log, in batches."""

    def __init__(
        self,
        db: Database,
        bus: Bus,
        on_commit: Callable[[list[StoredEvent]], None],
        *,
        max_batch: int = 500,
        max_queue: int = 100_000,
        attempts: int = 5,
    ) -> None:
        self.db = db
        self.bus = bus
        self.on_commit = on_commit
        self.max_batch = max_batch
        self.attempts = attempts
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=max_queue)
        self._subs: list[Subscription] = []
        self._task: asyncio.Task[None] | None = None
        self.recorded = 0
        self.dropped = 0

    async def start(self) -> None:
        if self._task is not None:
            return
        self._subs = [self.bus.subscribe(pattern, self._handle) for pattern in SUBJECTS]
        self._task = asyncio.create_task(self._run(), name="stream:recorder")

    async def _handle(self, subject: str, payload: dict[str, Any]) -> None:
        if RECORDED_MARK in payload:  # logged by its producer's own transaction
            return
        row = event_row(subject, payload, utcnow())
        if row is None:
            log.warning("stream_event_without_factory", subject=subject)
            return
        try:
            self._queue.put_nowait(row)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("stream_recorder_queue_full", subject=subject)

    def _take(self, first: dict[str, Any]) -> list[dict[str, Any]]:
        batch = [first]
        while len(batch) < self.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _run(self) -> None:
        while True:
            batch = self._take(await self._queue.get())
            try:
                await self._write(batch, self.attempts)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: list[dict[str, Any]], attempts: int) -> None:
        for attempt in range(1, attempts + 1):
            try:
                async with self.db.write_gate():
                    events = await append_events(self.db.engine, batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                if attempt < attempts:
                    await asyncio.sleep(0.05 * 2 ** (attempt - 1))
                    continue
                if len(batch) > 1:  # one bad row (a factory deleted meanwhile) spoils a batch
                    for row in batch:
                        await self._write([row], 1)
                    return
                self.dropped += 1
                log.exception("stream_record_failed", subject=batch[0]["kind"])
                return
            else:
                self.recorded += len(batch)
                self.on_commit(events)
                return

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop listening, then let what was already handed over be written."""
        unsubscribe = getattr(self.bus, "unsubscribe", None)
        for sub in self._subs:
            if unsubscribe is not None:
                unsubscribe(sub)
        self._subs = []
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None


# --- fan-out ------------------------------------------------------------------------------


class Listener:
    """What the hub and the KPI feeds know of a connection: its factory and a doorbell.

    The doorbell is one future the connection awaits with a timer beside it, not an
    `asyncio.Event` under `wait_for`: ringing it resumes the connection in the next
    turn of the loop, where the event's waiter task and wait_for's relay took two
    more, each behind whatever else is queued (ingest, under load).
    """

    def __init__(self, factory_id: int) -> None:
        self.factory_id = factory_id
        self.rung = False
        self._waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        self.rung = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self.rung = False

    async def wait(self, timeout_s: float) -> None:
        """Until rung (at once if rung since `clear`) or `timeout_s` passed."""
        if self.rung:
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout_s, _ring_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _ring_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class EventHub:
    """This process's window on the log: the newest events in memory, for every
    connection. `floor < id <= last_id` is exactly what `buffer` holds."""

    def __init__(self, engine: AsyncEngine, *, poll_s: float = 1.0, size: int = 5000) -> None:
        self.engine = engine
        self.poll_s = poll_s
        self.size = size
        self.last_id = 0
        self.floor = 0
        self.buffer: list[StoredEvent] = []
        self._listeners: dict[int, set[Listener]] = {}
        self._poke = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def poke(self) -> None:
        """Something was appended: read it now."""
        self._poke.set()

    def committed(self, events: list[StoredEvent]) -> None:
        """This process's recorder committed `events`. When they directly follow what
        the hub holds (no other writer's ids in between), take them as they are:
        nothing below them can still appear (the append lock), so the push skips a
        read of the table. Otherwise read the table."""
        if not events or not self._listeners:
            return
        first = events[0].id
        contiguous = all(e.id == first + i for i, e in enumerate(events))
        if self._lock.locked() or not contiguous or first != self.last_id + 1:
            self.poke()
            return
        self.buffer.extend(events)
        self.last_id = events[-1].id
        self._trim()
        for factory_id in {e.factory_id for e in events}:
            for listener in self._listeners.get(factory_id, ()):
                listener.wake()

    async def register(self, listener: Listener) -> int:
        """Add a listener; returns the newest id the hub has read."""
        async with self._lock:
            if not self._listeners:
                # Idle until now (nobody read): start from where the log stands.
                _, newest = await id_range(self.engine)
                self.last_id = self.floor = newest or 0
                self.buffer.clear()
            self._listeners.setdefault(listener.factory_id, set()).add(listener)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="stream:hub")
        return self.last_id

    def unregister(self, listener: Listener) -> None:
        group = self._listeners.get(listener.factory_id)
        if group is not None:
            group.discard(listener)
            if not group:
                del self._listeners[listener.factory_id]

    def listeners(self) -> Iterable[Listener]:
        for group in self._listeners.values():
            yield from group

    def after(self, factory_id: int, cursor: int) -> tuple[list[StoredEvent], int] | None:
        """A factory's events after `cursor` and the new cursor; None if the buffer no
        longer reaches back that far (read the table instead)."""
        if cursor < self.floor:
            return None
        start = bisect.bisect_right(self.buffer, cursor, key=lambda e: e.id)
        events = [e for e in self.buffer[start:] if e.factory_id == factory_id]
        return events, max(cursor, self.last_id)

    async def refresh(self) -> None:
        async with self._lock:
            woken: set[int] = set()
            while True:
                events = await read_events(self.engine, self.last_id)
                if not events:
                    break
                self.buffer.extend(events)
                self.last_id = events[-1].id
                woken.update(e.factory_id for e in events)
                if len(events) < 1000:
                    break
            self._trim()
        for factory_id in woken:
            for listener in self._listeners.get(factory_id, ()):
                listener.wake()

    def _trim(self) -> None:
        if len(self.buffer) > 2 * self.size:
            cut = len(self.buffer) - self.size
            self.floor = self.buffer[cut - 1].id
            del self.buffer[:cut]

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.poll_s)
            self._poke.clear()
            if not self._listeners:
                continue
            try:
                await self.refresh()
            except Exception:
                log.warning("stream_hub_read_failed", exc_info=True)
                await asyncio.sleep(self.poll_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


# Per series: (device_id, ts, value, text).
_Latest = tuple[int, int, float | None, str | None]


class KpiFeed:
    """One factory's latest values, read every `interval_s` while anyone listens.

    `gen` counts reads that changed something; `changes` remembers which series
    changed in each of the last generations (None: all of them, the first read),
    so each connection asks "what changed since generation g" and sends only that.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        factory_id: int,
        directory: SeriesDirectory,
        *,
        interval_s: float = 1.0,
        history: int = 120,
    ) -> None:
        self.engine = engine
        self.factory_id = factory_id
        self.directory = directory
        self.interval_s = interval_s
        self.values: dict[int, _Latest] = {}
        self.items: dict[int, dict[str, Any]] = {}
        self.gen = 0
        self.changes: deque[tuple[int, list[int] | None]] = deque(maxlen=history)
        self.listeners: set[Listener] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, listener: Listener) -> None:
        self.listeners.add(listener)
        if self.gen:
            listener.wake()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"stream:kpi:{self.factory_id}")

    def discard(self, listener: Listener) -> None:
        self.listeners.discard(listener)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        while self.listeners:
            started = time.monotonic()
            try:
                await self.poll()
            except Exception:
                log.warning("stream_kpi_read_failed", factory_id=self.factory_id, exc_info=True)
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def poll(self) -> None:
        fid = self.factory_id
        async with self.engine.connect() as conn:
            rows = await queries.latest_rows(conn, fid)
            newest = max((r[0] for r in rows), default=0)
            by_id, _ = await self.directory.get(conn, fid, newest_seen=newest)
        values, items = self.values, self.items
        changed: list[int] = []
        stamps: dict[int, dt.datetime] = {}
        seen: set[int] = set()
        for sid, did, ts, value, text_value in rows:
            seen.add(sid)
            current = (did, ts, value, text_value)
            if values.get(sid) == current:
                continue
            info = by_id.get(sid)
            if info is None:  # its parameter was deleted
                continue
            values[sid] = current
            when = stamps.get(ts)
            if when is None:
                when = stamps[ts] = dt.datetime.fromtimestamp(ts / 1000, dt.UTC)
            limits = info.limits
            items[sid] = {
                **info.static,
                "value": value,
                "text": text_value,
                "ts": when,
                "level": None if limits is None or value is None else level_of(value, *limits),
            }
            changed.append(sid)
        for sid in [s for s in values if s not in seen]:
            del values[sid]
            items.pop(sid, None)
        if self.gen == 0:
            self.gen = 1
            self.changes.append((1, None))
        elif changed:
            self.gen += 1
            self.changes.append((self.gen, changed))
        else:
            return
        for listener in self.listeners:
            listener.wake()

    def changed_since(self, gen: int) -> list[int] | None:
        """Series changed after generation `gen`; None means all of them."""
        if gen >= self.gen:
            return []
        if not self.changes or gen < self.changes[0][0] - 1:
            return None
        out: dict[int, None] = {}
        for g, sids in self.changes:
            if g <= gen:
                continue
            if sids is None:
                return None
            out.update(dict.fromkeys(sids))
        return list(out)

    async def stop(self) -> None:
        self.listeners.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


# --- one client ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamRequest:
    factory_id: int
    permissions: frozenset[str]
    types: frozenset[str]  # requested (already checked against the permissions)
    last_event_id: str | None = None
    devices: frozenset[int] | None = None
    kpi_only: bool = False


Revalidate = Callable[[], Awaitable[frozenset[str]]]


def sse(event: str | None, data: bytes, event_id: int | None = None) -> bytes:
    head = b""
    if event_id is not None:
        head += b"id: %d\n" % event_id
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    return head + b"data: " + data + b"\n\n"


class StreamConnection:
    def __init__(self, service: StreamService, req: StreamRequest, revalidate: Revalidate) -> None:
        self.service = service
        self.req = req
        self.revalidate = revalidate
        self.permissions = req.permissions
        self.listener = Listener(req.factory_id)
        self.cursor = 0
        self.kpi_gen = 0
        self.pending: dict[int, None] = {}  # series to send, oldest change first

    def allowed(self, kind: str) -> bool:
        return kind in self.req.types and TYPE_PERMISSIONS[kind] in self.permissions

    def close(self) -> None:
        self.listener.wake()

    async def _start_cursor(self) -> bytes:
        """Where to resume; a `reset` event if the given id cannot be resumed from."""
        raw = self.req.last_event_id
        if raw is None:
            return b""
        try:
            wanted: int | None = int(raw.strip())
        except ValueError:
            wanted = None
        oldest, newest = await id_range(self.service.engine)
        if wanted is not None and wanted >= 0:
            if newest is None and wanted == 0:
                return b""
            if newest is not None and oldest is not None and oldest - 1 <= wanted <= newest:
                self.cursor = wanted
                return b""
        self.cursor = newest or 0
        if wanted is None or wanted < 0:
            reason = "invalid"
        elif newest is None or wanted > newest:
            reason = "unknown"  # not an id of this log (a restored or reset database)
        else:
            reason = "expired"  # older than retention
        body = dumps({"reason": reason, "last_event_id": raw, "resume_from": self.cursor})
        return sse("reset", body, self.cursor)

    async def _log_events(self) -> list[bytes]:
        hub = self.service.hub
        out: list[bytes] = []
        while True:
            found = hub.after(self.req.factory_id, self.cursor)
            if found is not None:
                events, self.cursor = found
                done = True
            else:  # resuming from further back than the hub keeps: read the table
                mark = hub.last_id
                limit = 500
                events = await read_events(
                    self.service.engine, self.cursor, factory_id=self.req.factory_id, limit=limit
                )
                done = len(events) < limit
                self.cursor = max(self.cursor, events[-1].id if events else 0)
                if done:
                    self.cursor = max(self.cursor, mark)
            out.extend(sse(e.type, e.data, e.id) for e in events if self.allowed(e.type))
            if done or len(out) >= 500:
                return out

    def _kpi_event(self, feed: KpiFeed) -> bytes | None:
        changed = feed.changed_since(self.kpi_gen)
        self.kpi_gen = feed.gen
        sids = list(feed.items) if changed is None else changed
        devices, kpi_only = self.req.devices, self.req.kpi_only
        for sid in sids:
            item = feed.items.get(sid)
            if item is None:
                continue
            if devices is not None and item["device_id"] not in devices:
                continue
            if kpi_only and not item["is_kpi"]:
                continue
            self.pending[sid] = None
        if not self.pending:
            return None
        cap = self.service.kpi_max_items
        take = list(self.pending)[:cap]
        for sid in take:
            del self.pending[sid]
        values = [feed.items[s] for s in take if s in feed.items]
        if not values:
            return None
        return sse("kpi", dumps({"values": values, "more": bool(self.pending)}))

    async def events(self) -> AsyncIterator[bytes]:
        service = self.service
        hub = service.hub
        wants_log = self.allowed("alert") or self.allowed("device")
        feed: KpiFeed | None = None
        registered = False
        try:
            first = b"retry: %d\n: connected\n\n" % service.retry_ms
            reset = await self._start_cursor()
            if wants_log:
                newest = await hub.register(self.listener)
                registered = True
                if self.req.last_event_id is None:
                    self.cursor = newest
            if self.allowed("kpi"):
                feed = service.kpi_feed(self.req.factory_id)
                feed.add(self.listener)
            service.connections.add(self)
            yield first + reset
            loop = asyncio.get_running_loop()
            last_sent = next_kpi = loop.time()
            next_check = loop.time() + service.revalidate_s
            while not service.closing:
                self.listener.clear()
                now = loop.time()
                if now >= next_check:
                    try:
                        self.permissions = await self.revalidate()
                    except StreamClosed as exc:
                        yield sse("close", dumps({"reason": exc.reason}))
                        return
                    next_check = now + service.revalidate_s
                chunks: list[bytes] = []
                if wants_log and (self.allowed("alert") or self.allowed("device")):
                    chunks = await self._log_events()
                if (
                    feed is not None
                    and self.allowed("kpi")
                    and now >= next_kpi
                    and (feed.gen > self.kpi_gen or self.pending)
                ):
                    kpi = self._kpi_event(feed)
                    if kpi is not None:
                        chunks.append(kpi)
                        next_kpi = now + service.kpi_interval_s * 0.9
                if chunks:
                    yield b"".join(chunks)
                    last_sent = loop.time()
                elif loop.time() - last_sent >= service.heartbeat_s:
                    yield b": ping\n\n"
                    last_sent = loop.time()
                if self.listener.rung:
                    continue
                now = loop.time()
                deadline = min(last_sent + service.heartbeat_s, next_check)
                if feed is not None and self.pending:
                    deadline = min(deadline, max(next_kpi, now + 0.01))
                elif feed is not None and feed.gen > self.kpi_gen:
                    deadline = min(deadline, next_kpi)
                await self.listener.wait(max(0.0, deadline - now))
        except Exception:
            # After the headers went out there is no error response to give: end the
            # stream; the client reconnects with its Last-Event-ID and loses nothing.
            log.warning("stream_connection_failed", factory_id=self.req.factory_id, exc_info=True)
        finally:
            service.connections.discard(self)
            if registered:
                hub.unregister(self.listener)
            if feed is not None:
                service.release_feed(feed, self.listener)


# --- the service ---------------------------------------------------------------------------


class StreamService:
    """Everything of the stream one process runs; owned by the Container."""

    def __init__(
        self,
        db: Database,
        bus: Bus,
        *,
        poll_s: float = 1.0,
        kpi_interval_s: float = 1.0,
        heartbeat_s: float = 15.0,
        revalidate_s: float = 30.0,
        retry_ms: int = 3000,
        kpi_max_items: int = 500,
        retention_s: float = DEFAULT_RETENTION_S,
        max_rows: int = DEFAULT_MAX_ROWS,
    ) -> None:
        self.engine = db.engine
        self.bus = bus
        self.kpi_interval_s = kpi_interval_s
        self.heartbeat_s = heartbeat_s
        self.revalidate_s = revalidate_s
        self.retry_ms = retry_ms
        self.kpi_max_items = kpi_max_items
        self.retention_s = retention_s
        self.max_rows = max_rows
        self.hub = EventHub(db.engine, poll_s=poll_s)
        self.recorder = StreamRecorder(db, bus, self.hub.committed)
        self.directory = SeriesDirectory()
        self.feeds: dict[int, KpiFeed] = {}
        self._retired: set[KpiFeed] = set()
        self.connections: set[StreamConnection] = set()
        self.closing = False

    async def start(self) -> None:
        self.closing = False
        await self.recorder.start()

    async def record_in(
        self, conn: AsyncConnection, events: Sequence[tuple[str, dict[str, Any]]]
    ) -> list[StoredEvent]:
        """`record_in_sync` on an async connection."""
        return await conn.run_sync(self.record_in_sync, events)

    def record_in_sync(
        self, conn: Connection, events: Sequence[tuple[str, dict[str, Any]]]
    ) -> list[StoredEvent]:
        """Append (subject, payload) events inside the caller's transaction (an outbox:
        the log entry commits with the change itself, one transaction instead of two).
        After the commit, hand the result to `committed`; each payload is marked with
        its `stream_id` so the recorder does not log it again when it is published."""
        now = utcnow()
        pairs = [(p, row) for s, p in events if (row := event_row(s, p, now)) is not None]
        if not pairs:
            return []
        rows = [row for _, row in pairs]
        ids = append_rows_sync(conn, rows)
        for (payload, _), event_id in zip(pairs, ids, strict=True):
            payload[RECORDED_MARK] = event_id
        return [
            render(i, r["factory_id"], r["kind"], r["payload"], r["created_at"])
            for i, r in zip(ids, rows, strict=True)
        ]

    def committed(self, events: list[StoredEvent]) -> None:
        """Events from `record_in` are committed: push them to open streams now."""
        self.hub.committed(events)

    def connect(self, req: StreamRequest, revalidate: Revalidate) -> StreamConnection:
        return StreamConnection(self, req, revalidate)

    def kpi_feed(self, factory_id: int) -> KpiFeed:
        feed = self.feeds.get(factory_id)
        if feed is None:
            feed = self.feeds[factory_id] = KpiFeed(
                self.engine, factory_id, self.directory, interval_s=self.kpi_interval_s
            )
        return feed

    def release_feed(self, feed: KpiFeed, listener: Listener) -> None:
        feed.discard(listener)
        if not feed.listeners and self.feeds.get(feed.factory_id) is feed:
            # Its task sees nobody listening and ends within one interval; keep it
            # until then so stop() can wait for it.
            del self.feeds[feed.factory_id]
            self._retired = {f for f in self._retired if f.running}
            self._retired.add(feed)

    async def purge(self, now: dt.datetime | None = None) -> int:
        return await purge_events(
            self.engine, now=now, keep_s=self.retention_s, max_rows=self.max_rows
        )

    def shutdown(self) -> None:
        """End every open stream now (the server is stopping: don't make it wait)."""
        self.closing = True
        for connection in list(self.connections):
            connection.close()

    async def stop(self) -> None:
        self.shutdown()
        await self.recorder.stop()
        await self.hub.stop()
        for feed in [*self.feeds.values(), *self._retired]:
            await feed.stop()
        self.feeds.clear()
        self._retired.clear()
