"""The transports: e-mail (SMTP), Slack, Teams, signed webhooks, SMS and WhatsApp (Twilio).

Each `send_*` returns a short receipt (a message id) or raises `SendError`. A
`PermanentSendError` (a 4xx that retrying cannot fix, a refused address) goes
straight to `dead`; any other failure is retried with backoff by the worker.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

import aiosmtplib
import httpx

from plantwatch.core.config import Settings
from plantwatch.core.jsonutil import dumps

SIGNATURE_HEADER = "X-Plantwatch-Signature"
TIMESTAMP_HEADER = "X-Plantwatch-Timestamp"
DELIVERY_HEADER = "X-Plantwatch-Delivery"
EVENT_HEADER = "X-Plantwatch-Event"
USER_AGENT = "plantwatch-notify/1"
SEVERITY_COLOURS = {"low": "2EB886", "medium": "DAA038", "high": "E8912D", "critical": "D00000"}
# HTTP answers worth trying again; every other 4xx is the request's own fault.
RETRYABLE_STATUS = frozenset({408, 425, 429})


class SendError(Exception):
    permanent = False


class PermanentSendError(SendError):
    permanent = True


@dataclass(frozen=True)
class Message:
    """One rendered notification, ready for any transport."""

    event: str
    subject: str
    body: str
    short: str
    html: str | None = None
    severity: str = "medium"
    link: str | None = None
    # The event itself (webhooks send it as `data`).
    payload: dict[str, Any] = field(default_factory=dict)
    facts: list[tuple[str, str]] = field(default_factory=list)
    delivery_id: str = "test"


def _check_response(response: httpx.Response, what: str) -> None:
    if response.is_success:
        return
    text = response.text[:300].strip()
    message = f"{what} answered HTTP {response.status_code}" + (f": {text}" if text else "")
    if response.status_code >= 500 or response.status_code in RETRYABLE_STATUS:
        raise SendError(message)
    raise PermanentSendError(message)


async def _post(client: httpx.AsyncClient, what: str, url: str, **kwargs: Any) -> httpx.Response:
    try:
        response = await client.post(url, **kwargs)
    except httpx.TimeoutException as exc:
        raise SendError(f"{what}: timed out ({type(exc).__name__})") from exc
    except httpx.HTTPError as exc:
        raise SendError(f"{what}: {type(exc).__name__}: {exc}") from exc
    _check_response(response, what)
    return response


# --- e-mail --------------------------------------------------------------------------------


def email_message(settings: Settings, to: list[str], message: Message) -> EmailMessage:
    mail = EmailMessage()
    mail["Subject"] = message.subject
    mail["From"] = settings.smtp_from
    mail["To"] = ", ".join(to)
    domain = settings.smtp_from.rpartition("@")[2] or "plantwatch.local"
    mail["Message-ID"] = make_msgid("pw" + message.delivery_id, domain=domain)
    mail["X-Plantwatch-Event"] = message.event
    mail.set_content(message.body)
    if message.html:
        mail.add_alternative(message.html, subtype="html")
    return mail


async def send_email(settings: Settings, to: list[str], message: Message) -> str:
    if not settings.smtp_host:
        raise SendError("no SMTP server configured (PLANTWATCH_SMTP_HOST)")
    mail = email_message(settings, to, message)
    try:
        refused, _reply = await aiosmtplib.send(
            mail,
            hostname=settings.smtp_host,
            port=settings.smtp_port,
            username=settings.smtp_username,
            password=(
                settings.smtp_password.get_secret_value() if settings.smtp_password else None
            ),
            use_tls=settings.smtp_port == 465,
            start_tls=settings.smtp_starttls if settings.smtp_port != 465 else False,
            timeout=settings.notify_send_timeout_s,
        )
    except aiosmtplib.SMTPRecipientsRefused as exc:
        codes = [r.code for r in exc.recipients]
        error = SendError if any(400 <= c < 500 for c in codes) else PermanentSendError
        raise error(f"SMTP refused every recipient: {exc}") from exc
    except aiosmtplib.SMTPResponseException as exc:
        error = PermanentSendError if 500 <= exc.code < 600 else SendError
        raise error(f"SMTP {exc.code}: {exc.message}") from exc
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise SendError(f"SMTP: {type(exc).__name__}: {exc}") from exc
    if refused:  # the others got it, so this is not retried (it would reach them twice)
        return f"{mail['Message-ID']}; refused: {', '.join(sorted(refused))}"
    return str(mail["Message-ID"])


# --- Slack and Teams -----------------------------------------------------------------------


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def slack_payload(message: Message) -> dict[str, Any]:
    """Slack incoming webhook: `text` is the notification fallback, `blocks` the layout."""
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _clip(message.subject, 150)}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _clip(message.body, 3000)}},
    ]
    if message.facts:
        blocks.append(
            {
                "type": "section",
                "fields": [
                    {"type": "mrkdwn", "text": _clip(f"*{k}*\n{v}", 2000)}
                    for k, v in message.facts[:10]
                ],
            }
        )
    if message.link:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open in plantwatch"},
                        "url": message.link,
                    }
                ],
            }
        )
    return {"text": _clip(message.subject, 3000), "blocks": blocks}


def teams_payload(message: Message, fmt: str) -> dict[str, Any]:
    if fmt == "message_card":
        card: dict[str, Any] = {
            "@type": "MessageCard",
            "@context": "https://schema.org/extensions",
            "summary": _clip(message.subject, 200),
            "themeColor": SEVERITY_COLOURS.get(message.severity, "808080"),
            "title": message.subject,
            "text": message.body.replace("\n", "  \n"),
        }
        if message.facts:
            card["sections"] = [{"facts": [{"name": k, "value": v} for k, v in message.facts]}]
        if message.link:
            card["potentialAction"] = [
                {
                    "@type": "OpenUri",
                    "name": "Open in plantwatch",
                    "targets": [{"os": "default", "uri": message.link}],
                }
            ]
        return card
    body: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": message.subject,
            "weight": "Bolder",
            "size": "Medium",
            "wrap": True,
            "color": "Attention" if message.severity in ("high", "critical") else "Default",
        },
        {"type": "TextBlock", "text": message.body, "wrap": True},
    ]
    if message.facts:
        body.append(
            {"type": "FactSet", "facts": [{"title": k, "value": v} for k, v in message.facts]}
        )
    content: dict[str, Any] = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": body,
    }
    if message.link:
        content["actions"] = [
            {"type": "Action.OpenUrl", "title": "Open in plantwatch", "url": message.link}
        ]
    return {
        "type": "message",
        "attachments": [
            {
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": None,
                "content": content,
            }
        ],
    }


async def send_slack(client: httpx.AsyncClient, url: str, message: Message) -> str:
    response = await _post(client, "Slack", url, json=slack_payload(message))
    return response.text[:100] or "ok"


async def send_teams(client: httpx.AsyncClient, url: str, fmt: str, message: Message) -> str:
    response = await _post(client, "Teams", url, json=teams_payload(message, fmt))
    return response.text[:100] or str(response.status_code)


# --- signed webhook ------------------------------------------------------------------------


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """`sha256=` + hex HMAC-SHA256 over `<timestamp>.<raw body>` with the channel secret."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: str, timestamp: str, body: bytes, signature: str, *, now: float, tolerance_s: int = 300
) -> bool:
    """What a receiver does (docs/notifications.md): a fresh timestamp and a matching MAC."""
    try:
        age = abs(now - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


def webhook_body(message: Message) -> bytes:
    return dumps(
        {
            "id": message.delivery_id,
            "event": f"alert.{message.event}" if message.event != "test" else "test",
            "subject": message.subject,
            "text": message.body,
            "link": message.link,
            "data": message.payload,
        }
    )


async def send_webhook(
    client: httpx.AsyncClient, url: str, secret: str, message: Message, now: float | None = None
) -> str:
    body = webhook_body(message)
    timestamp = str(int(time.time() if now is None else now))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
        DELIVERY_HEADER: message.delivery_id,
        EVENT_HEADER: message.event,
    }
    response = await _post(client, "webhook", url, content=body, headers=headers)
    return f"HTTP {response.status_code}"


