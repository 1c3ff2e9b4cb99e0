"""The `ingest` role: MQTT telemetry in.

Without `PLANTWATCH_MQTT_URL` it runs the embedded broker on
`PLANTWATCH_MQTT_HOST` (default: the API host) and `PLANTWATCH_MQTT_PORT` (0 =
any free port; the banner shows the real one) and ingests inside it. With
`PLANTWATCH_MQTT_URL=mqtt://user:pass@host:1883` it subscribes to that broker
instead (shared subscription, so `plantwatch run ingest` scales out).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import structlog

from plantwatch.connectors.mqtt import MqttIngest, MqttUrl, register_health, unregister_health
from plantwatch.connectors.mqtt_broker import EmbeddedBroker
from plantwatch.connectors.mqtt_client import IngestSubscriber

if TYPE_CHECKING:
    from plantwatch.cli import RoleContext

log = structlog.get_logger("plantwatch.mqtt")

# How long `start` waits for the first connection to an external broker before it
# reports the role as running anyway (it keeps retrying in the background).
FIRST_CONNECT_WAIT_S = 5.0


class IngestRole:
    name = "ingest"

    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx
        container = ctx.container
        settings = container.settings
        self.ingest = MqttIngest(container.db, container.devices, container.pipeline)
        self.broker: EmbeddedBroker | None = None
        self.subscriber: IngestSubscriber | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        url = settings.mqtt_url.get_secret_value() if settings.mqtt_url else None
        if url:
            try:
                parsed = MqttUrl.parse(url)
            except ValueError as exc:
                raise _config_error(f"PLANTWATCH_MQTT_URL: {exc}") from None
            self.subscriber = IngestSubscriber(
                self.ingest,
                parsed,
                client_id=settings.mqtt_client_id,
                share_group=settings.mqtt_share_group,
                max_in_flight=settings.mqtt_max_in_flight,
                session_expiry_s=settings.mqtt_session_expiry_s,
            )
        else:
            self.broker = EmbeddedBroker(
                self.ingest,
                container.devices,
                container.secret,
                host=settings.mqtt_host if settings.mqtt_host is not None else ctx.host,
                port=settings.mqtt_port,
                max_in_flight=settings.mqtt_max_in_flight,
            )

    async def start(self) -> None:
        await self.ctx.container.start()  # the pipeline (idempotent; shared with other roles)
        if self.broker is not None:
            try:
                await self._start_broker()
            except OSError as exc:
                raise _cli_error(
                    f"cannot listen for MQTT on {self.broker.host}:{self.broker.port}: "
                    f"{exc.strerror or exc}"
                ) from None
        elif self.subscriber is not None:
            subscriber = self.subscriber
            self._task = asyncio.create_task(subscriber.run(), name="role:ingest")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(subscriber.connected.wait(), FIRST_CONNECT_WAIT_S)
            if not subscriber.connected.is_set():
                log.warning(
                    "mqtt_not_connected_yet",
                    broker=subscriber.url.display,
                    error=subscriber.last_error,
                )
        register_health(self.health)

    async def _start_broker(self) -> None:
        assert self.broker is not None
        try:
            await self.broker.start()
        except OSError:
            # The default port is often taken (a Mosquitto already on the machine): then
            # take a free one and say so, rather than refuse to start. A port someone
            # configured is never silently changed.
            if "mqtt_port" in self.ctx.container.settings.model_fields_set:
                raise
            taken = self.broker.port
            self.broker.port = 0
            await self.broker.start()
            log.warning("mqtt_default_port_taken", port=taken, using=self.broker.port)

    def endpoints(self) -> list[tuple[str, str]]:
        if self.broker is not None:
            return [("MQTT", f"{self.broker.url} (embedded broker; devices log in with keys)")]
        assert self.subscriber is not None
        state = "" if self.subscriber.connected.is_set() else " (connecting)"
        return [("MQTT", f"{self.subscriber.url.display} {self.subscriber.subscription}{state}")]

    def health(self) -> dict[str, Any]:
        if self.broker is not None:
            return self.broker.health()
        assert self.subscriber is not None
        return self.subscriber.health()

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)
        else:
            await self._stopped.wait()

    def request_stop(self, force: bool = False) -> None:
        unregister_health(self.health)
        if self.subscriber is not None:
            self.subscriber.stop()
            if force and self._task is not None:
                self._task.cancel()
        elif self.broker is not None and not self._stopped.is_set():
            broker = self.broker

            async def stop() -> None:
                try:
                    await broker.stop(timeout_s=0 if force else 5.0)
                finally:
                    self._stopped.set()

            asyncio.get_running_loop().create_task(stop(), name="role:ingest:stop")


def _cli_error(message: str) -> Exception:
    from plantwatch.cli import CliError

    return CliError(message)


def _config_error(message: str) -> Exception:
    from plantwatch.cli import ConfigError

    return ConfigError(message)
