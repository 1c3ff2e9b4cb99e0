"""Real local peers for the notification transports: an SMTP server (aiosmtpd) and an
HTTP server standing in for Slack, Teams, a webhook receiver and Twilio's REST API.

The HTTP server checks what the real services would: Slack's and Teams' payload
shapes, the webhook's HMAC signature and timestamp (and refuses a replay), and the
Twilio request (path, basic auth, form fields). Either peer can be told to fail
the next N requests (SMTP: 451 at DATA; HTTP: 500), and HTTP paths can be made slow.
"""

from __future__ import annotations

import base64
import email
import hashlib
import hmac
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from aiosmtpd.controller import Controller

# --- SMTP ----------------------------------------------------------------------------------


@dataclass
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    message: Message

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    def text(self) -> str:
        for part in self.message.walk():
            if part.get_content_type() == "text/plain":
                payload = part.get_payload(decode=True)
                assert isinstance(payload, bytes)
                return payload.decode()
        raise AssertionError("no text/plain part")

    def html(self) -> str | None:
        for part in self.message.walk():
            if part.get_content_type() == "text/html":
                payload = part.get_payload(decode=True)
                assert isinstance(payload, bytes)
                return payload.decode()
        return None


class SmtpHandler:
    def __init__(self) -> None:
        self.mails: list[Mail] = []
        self.refuse_next = 0
        self.refused = 0
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            if self.refuse_next > 0:
                self.refuse_next -= 1
                self.refused += 1
                return "451 4.3.0 Mailbox busy, try again later"
            content = envelope.content
            raw = content if isinstance(content, bytes) else content.encode()
            self.mails.append(
                Mail(envelope.mail_from, list(envelope.rcpt_tos), email.message_from_bytes(raw))
            )
        return "250 2.0.0 Message accepted for delivery"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class SmtpPeer:
    def __init__(self) -> None:
        self.handler = SmtpHandler()
        self.port = free_port()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)

    def start(self) -> None:
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()

    @property
    def mails(self) -> list[Mail]:
        with self.handler.lock:
            return list(self.handler.mails)

    def to(self, address: str) -> list[Mail]:
        return [m for m in self.mails if address in m.rcpt_tos]


# --- HTTP ----------------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    form: dict[str, list[str]] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


TWILIO_PATH = re.compile(r"^/2010-04-01/Accounts/(AC[0-9a-f]{32})/Messages\.json$")
PHONE = re.compile(r"^(whatsapp:)?\+[1-9]\d{6,14}$")


