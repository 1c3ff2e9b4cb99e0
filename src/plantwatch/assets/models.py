"""Asset tables: sites > areas > lines, devices, groups, parameters, device keys."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy import false as sa_false
from sqlalchemy.orm import Mapped, mapped_column

from plantwatch.core.db import Base, BigId, JsonType, TimestampMixin, UTCDateTime, utcnow


class Site(TimestampMixin, Base):
    __tablename__ = "sites"
    __table_args__ = (UniqueConstraint("factory_id", "name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    factory_id: Mapped[int] = mapped_column(ForeignKey("factories.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    address: Mapped[str | None] = mapped_column(String(500))


class Area(TimestampMixin, Base):
    __tablename__ = "areas"
    __table_args__ = (UniqueConstraint("site_id", "name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    factory_id: Mapped[int] = mapped_column(
        ForeignKey("factories.id", ondelete="CASCADE"), index=True
    )
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))


class Line(TimestampMixin, Base):
    __tablename__ = "lines"
    __table_args__ = (UniqueConstraint("area_id", "name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    factory_id: Mapped[int] = mapped_column(
        ForeignKey("factories.id", ondelete="CASCADE"), index=True
    )
    area_id: Mapped[int] = mapped_column(ForeignKey("areas.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))


class Device(TimestampMixin, Base):
    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("factory_id", "device_key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    factory_id: Mapped[int] = mapped_column(ForeignKey("factories.id", ondelete="CASCADE"))
    device_key: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str | None] = mapped_column(String(64))
    manufacturer: Mapped[str | None] = mapped_column(String(200))
    model: Mapped[str | None] = mapped_column(String(200))
    serial_number: Mapped[str | None] = mapped_column(String(200))
    location: Mapped[str | None] = mapped_column(String(300))
    line_id: Mapped[int | None] = mapped_column(
        ForeignKey("lines.id", ondelete="SET NULL"), index=True
    )
    criticality: Mapped[str] = mapped_column(String(16), default="medium")
    # `metadata` is reserved on declarative classes; the column keeps the public name.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JsonType, default=dict)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Connectivity, kept by telemetry ingest: unknown (never heard from), online, offline.
    # Separate from is_active, which says whether the device is commissioned at all.
    status: Mapped[str] = mapped_column(String(16), default="unknown", server_default="unknown")
    last_seen: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # Silence after which the device counts as offline; NULL = the factory's setting.
    offline_after_s: Mapped[int | None] = mapped_column(Integer)


device_group_members = Table(
    "device_group_members",
    Base.metadata,
    Column("group_id", ForeignKey("device_groups.id", ondelete="CASCADE"), primary_key=True),
    Column("device_id", ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    Index("ix_device_group_members_device", "device_id"),
)


class DeviceGroup(TimestampMixin, Base):
    __tablename__ = "device_groups"
    __table_args__ = (UniqueConstraint("factory_id", "name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    factory_id: Mapped[int] = mapped_column(ForeignKey("factories.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)


class DeviceParameter(Base):
    __tablename__ = "device_parameters"
    __table_args__ = (
        UniqueConstraint("device_id", "key"),
        Index("ix_device_parameters_factory_device", "factory_id", "device_id"),
        # A parameter's id is its time series' id: SQLite must never hand a deleted
        # parameter's id to a new one, or the new one would inherit old data.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    factory_id: Mapped[int] = mapped_column(ForeignKey("factories.id", ondelete="CASCADE"))
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(100))
    display_name: Mapped[str | None] = mapped_column(String(200))
    unit: Mapped[str | None] = mapped_column(String(32))
    data_type: Mapped[str] = mapped_column(String(16), default="float")
    is_kpi: Mapped[bool] = mapped_column(Boolean, default=False)
    # Electrical power (unit W, kW or MW): summed for plant power, integrated for energy.
    is_power: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    # Limits for threshold colouring and default rules; either side may be open.
    warning_low: Mapped[float | None] = mapped_column(Float)
    warning_high: Mapped[float | None] = mapped_column(Float)
    critical_low: Mapped[float | None] = mapped_column(Float)
    critical_high: Mapped[float | None] = mapped_column(Float)
    discovered_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class DeviceKey(Base):
    """A device credential. Only a SHA-256 of the key is stored (keys are 256-bit random,
    so a fast hash is safe and keeps the ingest lookup cheap)."""

    __tablename__ = "device_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    factory_id: Mapped[int] = mapped_column(ForeignKey("factories.id", ondelete="CASCADE"))
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
