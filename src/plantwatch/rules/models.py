"""Rule tables: the rules, their device scope, and per-(rule, device) engine state."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from plantwatch.core.db import Base, BigId, JsonType, TimestampMixin, UTCDateTime


class Rule(TimestampMixin, Base):
    __tablename__ = "rules"
    __table_args__ = (Index("ix_rules_factory_active", "factory_id", "is_active"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    factory_id: Mapped[int] = mapped_column(ForeignKey("factories.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    conditions: Mapped[dict[str, Any]] = mapped_column(JsonType)
    # devices | group | factory
    scope: Mapped[str] = mapped_column(String(16), default="factory")
    group_id: Mapped[int | None] = mapped_column(
        ForeignKey("device_groups.id", ondelete="SET NULL")
    )
    schedule: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    severity: Mapped[str] = mapped_column(String(16), default="medium")
    cooldown_s: Mapped[int] = mapped_column(Integer, default=900)
    auto_resolve: Mapped[bool] = mapped_column(Boolean, default=True)
    actions: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Set when the engine disabled the rule because evaluating it raised.
    error: Mapped[str | None] = mapped_column(Text)
    # Bumped on every change, so engines holding a compiled copy know to reload it.
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))


rule_devices = Table(
    "rule_devices",
    Base.metadata,
    Column("rule_id", ForeignKey("rules.id", ondelete="CASCADE"), primary_key=True),
    Column("device_id", ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    Index("ix_rule_devices_device", "device_id"),
)


class RuleDeviceState(Base):
    """What the engine must not forget across restarts, per rule and device."""

    __tablename__ = "rule_device_state"

    rule_id: Mapped[int] = mapped_column(
        ForeignKey("rules.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[int] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    rule_version: Mapped[int] = mapped_column(Integer)
    # `for` clocks and detector memory (conditions.RuleState.snapshot()).
    state: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    condition_true: Mapped[bool] = mapped_column(Boolean, default=False)
    last_fired_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
