"""Device authentication for HTTP: the `X-Device-Key` header.

`authenticated_device` is a FastAPI dependency for any device-facing route
(`/device/me`, HTTP telemetry ingest, ...). It answers 401 `device_key_invalid`
for a missing, unknown or revoked key and for a decommissioned device, and
yields the device's factory id with the device itself: the tenant comes from
the key, never from the request.
"""

from __future__ import annotations

from fastapi import Depends, Header
from sqlalchemy.ext.asyncio import AsyncSession

from plantwatch.assets.service import AuthenticatedDevice, authenticate_device
from plantwatch.tenancy.auth import db_session

DEVICE_KEY_HEADER = "X-Device-Key"

__all__ = ["DEVICE_KEY_HEADER", "AuthenticatedDevice", "authenticated_device"]


async def authenticated_device(
    x_device_key: str | None = Header(
        None,
        alias=DEVICE_KEY_HEADER,
        description="A device key from POST /api/v1/devices/{id}/keys",
    ),
    session: AsyncSession = Depends(db_session),
) -> AuthenticatedDevice:
    return await authenticate_device(session, x_device_key)
