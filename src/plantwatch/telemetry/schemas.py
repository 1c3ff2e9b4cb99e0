"""Request and response shapes of the telemetry API."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from pydantic import BaseModel, Field, field_serializer

from plantwatch.core.schemas import DbId, RequestModel, ResponseModel


class RejectOut(BaseModel):
    reason: str
    detail: str


class IngestResult(BaseModel):
    accepted: int = Field(description="Values stored (numbers and state texts)")
    rejected: int = Field(description="Values or entries refused; each is a dead letter")
    rejects: list[RejectOut] = Field(description="The first rejects, with their reasons")


class DeadLetterOut(ResponseModel):
    id: int
    device_id: int | None
    device_key: str | None
    source: str
    topic: str | None
    reason: str
    detail: str
    payload: bytes
    received_at: dt.datetime
    replayed_at: dt.datetime | None
    replay_result: str | None

    @field_serializer("payload")
    def _text(self, payload: bytes) -> str:
        # Payloads are JSON text in practice; anything else is shown escaped, not lost.
        return payload.decode("utf-8", errors="backslashreplace")


class DeadLetterSummary(BaseModel):
    open_by_reason: dict[str, int]


class ReplayRequest(RequestModel):
    ids: Annotated[list[DbId], Field(min_length=1, max_length=1000)]


class ReplayOut(BaseModel):
    id: int
    status: str
    accepted: int
    detail: str