# --- Twilio: SMS and WhatsApp --------------------------------------------------------------


async def send_twilio(
    client: httpx.AsyncClient,
    api_base: str,
    config: dict[str, Any],
    to: str,
    text: str,
    *,
    whatsapp: bool,
) -> str:
    sid = config["account_sid"]
    prefix = "whatsapp:" if whatsapp else ""
    url = f"{api_base.rstrip('/')}/2010-04-01/Accounts/{sid}/Messages.json"
    response = await _post(
        client,
        "Twilio",
        url,
        data={"To": prefix + to, "From": prefix + config["from_number"], "Body": text},
        auth=(sid, config["auth_token"]),
    )
    try:
        message_sid = response.json().get("sid")
    except ValueError:
        message_sid = None
    return str(message_sid or f"HTTP {response.status_code}")


# --- one entry point -----------------------------------------------------------------------


@dataclass
class Target:
    """Where one delivery goes: a channel kind, its config, and the recipient if any."""

    kind: str
    config: dict[str, Any]
    recipient: str | None = None


async def send(
    settings: Settings, client: httpx.AsyncClient, target: Target, message: Message
) -> str:
    kind, config = target.kind, target.config
    if kind == "email":
        to = [target.recipient] if target.recipient else list(config.get("recipients", []))
        if not to:
            raise PermanentSendError("no recipient")
        return await send_email(settings, to, message)
    if kind == "slack":
        return await send_slack(client, config["webhook_url"], message)
    if kind == "teams":
        return await send_teams(
            client, config["webhook_url"], config.get("format", "adaptive_card"), message
        )
    if kind == "webhook":
        return await send_webhook(client, config["url"], config["secret"], message)
    if kind in ("sms", "whatsapp"):
        if not target.recipient:
            raise PermanentSendError("no phone number")
        return await send_twilio(
            client,
            settings.twilio_api_base,
            config,
            target.recipient,
            message.short,
            whatsapp=kind == "whatsapp",
        )
    raise PermanentSendError(f"unknown channel kind '{kind}'")


def http_client(settings: Settings) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.notify_send_timeout_s, connect=10.0),
        headers={"User-Agent": USER_AGENT},
        follow_redirects=False,
    )
