"""The embedded MQTT broker (amqtt, MQTT 3.1.1) that `plantwatch up` starts.

Devices log in with user name = their device key (`M01`) and password = one of
their keys (`POST /api/v1/devices/{id}/keys`); anonymous clients and wrong keys
are refused at CONNECT. A device may publish and subscribe only under its own
subtree `factories/{slug}/devices/{device_key}/`; a publish elsewhere is
refused (never delivered to anyone) and recorded as a `device_mismatch` dead
letter. plantwatch's own clients log in as `$plantwatch` with a password
derived from the installation secret (`mqtt.internal_password`).

Telemetry is ingested inside the broker, before the PUBACK: amqtt would
acknowledge a QoS 1 message as soon as it is read, but here the connection's
packet handler first hands the message to the pipeline and sends the PUBACK only
once the batch holding it committed. If storing fails the device gets no PUBACK
and its connection is closed, so it sends the message again. Each PUBLISH is
handled in its own task, so many messages from many devices are in flight at
once and the pipeline commits them together; `max_in_flight` bounds that.

Client ids are scoped per device inside the broker, so no client can take over
or delete another device's (or tenant's) session by reusing its client id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import Any

import structlog
from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter  # type: ignore[import-untyped]
from amqtt.broker import Broker  # type: ignore[import-untyped]
from amqtt.contexts import Action  # type: ignore[import-untyped]
from amqtt.errors import AMQTTError, MQTTError, NoDataError  # type: ignore[import-untyped]
from amqtt.mqtt.connack import (  # type: ignore[import-untyped]
    BAD_USERNAME_PASSWORD,
    NOT_AUTHORIZED,
    ConnackPacket,
)
from amqtt.mqtt.protocol.broker_handler import (  # type: ignore[import-untyped]
    BrokerProtocolHandler,
)
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin  # type: ignore[import-untyped]
from prometheus_client import Counter

from plantwatch.connectors.mqtt import (
    ACKED,
    DROPPED,
    NOT_ACKED,
    MqttIngest,
    device_prefix,
    is_internal,
    parse_telemetry_topic,
)
from plantwatch.telemetry.pipeline import DeviceRef
from plantwatch.telemetry.service import DeviceDirectory
from plantwatch.tenancy.models import Factory

log = structlog.get_logger("plantwatch.mqtt")

BROKER = "embedded"
LISTENER = "default"
PRINCIPAL = "plantwatch.principal"  # key in amqtt's Session.attributes

REFUSED = Counter(
    "plantwatch_mqtt_connections_refused_total",
    "Connections the embedded MQTT broker refused",
    ["reason"],
)


@dataclass(frozen=True)
class Principal:
    """Who a connection is: a device (with the key it presented) or plantwatch itself."""

    device: DeviceRef | None
    prefix: str  # the topic subtree it owns ("" for plantwatch itself: everything)
    key: str | None = None

    @property
    def scope(self) -> str:
        return "plantwatch" if self.device is None else f"device-{self.device.device_id}"

    def owns(self, topic: str) -> bool:
        return self.device is None or topic.startswith(self.prefix)


def _principal(session: Any) -> Principal | None:
    if session is None:
        return None
    found = session.attributes.get(PRINCIPAL)
    return found if isinstance(found, Principal) else None


class EmbeddedBroker:
    """amqtt on a socket of ours (port 0 = any free port), ingesting device telemetry."""

    def __init__(
        self,
        ingest: MqttIngest,
        devices: DeviceDirectory,
        secret: str,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        max_in_flight: int = 8000,
        session_expiry_s: int = 86_400,
    ) -> None:
        self.ingest = ingest
        self.devices = devices
        self.secret = secret
        self.host = host
        self.port = port
        self.max_in_flight = max(1, max_in_flight)
        self.session_expiry_s = session_expiry_s
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._broker: _Broker | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        # amqtt and its state-machine library log every connection and state change at
        # INFO; plantwatch logs what matters itself.
        for noisy in ("amqtt", "transitions"):
            logger = logging.getLogger(noisy)
            if logger.getEffectiveLevel() < logging.WARNING:
                logger.setLevel(logging.WARNING)
        config = {
            "listeners": {LISTENER: {"type": "external"}},
            "session_expiry_interval": self.session_expiry_s,
            "plugins": {
                f"{__name__}.DeviceAuthPlugin": {},
                f"{__name__}.DeviceTopicPlugin": {},
            },
        }
        broker = _Broker(config, self)
        await broker.start()
        self._broker = broker
        try:
            self._server = await asyncio.start_server(
                self._accept, self.host or None, self.port, reuse_address=True
            )
        except BaseException:
            await broker.shutdown()
            self._broker = None
            raise
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("mqtt_broker_started", host=self.host, port=self.port)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, let messages in flight commit (and be acked), then shut down."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)
        if self._broker is not None:
            broker, self._broker = self._broker, None
            await broker.shutdown()

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.is_serving()

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
        return f"mqtt://{f'[{host}]' if ':' in host else host}:{self.port}"

    def health(self) -> dict[str, Any]:
        ok = self.running
        return {
            "status": "ok" if ok else "error",
            "broker": "embedded",
            "url": self.url,
            "clients": len(self._broker.sessions) if self._broker is not None else 0,
            "in_flight": self._in_flight,
        }

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        broker = self._broker
        if broker is None:
            writer.close()
            return
        try:
            await broker.external_connected(
                StreamReaderAdapter(reader), StreamWriterAdapter(writer), LISTENER
            )
        except Exception as exc:  # one client's failure never takes the listener down
            log.warning("mqtt_client_error", error=str(exc))
        finally:
            writer.close()

    # -- who may do what -----------------------------------------------------------------

    async def authenticate(
        self, username: str | None, password: str | None, will_topic: str | None
    ) -> Principal | str:
        """The principal, or why the connection is refused."""
        if username is None or password is None:
            return "anonymous"
        if is_internal(username, password, self.secret):
            return Principal(None, "")
        if not password.isascii() or not password.isprintable():
            return "bad_credentials"
        device = await self.devices.by_key(password)
        if device is None or device.device_key != username:
            return "bad_credentials"
        async with self.ingest.db.session() as session:
            factory = await session.get(Factory, device.factory_id)
        if factory is None:
            return "bad_credentials"
        principal = Principal(device, device_prefix(factory.slug, device.device_key), password)
        if will_topic is not None and not principal.owns(will_topic):
            return "will_topic_not_allowed"
        return principal

    def allowed(self, principal: Principal | None, topic: str, action: Any) -> bool:
        if principal is None:
            return False
        if principal.device is None:
            return True
        if action == Action.SUBSCRIBE:
            # A filter inside the device's subtree can only match topics inside it.
            return topic.startswith(principal.prefix) and "$share" not in topic
        return principal.owns(topic)

    async def on_publish(self, session: Any, topic: str, payload: bytes, qos: int) -> bool:
        """Handle a device's PUBLISH before amqtt acknowledges and routes it.

        True: go on (amqtt acks, then routes it if the topic is allowed). False: do not
        ack; the connection is closed (key revoked, or the message could not be stored).
        """
        principal = _principal(session)
        if principal is None:
            return False
        sender = principal.device
        if sender is not None and principal.key is not None:
            current = await self.devices.by_key(principal.key)
            if current is None or current.device_id != sender.device_id:
                log.info("mqtt_device_key_revoked", device_key=sender.device_key)
                REFUSED.labels("key_revoked").inc()
                return False
        if parse_telemetry_topic(topic) is None:
            if sender is None or principal.owns(topic):
                return True  # not telemetry: the broker just routes it
            try:
                await self.ingest.refuse_foreign_topic(topic, payload, sender, broker=BROKER)
            except Exception:
                log.exception("mqtt_dead_letter_failed")
                return False
            return True  # acked; amqtt's topic check keeps it from everyone
        if qos == 0 and self._slots.locked():
            DROPPED.labels(BROKER).inc()
            return True
        self._in_flight += 1
        self._idle.clear()
        try:
            async with self._slots:
                await self.ingest.handle_message(topic, payload, sender=sender, broker=BROKER)
        except Exception as exc:
            NOT_ACKED.labels(BROKER).inc()
            log.error("mqtt_ingest_failed_not_acked", error=str(exc), topic=topic[:200])
            return False
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
        return True


class DeviceAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """A connection is authenticated when `_Broker` attached a principal to its session."""

    async def authenticate(self, *, session: Any) -> bool:
        return _principal(session) is not None


class DeviceTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """Devices publish, subscribe and receive only inside their own subtree."""

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Any = None
    ) -> bool:
        broker = self.context._broker_instance
        if topic is None or not isinstance(broker, _Broker):
            return False
        return broker.gateway.allowed(_principal(session), topic, action)


class _DeviceHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's per-connection handler, storing telemetry before the PUBACK goes out."""

    gateway: EmbeddedBroker

    async def handle_publish(self, publish_packet: Any) -> None:
        topic = publish_packet.topic_name
        data = publish_packet.data
        if topic is None or data is None or self.session is None:
            return
        qos = publish_packet.qos or 0
        try:
            stored = await self.gateway.on_publish(self.session, topic, bytes(data), qos)
        except Exception:  # e.g. the database is down while re-checking the key
            log.exception("mqtt_publish_failed")
            NOT_ACKED.labels(BROKER).inc()
            stored = False
        if not stored:
            # No PUBACK: closing makes the device send the message again.
            if self.writer is not None:
                with contextlib.suppress(Exception):
                    await self.writer.close()
            return
        await super().handle_publish(publish_packet)
        if qos:
            ACKED.labels(BROKER).inc()


