"""Notifications: channels, the caller's preferences, the delivery log and retries.

Every function takes the factory from the caller (an `Actor` or `factory_id`);
another factory's channel or delivery is "not found". Channel secrets are stored
as given and never leave this module unmasked (API output and audit alike).
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from pathlib import Path
from typing import Any

from pydantic import EmailStr, TypeAdapter, ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from plantwatch.core.config import Settings
from plantwatch.core.db import utcnow
from plantwatch.core.errors import Conflict, NotFound, invalid_body
from plantwatch.core.listing import like_pattern, paginate, parse_sort
from plantwatch.core.schemas import PageParams
from plantwatch.notify import channels
from plantwatch.notify.dispatch import local_text, provider_channels, zone
from plantwatch.notify.models import (
    CLAIMABLE,
    DEAD,
    PENDING,
    SENDING,
    SENT,
    NotificationChannel,
    NotificationPreference,
)
from plantwatch.notify.models import NotificationDelivery as Delivery
from plantwatch.notify.render import Renderer
from plantwatch.notify.schemas import (
    CONFIG_MODELS,
    E164,
    SECRET_FIELDS,
    ChannelBody,
    ChannelOut,
    ChannelTestResult,
    ChannelUpdate,
    DeliveryOut,
    PreferencesBody,
    PreferencesOut,
    mask,
    masked_config,
)
from plantwatch.tenancy.audit import Actor, record, snapshot
from plantwatch.tenancy.models import Factory

CHANNEL_SORTS = {"name": NotificationChannel.name, "created_at": NotificationChannel.created_at}
DELIVERY_SORTS = {
    "created_at": Delivery.created_at,
    "next_attempt_at": Delivery.next_attempt_at,
    "status": Delivery.status,
}
_EMAIL = TypeAdapter(EmailStr)


@functools.lru_cache(maxsize=4)
def renderer_for(templates_dir: Path | None) -> Renderer:
    return Renderer(templates_dir)


# --- channels ------------------------------------------------------------------------------


def channel_out(channel: NotificationChannel) -> ChannelOut:
    return ChannelOut(
        id=channel.id,
        name=channel.name,
        kind=channel.kind,
        config=masked_config(channel.kind, channel.config),
        events=list(channel.events),
        is_active=channel.is_active,
        created_by=channel.created_by,
        created_at=channel.created_at,
        updated_at=channel.updated_at,
    )


def _audit_view(channel: NotificationChannel) -> dict[str, Any]:
    view = snapshot(channel)
    view["config"] = masked_config(channel.kind, channel.config)
    return view


def check_config(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """The config validated for its kind; 422 with `body.config.<field>` paths."""
    model = CONFIG_MODELS[kind]
    try:
        parsed = model.model_validate(config)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = "".join(
                f"[{part}]" if isinstance(part, int) else f".{part}" for part in err["loc"]
            )
            message = str(err["msg"]).removeprefix("Value error, ")
            problems.append((f"config{loc}", message))
        raise invalid_body(problems) from None
    return parsed.model_dump(mode="json")


async def _channel(session: AsyncSession, factory_id: int, channel_id: int) -> NotificationChannel:
    channel = await session.scalar(
        select(NotificationChannel).where(
            NotificationChannel.id == channel_id, NotificationChannel.factory_id == factory_id
        )
    )
    if channel is None:
        raise NotFound(f"no notification channel {channel_id}", code="channel_not_found")
    return channel


def _name_taken(name: str) -> Conflict:
    return Conflict(f"a notification channel named '{name}' exists", code="channel_exists")


async def _check_name(
    session: AsyncSession, factory_id: int, name: str, exclude_id: int | None = None
) -> None:
    stmt = select(NotificationChannel.id).where(
        NotificationChannel.factory_id == factory_id, NotificationChannel.name == name
    )
    if exclude_id is not None:
        stmt = stmt.where(NotificationChannel.id != exclude_id)
    if await session.scalar(stmt) is not None:
        raise _name_taken(name)


async def _commit(session: AsyncSession, name: str) -> None:
    try:
        await session.commit()
    except IntegrityError as exc:  # the same name created meanwhile
        await session.rollback()
        raise _name_taken(name) from exc


async def create_channel(session: AsyncSession, actor: Actor, body: ChannelBody) -> ChannelOut:
    config = check_config(body.kind, body.config)
    await _check_name(session, actor.factory_id, body.name)
    channel = NotificationChannel(
        factory_id=actor.factory_id,
        name=body.name,
        kind=body.kind.value,
        config=config,
        events=[e.value for e in dict.fromkeys(body.events)],
        is_active=body.is_active,
        created_by=actor.user_id,
    )
    session.add(channel)
    await session.flush()
    record(
        session,
        actor,
        "notification_channel.create",
        "notification_channel",
        channel.id,
        after=_audit_view(channel),
    )
    await _commit(session, body.name)
    return channel_out(channel)


def _merge_config(kind: str, current: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    merged = {**current, **given}
    for key in SECRET_FIELDS.get(kind, ()):
        value = given.get(key)
        current_value = current.get(key)
        # The masked value sent back (e.g. a form round trip): keep the secret.
        if isinstance(current_value, str) and value == mask(current_value):
            merged[key] = current_value
    return merged


async def update_channel(
    session: AsyncSession, actor: Actor, channel_id: int, body: ChannelUpdate
) -> ChannelOut:
    channel = await _channel(session, actor.factory_id, channel_id)
    changes = body.model_dump(exclude_unset=True)
    config = (
        check_config(channel.kind, _merge_config(channel.kind, channel.config, changes["config"]))
        if "config" in changes
        else None
    )
    if "name" in changes:
        await _check_name(session, actor.factory_id, changes["name"], exclude_id=channel.id)
    before = _audit_view(channel)
    if "name" in changes:
        channel.name = changes["name"]
    if config is not None:
        channel.config = config
    if "events" in changes:
        channel.events = [str(e) for e in dict.fromkeys(changes["events"])]
    if "is_active" in changes:
        channel.is_active = changes["is_active"]
    channel.updated_at = utcnow()
    record(
        session,
        actor,
        "notification_channel.update",
        "notification_channel",
        channel.id,
        before=before,
        after=_audit_view(channel),
    )
    await _commit(session, channel.name)
    return channel_out(channel)


async def delete_channel(session: AsyncSession, actor: Actor, channel_id: int) -> None:
    channel = await _channel(session, actor.factory_id, channel_id)
    now = utcnow()
    # What was still waiting for this channel will never go: say so in the log.
    await session.execute(
        update(Delivery)
        .where(Delivery.channel_id == channel.id, Delivery.status.in_(CLAIMABLE))
        .values(status=DEAD, last_error="its channel was deleted", updated_at=now)
    )
    record(
        session,
        actor,
        "notification_channel.delete",
        "notification_channel",
        channel.id,
        before=_audit_view(channel),
    )
    await session.delete(channel)
    await session.commit()


async def get_channel(session: AsyncSession, factory_id: int, channel_id: int) -> ChannelOut:
    return channel_out(await _channel(session, factory_id, channel_id))


async def list_channels(
    session: AsyncSession,
    factory_id: int,
    params: PageParams,
    *,
    kind: str | None,
    is_active: bool | None,
    search: str | None,
    sort: str | None,
) -> tuple[list[ChannelOut], int]:
    stmt = select(NotificationChannel).where(NotificationChannel.factory_id == factory_id)
    if kind is not None:
        stmt = stmt.where(NotificationChannel.kind == kind)
    if is_active is not None:
        stmt = stmt.where(NotificationChannel.is_active.is_(is_active))
    if search:
        stmt = stmt.where(
            func.lower(NotificationChannel.name).like(like_pattern(search), escape="\\")
        )
    rows, total = await paginate(
        session,
        stmt,
        params,
        parse_sort(sort, CHANNEL_SORTS, "name"),
        NotificationChannel.id,
    )
    return [channel_out(c) for c in rows], total


def _test_targets(channel: NotificationChannel, to: str | None) -> list[channels.Target]:
    config = dict(channel.config)
    if channel.kind == "email":
        if to is not None:
            try:
                to = str(_EMAIL.validate_python(to))
            except ValidationError:
                raise invalid_body([("to", "must be an e-mail address")]) from None
            return [channels.Target("email", config, to)]
        return [channels.Target("email", {"recipients": config["recipients"]})]
    if channel.kind in ("sms", "whatsapp"):
        if to is not None:
            if not E164.match(to):
                raise invalid_body([("to", "must be an E.164 phone number like +4915112345678")])
            return [channels.Target(channel.kind, config, to)]
        numbers = config.get("to_numbers") or []
        if not numbers:
            raise invalid_body([("to", "this channel has no numbers of its own: give `to`")])
        return [channels.Target(channel.kind, config, n) for n in numbers]
    if to is not None:
        raise invalid_body([("to", f"a {channel.kind} channel sends to its own URL")])
    return [channels.Target(channel.kind, config)]


async def test_channel(
    session: AsyncSession, settings: Settings, actor: Actor, channel_id: int, to: str | None
) -> ChannelTestResult:
    """Send a test message now, through the real transport, and say how it went."""
    channel = await _channel(session, actor.factory_id, channel_id)
    targets = _test_targets(channel, to)
    factory = await session.get(Factory, actor.factory_id)
    timezone = factory.timezone if factory is not None else "UTC"
    rendered = renderer_for(settings.notify_templates_dir).render(
        "test",
        {
            "channel": {"name": channel.name, "kind": channel.kind},
            "factory": {"name": factory.name if factory else "", "timezone": timezone},
            "local_at": local_text(utcnow(), zone(timezone)),
            "severity": "low",
        },
    )
    message = channels.Message(
        event="test",
        subject=rendered.subject,
        body=rendered.body,
        short=rendered.short,
        html=rendered.html,
        severity="low",
        payload={"event": "test", "channel_id": channel.id},
    )
    await session.commit()  # no transaction (nor SQLite write lock) held while sending
    started = time.perf_counter()
    errors: list[str] = []
    async with channels.http_client(settings) as client:
        for target in targets:
            try:
                await channels.send(settings, client, target, message)
            except channels.SendError as exc:
                errors.append(str(exc))
    result = ChannelTestResult(
        ok=not errors,
        kind=channel.kind,
        targets=[t.recipient or channel.kind for t in targets],
        error="; ".join(errors)[:2000] or None,
        ms=round((time.perf_counter() - started) * 1000, 1),
    )
    record(
        session,
        actor,
        "notification_channel.test",
        "notification_channel",
        channel.id,
        after={"ok": result.ok, "error": result.error, "targets": result.targets},
    )
    await session.commit()
    return result


# --- preferences ---------------------------------------------------------------------------


def _preferences_out(
    user_id: int, pref: NotificationPreference | None, timezone: str, settings: Settings
) -> PreferencesOut:
    if pref is None:
        defaults = PreferencesBody()
        return PreferencesOut(
            user_id=user_id,
            enabled=defaults.enabled,
            channels=[c.model_dump(mode="json") for c in defaults.channels],
            min_severity=defaults.min_severity.value,
            quiet_hours=None,
            digest=defaults.digest,
            digest_hour=settings.notify_digest_hour,
            timezone=timezone,
            saved=False,
            updated_at=None,
        )
    quiet = (
        {"start": pref.quiet_start, "end": pref.quiet_end}
        if pref.quiet_start and pref.quiet_end
        else None
    )
    return PreferencesOut(
        user_id=user_id,
        enabled=pref.enabled,
        channels=list(pref.channels),
        min_severity=pref.min_severity,
        quiet_hours=quiet,
        digest=pref.digest,
        digest_hour=pref.digest_hour
        if pref.digest_hour is not None
        else settings.notify_digest_hour,
        timezone=timezone,
        saved=True,
        updated_at=pref.updated_at,
    )


async def _timezone(session: AsyncSession, factory_id: int) -> str:
    return await session.scalar(select(Factory.timezone).where(Factory.id == factory_id)) or "UTC"


async def get_preferences(
    session: AsyncSession, settings: Settings, actor: Actor
) -> PreferencesOut:
    assert actor.user_id is not None
    pref = await session.get(NotificationPreference, actor.user_id)
    if pref is not None and pref.factory_id != actor.factory_id:
        pref = None
    return _preferences_out(
        actor.user_id, pref, await _timezone(session, actor.factory_id), settings
    )


async def put_preferences(
    session: AsyncSession, settings: Settings, actor: Actor, body: PreferencesBody
) -> PreferencesOut:
    assert actor.user_id is not None
    problems: list[tuple[str, str]] = []
    seen: set[tuple[str, str | None]] = set()
    providers = await provider_channels(session, actor.factory_id)
    for i, entry in enumerate(body.channels):
        ident = (entry.kind, str(entry.address or entry.phone or ""))
        if ident in seen:
            problems.append((f"channels[{i}]", "listed twice"))
        seen.add(ident)
        if entry.kind != "email" and entry.kind not in providers:
            problems.append(
                (
                    f"channels[{i}].kind",
                    f"this factory has no active {entry.kind} channel to send through; "
                    "an administrator must create one first",
                )
            )
    if problems:
        raise invalid_body(problems)
    pref = await session.get(NotificationPreference, actor.user_id)
    before = snapshot(pref) if pref is not None else None
    if pref is None:
        pref = NotificationPreference(user_id=actor.user_id, factory_id=actor.factory_id)
        session.add(pref)
    pref.enabled = body.enabled
    pref.channels = [c.model_dump(mode="json", exclude_none=True) for c in body.channels]
    pref.min_severity = body.min_severity.value
    pref.quiet_start = body.quiet_hours.start if body.quiet_hours else None
    pref.quiet_end = body.quiet_hours.end if body.quiet_hours else None
    pref.digest = body.digest
    pref.digest_hour = body.digest_hour
    pref.updated_at = utcnow()
    await session.flush()
    record(
        session,
        actor,
        "notification_preferences.update",
        "user",
        actor.user_id,
        before=before,
        after=snapshot(pref),
    )
    await session.commit()
    return _preferences_out(
        actor.user_id, pref, await _timezone(session, actor.factory_id), settings
    )


# --- deliveries ----------------------------------------------------------------------------


def delivery_out(row: Delivery) -> DeliveryOut:
    return DeliveryOut.model_validate(
        {
            "id": row.id,
            "event": row.event,
            "alert_id": row.alert_id,
            "channel_id": row.channel_id,
            "user_id": row.user_id,
            "kind": row.kind,
            "recipient": row.recipient,
            "status": row.status,
            "attempts": row.attempts,
            "max_attempts": row.max_attempts,
            "next_attempt_at": row.next_attempt_at,
            "last_error": row.last_error,
            "subject": row.subject,
            "body": row.body,
            "short_body": row.short_body,
            "attempt_log": row.attempt_log,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "sent_at": row.sent_at,
        }
    )


async def list_deliveries(
    session: AsyncSession,
    factory_id: int,
    params: PageParams,
    *,
    status: str | None = None,
    channel_id: int | None = None,
    alert_id: int | None = None,
    user_id: int | None = None,
    event: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    sort: str | None = None,
) -> tuple[list[DeliveryOut], int]:
    stmt = select(Delivery).where(Delivery.factory_id == factory_id)
    if status is not None:
        stmt = stmt.where(Delivery.status == status)
    if channel_id is not None:
        stmt = stmt.where(Delivery.channel_id == channel_id)
    if alert_id is not None:
        stmt = stmt.where(Delivery.alert_id == alert_id)
    if user_id is not None:
        stmt = stmt.where(Delivery.user_id == user_id)
    if event is not None:
        stmt = stmt.where(Delivery.event == event)
    if since is not None:
        stmt = stmt.where(Delivery.created_at >= since)
    if until is not None:
        stmt = stmt.where(Delivery.created_at < until)
    rows, total = await paginate(
        session, stmt, params, parse_sort(sort, DELIVERY_SORTS, "-created_at"), Delivery.id
    )
    return [delivery_out(r) for r in rows], total


async def _delivery(session: AsyncSession, factory_id: int, delivery_id: int) -> Delivery:
    row = await session.scalar(
        select(Delivery).where(Delivery.id == delivery_id, Delivery.factory_id == factory_id)
    )
    if row is None:
        raise NotFound(f"no delivery {delivery_id}", code="delivery_not_found")
    return row


async def get_delivery(session: AsyncSession, factory_id: int, delivery_id: int) -> DeliveryOut:
    return delivery_out(await _delivery(session, factory_id, delivery_id))


async def retry_delivery(
    session: AsyncSession, settings: Settings, actor: Actor, delivery_id: int
) -> DeliveryOut:
    """Send again now: a failed or dead delivery (a dead one gets a fresh set of
    attempts), or a pending one held back by backoff or quiet hours. Never one that
    was sent, nor one being sent."""
    row = await _delivery(session, actor.factory_id, delivery_id)
    if row.status == SENT:
        raise Conflict("this delivery was sent; it is never sent twice", code="delivery_sent")
    if row.status == SENDING:
        raise Conflict("this delivery is being sent right now", code="delivery_in_progress")
    now = utcnow()
    before = {"status": row.status, "next_attempt_at": row.next_attempt_at.isoformat()}
    max_attempts = row.max_attempts
    if row.status == DEAD:
        max_attempts = row.attempts + settings.notify_max_attempts
    result = await session.execute(
        update(Delivery)
        .where(Delivery.id == row.id, Delivery.status == row.status)
        .values(
            status=PENDING,
            next_attempt_at=now,
            max_attempts=max_attempts,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 1) != 1:
        await session.rollback()
        raise Conflict("the delivery changed meanwhile; look again", code="delivery_in_progress")
    record(
        session,
        actor,
        "notification_delivery.retry",
        "notification_delivery",
        row.id,
        before=before,
        after={"status": PENDING, "next_attempt_at": now.isoformat()},
    )
    await session.commit()
    await session.refresh(row)
    return delivery_out(row)
