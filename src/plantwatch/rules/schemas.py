"""Request and response shapes of the rules API.

The condition tree and schedule are checked by rules.conditions and
rules.schedules (in the service), so their errors carry the exact path of the
bad node, e.g. `body.conditions.conditions[1].threshold`.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, Field

from plantwatch.core.schemas import DbId, NotNull, RequestModel, no_control_chars

Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(no_control_chars)]
Cooldown = Annotated[int | str, Field(description='Seconds, or a duration like "15m"')]
MAX_SCOPE_DEVICES = 1000
MAX_NOTIFY_CHANNELS = 20


class Severity(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class DevicesScope(RequestModel):
    type: Literal["devices"]
    device_ids: Annotated[list[DbId], Field(min_length=1, max_length=MAX_SCOPE_DEVICES)]


class GroupScope(RequestModel):
    type: Literal["group"]
    group_id: DbId


class FactoryScope(RequestModel):
    type: Literal["factory"]


# Not a pydantic discriminated union: RequestModel's NUL check is a before-validator on
# every field, which discriminators refuse; `type` literals pick the member all the same.
Scope = DevicesScope | GroupScope | FactoryScope


class Actions(RequestModel):
    alert: bool = Field(default=True, description="Open an alert when the rule fires")
    event: bool = Field(default=True, description="Publish `rule.fired` on the bus")
    work_order: bool = Field(
        default=False, description="Publish `rule.work_order` (maintenance opens a work order)"
    )
    notify: Annotated[list[DbId], Field(max_length=MAX_NOTIFY_CHANNELS)] = Field(
        default_factory=list, description="Notification channel ids of this factory"
    )


class RuleBody(RequestModel):
    name: Name
    description: Annotated[str, Field(max_length=4000)] | None = None
    conditions: dict[str, Any]
    scope: Scope = Field(default_factory=lambda: FactoryScope(type="factory"))
    schedule: dict[str, Any] | None = None
    severity: Severity = Severity.MEDIUM
    cooldown: Cooldown = 900
    auto_resolve: bool = True
    actions: Actions = Field(default_factory=Actions)
    is_active: bool = True


class RuleUpdate(RequestModel):
    name: Annotated[Name | None, NotNull] = None
    description: Annotated[str, Field(max_length=4000)] | None = None
    conditions: Annotated[dict[str, Any] | None, NotNull] = None
    scope: Annotated[Scope | None, NotNull] = None
    schedule: dict[str, Any] | None = None
    severity: Annotated[Severity | None, NotNull] = None
    cooldown: Annotated[Cooldown | None, NotNull] = None
    auto_resolve: Annotated[bool | None, NotNull] = None
    actions: Annotated[Actions | None, NotNull] = None
    is_active: Annotated[bool | None, NotNull] = None


class Warning_(BaseModel):
    path: str
    message: str


class RuleOut(BaseModel):
    id: int
    name: str
    description: str | None
    conditions: dict[str, Any]
    scope: dict[str, Any]
    schedule: dict[str, Any] | None
    severity: str
    cooldown_s: int
    auto_resolve: bool
    actions: dict[str, Any]
    is_active: bool
    error: str | None
    version: int
    parameters: list[str]
    warnings: list[Warning_]
    created_by: int | None
    created_at: dt.datetime
    updated_at: dt.datetime


class ValidateOut(BaseModel):
    valid: bool
    parameters: list[str]
    warnings: list[Warning_]


class BacktestRequest(RequestModel):
    start: AwareDatetime
    end: AwareDatetime
    device_ids: Annotated[list[DbId], Field(max_length=MAX_SCOPE_DEVICES)] | None = None


class UnsavedBacktest(BacktestRequest):
    rule: RuleBody


class Firing(BaseModel):
    device_id: int
    device_key: str
    started_at: dt.datetime
    ended_at: dt.datetime | None = Field(description="When the condition cleared (None: still)")
    occurrences: int
    message: str


class BacktestOut(BaseModel):
    start: dt.datetime
    end: dt.datetime
    devices: int
    points: int
    firings: list[Firing]
