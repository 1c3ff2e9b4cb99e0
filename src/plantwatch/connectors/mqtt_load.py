"""A fast MQTT 3.1.1 publisher for load tests and benchmarks (not for devices).

Device-grade clients (paho, aiomqtt) spend tens of microseconds per message in
Python, so on a 2-core machine the publisher, not plantwatch, would set the
pace. This one pipelines pre-encoded PUBLISH packets over one socket with a
window of unacknowledged QoS 1 packet ids, and records when each PUBACK came
back. It speaks just enough MQTT for that: CONNECT/CONNACK, PUBLISH, PUBACK.

    stats = await publish_messages("127.0.0.1", 1883, messages, username=..., password=...)
    stats.acked, stats.seconds, stats.messages_per_s

`telemetry_messages` builds realistic 10-metric payloads for a set of topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import orjson

CONNACK_CODES = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


class PublishError(Exception):
    """The broker refused the connection or closed it before every message was acked."""


@dataclass
class PublishStats:
    sent: int = 0
    acked: int = 0
    seconds: float = 0.0
    # Seconds from sending each message to its PUBACK (QoS 1), in ack order.
    ack_latencies: list[float] = field(default_factory=list)

    @property
    def messages_per_s(self) -> float:
        return self.acked / self.seconds if self.seconds else 0.0


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def connect_packet(
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    *,
    keepalive: int = 60,
    clean_session: bool = True,
) -> bytes:
    flags = 0x02 if clean_session else 0
    payload = _utf8(client_id)
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
    if password is not None:
        flags |= 0x40
        payload += _utf8(password)
    variable = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
    body = variable + payload
    return b"\x10" + _remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes, qos: int, packet_id: int = 0) -> bytes:
    body = _utf8(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + _remaining_length(len(body)) + body


def telemetry_messages(
    topics: Sequence[str], count: int, *, metrics: int = 10, start_ms: int | None = None
) -> Iterator[tuple[str, bytes]]:
    """`count` payloads `{"ts", "values": {m0..m<metrics-1>}}`, round robin over `topics`,
    each topic's timestamps 1 ms apart and increasing (so every point is a new row)."""
    base = int(time.time() * 1000) - count // max(len(topics), 1) - 1000
    base = start_ms if start_ms is not None else base
    names = [f"m{i}" for i in range(metrics)]
    for i in range(count):
        topic = topics[i % len(topics)]
        ts = base + i // len(topics)
        values = {name: round((i % 1000) * 0.1 + j, 3) for j, name in enumerate(names)}
        yield topic, orjson.dumps({"ts": ts, "values": values})


async def publish_messages(
    host: str,
    port: int,
    messages: Iterable[tuple[str, bytes]],
    *,
    username: str | None = None,
    password: str | None = None,
    qos: int = 1,
    window: int = 500,
    client_id: str | None = None,
    timeout_s: float = 120.0,
) -> PublishStats:
    """Publish every (topic, payload) on one connection; return once all are acked.

    At most `window` QoS 1 messages are unacknowledged at once. QoS 0 messages
    are written as fast as the socket takes them (`acked` then counts sent).
    """
    if qos not in (0, 1):
        raise ValueError("qos must be 0 or 1")
    window = max(1, min(window, 65535))
    reader, writer = await asyncio.open_connection(host, port)
    stats = PublishStats()
    try:
        writer.write(
            connect_packet(client_id or f"pw-load-{os.getpid()}-{id(stats)}", username, password)
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readexactly(4), timeout=10)
        if head[0] != 0x20 or head[3] != 0:
            raise PublishError(f"connection refused: {CONNACK_CODES.get(head[3], head[3])}")
        await asyncio.wait_for(
            _pump(reader, writer, messages, qos, window, stats), timeout=timeout_s
        )
    finally:
        with contextlib.suppress(Exception):
            writer.write(b"\xe0\x00")  # DISCONNECT
            writer.close()
            await writer.wait_closed()
    return stats


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    messages: Iterable[tuple[str, bytes]],
    qos: int,
    window: int,
    stats: PublishStats,
) -> None:
    started = time.perf_counter()
    if qos == 0:
        for topic, payload in messages:
            writer.write(publish_packet(topic, payload, 0))
            stats.sent += 1
            if stats.sent % 256 == 0:
                await writer.drain()
        await writer.drain()
        stats.acked = stats.sent
        stats.seconds = time.perf_counter() - started
        return

    free = asyncio.Semaphore(window)
    sent_at: dict[int, float] = {}
    ids = itertools.cycle(range(1, 65536))
    finished = asyncio.Event()
    source_done = False

    async def read_acks() -> None:
        buffer = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                raise PublishError(
                    f"broker closed the connection after {stats.acked}/{stats.sent} acks"
                )
            buffer += chunk
            pos = 0
            now = time.perf_counter()
            while len(buffer) - pos >= 4:
                kind = buffer[pos]
                if kind != 0x40:  # only PUBACKs expected (2-byte remaining length)
                    raise PublishError(f"unexpected packet type 0x{kind:02x}")
                packet_id = (buffer[pos + 2] << 8) | buffer[pos + 3]
                pos += 4
                at = sent_at.pop(packet_id, None)
                if at is not None:
                    stats.acked += 1
                    stats.ack_latencies.append(now - at)
                    free.release()
            buffer = buffer[pos:]
            if source_done and not sent_at:
                finished.set()
                return

    acks = asyncio.create_task(read_acks())
    try:
        for topic, payload in messages:
            if free.locked():
                await writer.drain()
            await free.acquire()
            if acks.done():
                acks.result()
            packet_id = next(ids)
            while packet_id in sent_at:
                packet_id = next(ids)
            sent_at[packet_id] = time.perf_counter()
            writer.write(publish_packet(topic, payload, 1, packet_id))
            stats.sent += 1
        await writer.drain()
        source_done = True
        if not sent_at:
            finished.set()
        waiter = asyncio.create_task(finished.wait())
        done, _ = await asyncio.wait({acks, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if acks in done:
            acks.result()
    finally:
        acks.cancel()
        with contextlib.suppress(asyncio.CancelledError, PublishError):
            await acks
    stats.seconds = time.perf_counter() - started
