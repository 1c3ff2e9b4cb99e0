"""The daily digest: one e-mail per user who asked for it, at their chosen hour.

The scheduler calls `queue_digests` every few minutes. For each user with
`digest: true`, the latest digest moment at or before now is today's (or, before
the hour, yesterday's) `digest_hour` in the factory's timezone; the digest covers
the 24 local hours before it (23 or 25 across a DST change) and is queued once:
its idempotency key is (user, local date). A day without alerts and with none
open sends nothing. Missed moments (plantwatch was down) are not replayed; only
the latest is sent.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any

import structlog
from sqlalchemy import func, select

from plantwatch.alerts.lifecycle import RESOLVED
from plantwatch.alerts.models import Alert
from plantwatch.assets.models import Device
from plantwatch.core.config import Settings
from plantwatch.core.db import Database
from plantwatch.notify.dispatch import (
    Planned,
    delivery_row,
    insert_deliveries,
    key_of,
    user_addresses,
    zone,
)
from plantwatch.notify.models import NotificationDelivery, NotificationPreference
from plantwatch.notify.render import Renderer
from plantwatch.tenancy.models import Factory, User

log = structlog.get_logger("plantwatch.notify")

DIGEST_LIST_MAX = 25
SEVERITY_ORDER = {"critical": 0, "high": 1, "medium": 2, "low": 3}


def digest_moment(now: dt.datetime, timezone: str, hour: int) -> dt.datetime:
    """The latest local `hour`:00 at or before `now`, as an aware local datetime."""
    tz = zone(timezone)
    local = now.astimezone(tz)
    day = local.date()
    moment = dt.datetime.combine(day, dt.time(hour), tzinfo=tz)
    if moment.astimezone(dt.UTC) > now:
        moment = dt.datetime.combine(day - dt.timedelta(days=1), dt.time(hour), tzinfo=tz)
    return moment


def digest_key(user_id: int, day: dt.date) -> str:
    return key_of("digest", user_id, day.isoformat())


async def queue_digests(
    db: Database, settings: Settings, renderer: Renderer, now: dt.datetime
) -> int:
    """Queue every digest that is due and not yet queued; how many were queued."""
    queued = 0
    async with db.session() as session:
        rows = (
            await session.execute(
                select(User, NotificationPreference, Factory)
                .join(NotificationPreference, NotificationPreference.user_id == User.id)
                .join(Factory, Factory.id == User.factory_id)
                .where(
                    NotificationPreference.digest, NotificationPreference.enabled, User.is_active
                )
                .order_by(User.id)
            )
        ).all()
        await session.commit()
    for user, pref, factory in rows:
        hour = pref.digest_hour if pref.digest_hour is not None else settings.notify_digest_hour
        moment = digest_moment(now, factory.timezone, hour)
        key = digest_key(user.id, moment.date())
        async with db.session() as session:
            exists = await session.scalar(
                select(NotificationDelivery.id).where(NotificationDelivery.idempotency_key == key)
            )
            if exists is not None:
                await session.commit()
                continue
            context = await digest_context(session, settings, factory, user, moment)
            if context is None:
                await session.commit()
                continue
            addresses = [a for a in user_addresses(user, pref) if a[0] == "email"]
            recipient = addresses[0][1] if addresses else user.email
            rendered = renderer.render("digest", context)
            plan = Planned(
                target_key=f"u{user.id}:email:{recipient}",
                kind="email",
                channel_id=None,
                user_id=user.id,
                recipient=recipient,
                not_before=now,
            )
            row = delivery_row(
                factory_id=factory.id,
                key=key,
                event="digest",
                alert_id=None,
                plan=plan,
                rendered=rendered,
                payload={
                    "event": "digest",
                    "factory_id": factory.id,
                    "user_id": user.id,
                    "date": moment.date().isoformat(),
                    "total": context["total"],
                    "counts": context["counts"],
                    "open_count": context["open_count"],
                },
                max_attempts=settings.notify_max_attempts,
                now=now,
            )
            queued += len(await insert_deliveries(session, [row]))
            await session.commit()
    if queued:
        log.info("notify_digests_queued", digests=queued)
    return queued


async def digest_context(
    session: Any, settings: Settings, factory: Factory, user: User, moment: dt.datetime
) -> dict[str, Any] | None:
    """What the digest template sees; None when there is nothing to tell."""
    tz = zone(factory.timezone)
    start = dt.datetime.combine(moment.date() - dt.timedelta(days=1), moment.time(), tzinfo=tz)
    start_utc, end_utc = start.astimezone(dt.UTC), moment.astimezone(dt.UTC)
    rows = (
        await session.execute(
            select(Alert, Device.name)
            .outerjoin(Device, Device.id == Alert.device_id)
            .where(
                Alert.factory_id == factory.id,
                Alert.triggered_at >= start_utc,
                Alert.triggered_at < end_utc,
            )
        )
    ).all()
    open_count = int(
        await session.scalar(
            select(func.count())
            .select_from(Alert)
            .where(Alert.factory_id == factory.id, Alert.status != RESOLVED)
        )
        or 0
    )
    if not rows and open_count == 0:
        return None
    counts = Counter(alert.severity for alert, _ in rows)
    ordered = sorted(rows, key=lambda r: (SEVERITY_ORDER.get(r[0].severity, 9), r[0].triggered_at))
    alerts = [
        {
            "id": alert.id,
            "severity": alert.severity,
            "title": alert.title,
            "device": device_name,
            "status": alert.status,
            "occurrences": alert.occurrences,
            "at": alert.triggered_at.astimezone(tz).strftime("%Y-%m-%d %H:%M"),
        }
        for alert, device_name in ordered[:DIGEST_LIST_MAX]
    ]
    return {
        "user": {"name": user.full_name or user.email, "email": user.email},
        "factory": {"name": factory.name, "timezone": factory.timezone},
        "date": moment.date().isoformat(),
        "start": start.strftime("%Y-%m-%d %H:%M"),
        "end": moment.strftime("%Y-%m-%d %H:%M"),
        "total": len(rows),
        "counts": {s: counts.get(s, 0) for s in ("critical", "high", "medium", "low")},
        "open_count": open_count,
        "alerts": alerts,
        "more": max(0, len(rows) - DIGEST_LIST_MAX),
        "link": f"{settings.public_url.rstrip('/')}/alerts" if settings.public_url else None,
        "severity": "medium",
    }
