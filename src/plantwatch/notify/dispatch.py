"""The dispatcher: turns `alert.<event>` bus events into queued deliveries.

It runs as a bus subscriber (off the hot path: the alert is committed and
published before we see it), decides who hears about the event, renders the
messages once, and inserts one `pending` delivery per target in one transaction.
The delivery worker sends them. Targets:

- the channels the alert's rule names in `actions.notify` (active, in the
  factory, and subscribed to this event in their `events`); a channel with a list
  of e-mail recipients or phone numbers gets one delivery per recipient;
- users: on `escalated`, `reminder` and `assigned` the event's `recipients`; on
  `created` every user whose preferences opt into the alert's severity. Each user
  is reached on the kinds their preferences list (e-mail by default).

Preferences: `enabled: false` silences a user completely. `min_severity` filters
`created` (a user named as recipient of an escalation, reminder or assignment is
told whatever the severity: they were made responsible). Quiet hours (factory
timezone) hold a user's notifications back until the quiet hours end, except
for critical alerts, which are sent at once.

Idempotency: the key of a delivery is a hash of (alert, event, event time,
target), unique in the table, so a redelivered bus event queues nothing twice.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from plantwatch.alerts.models import Alert
from plantwatch.assets.models import Device
from plantwatch.core.config import Settings
from plantwatch.core.db import Database, utcnow
from plantwatch.notify.models import PENDING, NotificationChannel, NotificationPreference
from plantwatch.notify.models import NotificationDelivery as Delivery
from plantwatch.notify.render import Rendered, Renderer
from plantwatch.notify.schemas import SEVERITY_RANK
from plantwatch.rules.models import Rule
from plantwatch.tenancy.models import Factory, User

log = structlog.get_logger("plantwatch.notify")

NOTIFIED_EVENTS = frozenset(
    {"created", "repeated", "acknowledged", "assigned", "escalated", "reminder", "resolved"}
)
DIRECTED_EVENTS = frozenset({"assigned", "escalated", "reminder"})
SUBJECT = "alert.>"


def zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ValueError, KeyError):
        return ZoneInfo("UTC")


def parse_at(value: Any) -> dt.datetime:
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
        except ValueError:
            pass
    return utcnow()


def local_text(at: dt.datetime, tz: ZoneInfo) -> str:
    return at.astimezone(tz).strftime("%Y-%m-%d %H:%M %Z")


def key_of(*parts: Any) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def quiet_until(
    start: str | None, end: str | None, now: dt.datetime, tz: ZoneInfo
) -> dt.datetime | None:
    """If `now` falls in the quiet hours [start, end) local time: when they end (UTC)."""
    if not start or not end:
        return None
    local = now.astimezone(tz)
    s, e, m = _minutes(start), _minutes(end), local.hour * 60 + local.minute
    inside = (s <= m < e) if s < e else (m >= s or m < e)
    if not inside:
        return None
    end_date = local.date() if m < e else local.date() + dt.timedelta(days=1)
    end_local = dt.datetime.combine(end_date, dt.time(e // 60, e % 60), tzinfo=tz)
    # Wall-clock arithmetic across a DST change: normalise through UTC.
    return end_local.astimezone(dt.UTC)


@dataclass
class Planned:
    """One delivery to insert."""

    target_key: str
    kind: str
    channel_id: int | None
    user_id: int | None
    recipient: str | None
    not_before: dt.datetime


def delivery_row(
    *,
    factory_id: int,
    key: str,
    event: str,
    alert_id: int | None,
    plan: Planned,
    rendered: Rendered,
    payload: dict[str, Any],
    max_attempts: int,
    now: dt.datetime,
) -> dict[str, Any]:
    return {
        "factory_id": factory_id,
        "idempotency_key": key,
        "event": event,
        "alert_id": alert_id,
        "channel_id": plan.channel_id,
        "user_id": plan.user_id,
        "kind": plan.kind,
        "recipient": plan.recipient,
        "status": PENDING,
        "attempts": 0,
        "max_attempts": max_attempts,
        "next_attempt_at": plan.not_before,
        "subject": rendered.subject,
        "body": rendered.body,
        "short_body": rendered.short,
        "payload": payload,
        "attempt_log": [],
        "created_at": now,
        "updated_at": now,
    }


async def insert_deliveries(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Insert, skipping any whose idempotency key exists; the ids actually inserted."""
    if not rows:
        return []
    unique = ["idempotency_key"]
    stmt: Any
    if session.get_bind().dialect.name == "postgresql":
        stmt = postgresql.insert(Delivery).on_conflict_do_nothing(index_elements=unique)
    else:
        stmt = sqlite.insert(Delivery).on_conflict_do_nothing(index_elements=unique)
    inserted: list[int] = []
    for row in rows:  # one statement per row: RETURNING tells exactly which were new
        new_id = await session.scalar(stmt.values(**row).returning(Delivery.id))
        if new_id is not None:
            inserted.append(int(new_id))
    return inserted


