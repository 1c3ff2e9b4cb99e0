"""Request and response shapes of the alerts API."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, Field

from plantwatch.core.schemas import DbId, RequestModel
from plantwatch.rules.schemas import Severity
from plantwatch.tenancy.permissions import Role

Note = Annotated[str, Field(min_length=1, max_length=4000)]
MAX_SLA_S = 90 * 86_400
MAX_LEVELS = 10
MAX_LEVEL_USERS = 100

__all__ = ["Severity"]


class AlertStatus(StrEnum):
    TRIGGERED = "triggered"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


# --- requests ------------------------------------------------------------------------------


class AcknowledgeBody(RequestModel):
    note: Note | None = None


class AssignBody(RequestModel):
    user_id: DbId | None = Field(description="A user of this factory; null unassigns")
    note: Note | None = None


class ResolveBody(RequestModel):
    note: Note | None = Field(None, description="What was wrong and what was done")


class ReopenBody(RequestModel):
    reason: Note | None = None


class CommentBody(RequestModel):
    text: Note


class EscalateBody(RequestModel):
    reason: Note | None = None


SlaSeconds = Annotated[int, Field(ge=1, le=MAX_SLA_S)]


class SlaPolicyBody(RequestModel):
    severity: Severity
    ack_s: SlaSeconds | None = Field(description="Seconds to acknowledge; null: no target")
    resolve_s: SlaSeconds | None = Field(description="Seconds to resolve; null: no target")
    remind_every_s: Annotated[int, Field(ge=60, le=MAX_SLA_S)] | None = Field(
        None, description="Repeat a reminder this often while unacknowledged past its deadline"
    )


class SlaConfigBody(RequestModel):
    """The factory's SLA. Severities not listed go back to the defaults."""

    policies: Annotated[list[SlaPolicyBody], Field(max_length=len(Severity))]


class EscalationLevelBody(RequestModel):
    user_ids: Annotated[list[DbId], Field(max_length=MAX_LEVEL_USERS)] = Field(default_factory=list)
    roles: Annotated[list[Role], Field(max_length=len(Role))] = Field(default_factory=list)


class EscalationChainBody(RequestModel):
    """Levels in order: the first is level 1."""

    levels: Annotated[list[EscalationLevelBody], Field(max_length=MAX_LEVELS)]


# --- responses -----------------------------------------------------------------------------


class SlaOut(BaseModel):
    ack_due_at: dt.datetime | None
    resolve_due_at: dt.datetime | None
    ack_breached: bool = Field(description="The acknowledge deadline passed before an ack")
    resolve_breached: bool = Field(description="The resolve deadline passed before resolving")
    ack_remaining_s: float | None = Field(
        description="Seconds left to acknowledge (negative: overdue); null once acknowledged"
    )
    resolve_remaining_s: float | None = Field(
        description="Seconds left to resolve (negative: overdue); null once resolved"
    )
    next_check_at: dt.datetime | None


class AlertOut(BaseModel):
    id: int
    rule_id: int | None
    rule_name: str | None
    device_id: int | None
    device_key: str | None
    device_name: str | None
    severity: str
    status: str
    title: str
    message: str
    facts: list[dict[str, Any]]
    snapshot: dict[str, Any]
    occurrences: int
    triggered_at: dt.datetime
    last_seen_at: dt.datetime
    acknowledged_at: dt.datetime | None
    acknowledged_by: int | None
    resolved_at: dt.datetime | None
    resolved_by: int | None
    resolution_note: str | None
    assigned_to: int | None
    escalation_level: int
    last_escalated_at: dt.datetime | None
    last_reminder_at: dt.datetime | None
    sla: SlaOut


class TimelineEntry(BaseModel):
    id: int
    kind: str
    actor_id: int | None
    actor_email: str | None
    at: dt.datetime
    data: dict[str, Any]


class AlertDetail(AlertOut):
    timeline: list[TimelineEntry]


class AlertCounts(BaseModel):
    total: int
    open: int = Field(description="Not resolved")
    by_severity: dict[str, int]
    by_status: dict[str, int]
    open_by_severity: dict[str, int]


class SlaPolicyOut(BaseModel):
    severity: str
    ack_s: int | None
    resolve_s: int | None
    remind_every_s: int | None
    source: str = Field(description="factory: configured here; default: the built-in target")


class EscalationLevelOut(BaseModel):
    level: int
    user_ids: list[int]
    roles: list[str]
    users: list[int] = Field(description="Who this level reaches today (users and role holders)")


class EscalationChainOut(BaseModel):
    levels: list[EscalationLevelOut]
