"""The stream's event log: every alert and device event, in one ordered, resumable table.

`id` is the SSE event id. It only grows and is never reused (SQLite AUTOINCREMENT,
a PostgreSQL sequence), and rows are appended under a lock held until commit
(`service.append_events`), so the ids visible to a reader are always a prefix of
the ids that will ever be visible: a reader that has seen id N has seen, or can
still read, every earlier one. Retention deletes a prefix and keeps the newest row.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from plantwatch.core.db import Base, BigId, JsonType, UTCDateTime, utcnow


class StreamEvent(Base):
    __tablename__ = "stream_events"
    __table_args__ = (
        Index("ix_stream_events_factory", "factory_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    factory_id: Mapped[int] = mapped_column(ForeignKey("factories.id", ondelete="CASCADE"))
    # The bus subject: alert.created, alert.acknowledged, device.online, ...
    kind: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JsonType)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
