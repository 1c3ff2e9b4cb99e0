"""Request and response shapes of the telemetry API."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

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


# --- KPI API (live values, history, latest values, energy) --------------------------------

Level = Literal["ok", "warning", "critical"]


class KpiValueOut(BaseModel):
    parameter_id: int
    key: str
    display_name: str | None
    unit: str | None
    data_type: str
    is_kpi: bool
    value: float | None = Field(description="Latest number; null for state parameters or no data")
    text: str | None = Field(description="Latest state text (string parameters)")
    ts: dt.datetime | None = Field(description="Time of the latest value (UTC)")
    stale: bool = Field(description="No value, or the latest is at least the offline limit old")
    level: Level | None = Field(description="Against the limits; null without limits or value")
    warning_low: float | None
    warning_high: float | None
    critical_low: float | None
    critical_high: float | None


class LiveKpisOut(BaseModel):
    device_id: int
    device_key: str
    name: str
    status: str = Field(description="unknown, online or offline")
    last_seen: dt.datetime | None
    offline_after_s: int = Field(description="The device's limit, else the factory's")
    timestamp: dt.datetime = Field(description="When these values were read")
    kpis: list[KpiValueOut]


class HistorySeriesOut(BaseModel):
    parameter_id: int
    key: str
    display_name: str | None
    unit: str | None
    points: list[tuple[int, int | float]] = Field(
        description="[[bucket_start_ms, value], ...] (raw: [[ts_ms, value], ...]), oldest first"
    )


class KpiHistoryOut(BaseModel):
    device_id: int
    start: dt.datetime
    end: dt.datetime
    interval: str = Field(description="The interval used: raw, or a step such as 1m or 2h")
    interval_ms: int | None
    agg: str | None = Field(description="The aggregate of each bucket; null for raw points")
    tiers: list[str] = Field(description="Tiers that answered, finest first: raw, 1m, 1h")
    parameters: list[HistorySeriesOut]


class LatestValueOut(BaseModel):
    device_id: int
    device_key: str
    device_name: str
    parameter_id: int
    key: str
    display_name: str | None
    unit: str | None
    is_kpi: bool
    value: float | None
    text: str | None
    ts: dt.datetime
    stale: bool
    level: Level | None


class EnergyParameterOut(BaseModel):
    parameter_id: int
    key: str
    unit: str | None
    counted: bool = Field(description="False when the unit is not W, kW or MW")
    power_kw: float | None = Field(description="Latest value in kW; null when stale or unknown")
    ts: dt.datetime | None
    stale: bool
    energy_today_kwh: float


class DeviceEnergyOut(BaseModel):
    device_id: int
    device_key: str
    name: str
    current_power_kw: float
    energy_today_kwh: float
    parameters: list[EnergyParameterOut]


class EnergySummaryOut(BaseModel):
    timestamp: dt.datetime = Field(description="The time of the figures (now)")
    timezone: str = Field(description="The factory's timezone, which defines 'today'")
    day_start: dt.datetime = Field(description="Local midnight, in UTC")
    current_power_kw: float
    energy_today_kwh: float
    devices: list[DeviceEnergyOut]


class DeviceEnergyDetailOut(DeviceEnergyOut):
    timestamp: dt.datetime
    timezone: str
    day_start: dt.datetime
