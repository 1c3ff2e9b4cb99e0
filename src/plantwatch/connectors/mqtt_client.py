"""The ingest subscriber for an external MQTT broker (Mosquitto, EMQX, ...).

It subscribes to `$share/{group}/factories/+/devices/+/telemetry` with QoS 1, so
several ingest workers split the load, and acknowledges each message (PUBACK)
only after the pipeline committed it. A message whose batch failed is never
acknowledged: the connection is dropped and re-established with the same
persistent session, and the broker sends the unacknowledged messages again.

Why its own small MQTT client and not a library: the subscriber needs exactly
one thing libraries make hard — a PUBACK sent later, from another task, on the
connection the message came from and never on a newer one (a late ack on a
reconnected session would acknowledge a different message that reuses the packet
id). aiomqtt hides paho's manual ack and, with paho's one-packet-per-read loop,
tops out near 4,000 messages/s here; gmqtt acks on whatever connection is
current. This protocol object is one connection: its acks cannot outlive it.
It parses every packet in a read at once, bounds the messages in flight with the
MQTT 5 Receive Maximum (and by pausing the socket, for 3.1.1 brokers), and
speaks MQTT 5 with a fallback to 3.1.1. See docs/mqtt.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import structlog

from plantwatch.connectors.mqtt import (
    ACKED,
    NOT_ACKED,
    TELEMETRY_FILTER,
    MqttIngest,
    MqttUrl,
)

log = structlog.get_logger("plantwatch.mqtt")

BROKER = "external"
_ACKED = ACKED.labels(BROKER)
MQTT_V311 = 4
MQTT_V5 = 5

# CONNACK return codes (3.1.1) and reason codes (5) worth naming in an error.
_REFUSALS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
}


class MqttError(Exception):
    """The broker refused us or broke the protocol."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None if `data` ends inside it."""
    value = 0
    shift = 0
    for i in range(4):
        if pos + i >= len(data):
            return None
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise MqttError("malformed variable byte integer")


def _string(value: bytes) -> bytes:
    return struct.pack("!H", len(value)) + value


def connect_packet(
    version: int,
    client_id: str,
    username: str | None,
    password: str | None,
    *,
    keepalive: int,
    session_expiry_s: int,
    receive_maximum: int,
) -> bytes:
    flags = 0  # clean start/session off: the session (and unacked messages) persists
    payload = _string(client_id.encode())
    if username is not None:
        flags |= 0x80
        payload += _string(username.encode())
    if password is not None:
        flags |= 0x40
        payload += _string(password.encode())
    variable = _string(b"MQTT") + bytes([version, flags]) + struct.pack("!H", keepalive)
    if version == MQTT_V5:
        props = b"\x11" + struct.pack("!I", session_expiry_s)
        props += b"\x21" + struct.pack("!H", receive_maximum)
        variable += _varint(len(props)) + props
    body = variable + payload
    return b"\x10" + _varint(len(body)) + body


def subscribe_packet(version: int, packet_id: int, topic_filter: str, qos: int) -> bytes:
    body = struct.pack("!H", packet_id)
    if version == MQTT_V5:
        body += b"\x00"  # no properties
    body += _string(topic_filter.encode()) + bytes([qos])
    return b"\x82" + _varint(len(body)) + body


# (topic, payload, qos, packet id) of each PUBLISH
Publish = tuple[bytes, bytes, int, int]
# Called once per read from the socket with the PUBLISH packets it completed.
OnPublish = Callable[["SubscriberConnection", list[Publish]], None]