class Dispatcher:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        renderer: Renderer,
        *,
        on_queued: Callable[[], None] | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.db = db
        self.settings = settings
        self.renderer = renderer
        self.on_queued = on_queued
        self.clock = clock

    async def handle(self, subject: str, payload: dict[str, Any]) -> None:
        """Bus handler. Raising makes the bus redeliver; the idempotency keys make
        that harmless."""
        await self.dispatch(payload)

    async def dispatch(self, payload: dict[str, Any]) -> list[int]:
        event = str(payload.get("event", ""))
        if event not in NOTIFIED_EVENTS:
            return []
        factory_id = int(payload["factory_id"])
        async with self.db.session() as session:
            factory = await session.get(Factory, factory_id)
            if factory is None:
                return []
            now = self.clock()
            tz = zone(factory.timezone)
            plans = await self._plan(session, factory_id, event, payload, tz, now)
            if not plans:
                await session.commit()
                return []
            context = await event_context(session, self.settings, factory, payload)
            rendered = self.renderer.render(event, context)
            alert_id = payload.get("alert_id")
            stamp = (payload.get("at"), payload.get("escalation_level"), payload.get("occurrences"))
            rows = [
                delivery_row(
                    factory_id=factory_id,
                    key=key_of("alert", alert_id, event, *stamp, plan.target_key),
                    event=event,
                    alert_id=alert_id,
                    plan=plan,
                    rendered=rendered,
                    payload=payload,
                    max_attempts=self.settings.notify_max_attempts,
                    now=now,
                )
                for plan in plans
            ]
            inserted = await insert_deliveries(session, rows)
            await session.commit()
        if inserted:
            log.info(
                "notify_queued", alert_event=event, alert_id=alert_id, deliveries=len(inserted)
            )
            if self.on_queued is not None:
                self.on_queued()
        return inserted

    async def _plan(
        self,
        session: AsyncSession,
        factory_id: int,
        event: str,
        payload: dict[str, Any],
        tz: ZoneInfo,
        now: dt.datetime,
    ) -> list[Planned]:
        plans: list[Planned] = []
        seen: set[tuple[str, str]] = set()  # (kind, recipient): one message per address

        def add(plan: Planned) -> None:
            ident = (plan.kind, plan.recipient or f"channel:{plan.channel_id}")
            if ident not in seen:
                seen.add(ident)
                plans.append(plan)

        for channel in await self._rule_channels(session, factory_id, payload, event):
            for recipient in channel_recipients(channel):
                add(
                    Planned(
                        target_key=f"c{channel.id}:{recipient or ''}",
                        kind=channel.kind,
                        channel_id=channel.id,
                        user_id=None,
                        recipient=recipient,
                        not_before=now,
                    )
                )
        for plan in await self._user_plans(session, factory_id, event, payload, tz, now):
            add(plan)
        return plans

    async def _rule_channels(
        self, session: AsyncSession, factory_id: int, payload: dict[str, Any], event: str
    ) -> list[NotificationChannel]:
        rule_id = payload.get("rule_id")
        if rule_id is None:
            return []
        actions = await session.scalar(
            select(Rule.actions).where(Rule.id == rule_id, Rule.factory_id == factory_id)
        )
        wanted = [i for i in (actions or {}).get("notify", []) if isinstance(i, int)]
        if not wanted:
            return []
        channels = (
            await session.scalars(
                select(NotificationChannel)
                .where(
                    NotificationChannel.factory_id == factory_id,
                    NotificationChannel.id.in_(wanted),
                    NotificationChannel.is_active,
                )
                .order_by(NotificationChannel.id)
            )
        ).all()
        missing = set(wanted) - {c.id for c in channels}
        if missing:
            log.warning("notify_channels_unavailable", rule_id=rule_id, channels=sorted(missing))
        return [c for c in channels if event in (c.events or [])]

    async def _user_plans(
        self,
        session: AsyncSession,
        factory_id: int,
        event: str,
        payload: dict[str, Any],
        tz: ZoneInfo,
        now: dt.datetime,
    ) -> list[Planned]:
        severity = str(payload.get("severity", "medium"))
        if event in DIRECTED_EVENTS:
            ids = [int(i) for i in payload.get("recipients") or [] if isinstance(i, int)]
            if not ids:
                return []
            rows = (
                await session.execute(
                    select(User, NotificationPreference)
                    .outerjoin(NotificationPreference, NotificationPreference.user_id == User.id)
                    .where(User.factory_id == factory_id, User.id.in_(ids), User.is_active)
                    .order_by(User.id)
                )
            ).all()
            check_severity = False
        elif event == "created":
            rows = (
                await session.execute(
                    select(User, NotificationPreference)
                    .join(NotificationPreference, NotificationPreference.user_id == User.id)
                    .where(
                        User.factory_id == factory_id,
                        User.is_active,
                        NotificationPreference.enabled,
                    )
                    .order_by(User.id)
                )
            ).all()
            check_severity = True
        else:
            return []
        providers = await provider_channels(session, factory_id)
        actor_id = payload.get("actor_id")
        plans: list[Planned] = []
        for user, pref in rows:
            if pref is not None and not pref.enabled:
                continue
            if user.id == actor_id:  # nobody is told about what they just did themselves
                continue
            if (
                check_severity
                and pref is not None
                and SEVERITY_RANK.get(severity, 1) < SEVERITY_RANK.get(pref.min_severity, 2)
            ):
                continue
            not_before = now
            if pref is not None and severity != "critical":
                until = quiet_until(pref.quiet_start, pref.quiet_end, now, tz)
                if until is not None:
                    not_before = until
            for kind, recipient in user_addresses(user, pref):
                provider = providers.get(kind)
                if kind != "email" and provider is None:
                    log.warning("notify_no_provider", kind=kind, user_id=user.id)
                    continue
                plans.append(
                    Planned(
                        target_key=f"u{user.id}:{kind}:{recipient}",
                        kind=kind,
                        channel_id=provider.id if provider is not None else None,
                        user_id=user.id,
                        recipient=recipient,
                        not_before=not_before,
                    )
                )
        return plans


