"""Composition root: settings -> backends -> services, shared by the API and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

from plantwatch.core.bus import Bus, InProcessBus
from plantwatch.core.config import Settings
from plantwatch.core.db import Database
from plantwatch.stream.service import StreamService
from plantwatch.telemetry.kpis import SeriesDirectory
from plantwatch.telemetry.latest import LatestCache
from plantwatch.telemetry.partitions import Partitions
from plantwatch.telemetry.payloads import Limits
from plantwatch.telemetry.pipeline import IngestPipeline
from plantwatch.telemetry.service import DeviceDirectory


def ingest_limits(settings: Settings) -> Limits:
    return Limits(
        max_bytes=settings.ingest_max_payload_bytes,
        max_entries=settings.ingest_max_entries,
        max_metrics=settings.ingest_max_metrics,
        max_future_ms=settings.ingest_max_future_s * 1000,
        max_past_ms=settings.ingest_max_past_s * 1000,
    )


@dataclass
class Container:
    settings: Settings
    db: Database
    secret: str = field(repr=False)
    bus: Bus
    partitions: Partitions
    devices: DeviceDirectory
    pipeline: IngestPipeline
    # The live stream: records this process's alert/device events, serves SSE clients.
    stream: StreamService
    # Per-process cache of series metadata for latest-value reads (values are never cached).
    series: SeriesDirectory = field(default_factory=SeriesDirectory)
    # Latest values in memory, written through by this process's ingest.
    latest: LatestCache = field(default_factory=LatestCache)
    _started: bool = False

    @classmethod
    def build(cls, settings: Settings) -> Container:
        settings.ensure_data_dir()
        db = Database(settings.resolved_database_url)
        bus = InProcessBus()
        partitions = Partitions(db.engine)
        latest = LatestCache()
        return cls(
            settings=settings,
            db=db,
            secret=settings.secret(),
            bus=bus,
            partitions=partitions,
            devices=DeviceDirectory(db),
            pipeline=IngestPipeline(
                db,
                bus,
                partitions,
                limits=ingest_limits(settings),
                max_batch_points=settings.ingest_batch_points,
                linger_s=settings.ingest_linger_ms / 1000,
                latest=latest,
            ),
            latest=latest,
            stream=StreamService(db, bus),
        )

    async def start(self) -> None:
        """Start the background parts every role needs (idempotent: roles share one)."""
        if self._started:
            return
        self._started = True
        await self.pipeline.start()
        await self.stream.start()

    async def close(self) -> None:
        if self._started:
            await self.pipeline.stop()
            await self.stream.stop()
            self._started = False
        await self.bus.close()
        await self.db.dispose()
