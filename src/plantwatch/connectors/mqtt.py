"""MQTT ingest: what every MQTT path shares.

A message on `factories/{factory_slug}/devices/{device_key}/telemetry` is
resolved to a device and handed to the ingest pipeline, which returns only after
the batch holding it committed. Whoever received the message (the embedded
broker, or the subscriber on an external broker) acknowledges it after that,
never before: `MqttIngest.handle_message` raising means "not stored, do not ack".

Anything that cannot be tied to an active device becomes a dead letter with a
precise reason (`invalid_topic`, `unknown_factory`, `unknown_device`,
`device_inactive`, `device_mismatch`), its raw payload kept for replay; bad
payloads are dead-lettered by the pipeline with its own reasons. Factories
with `auto_register_devices` get unknown devices registered on first sight.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog
from prometheus_client import Counter
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from plantwatch.assets.models import Device
from plantwatch.assets.schemas import DEVICE_KEY_PATTERN
from plantwatch.core.db import Database
from plantwatch.telemetry.payloads import clean_text
from plantwatch.telemetry.pipeline import DeviceRef, IngestOutcome, IngestPipeline
from plantwatch.telemetry.service import (
    DEVICE_INACTIVE,
    DEVICE_MISMATCH,
    INVALID_TOPIC,
    UNKNOWN_DEVICE,
    UNKNOWN_FACTORY,
    DeviceDirectory,
    FactoryRef,
)
from plantwatch.tenancy.schemas import SLUG_RE

log = structlog.get_logger("plantwatch.mqtt")

SOURCE = "mqtt"
TELEMETRY_FILTER = "factories/+/devices/+/telemetry"
# The user name plantwatch's own clients log in to the embedded broker with. It can
# never be a device key (those start with a letter or digit).
INTERNAL_USERNAME = "$plantwatch"
STORED = "stored"
# Dead letters keep at most this much of a message that never reached the parser.
DEAD_LETTER_PAYLOAD_LIMIT = 65_536
_TOPIC_COLUMN = 300
_DEVICE_KEY_RE = re.compile(DEVICE_KEY_PATTERN)
_DEVICE_KEY_MAX = 100

RECEIVED = Counter(
    "plantwatch_mqtt_messages_received_total", "MQTT telemetry messages received", ["broker"]
)
ACKED = Counter(
    "plantwatch_mqtt_messages_acked_total",
    "MQTT messages acknowledged (QoS 1) after the batch holding them committed",
    ["broker"],
)
DEAD_LETTERED = Counter(
    "plantwatch_mqtt_messages_dead_lettered_total",
    "MQTT messages stored as a dead letter instead of telemetry",
    ["broker", "reason"],
)
NOT_ACKED = Counter(
    "plantwatch_mqtt_messages_not_acked_total",
    "MQTT messages left unacknowledged because storing them failed (they are redelivered)",
    ["broker"],
)
DROPPED = Counter(
    "plantwatch_mqtt_messages_dropped_total",
    "QoS 0 MQTT messages dropped because too many messages were in flight",
    ["broker"],
)


# Health of the MQTT side running in this process (the `ingest` role registers it), for
# `/health`: `mqtt_health()` is None when no MQTT ingest runs here.
_health_sources: list[Callable[[], dict[str, Any]]] = []


def register_health(source: Callable[[], dict[str, Any]]) -> None:
    _health_sources.append(source)


def unregister_health(source: Callable[[], dict[str, Any]]) -> None:
    if source in _health_sources:
        _health_sources.remove(source)


def mqtt_health() -> dict[str, Any] | None:
    """`{"status": "ok"|"error", ...}` of the broker connection, or None if not running."""
    return _health_sources[-1]() if _health_sources else None


def telemetry_topic(factory_slug: str, device_key: str) -> str:
    return f"factories/{factory_slug}/devices/{device_key}/telemetry"


def device_prefix(factory_slug: str, device_key: str) -> str:
    """The topic subtree a device owns: `factories/{slug}/devices/{key}/`."""
    return f"factories/{factory_slug}/devices/{device_key}/"


def parse_telemetry_topic(topic: str) -> tuple[str, str] | None:
    """(factory_slug, device_key) of a telemetry topic, or None if it has another shape."""
    parts = topic.split("/")
    if (
        len(parts) != 5
        or parts[0] != "factories"
        or parts[2] != "devices"
        or parts[4] != "telemetry"
        or not parts[1]
        or not parts[3]
    ):
        return None
    return parts[1], parts[3]


def internal_password(secret: str) -> str:
    """The password of `INTERNAL_USERNAME`: derived from the installation's secret, so
    every plantwatch process of the installation (and nobody else) knows it."""
    return hmac.new(secret.encode(), b"plantwatch/mqtt-internal/v1", hashlib.sha256).hexdigest()


def is_internal(username: str | None, password: str | None, secret: str) -> bool:
    if username != INTERNAL_USERNAME or not password:
        return False
    return hmac.compare_digest(password.encode(), internal_password(secret).encode())


def _valid_device_key(key: str) -> bool:
    return len(key) <= _DEVICE_KEY_MAX and _DEVICE_KEY_RE.fullmatch(key) is not None


def _show(value: str, limit: int = 120) -> str:
    return repr(clean_text(value, limit))


# --- broker URLs -----------------------------------------------------------------------


@dataclass(frozen=True)
class MqttUrl:
    """`mqtt://[user[:password]@]host[:port]` or `mqtts://...` (TLS, default port 8883)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> MqttUrl:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"not an MQTT URL (mqtt://host:port or mqtts://...): {parts.scheme}")
        tls = parts.scheme in ("mqtts", "ssl")
        if not parts.hostname:
            raise ValueError("the MQTT URL has no host")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise ValueError("the MQTT URL has an invalid port") from None
        return cls(
            host=parts.hostname,
            port=port,
            tls=tls,
            username=unquote(parts.username) if parts.username is not None else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    @property
    def display(self) -> str:
        """The URL without its password (for logs and banners)."""
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}"


