"""Alert tables: alerts, their immutable timeline, SLA policies and the escalation chain."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from plantwatch.core.db import Base, BigId, JsonType, TimestampMixin, UTCDateTime, utcnow


class Alert(TimestampMixin, Base):
    __tablename__ = "alerts"
    __table_args__ = (
        # One open alert per (rule, device): `open_key` is "<rule_id>:<device_id>" while
        # the alert is open and NULL once resolved (NULLs never collide, on both databases).
        UniqueConstraint("open_key", name="uq_alerts_open_key"),
        Index("ix_alerts_factory_status", "factory_id", "status"),
        Index("ix_alerts_factory_triggered", "factory_id", "triggered_at"),
        Index("ix_alerts_next_sla_check_at", "next_sla_check_at"),
        Index("ix_alerts_rule_id", "rule_id"),
        Index("ix_alerts_device_id", "device_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    factory_id: Mapped[int] = mapped_column(ForeignKey("factories.id", ondelete="CASCADE"))
    rule_id: Mapped[int | None] = mapped_column(ForeignKey("rules.id", ondelete="SET NULL"))
    device_id: Mapped[int | None] = mapped_column(ForeignKey("devices.id", ondelete="SET NULL"))
    open_key: Mapped[str | None] = mapped_column(String(64))
    severity: Mapped[str] = mapped_column(String(16))
    # lifecycle.TRIGGERED | ACKNOWLEDGED | RESOLVED
    status: Mapped[str] = mapped_column(String(16))
    title: Mapped[str] = mapped_column(String(300))
    message: Mapped[str] = mapped_column(Text)
    # The values that made each leaf true (conditions.Fact as dicts).
    facts: Mapped[list[dict[str, Any]]] = mapped_column(JsonType, default=list)
    # The device's latest values when the alert opened.
    snapshot: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    occurrences: Mapped[int] = mapped_column(Integer, default=1)
    triggered_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    acknowledged_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    acknowledged_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    resolved_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    resolved_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    resolution_note: Mapped[str | None] = mapped_column(Text)
    assigned_to: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    # 0 = not escalated; n = the chain level last notified.
    escalation_level: Mapped[int] = mapped_column(Integer, default=0)
    last_escalated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_reminder_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    ack_due_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    resolve_due_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # Deadlines already acted on, so one deadline escalates once.
    ack_breach_handled: Mapped[bool] = mapped_column(default=False)
    resolve_breach_handled: Mapped[bool] = mapped_column(default=False)
    # When the SLA sweeper must look at this alert again (NULL: never).
    next_sla_check_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class AlertEvent(Base):
    """One line of an alert's timeline. Written once; never updated or deleted by the API."""

    __tablename__ = "alert_events"
    __table_args__ = (Index("ix_alert_events_alert", "alert_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"))
    factory_id: Mapped[int] = mapped_column(ForeignKey("factories.id", ondelete="CASCADE"))
    # created | repeated | acknowledged | assigned | commented | escalated | reminder |
    # resolved | auto-resolved | reopened
    kind: Mapped[str] = mapped_column(String(32))
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    data: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)


class AlertSlaPolicy(Base):
    """A factory's SLA for one severity; lifecycle.DEFAULT_SLA applies where no row exists."""

    __tablename__ = "alert_sla_policies"

    factory_id: Mapped[int] = mapped_column(
        ForeignKey("factories.id", ondelete="CASCADE"), primary_key=True
    )
    severity: Mapped[str] = mapped_column(String(16), primary_key=True)
    ack_s: Mapped[int | None] = mapped_column(Integer)
    resolve_s: Mapped[int | None] = mapped_column(Integer)
    remind_every_s: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class EscalationLevel(Base):
    """One level of a factory's escalation chain: people and/or roles, resolved when used."""

    __tablename__ = "escalation_levels"

    factory_id: Mapped[int] = mapped_column(
        ForeignKey("factories.id", ondelete="CASCADE"), primary_key=True
    )
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_ids: Mapped[list[int]] = mapped_column(JsonType, default=list)
    roles: Mapped[list[str]] = mapped_column(JsonType, default=list)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
