"""Passwords (and invite tokens) never reach a log line, a response or the audit log."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import httpx
import pytest
import structlog

from plantwatch.app import Container
from plantwatch.core.logging import configure_logging
from plantwatch.tenancy import service
from tests.conftest import LoggedIn

CREATE_PW = "Pw-create-7f3a91c"
INVITE_PW = "Pw-invite-0b9e44d"
WRONG_PW = "Pw-wrong-5c2d18e"
CHANGED_PW = "Pw-changed-e61f07a"
RESET_PW = "Pw-reset-93ac5b2"
REJECTED_PW = "Pw-rejected-1d4e8f"
SECRETS = [CREATE_PW, INVITE_PW, WRONG_PW, CHANGED_PW, RESET_PW, REJECTED_PW]


@pytest.fixture
def verbose_logs() -> Iterator[Callable[[], None]]:
    """Turns on the production log setup at debug level, plus SQLAlchemy's statement
    and parameter logging (so a password that reached any SQL parameter would show
    up). Called inside the test, so its stderr is the one capsys captures; the
    previous setup is restored afterwards.
    """
    root = logging.getLogger()
    access = logging.getLogger("uvicorn.access")
    sql = logging.getLogger("sqlalchemy.engine")
    saved = (root.handlers[:], root.level, access.disabled, sql.level)
    structlog_config = structlog.get_config()

    def enable() -> None:
        configure_logging("debug", "json")
        sql.setLevel(logging.INFO)

    yield enable
    structlog.configure(**structlog_config)
    root.handlers = saved[0]
    root.setLevel(saved[1])
    access.disabled = saved[2]
    sql.setLevel(saved[3])


async def test_passwords_are_never_logged_or_returned(
    client: httpx.AsyncClient,
    admin_a: LoggedIn,
    container: Container,
    verbose_logs: Callable[[], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    verbose_logs()
    responses: list[httpx.Response] = []

    async def call(method: str, path: str, **kwargs: object) -> httpx.Response:
        response = await client.request(method, path, **kwargs)  # type: ignore[arg-type]
        responses.append(response)
        return response

    h = admin_a.headers
    created = await call(
        "POST",
        "/api/v1/users",
        json={"email": "c@acme.example", "password": CREATE_PW, "role": "viewer"},
        headers=h,
    )
    assert created.status_code == 201
    # Rejected bodies must not be echoed back or logged either.
    rejected = await call(
        "POST",
        "/api/v1/users",
        json={"email": "nope", "password": REJECTED_PW, "role": "viewer", "x": 1},
        headers=h,
    )
    assert rejected.status_code == 422
    login = await call(
        "POST",
        "/api/v1/auth/login",
        json={"factory_slug": "acme", "email": "c@acme.example", "password": CREATE_PW},
    )
    assert login.status_code == 200
    wrong = await call(
        "POST",
        "/api/v1/auth/login",
        json={"factory_slug": "acme", "email": "c@acme.example", "password": WRONG_PW},
    )
    assert wrong.status_code == 401

    invited = await call(
        "POST",
        "/api/v1/users/invite",
        json={"email": "i@acme.example", "role": "viewer"},
        headers=h,
    )
    invite_token = invited.json()["data"]["invite_token"]
    accepted = await call(
        "POST", "/api/v1/users/accept-invite", json={"token": invite_token, "password": INVITE_PW}
    )
    assert accepted.status_code == 200
    invitee = {"Authorization": f"Bearer {accepted.json()['access_token']}"}
    bad_change = await call(
        "POST",
        "/api/v1/auth/password",
        json={"current_password": WRONG_PW, "new_password": CHANGED_PW},
        headers=invitee,
    )
    assert bad_change.status_code == 422
    changed = await call(
        "POST",
        "/api/v1/auth/password",
        json={"current_password": INVITE_PW, "new_password": CHANGED_PW},
        headers=invitee,
    )
    assert changed.status_code == 204

    async with container.db.session() as session:
        await service.reset_password(session, admin_a.factory_id, "c@acme.example", RESET_PW)
        await session.commit()

    audit = await call("GET", "/api/v1/audit", params={"per_page": 500}, headers=h)
    users = await call("GET", "/api/v1/users", headers=h)
    assert audit.status_code == users.status_code == 200
    assert audit.json()["meta"]["total"] >= 8

    captured = capsys.readouterr()
    logs = captured.out + captured.err
    # The capture really saw the traffic and the SQL, so absence below means something.
    assert '"event": "request"' in logs and "/api/v1/users/accept-invite" in logs
    assert "INSERT INTO users" in logs and "UPDATE users SET password_hash" in logs
    for secret in SECRETS:
        assert secret not in logs, f"{secret} was logged"
    assert invite_token not in logs
    for response in responses:
        for secret in SECRETS:
            assert secret not in response.text, f"{secret} in {response.request.url}"
        assert "password_hash" not in response.text
        assert "$argon2" not in response.text
