"""Request and response shapes of the notifications API, and each channel kind's config.

A channel body carries `config` as a plain object; the service checks it against
the model of the channel's kind (CONFIG_MODELS), so a bad field is a 422 at
`body.config.<field>`. Secrets (auth tokens, signing secrets, Slack/Teams
webhook URLs, which embed a token) are never returned: see `mask`.
"""

from __future__ import annotations

import datetime as dt
import re
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, EmailStr, Field, model_validator

from plantwatch.core.schemas import NotNull, RequestModel, no_control_chars


class ChannelKind(StrEnum):
    EMAIL = "email"
    SLACK = "slack"
    TEAMS = "teams"
    WEBHOOK = "webhook"
    SMS = "sms"
    WHATSAPP = "whatsapp"


class AlertEventName(StrEnum):
    CREATED = "created"
    REPEATED = "repeated"
    ACKNOWLEDGED = "acknowledged"
    ASSIGNED = "assigned"
    ESCALATED = "escalated"
    REMINDER = "reminder"
    RESOLVED = "resolved"


class Severity(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


SEVERITY_RANK = {"low": 0, "medium": 1, "high": 2, "critical": 3}
# What a channel named by a rule hears about unless its `events` say otherwise.
DEFAULT_CHANNEL_EVENTS = [
    AlertEventName.CREATED,
    AlertEventName.ESCALATED,
    AlertEventName.RESOLVED,
]
E164 = re.compile(r"^\+[1-9]\d{6,14}$")
HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


def _http_url(value: str) -> str:
    if len(value) > 2000:
        raise ValueError("must be at most 2000 characters")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL with a host")
    return value


def _phone(value: str) -> str:
    if not E164.match(value):
        raise ValueError("must be an E.164 phone number like +4915112345678")
    return value


def _hhmm(value: str) -> str:
    if not HHMM.match(value):
        raise ValueError("must be a time of day HH:MM (00:00-23:59)")
    return value


HttpUrlText = Annotated[str, AfterValidator(no_control_chars), AfterValidator(_http_url)]
Phone = Annotated[str, AfterValidator(_phone)]
TimeOfDay = Annotated[str, AfterValidator(_hhmm)]
Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(no_control_chars)]


# --- channel configs, one model per kind ---------------------------------------------------


class EmailConfig(RequestModel):
    recipients: Annotated[list[EmailStr], Field(min_length=1, max_length=50)]


class SlackConfig(RequestModel):
    webhook_url: HttpUrlText


class TeamsConfig(RequestModel):
    webhook_url: HttpUrlText
    # adaptive_card: Teams Workflows ("Post to a channel when a webhook request is
    # received"); message_card: the older Office 365 connector webhooks.
    format: Literal["adaptive_card", "message_card"] = "adaptive_card"


class WebhookConfig(RequestModel):
    url: HttpUrlText
    secret: Annotated[str, Field(min_length=16, max_length=256)]


class TwilioConfig(RequestModel):
    account_sid: Annotated[str, Field(pattern=r"^AC[0-9a-fA-F]{32}$")]
    auth_token: Annotated[str, Field(min_length=8, max_length=128)]
    from_number: Phone
    # May be empty: then the channel only carries users' own SMS/WhatsApp preferences.
    to_numbers: Annotated[list[Phone], Field(max_length=50)] = Field(default_factory=list)


CONFIG_MODELS: dict[str, type[RequestModel]] = {
    ChannelKind.EMAIL: EmailConfig,
    ChannelKind.SLACK: SlackConfig,
    ChannelKind.TEAMS: TeamsConfig,
    ChannelKind.WEBHOOK: WebhookConfig,
    ChannelKind.SMS: TwilioConfig,
    ChannelKind.WHATSAPP: TwilioConfig,
}
# Config fields never returned by the API.
SECRET_FIELDS: dict[str, tuple[str, ...]] = {
    ChannelKind.EMAIL: (),
    ChannelKind.SLACK: ("webhook_url",),
    ChannelKind.TEAMS: ("webhook_url",),
    ChannelKind.WEBHOOK: ("secret",),
    ChannelKind.SMS: ("auth_token",),
    ChannelKind.WHATSAPP: ("auth_token",),
}