class _Broker(Broker):  # type: ignore[misc]
    """amqtt's broker, authenticating before it touches any session.

    Stock amqtt merges a CONNECT into the session of the same client id (or deletes
    that session, or takes a live connection over) before asking the auth plugins.
    Here credentials are checked first, refused clients get a CONNACK error and are
    dropped, and client ids are scoped to the authenticated principal. The session
    handling after that mirrors amqtt 0.12's `_initialize_client_session`.
    """

    def __init__(self, config: dict[str, Any], gateway: EmbeddedBroker) -> None:
        super().__init__(config)
        self.gateway = gateway

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[Any, Any]:
        try:
            handler, incoming = await _DeviceHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except AMQTTError as exc:
            raise AMQTTError(exc) from exc
        except MQTTError as exc:
            with contextlib.suppress(Exception):
                await writer.close()
            raise MQTTError(exc) from exc
        except NoDataError as exc:
            raise AMQTTError(exc) from exc

        will_topic = incoming.will_topic if incoming.will_flag else None
        principal = await self.gateway.authenticate(
            incoming.username, incoming.password, will_topic
        )
        if not isinstance(principal, Principal):
            REFUSED.labels(principal).inc()
            code = NOT_AUTHORIZED if principal != "bad_credentials" else BAD_USERNAME_PASSWORD
            with contextlib.suppress(Exception):
                await ConnackPacket.build(0, code).to_stream(writer)
                await writer.close()
            raise MQTTError(f"connection from {remote_address}:{remote_port} refused: {principal}")
        handler.gateway = self.gateway
        incoming.client_id = f"{principal.scope}/{incoming.client_id}"

        session = incoming
        if incoming.clean_session:
            await self._delete_session(incoming.client_id)
            session.parent = 0
        elif incoming.client_id in self._sessions:
            session, _ = self._sessions[incoming.client_id]
            for name in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "keep_alive",
                "username",
                "password",
            ):
                setattr(session, name, getattr(incoming, name))
            session.parent = 1
        else:
            session.parent = 0
        session.attributes[PRINCIPAL] = principal
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session
