"""Request and response shapes of the tenancy API."""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    model_validator,
)

from plantwatch.core.schemas import NotNull, RequestModel, ResponseModel, no_control_chars
from plantwatch.tenancy.permissions import PERMISSIONS, Role

SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")


def _check_timezone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown timezone '{value}'") from exc
    return value


def _check_slug(value: str) -> str:
    if not SLUG_RE.match(value):
        raise ValueError("slug must be lowercase letters, digits and dashes (1-64)")
    return value


def _check_permission(value: str) -> str:
    if value not in PERMISSIONS:
        raise ValueError(f"unknown permission '{value}'")
    return value


def _dedupe(value: list[str]) -> list[str]:
    return sorted(set(value))


Timezone = Annotated[str, Field(max_length=64), AfterValidator(_check_timezone)]
Slug = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_check_slug)]
Password = Annotated[str, Field(min_length=8, max_length=256)]
PermissionName = Annotated[str, Field(max_length=64), AfterValidator(_check_permission)]
Grants = Annotated[list[PermissionName], Field(max_length=64), AfterValidator(_dedupe)]
Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(no_control_chars)]
Phone = Annotated[str, Field(pattern=r"^\+?[0-9 ()\-]{4,31}$")]
Email = Annotated[EmailStr, Field(max_length=254)]


# --- factories -------------------------------------------------------------


class FactoryPublic(ResponseModel):
    id: int
    name: str
    slug: str


class FactoryOut(ResponseModel):
    id: int
    name: str
    slug: str
    timezone: str
    auto_register_devices: bool
    offline_after_s: int
    created_at: dt.datetime
    updated_at: dt.datetime


class FactoryCreate(RequestModel):
    name: Name
    slug: Slug
    timezone: Timezone = "UTC"


class FactoryUpdate(RequestModel):
    name: Annotated[Name | None, NotNull] = None
    timezone: Annotated[Timezone | None, NotNull] = None
    auto_register_devices: Annotated[bool | None, NotNull] = None
    offline_after_s: Annotated[int | None, NotNull, Field(ge=10, le=7 * 86400)] = None


# --- auth -------------------------------------------------------------------


class LoginRequest(BaseModel):
    # Not a RequestModel: here factory_id names the factory to log in to.
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    factory_slug: Slug | None = None
    factory_id: int | None = Field(None, ge=1, le=2**63 - 1)
    email: Annotated[str, Field(min_length=3, max_length=254), AfterValidator(no_control_chars)]
    password: Annotated[str, Field(min_length=1, max_length=256)]

    @model_validator(mode="after")
    def _one_factory(self) -> LoginRequest:
        if (self.factory_slug is None) == (self.factory_id is None):
            raise ValueError("give exactly one of factory_slug or factory_id")
        return self


class RefreshRequest(RequestModel):
    refresh_token: Annotated[str, Field(min_length=10, max_length=200)]


class UserOut(ResponseModel):
    id: int
    factory_id: int
    email: str
    full_name: str | None
    phone: str | None
    role: str
    permissions: list[str]
    effective_permissions: list[str] = []
    is_active: bool
    pending_invite: bool = False
    last_login_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


class TokenPair(BaseModel):
    access_token: str
    refresh_token: str
    token_type: str = "bearer"  # noqa: S105 (the OAuth2 scheme name, not a secret)
    expires_in: int
    user: UserOut


class MeOut(BaseModel):
    user: UserOut
    factory: FactoryOut


# --- users and invites ------------------------------------------------------


class UserCreate(RequestModel):
    email: Email
    password: Password
    full_name: Name | None = None
    phone: Phone | None = None
    role: Role
    permissions: Grants = []


class UserInvite(RequestModel):
    email: Email
    full_name: Name | None = None
    phone: Phone | None = None
    role: Role
    permissions: Grants = []


class InviteOut(BaseModel):
    user: UserOut
    invite_token: str
    expires_at: dt.datetime
    accept_url: str


class AcceptInvite(RequestModel):
    token: Annotated[str, Field(min_length=10, max_length=200)]
    password: Password
    full_name: Name | None = None


class UserUpdate(RequestModel):
    """PATCH: omitted fields stay; `full_name` and `phone` may be cleared with null."""

    full_name: Name | None = None
    phone: Phone | None = None
    role: Annotated[Role | None, NotNull] = None
    permissions: Annotated[Grants | None, NotNull] = None
    is_active: Annotated[bool | None, NotNull] = None


class PasswordChange(RequestModel):
    current_password: Annotated[str, Field(min_length=1, max_length=256)]
    new_password: Password


# --- roles and permissions --------------------------------------------------


class PermissionOut(BaseModel):
    name: str
    description: str


class RoleOut(BaseModel):
    name: str
    description: str
    permissions: list[str]


# --- audit ------------------------------------------------------------------


class AuditOut(ResponseModel):
    id: int
    at: dt.datetime
    user_id: int | None
    actor: str
    action: str
    entity_type: str
    entity_id: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    request_id: str | None
    ip: str | None