def mask(value: str) -> str:
    """What the API shows of a secret: enough to tell two apart, never enough to use."""
    if "://" in value:
        parts = urlsplit(value)
        return f"{parts.scheme}://{parts.hostname}/****{value[-4:]}"
    return f"****{value[-4:]}" if len(value) >= 16 else "****"


def masked_config(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    out = dict(config)
    for key in SECRET_FIELDS.get(kind, ()):
        if isinstance(out.get(key), str):
            out[key] = mask(out[key])
    return out


# --- channels ----------------------------------------------------------------------------


Events = Annotated[list[AlertEventName], Field(min_length=1, max_length=len(AlertEventName))]


class ChannelBody(RequestModel):
    name: Name
    kind: ChannelKind
    config: dict[str, Any]
    events: Events = Field(default_factory=lambda: list(DEFAULT_CHANNEL_EVENTS))
    is_active: bool = True


class ChannelUpdate(RequestModel):
    """Fields left out stay. `config` is merged into the stored one, so a secret need
    not be sent again (sending back its masked form keeps it too)."""

    name: Annotated[Name | None, NotNull] = None
    config: Annotated[dict[str, Any] | None, NotNull] = None
    events: Annotated[Events | None, NotNull] = None
    is_active: Annotated[bool | None, NotNull] = None


class ChannelOut(BaseModel):
    id: int
    name: str
    kind: str
    config: dict[str, Any] = Field(description="Secrets masked")
    events: list[str]
    is_active: bool
    created_by: int | None
    created_at: dt.datetime
    updated_at: dt.datetime


class ChannelTest(RequestModel):
    to: Annotated[str, Field(max_length=320), AfterValidator(no_control_chars)] | None = Field(
        default=None,
        description="E-mail address (email) or phone number (sms, whatsapp) to send the "
        "test to instead of the channel's own recipients",
    )


class ChannelTestResult(BaseModel):
    ok: bool
    kind: str
    targets: list[str]
    error: str | None
    ms: float


# --- preferences ---------------------------------------------------------------------------


class PreferenceChannel(RequestModel):
    kind: Literal["email", "sms", "whatsapp"]
    # email: defaults to the user's login e-mail.
    address: EmailStr | None = None
    # sms / whatsapp: required.
    phone: Phone | None = None

    @model_validator(mode="after")
    def _target(self) -> PreferenceChannel:
        if self.kind == "email" and self.phone is not None:
            raise ValueError("an email channel takes `address`, not `phone`")
        if self.kind != "email" and (self.phone is None or self.address is not None):
            raise ValueError(f"a {self.kind} channel needs `phone` (and no `address`)")
        return self


class QuietHours(RequestModel):
    start: TimeOfDay
    end: TimeOfDay

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHours:
        if self.start == self.end:
            raise ValueError("start and end must differ")
        return self


class PreferencesBody(RequestModel):
    enabled: bool = True
    channels: Annotated[list[PreferenceChannel], Field(max_length=5)] = Field(
        default_factory=lambda: [PreferenceChannel(kind="email")]
    )
    min_severity: Severity = Severity.HIGH
    quiet_hours: QuietHours | None = None
    digest: bool = False
    digest_hour: Annotated[int, Field(ge=0, le=23)] | None = None


class PreferencesOut(BaseModel):
    user_id: int
    enabled: bool
    channels: list[dict[str, Any]]
    min_severity: str
    quiet_hours: dict[str, str] | None
    digest: bool
    digest_hour: int = Field(description="Local hour of the daily digest")
    timezone: str = Field(description="The factory's timezone: quiet hours and digest use it")
    saved: bool = Field(description="False: nothing stored yet; these are the defaults")
    updated_at: dt.datetime | None


# --- deliveries ----------------------------------------------------------------------------


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    DEAD = "dead"


class Attempt(BaseModel):
    at: dt.datetime
    ok: bool
    error: str | None = None
    ms: float
    info: str | None = None


class DeliveryOut(BaseModel):
    id: int
    event: str
    alert_id: int | None
    channel_id: int | None
    user_id: int | None
    kind: str
    recipient: str | None
    status: str
    attempts: int
    max_attempts: int
    next_attempt_at: dt.datetime
    last_error: str | None
    subject: str
    body: str
    short_body: str
    attempt_log: list[Attempt]
    created_at: dt.datetime
    updated_at: dt.datetime
    sent_at: dt.datetime | None
