"""Notification tables: channels, per-user preferences, and the delivery log.

A delivery is one message for one event to one target (a channel, or a user's
address on a channel kind). Its idempotency key is unique, so an event is never
queued twice for the same target, however often the bus redelivers it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from plantwatch.core.db import Base, BigId, JsonType, TimestampMixin, UTCDateTime, utcnow

# Delivery states. `failed` = the last attempt failed and another is scheduled;
# `dead` = no more attempts (retry by hand: POST /notifications/deliveries/{id}/retry).
PENDING = "pending"
SENDING = "sending"
SENT = "sent"
FAILED = "failed"
DEAD = "dead"
DELIVERY_STATES = (PENDING, SENDING, SENT, FAILED, DEAD)
CLAIMABLE = (PENDING, FAILED)


class NotificationChannel(TimestampMixin, Base):
    __tablename__ = "notification_channels"
    __table_args__ = (UniqueConstraint("factory_id", "name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    factory_id: Mapped[int] = mapped_column(ForeignKey("factories.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    # email | slack | teams | webhook | sms | whatsapp
    kind: Mapped[str] = mapped_column(String(16))
    # Per kind (notify.schemas): recipients, URLs, secrets, Twilio credentials.
    config: Mapped[dict[str, Any]] = mapped_column(JsonType)
    # The alert events this channel is told about when a rule names it.
    events: Mapped[list[str]] = mapped_column(JsonType)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))


class NotificationPreference(TimestampMixin, Base):
    """One user's choices; a user without a row gets only what is addressed to them."""

    __tablename__ = "notification_preferences"
    __table_args__ = (Index("ix_notification_preferences_factory", "factory_id"),)

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    factory_id: Mapped[int] = mapped_column(ForeignKey("factories.id", ondelete="CASCADE"))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # [{"kind": "email", "address": str | None}, {"kind": "sms"|"whatsapp", "phone": str}]
    channels: Mapped[list[dict[str, Any]]] = mapped_column(JsonType)
    min_severity: Mapped[str] = mapped_column(String(16), default="high")
    # "HH:MM" in the factory's timezone; both set or both NULL.
    quiet_start: Mapped[str | None] = mapped_column(String(5))
    quiet_end: Mapped[str | None] = mapped_column(String(5))
    digest: Mapped[bool] = mapped_column(Boolean, default=False)
    # Local hour of the daily digest; NULL = the deployment's notify_digest_hour.
    digest_hour: Mapped[int | None] = mapped_column(Integer)


class NotificationDelivery(Base):
    __tablename__ = "notification_deliveries"
    __table_args__ = (
        Index("ix_notification_deliveries_due", "status", "next_attempt_at"),
        Index("ix_notification_deliveries_factory_created", "factory_id", "created_at"),
        Index("ix_notification_deliveries_factory_alert", "factory_id", "alert_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    factory_id: Mapped[int] = mapped_column(ForeignKey("factories.id", ondelete="CASCADE"))
    # event + target: a second insert of the same pair is a no-op.
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    event: Mapped[str] = mapped_column(String(32))
    # Not a foreign key: the delivery log outlives deleted alerts.
    alert_id: Mapped[int | None] = mapped_column(BigId)
    channel_id: Mapped[int | None] = mapped_column(
        ForeignKey("notification_channels.id", ondelete="SET NULL")
    )
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    kind: Mapped[str] = mapped_column(String(16))
    # E-mail address or phone number; NULL for the channel's own targets (URLs, lists).
    recipient: Mapped[str | None] = mapped_column(String(320))
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    # While `sending`: when the claim lapses (a worker that died mid-send).
    lease_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    subject: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    short_body: Mapped[str] = mapped_column(Text)
    # The event the message is about (webhooks send it as data).
    payload: Mapped[dict[str, Any]] = mapped_column(JsonType)
    # Every attempt: [{"at", "ok", "error", "ms"}].
    attempt_log: Mapped[list[dict[str, Any]]] = mapped_column(JsonType)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
