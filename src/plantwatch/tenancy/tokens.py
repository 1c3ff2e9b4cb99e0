"""Passwords (argon2id), JWT access tokens and opaque secrets. Pure: no database."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

ALGORITHM = "HS256"
ISSUER = "plantwatch"
_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
# Verified against when the account does not exist, so a miss costs as much as a hit.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def password_needs_rehash(password_hash: str) -> bool:
    return _hasher.check_needs_rehash(password_hash)


def new_opaque_token(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """SHA-256 hex of a high-entropy token: what the database stores instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class AccessClaims:
    user_id: int
    factory_id: int
    session_id: int
    role: str
    expires_at: dt.datetime


class InvalidToken(Exception):
    pass


def encode_access_token(
    secret: str,
    *,
    user_id: int,
    factory_id: int,
    factory_slug: str,
    session_id: int,
    role: str,
    ttl_s: int,
    now: dt.datetime,
) -> str:
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "sub": str(user_id),
        "fid": factory_id,
        "fslug": factory_slug,
        "sid": session_id,
        "role": role,
        "typ": "access",
        "iat": int(now.timestamp()),
        "exp": int(now.timestamp()) + ttl_s,
        "jti": secrets.token_hex(8),
    }
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def decode_access_token(secret: str, token: str) -> AccessClaims:
    """Verify signature, algorithm (HS256 only: `none` and others are refused), expiry, type."""
    try:
        payload = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            options={"require": ["exp", "iat", "sub", "iss"]},
        )
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from exc
    if payload.get("typ") != "access":
        raise InvalidToken("not an access token")
    try:
        return AccessClaims(
            user_id=int(payload["sub"]),
            factory_id=int(payload["fid"]),
            session_id=int(payload["sid"]),
            role=str(payload["role"]),
            expires_at=dt.datetime.fromtimestamp(int(payload["exp"]), dt.UTC),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidToken("malformed claims") from exc