def channel_recipients(channel: NotificationChannel) -> list[str | None]:
    """One delivery per address of a channel (None: the channel's single endpoint)."""
    config = channel.config or {}
    if channel.kind == "email":
        return list(dict.fromkeys(str(r) for r in config.get("recipients", [])))
    if channel.kind in ("sms", "whatsapp"):
        return list(dict.fromkeys(str(n) for n in config.get("to_numbers", [])))
    return [None]


def user_addresses(user: User, pref: NotificationPreference | None) -> list[tuple[str, str]]:
    entries = pref.channels if pref is not None else [{"kind": "email"}]
    out: list[tuple[str, str]] = []
    for entry in entries or []:
        kind = entry.get("kind")
        if kind == "email":
            out.append(("email", str(entry.get("address") or user.email)))
        elif kind in ("sms", "whatsapp") and entry.get("phone"):
            out.append((str(kind), str(entry["phone"])))
    return out


async def provider_channels(
    session: AsyncSession, factory_id: int
) -> dict[str, NotificationChannel]:
    """The channel whose Twilio account carries users' own SMS / WhatsApp messages:
    the factory's oldest active channel of that kind."""
    channels = (
        await session.scalars(
            select(NotificationChannel)
            .where(
                NotificationChannel.factory_id == factory_id,
                NotificationChannel.is_active,
                NotificationChannel.kind.in_(("sms", "whatsapp")),
            )
            .order_by(NotificationChannel.id)
        )
    ).all()
    out: dict[str, NotificationChannel] = {}
    for channel in channels:
        out.setdefault(channel.kind, channel)
    return out


def fact_text(fact: Any) -> str:
    if isinstance(fact, dict):
        if fact.get("text"):
            return str(fact["text"])
        parts = [fact.get("parameter"), fact.get("operator"), fact.get("threshold")]
        value = fact.get("value")
        return " ".join(str(p) for p in parts if p is not None) + (
            f" (value {value})" if value is not None else ""
        )
    return str(fact)


async def _user_name(session: AsyncSession, factory_id: int, user_id: Any) -> str | None:
    if not isinstance(user_id, int):
        return None
    row = (
        await session.execute(
            select(User.full_name, User.email).where(
                User.id == user_id, User.factory_id == factory_id
            )
        )
    ).first()
    return (row[0] or row[1]) if row is not None else None


async def event_context(
    session: AsyncSession, settings: Settings, factory: Factory, payload: dict[str, Any]
) -> dict[str, Any]:
    """What the templates see for an alert event."""
    tz = zone(factory.timezone)
    device = None
    if isinstance(payload.get("device_id"), int):
        row = (
            await session.execute(
                select(Device.name, Device.device_key).where(
                    Device.id == payload["device_id"], Device.factory_id == factory.id
                )
            )
        ).first()
        if row is not None:
            device = {"id": payload["device_id"], "name": row[0], "key": row[1]}
    rule = None
    if isinstance(payload.get("rule_id"), int):
        name = await session.scalar(
            select(Rule.name).where(Rule.id == payload["rule_id"], Rule.factory_id == factory.id)
        )
        if name is not None:
            rule = {"id": payload["rule_id"], "name": name}
    facts: list[str] = []
    if isinstance(payload.get("alert_id"), int):
        stored = await session.scalar(
            select(Alert.facts).where(
                Alert.id == payload["alert_id"], Alert.factory_id == factory.id
            )
        )
        facts = [fact_text(f) for f in stored or []][:20]
    link = None
    if settings.public_url and payload.get("alert_id") is not None:
        link = f"{settings.public_url.rstrip('/')}/alerts/{payload['alert_id']}"
    return {
        "event": payload.get("event"),
        "alert": payload,
        "severity": payload.get("severity"),
        "device": device,
        "rule": rule,
        "facts": facts,
        "factory": {"name": factory.name, "timezone": factory.timezone},
        "local_at": local_text(parse_at(payload.get("at")), tz),
        "link": link,
        "actor": await _user_name(session, factory.id, payload.get("actor_id")),
        "assignee": await _user_name(session, factory.id, payload.get("assigned_to")),
    }