class SubscriberConnection(asyncio.Protocol):
    """One MQTT connection of the subscriber. Acks go only to this connection."""

    def __init__(self, version: int, on_publish: OnPublish, max_in_flight: int) -> None:
        self.version = version
        self.on_publish = on_publish
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[tuple[bool, int]] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self._buffer = bytearray()
        self._publishes: list[Publish] = []
        self._paused = False
        self.last_received = time.monotonic()

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        buffer = self._buffer
        buffer += data
        pos = 0
        end = len(buffer)
        try:
            while end - pos >= 2:
                length = _read_varint(buffer, pos + 1)
                if length is None:
                    break
                size, start = length
                if start + size > end:
                    break
                self._packet(buffer[pos], bytes(buffer[start : start + size]))
                pos = start + size
        except (MqttError, struct.error, IndexError, UnicodeDecodeError) as exc:
            self._fail(MqttError(f"protocol error: {exc}"))
            return
        del buffer[:pos]
        if self._publishes:
            publishes, self._publishes = self._publishes, []
            self.on_publish(self, publishes)

    def connection_lost(self, exc: Exception | None) -> None:
        error = exc or MqttError("the broker closed the connection")
        if not self.connack.done():
            self.connack.set_exception(error)
        for waiter in self._subacks.values():
            if not waiter.done():
                waiter.set_exception(error)
        if not self.closed.done():
            self.closed.set_result(None)

    # -- packets in --------------------------------------------------------------------

    def _packet(self, header: int, body: bytes) -> None:
        kind = header >> 4
        if kind == 3:  # PUBLISH
            qos = (header >> 1) & 0x03
            (topic_length,) = struct.unpack_from("!H", body, 0)
            pos = 2 + topic_length
            topic = body[2:pos]
            packet_id = 0
            if qos:
                if qos > 1:
                    raise MqttError("QoS 2 delivery on a QoS 1 subscription")
                (packet_id,) = struct.unpack_from("!H", body, pos)
                pos += 2
            if self.version == MQTT_V5:
                props = _read_varint(body, pos)
                if props is None:
                    raise MqttError("truncated PUBLISH properties")
                pos = props[1] + props[0]
            self.in_flight += 1
            if self.in_flight >= self.max_in_flight and not self._paused and self.transport:
                self._paused = True
                self.transport.pause_reading()
            self._publishes.append((topic, body[pos:], qos, packet_id))
        elif kind == 2:  # CONNACK
            if not self.connack.done():
                self.connack.set_result((bool(body[0] & 1), body[1]))
        elif kind == 9:  # SUBACK
            (packet_id,) = struct.unpack_from("!H", body, 0)
            pos = 2
            if self.version == MQTT_V5:
                props = _read_varint(body, pos)
                if props is None:
                    raise MqttError("truncated SUBACK properties")
                pos = props[1] + props[0]
            waiter = self._subacks.pop(packet_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(list(body[pos:]))
        elif kind == 13:  # PINGRESP
            pass
        elif kind == 14:  # DISCONNECT from the server (MQTT 5)
            reason = body[0] if body else 0
            self._fail(MqttError(f"the broker disconnected us (reason 0x{reason:02x})"))
        else:
            raise MqttError(f"unexpected packet type {kind}")

    def _fail(self, exc: Exception) -> None:
        log.warning("mqtt_connection_error", error=str(exc))
        self.abort()

    # -- packets out -------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True

    def ack_many(self, packet_ids: Sequence[int]) -> int:
        """PUBACK each of `packet_ids` in one write; how many were sent (0: gone)."""
        if not packet_ids:
            return 0
        packets = b"".join(b"\x40\x02" + pid.to_bytes(2, "big") for pid in packet_ids)
        return len(packet_ids) if self.send(packets) else 0

    def done_with_messages(self, count: int) -> None:
        self.in_flight -= count
        if self._paused and self.in_flight < self.max_in_flight and self.transport:
            self._paused = False
            self.transport.resume_reading()

    async def subscribe(self, packet_id: int, topic_filter: str, qos: int) -> list[int]:
        waiter: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._subacks[packet_id] = waiter
        self.send(subscribe_packet(self.version, packet_id, topic_filter, qos))
        return await waiter

    def ping(self) -> None:
        self.send(b"\xc0\x00")

    def stop_reading(self) -> None:
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def disconnect(self, *, end_session: bool = False) -> None:
        """Send DISCONNECT and close; `end_session` (MQTT 5) drops the broker-side session."""
        if self.version == MQTT_V5 and end_session:
            props = b"\x11" + struct.pack("!I", 0)
            body = b"\x00" + _varint(len(props)) + props
            self.send(b"\xe0" + _varint(len(body)) + body)
        else:
            self.send(b"\xe0\x00")
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping unsent acks: the broker redelivers what was not acked."""
        if self.transport is not None:
            self.transport.abort()


def default_client_id() -> str:
    return f"plantwatch-ingest-{socket.gethostname()}-{os.getpid()}"[:64]


class IngestSubscriber:
    """Subscribe on an external broker and ingest every telemetry message, acking after
    commit; reconnects (same client id, persistent session) until stopped."""

    def __init__(
        self,
        ingest: MqttIngest,
        url: MqttUrl,
        *,
        client_id: str | None = None,
        share_group: str = "plantwatch",
        topic_filter: str = TELEMETRY_FILTER,
        max_in_flight: int = 8000,
        session_expiry_s: int = 300,
        keepalive_s: int = 30,
        version: int = MQTT_V5,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.ingest = ingest
        self.url = url
        self.client_id = client_id or default_client_id()
        self.subscription = f"$share/{share_group}/{topic_filter}" if share_group else topic_filter
        self.max_in_flight = max(1, min(max_in_flight, 65535))
        self.session_expiry_s = session_expiry_s
        self.keepalive_s = keepalive_s
        self.version = version
        self.ssl_context = ssl_context
        if url.tls and ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        self.connected = asyncio.Event()
        self.last_error: str | None = None
        self.connections = 0
        self.messages = 0
        self._connection: SubscriberConnection | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    # -- status ------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        ok = self.connected.is_set()
        status: dict[str, Any] = {
            "status": "ok" if ok else "error",
            "broker": self.url.display,
            "subscription": self.subscription,
            "in_flight": len(self._tasks),
        }
        if not ok and self.last_error:
            status["error"] = self.last_error
        return status

    # -- running -----------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, subscribe and ingest until `stop()`; reconnect after failures."""
        delay = 0.1
        while not self._stopping.is_set():
            try:
                connection = await self._connect()
            except (OSError, MqttError, TimeoutError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.warning("mqtt_connect_failed", broker=self.url.display, error=self.last_error)
            else:
                delay = 0.1
                await self._serve(connection)
            if self._stopping.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
            delay = min(delay * 2, 10.0)

    def stop(self) -> None:
        self._stopping.set()

    async def _connect(self) -> SubscriberConnection:
        loop = asyncio.get_running_loop()
        _, connection = await asyncio.wait_for(
            loop.create_connection(
                lambda: SubscriberConnection(self.version, self._on_publish, self.max_in_flight),
                self.url.host,
                self.url.port,
                ssl=self.ssl_context,
            ),
            timeout=10,
        )
        try:
            connection.send(
                connect_packet(
                    self.version,
                    self.client_id,
                    self.url.username,
                    self.url.password,
                    keepalive=self.keepalive_s,
                    session_expiry_s=self.session_expiry_s,
                    receive_maximum=self.max_in_flight,
                )
            )
            _, code = await asyncio.wait_for(connection.connack, timeout=10)
            if code in (1, 0x84) and self.version == MQTT_V5:
                log.info("mqtt_broker_speaks_3_1_1", broker=self.url.display)
                self.version = MQTT_V311
                connection.abort()
                return await self._connect()
            if code != 0:
                raise MqttError(f"connection refused: {_REFUSALS.get(code, hex(code))}")
            granted = await asyncio.wait_for(connection.subscribe(1, self.subscription, 1), 10)
            if not granted or granted[0] > 1:
                code = granted[0] if granted else -1
                raise MqttError(
                    f"subscription to {self.subscription} refused "
                    f"({_REFUSALS.get(code, hex(code))})"
                )
        except BaseException:
            connection.abort()
            raise
        return connection

    async def _serve(self, connection: SubscriberConnection) -> None:
        self._connection = connection
        self.connections += 1
        self.last_error = None
        self.connected.set()
        log.info(
            "mqtt_subscribed",
            broker=self.url.display,
            subscription=self.subscription,
            client_id=self.client_id,
            protocol="5" if self.version == MQTT_V5 else "3.1.1",
        )
        keepalive = asyncio.create_task(self._keepalive(connection))
        stop: asyncio.Future[Any] = asyncio.ensure_future(self._stopping.wait())
        closed: asyncio.Future[Any] = connection.closed
        try:
            await asyncio.wait({stop, closed}, return_when=asyncio.FIRST_COMPLETED)
            if self._stopping.is_set() and not connection.closed.done():
                # Graceful: take no more, finish (and ack) what is in flight, then leave and
                # end the broker-side session so the group's other workers get its share.
                connection.stop_reading()
                await self._drain(10)
                connection.disconnect(end_session=True)
            elif not self._stopping.is_set():
                self.last_error = self.last_error or "connection lost"
                log.warning("mqtt_connection_lost", broker=self.url.display)
        finally:
            self.connected.clear()
            keepalive.cancel()
            stop.cancel()
            self._connection = None

    async def _drain(self, wait_s: float) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=wait_s)

    async def _keepalive(self, connection: SubscriberConnection) -> None:
        interval = max(self.keepalive_s / 2, 0.5)
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - connection.last_received > self.keepalive_s * 1.5:
                self.last_error = "the broker stopped answering"
                connection.abort()
                return
            connection.ping()

    # -- messages ----------------------------------------------------------------------

    def _on_publish(self, connection: SubscriberConnection, publishes: list[Publish]) -> None:
        task = asyncio.ensure_future(self._process(connection, publishes))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _process(self, connection: SubscriberConnection, publishes: list[Publish]) -> None:
        """Ingest the messages of one read together; ack each after its commit."""
        self.messages += len(publishes)
        try:
            await self.ingest.handle_messages(
                [
                    (topic.decode("utf-8", "surrogateescape"), payload)
                    for topic, payload, _, _ in publishes
                ],
                broker=BROKER,
            )
        except Exception as exc:
            # Not durable: never ack. Dropping the connection makes the broker send every
            # unacknowledged message again when we are back (same session).
            NOT_ACKED.labels(BROKER).inc(len(publishes))
            self.last_error = f"ingest failed: {exc}"
            log.error("mqtt_ingest_failed_not_acked", error=str(exc))
            connection.abort()
        else:
            acked = connection.ack_many([pid for _, _, qos, pid in publishes if qos])
            _ACKED.inc(acked)
        finally:
            connection.done_with_messages(len(publishes))