# --- the shared ingest step ---------------------------------------------------------------


class MqttIngest:
    """Resolve a topic to a device and ingest the payload; dead-letter what cannot be.

    `handle_message` returns `STORED` (some or all values stored) or the reason the
    message became a dead letter, and raises when nothing could be made durable
    (database down): the caller must then not acknowledge the message.
    """

    def __init__(
        self,
        db: Database,
        devices: DeviceDirectory,
        pipeline: IngestPipeline,
        *,
        ttl_s: float = 10.0,
    ) -> None:
        self.db = db
        self.devices = devices
        self.pipeline = pipeline
        self.ttl_s = ttl_s
        # (factory_id, device_key) -> (expires, is_active or None if no such device)
        self._states: dict[tuple[int, str], tuple[float, bool | None]] = {}
        self._register_lock = asyncio.Lock()
        self._received: dict[str, Any] = {}

    async def handle_message(
        self,
        topic: str,
        payload: bytes,
        *,
        sender: DeviceRef | None = None,
        broker: str = "external",
    ) -> str:
        """Ingest one message; `sender` is the device that published it when the broker
        authenticated it (embedded broker): then the topic must be its own."""
        self._count_received(broker, 1)
        resolved = await self._resolve(topic, payload, sender=sender, broker=broker)
        if isinstance(resolved, str):
            return resolved
        outcome = await self.pipeline.ingest(resolved, payload, source=SOURCE, topic=topic)
        return self._status(outcome, broker)

    async def handle_messages(
        self, messages: Sequence[tuple[str, bytes]], *, broker: str = "external"
    ) -> list[str]:
        """`handle_message` for messages that arrived together (one read from an external
        broker): they are queued for the writer together and awaited together, which
        saves the per-message task and wake-up. Raises when any could not be made
        durable: the caller then acknowledges none of them."""
        self._count_received(broker, len(messages))
        statuses: list[str] = []
        accepted: list[tuple[int, DeviceRef, str, bytes]] = []
        for topic, payload in messages:
            resolved = await self._resolve(topic, payload, broker=broker)
            if isinstance(resolved, str):
                statuses.append(resolved)
            else:
                accepted.append((len(statuses), resolved, topic, payload))
                statuses.append(STORED)
        if accepted:
            outcomes = await self.pipeline.ingest_many(
                [(device, payload, topic) for _, device, topic, payload in accepted],
                source=SOURCE,
            )
            for (index, _, _, _), outcome in zip(accepted, outcomes, strict=True):
                statuses[index] = self._status(outcome, broker)
        return statuses

    def _count_received(self, broker: str, count: int) -> None:
        counter = self._received.get(broker)
        if counter is None:
            counter = self._received[broker] = RECEIVED.labels(broker)
        counter.inc(count)  # once per read, not per message: each inc takes a lock

    @staticmethod
    def _status(outcome: IngestOutcome, broker: str) -> str:
        if not outcome.accepted and outcome.rejects:
            reason = outcome.rejects[0].reason
            DEAD_LETTERED.labels(broker, reason).inc()
            return reason
        return STORED

    async def _resolve(
        self, topic: str, payload: bytes, *, sender: DeviceRef | None = None, broker: str
    ) -> DeviceRef | str:
        """The device a message is for, or the reason it became a dead letter."""
        parts = parse_telemetry_topic(topic)
        if parts is None:
            return await self._reject(
                broker,
                INVALID_TOPIC,
                f"topic {_show(topic)} is not factories/{{factory}}/devices/{{device}}/telemetry",
                topic,
                payload,
                sender=sender,
            )
        slug, key = parts
        factory = await self.devices.factory(slug) if SLUG_RE.fullmatch(slug) else None
        if sender is not None and (
            factory is None or factory.factory_id != sender.factory_id or key != sender.device_key
        ):
            return await self._reject(
                broker,
                DEVICE_MISMATCH,
                f"device '{sender.device_key}' published under another device's topic "
                f"{_show(topic)}",
                topic,
                payload,
                sender=sender,
            )
        if factory is None:
            return await self._reject(
                broker, UNKNOWN_FACTORY, f"no factory {_show(slug, 64)}", topic, payload
            )
        device = sender or await self._device(factory, key)
        if isinstance(device, tuple):
            reason, detail = device
            known_key = key if _valid_device_key(key) else None
            return await self._reject(
                broker,
                reason,
                detail,
                topic,
                payload,
                factory_id=factory.factory_id,
                device_key=known_key,
            )
        return device

    async def refuse_foreign_topic(
        self, topic: str, payload: bytes, sender: DeviceRef, *, broker: str
    ) -> str:
        """Dead-letter a message a device published outside its own topics."""
        RECEIVED.labels(broker).inc()
        return await self._reject(
            broker,
            DEVICE_MISMATCH,
            f"device '{sender.device_key}' may publish only under its own topics, not "
            f"{_show(topic)}",
            topic,
            payload,
            sender=sender,
        )

    async def _device(self, factory: FactoryRef, key: str) -> DeviceRef | tuple[str, str]:
        """The active device, or (reason, detail) why the message cannot be stored."""
        if not _valid_device_key(key):
            return INVALID_TOPIC, f"{_show(key)} is not a valid device key"
        device = await self.devices.by_topic(factory, key)
        if device is not None:
            return device
        active = await self._is_active(factory.factory_id, key)
        if active is False:
            return DEVICE_INACTIVE, f"device '{key}' is decommissioned (inactive)"
        if not factory.auto_register_devices:
            return UNKNOWN_DEVICE, f"no device '{key}' in factory '{factory.slug}'"
        async with self._register_lock:  # one registration at a time: no duplicate inserts
            device = await self.devices.by_topic(factory, key)
            if device is not None:
                return device
            try:
                device = await self.devices.register(factory, key)
            except IntegrityError:  # another process registered it just now
                self.devices.invalidate()
                device = await self.devices.by_topic(factory, key)
                if device is None:
                    raise
            self._states.pop((factory.factory_id, key), None)
            log.info("mqtt_device_auto_registered", factory=factory.slug, device_key=key)
            return device

    async def _is_active(self, factory_id: int, key: str) -> bool | None:
        """Whether the device exists and is active (None: no such device), cached."""
        now = time.monotonic()
        hit = self._states.get((factory_id, key))
        if hit is not None and hit[0] > now:
            return hit[1]
        async with self.db.session() as session:
            active = await session.scalar(
                select(Device.is_active).where(
                    Device.factory_id == factory_id, Device.device_key == key
                )
            )
        if len(self._states) > 10_000:
            self._states.clear()
        self._states[(factory_id, key)] = (now + self.ttl_s, active)
        return active

    async def _reject(
        self,
        broker: str,
        reason: str,
        detail: str,
        topic: str,
        payload: bytes,
        *,
        sender: DeviceRef | None = None,
        factory_id: int | None = None,
        device_key: str | None = None,
    ) -> str:
        await self.pipeline.dead_letter(
            factory_id=sender.factory_id if sender else factory_id,
            source=SOURCE,
            raw=bytes(payload[:DEAD_LETTER_PAYLOAD_LIMIT]),
            reason=reason,
            detail=clean_text(detail, 2000),
            topic=clean_text(topic, _TOPIC_COLUMN),
            device_key=sender.device_key if sender else device_key,
            device_id=sender.device_id if sender else None,
        )
        DEAD_LETTERED.labels(broker, reason).inc()
        return reason
