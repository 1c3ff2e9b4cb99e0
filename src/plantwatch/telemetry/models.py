"""Time-series and dead-letter tables.

A series is one device parameter: `series_id` is `device_parameters.id`.
Timestamps in the time-series tables are epoch milliseconds (BIGINT): compact,
fast to compare and bucket, identical on SQLite and PostgreSQL. Raw and rollup
tables carry no foreign keys (they are the hot path; series rows are deleted
with their parameter by the service, and retention drops old data wholesale).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from plantwatch.core.db import Base, BigId, JsonType, UTCDateTime, utcnow

telemetry_raw = Table(
    "telemetry_raw",
    Base.metadata,
    Column("series_id", BigInteger, primary_key=True),
    Column("ts", BigInteger, primary_key=True),
    Column("value", Float, nullable=False),
    # Clustered by (series, time) on SQLite; range-partitioned by time on PostgreSQL
    # (partitions are made by telemetry.partitions, not by the migration).
    sqlite_with_rowid=False,
    postgresql_partition_by="RANGE (ts)",
)


def _rollup_table(name: str) -> Table:
    return Table(
        name,
        Base.metadata,
        Column("series_id", BigInteger, primary_key=True),
        Column("bucket", BigInteger, primary_key=True),
        Column("cnt", Integer, nullable=False),
        Column("total", Float, nullable=False),
        Column("vmin", Float, nullable=False),
        Column("vmax", Float, nullable=False),
        Column("first_ts", BigInteger, nullable=False),
        Column("vfirst", Float, nullable=False),
        Column("last_ts", BigInteger, nullable=False),
        Column("vlast", Float, nullable=False),
        sqlite_with_rowid=False,
    )


rollup_1m = _rollup_table("telemetry_1m")
rollup_1h = _rollup_table("telemetry_1h")

series_latest = Table(
    "series_latest",
    Base.metadata,
    Column("series_id", BigInteger, primary_key=True),
    Column("factory_id", BigInteger, nullable=False),
    Column("device_id", BigInteger, nullable=False),
    Column("ts", BigInteger, nullable=False),
    Column("value", Float),
    # String parameters (states such as "RUNNING") keep their latest text here.
    Column("text", String(256)),
    Index("ix_series_latest_factory_device", "factory_id", "device_id"),
)


class DeadLetter(Base):
    """Telemetry that could not be stored, with why, kept for a person to fix and replay."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        Index("ix_dead_letters_factory_received", "factory_id", "received_at"),
        Index("ix_dead_letters_factory_reason", "factory_id", "reason"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # NULL when the sender could not be tied to a factory (unknown topic prefix).
    factory_id: Mapped[int | None] = mapped_column(ForeignKey("factories.id", ondelete="CASCADE"))
    device_id: Mapped[int | None] = mapped_column(ForeignKey("devices.id", ondelete="SET NULL"))
    device_key: Mapped[str | None] = mapped_column(String(100))
    source: Mapped[str] = mapped_column(String(16))
    topic: Mapped[str | None] = mapped_column(String(300))
    reason: Mapped[str] = mapped_column(String(48))
    detail: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    context: Mapped[dict[str, object] | None] = mapped_column(JsonType)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    replayed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    replay_result: Mapped[str | None] = mapped_column(String(200))
