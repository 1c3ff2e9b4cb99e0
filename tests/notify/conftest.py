"""Notification test fixtures: real local peers, settings pointing at them, a clock
the tests move by hand, and helpers to create channels through the API."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from plantwatch.app import Container
from plantwatch.core.config import Settings
from plantwatch.notify.dispatch import Dispatcher
from plantwatch.notify.render import Renderer
from plantwatch.notify.worker import DeliveryWorker
from tests.conftest import LoggedIn
from tests.notify.peers import HttpPeer, SmtpPeer

TWILIO_SID = "AC" + "0123456789abcdef" * 2
TWILIO_TOKEN = "twilio-token-0123456789"
HOOK_SECRET = "whsec-0123456789abcdef"


@pytest.fixture
def smtp_peer() -> Iterator[SmtpPeer]:
    peer = SmtpPeer()
    peer.start()
    yield peer
    peer.stop()


@pytest.fixture
def http_peer() -> Iterator[HttpPeer]:
    peer = HttpPeer()
    peer.twilio_tokens[TWILIO_SID] = TWILIO_TOKEN
    peer.start()
    yield peer
    peer.stop()


@pytest.fixture
def settings(
    tmp_path: Path, database_url: str, smtp_peer: SmtpPeer, http_peer: HttpPeer
) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        public_url="https://plantwatch.example",
        smtp_host="127.0.0.1",
        smtp_port=smtp_peer.port,
        smtp_starttls=False,
        smtp_from="alerts@plant.example",
        twilio_api_base=http_peer.url,
        notify_backoff_base_s=10,
        notify_max_attempts=4,
        notify_send_timeout_s=5,
    )


class Clock:
    """Injected `now`: tests move time instead of sleeping."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> dt.datetime:
        self.now += dt.timedelta(**delta)
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(dt.datetime.now(dt.UTC).replace(microsecond=0))


@pytest.fixture
def renderer() -> Renderer:
    return Renderer()


@pytest.fixture
async def worker(
    container: Container, renderer: Renderer, clock: Clock
) -> Any:  # AsyncIterator[DeliveryWorker]
    w = DeliveryWorker(container.db, container.settings, renderer, clock=clock, rng=lambda: 0.5)
    yield w
    await w.close()


@pytest.fixture
def dispatcher(container: Container, renderer: Renderer, clock: Clock) -> Dispatcher:
    return Dispatcher(container.db, container.settings, renderer, clock=clock)


def channel_configs(http_peer: HttpPeer, tag: str = "") -> dict[str, dict[str, Any]]:
    """A valid config for every kind, pointing at the local peers."""
    hook = f"/hook/{tag or uuid.uuid4().hex[:8]}"
    http_peer.webhook_secrets[hook] = HOOK_SECRET
    return {
        "email": {"recipients": ["ops@plant.example", "lead@plant.example"]},
        "slack": {"webhook_url": f"{http_peer.url}/slack/T000/B000/XXXXXXXXXXXXXXXX"},
        "teams": {"webhook_url": f"{http_peer.url}/teams/workflow-0123456789"},
        "webhook": {"url": f"{http_peer.url}{hook}", "secret": HOOK_SECRET},
        "sms": {
            "account_sid": TWILIO_SID,
            "auth_token": TWILIO_TOKEN,
            "from_number": "+15005550006",
            "to_numbers": ["+4915112345678"],
        },
        "whatsapp": {
            "account_sid": TWILIO_SID,
            "auth_token": TWILIO_TOKEN,
            "from_number": "+14155238886",
            "to_numbers": ["+4917612345678"],
        },
    }


async def create_channel(
    client: httpx.AsyncClient, user: LoggedIn, kind: str, config: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/notifications/channels",
        json={
            "name": extra.pop("name", f"{kind} {uuid.uuid4().hex[:6]}"),
            "kind": kind,
            "config": config,
            **extra,
        },
        headers=user.headers,
    )
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data
