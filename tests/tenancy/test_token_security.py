"""Every way to present a bad access token ends in 401 problem+json, nothing else."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import httpx
import jwt
import pytest

from plantwatch.app import Container
from plantwatch.tenancy import tokens
from tests.conftest import LoggedIn, assert_problem

ME = "/api/v1/auth/me"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def claims_of(token: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(b64url_decode(token.split(".")[1]))
    return value


def flip(text: str, index: int) -> str:
    char = text[index]
    return text[:index] + ("A" if char != "A" else "B") + text[index + 1 :]


async def assert_rejected(client: httpx.AsyncClient, token: str) -> None:
    response = await client.get(ME, headers={"Authorization": f"Bearer {token}"})
    body = assert_problem(response, 401)
    assert body["code"] in {"token_invalid", "token_missing", "session_revoked"}
    assert response.headers["www-authenticate"] == "Bearer"
    # A protected write is refused the same way, before any validation.
    create = await client.post(
        "/api/v1/users", json={"nonsense": True}, headers={"Authorization": f"Bearer {token}"}
    )
    assert_problem(create, 401)


async def test_valid_token_is_accepted(client: httpx.AsyncClient, admin_a: LoggedIn) -> None:
    # The control for every case below.
    assert (await client.get(ME, headers=admin_a.headers)).status_code == 200


@pytest.mark.parametrize("part", [0, 1, 2])
async def test_tampered_token(client: httpx.AsyncClient, admin_a: LoggedIn, part: int) -> None:
    pieces = admin_a.access_token.split(".")
    # A middle character: every one of its 6 bits is significant.
    pieces[part] = flip(pieces[part], len(pieces[part]) // 2)
    await assert_rejected(client, ".".join(pieces))


async def test_payload_rewritten_to_other_factory(
    client: httpx.AsyncClient, admin_a: LoggedIn, admin_b: LoggedIn
) -> None:
    header, _payload, signature = admin_a.access_token.split(".")
    claims = claims_of(admin_a.access_token)
    claims.update(fid=admin_b.factory_id, sub=str(admin_b.user_id), role="super_admin")
    forged = ".".join([header, b64url(json.dumps(claims).encode()), signature])
    await assert_rejected(client, forged)


async def test_expired_token(
    client: httpx.AsyncClient, admin_a: LoggedIn, container: Container
) -> None:
    claims = claims_of(admin_a.access_token)
    expired = tokens.encode_access_token(
        container.secret,
        user_id=admin_a.user_id,
        factory_id=admin_a.factory_id,
        factory_slug=admin_a.factory_slug,
        session_id=claims["sid"],
        role="super_admin",
        ttl_s=900,
        now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
    )
    await assert_rejected(client, expired)


async def test_alg_none_token(client: httpx.AsyncClient, admin_a: LoggedIn) -> None:
    claims = claims_of(admin_a.access_token)
    for alg in ["none", "None", "NONE"]:
        header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        payload = b64url(json.dumps(claims).encode())
        await assert_rejected(client, f"{header}.{payload}.")
        # With the original signature attached, too.
        signature = admin_a.access_token.split(".")[2]
        await assert_rejected(client, f"{header}.{payload}.{signature}")


async def test_other_algorithms_are_refused(
    client: httpx.AsyncClient, admin_a: LoggedIn, container: Container
) -> None:
    claims = claims_of(admin_a.access_token)
    for alg in ["HS384", "HS512"]:
        await assert_rejected(client, jwt.encode(claims, container.secret, algorithm=alg))


async def test_token_signed_with_another_key(client: httpx.AsyncClient, admin_a: LoggedIn) -> None:
    claims = claims_of(admin_a.access_token)
    other = jwt.encode(claims, "another-installation-secret-key-0123456789", algorithm="HS256")
    await assert_rejected(client, other)


async def test_refresh_token_is_not_an_access_token(
    client: httpx.AsyncClient, admin_a: LoggedIn, container: Container
) -> None:
    await assert_rejected(client, admin_a.refresh_token)
    # Nor is a correctly signed JWT of another type.
    claims = {**claims_of(admin_a.access_token), "typ": "refresh"}
    await assert_rejected(client, jwt.encode(claims, container.secret, algorithm="HS256"))


async def test_signed_token_for_unknown_session_or_user(
    client: httpx.AsyncClient, admin_a: LoggedIn, container: Container
) -> None:
    now = dt.datetime.now(dt.UTC)
    common: dict[str, Any] = {
        "factory_slug": admin_a.factory_slug,
        "role": "super_admin",
        "ttl_s": 900,
        "now": now,
    }
    sid = claims_of(admin_a.access_token)["sid"]
    for user_id, factory_id, session_id in [
        (admin_a.user_id, admin_a.factory_id, sid + 1000),
        (admin_a.user_id + 1000, admin_a.factory_id, sid),
        (admin_a.user_id, admin_a.factory_id + 1000, sid),
    ]:
        token = tokens.encode_access_token(
            container.secret,
            user_id=user_id,
            factory_id=factory_id,
            session_id=session_id,
            **common,
        )
        await assert_rejected(client, token)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer garbage",
        "Bearer a.b.c",
        "Bearer " + "x" * 5000,
        "Bearer ..",
        "Basic dXNlcjpwYXNz",
        "Token abc.def.ghi",
    ],
)
async def test_garbage_authorization(
    client: httpx.AsyncClient, admin_a: LoggedIn, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await client.get(ME, headers=headers)
    assert_problem(response, 401)
    listing = await client.get("/api/v1/users", headers=headers)
    assert_problem(listing, 401)