class HttpPeer:
    """One server, many fake services, each on its own path."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.fail_next: dict[str, int] = {}
        self.delay_s: dict[str, float] = {}
        self.webhook_secrets: dict[str, str] = {}
        self.twilio_tokens: dict[str, str] = {}
        self.seen_signatures: set[str] = set()
        self.lock = threading.Lock()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                status, reply, form = peer.handle(self.path, self.headers, body)
                with peer.lock:
                    peer.requests.append(
                        Received(self.path, dict(self.headers.items()), body, status, form)
                    )
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def received(self, prefix: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path.startswith(prefix)]

    def ok(self, prefix: str) -> list[Received]:
        return [r for r in self.received(prefix) if 200 <= r.status < 300]

    # --- the fake services ---------------------------------------------------------------

    def handle(
        self, path: str, headers: Any, body: bytes
    ) -> tuple[int, bytes | dict[str, Any], dict[str, list[str]]]:
        for prefix, delay in list(self.delay_s.items()):
            if path.startswith(prefix):
                time.sleep(delay)  # a slow peer (this request's own server thread)
        with self.lock:
            for prefix, left in self.fail_next.items():
                if path.startswith(prefix) and left > 0:
                    self.fail_next[prefix] = left - 1
                    return 500, {"error": "injected failure"}, {}
        if path.startswith("/slack/"):
            return (*self._slack(body), {})
        if path.startswith("/teams/"):
            return (*self._teams(body), {})
        if path.startswith("/hook/"):
            return (*self._webhook(path, headers, body), {})
        match = TWILIO_PATH.match(path)
        if match:
            return self._twilio(match.group(1), headers, body)
        return 404, {"error": "no such path"}, {}

    @staticmethod
    def _slack(body: bytes) -> tuple[int, bytes | dict[str, Any]]:
        try:
            payload = json.loads(body)
        except ValueError:
            return 400, b"invalid_payload"
        blocks = payload.get("blocks")
        if not isinstance(payload.get("text"), str) or not isinstance(blocks, list) or not blocks:
            return 400, b"invalid_payload"
        for block in blocks:
            if block.get("type") not in ("header", "section", "actions", "context", "divider"):
                return 400, b"invalid_blocks"
        if blocks[0]["type"] != "header" or blocks[0]["text"]["type"] != "plain_text":
            return 400, b"invalid_blocks"
        if len(blocks[0]["text"]["text"]) > 150:
            return 400, b"invalid_blocks"
        return 200, b"ok"

    @staticmethod
    def _teams(body: bytes) -> tuple[int, bytes | dict[str, Any]]:
        payload = json.loads(body)
        if payload.get("@type") == "MessageCard":
            ok = payload.get("@context") == "https://schema.org/extensions" and bool(
                payload.get("summary") or payload.get("text")
            )
            return (200, b"1") if ok else (400, b"Summary or Text is required.")
        if payload.get("type") != "message":
            return 400, b"bad request"
        attachments = payload.get("attachments") or []
        if (
            len(attachments) != 1
            or attachments[0].get("contentType") != "application/vnd.microsoft.card.adaptive"
        ):
            return 400, b"bad attachment"
        card = attachments[0].get("content") or {}
        if card.get("type") != "AdaptiveCard" or not card.get("version") or not card.get("body"):
            return 400, b"bad card"
        return 202, b""

    def _webhook(self, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        secret = self.webhook_secrets.get(path)
        if secret is None:
            return 404, {"error": "unknown hook"}
        timestamp = headers.get("X-Plantwatch-Timestamp", "")
        signature = headers.get("X-Plantwatch-Signature", "")
        if headers.get("Content-Type") != "application/json":
            return 415, {"error": "json only"}
        try:
            age = abs(time.time() - int(timestamp))
        except ValueError:
            return 401, {"error": "no timestamp"}
        if age > 300:
            return 401, {"error": "stale timestamp"}
        expected = (
            "sha256="
            + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
        )
        if not hmac.compare_digest(expected, signature):
            return 401, {"error": "bad signature"}
        with self.lock:
            if signature in self.seen_signatures:
                return 409, {"error": "replayed"}
            self.seen_signatures.add(signature)
        json.loads(body)
        return 200, {"received": True}

    def _twilio(
        self, sid: str, headers: Any, body: bytes
    ) -> tuple[int, dict[str, Any], dict[str, list[str]]]:
        token = self.twilio_tokens.get(sid)
        auth = headers.get("Authorization", "")
        expected = "Basic " + base64.b64encode(f"{sid}:{token}".encode()).decode()
        if token is None or not hmac.compare_digest(auth, expected):
            return 401, {"code": 20003, "message": "Authenticate", "status": 401}, {}
        if not headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            return 400, {"code": 20001, "message": "form encoding expected"}, {}
        form = parse_qs(body.decode(), keep_blank_values=True)
        if sorted(form) != ["Body", "From", "To"] or any(len(v) != 1 for v in form.values()):
            return 400, {"code": 21604, "message": "To, From and Body are required"}, form
        to, sender = form["To"][0], form["From"][0]
        if not PHONE.match(to) or not PHONE.match(sender):
            return 400, {"code": 21211, "message": f"Invalid 'To' Phone Number: {to}"}, form
        if to.startswith("whatsapp:") != sender.startswith("whatsapp:"):
            return 400, {"code": 63007, "message": "channel mismatch"}, form
        if not form["Body"][0] or len(form["Body"][0]) > 1600:
            return 400, {"code": 21617, "message": "body length"}, form
        return (
            201,
            {"sid": "SM" + uuid.uuid4().hex, "status": "queued", "to": to, "from": sender},
            form,
        )
