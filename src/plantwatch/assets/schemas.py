"""Request and response shapes of the assets API."""

from __future__ import annotations

import datetime as dt
import json
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field

from plantwatch.core.schemas import DbId, NotNull, RequestModel, ResponseModel

DEVICE_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
PARAMETER_KEY_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]*$"
METADATA_MAX_BYTES = 16 * 1024
METADATA_MAX_KEYS = 64
MAX_GROUP_DEVICE_IDS = 1000


Name = Annotated[str, Field(min_length=1, max_length=200)]
Address = Annotated[str, Field(max_length=500)]
Description = Annotated[str, Field(max_length=2000)]
ShortText = Annotated[str, Field(max_length=200)]
Kind = Annotated[str, Field(min_length=1, max_length=64)]
Location = Annotated[str, Field(max_length=300)]
DeviceKeyStr = Annotated[str, Field(min_length=1, max_length=100, pattern=DEVICE_KEY_PATTERN)]
ParameterKey = Annotated[str, Field(min_length=1, max_length=100, pattern=PARAMETER_KEY_PATTERN)]
Unit = Annotated[str, Field(max_length=32)]
KeyName = Annotated[str, Field(min_length=1, max_length=100)]
Threshold = Annotated[float, Field(allow_inf_nan=False)]
# Seconds of silence before a device counts as offline (10 s to 7 days).
OfflineAfter = Annotated[int, Field(ge=10, le=7 * 86400)]


class Criticality(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


CRITICALITY_RANK = {c.value: i for i, c in enumerate(Criticality)}


class DeviceStatus(StrEnum):
    """Connectivity, maintained by telemetry ingest (read-only in the API)."""

    UNKNOWN = "unknown"
    ONLINE = "online"
    OFFLINE = "offline"


class DataType(StrEnum):
    FLOAT = "float"
    INT = "int"
    BOOL = "bool"
    STRING = "string"


def _check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    if len(value) > METADATA_MAX_KEYS:
        raise ValueError(f"at most {METADATA_MAX_KEYS} keys")
    try:
        size = len(json.dumps(value, allow_nan=False, separators=(",", ":")).encode())
    except ValueError as exc:
        raise ValueError("numbers must be finite") from exc
    if size > METADATA_MAX_BYTES:
        raise ValueError(f"at most {METADATA_MAX_BYTES} bytes when serialised as JSON")
    return value


Metadata = Annotated[dict[str, Any], AfterValidator(_check_metadata)]


# --- sites, areas, lines ------------------------------------------------------


class SiteCreate(RequestModel):
    name: Name
    address: Address | None = None


class SiteUpdate(RequestModel):
    name: Annotated[Name | None, NotNull] = None
    address: Address | None = None


class SiteOut(ResponseModel):
    id: int
    name: str
    address: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


class AreaCreate(RequestModel):
    site_id: DbId
    name: Name


class AreaUpdate(RequestModel):
    site_id: Annotated[DbId | None, NotNull] = None
    name: Annotated[Name | None, NotNull] = None


class AreaOut(ResponseModel):
    id: int
    site_id: int
    site_name: str
    name: str
    created_at: dt.datetime
    updated_at: dt.datetime


class LineCreate(RequestModel):
    area_id: DbId
    name: Name


class LineUpdate(RequestModel):
    area_id: Annotated[DbId | None, NotNull] = None
    name: Annotated[Name | None, NotNull] = None


class LineOut(ResponseModel):
    id: int
    area_id: int
    area_name: str
    site_id: int
    site_name: str
    name: str
    created_at: dt.datetime
    updated_at: dt.datetime


class TreeLine(BaseModel):
    id: int
    name: str
    device_count: int
    active_device_count: int


class TreeArea(BaseModel):
    id: int
    name: str
    device_count: int
    active_device_count: int
    lines: list[TreeLine]


class TreeSite(BaseModel):
    id: int
    name: str
    device_count: int
    active_device_count: int
    areas: list[TreeArea]


class TreeUnassigned(BaseModel):
    """Devices on no line."""

    device_count: int
    active_device_count: int


class AssetTree(BaseModel):
    sites: list[TreeSite]
    unassigned: TreeUnassigned


# --- devices --------------------------------------------------------------------


class DeviceCreate(RequestModel):
    device_key: DeviceKeyStr
    name: Name
    kind: Kind | None = None
    manufacturer: ShortText | None = None
    model: ShortText | None = None
    serial_number: ShortText | None = None
    location: Location | None = None
    line_id: DbId | None = None
    criticality: Criticality = Criticality.MEDIUM
    metadata: Metadata = Field(default_factory=dict)
    is_active: bool = True
    offline_after_s: OfflineAfter | None = None


class DeviceUpdate(RequestModel):
    device_key: Annotated[DeviceKeyStr | None, NotNull] = None
    name: Annotated[Name | None, NotNull] = None
    kind: Kind | None = None
    manufacturer: ShortText | None = None
    model: ShortText | None = None
    serial_number: ShortText | None = None
    location: Location | None = None
    line_id: DbId | None = None
    criticality: Annotated[Criticality | None, NotNull] = None
    metadata: Annotated[Metadata | None, NotNull] = None
    is_active: Annotated[bool | None, NotNull] = None
    offline_after_s: OfflineAfter | None = None


class DeviceOut(BaseModel):
    id: int
    device_key: str
    name: str
    kind: str | None
    manufacturer: str | None
    model: str | None
    serial_number: str | None
    location: str | None
    line_id: int | None
    line_name: str | None
    area_id: int | None
    area_name: str | None
    site_id: int | None
    site_name: str | None
    criticality: str
    metadata: dict[str, Any]
    is_active: bool
    status: str
    last_seen: dt.datetime | None
    offline_after_s: int | None
    created_at: dt.datetime
    updated_at: dt.datetime


# --- groups -------------------------------------------------------------------


class GroupCreate(RequestModel):
    name: Name
    description: Description | None = None


class GroupUpdate(RequestModel):
    name: Annotated[Name | None, NotNull] = None
    description: Description | None = None


class GroupOut(BaseModel):
    id: int
    name: str
    description: str | None
    device_count: int
    created_at: dt.datetime
    updated_at: dt.datetime


class GroupMembers(RequestModel):
    device_ids: Annotated[list[DbId], Field(max_length=MAX_GROUP_DEVICE_IDS)]


# --- parameters -----------------------------------------------------------------


class ParameterCreate(RequestModel):
    key: ParameterKey
    display_name: Name | None = None
    unit: Unit | None = None
    data_type: DataType = DataType.FLOAT
    is_kpi: bool = False
    is_power: bool = False
    warning_low: Threshold | None = None
    warning_high: Threshold | None = None
    critical_low: Threshold | None = None
    critical_high: Threshold | None = None


class ParameterUpdate(RequestModel):
    display_name: Name | None = None
    unit: Unit | None = None
    data_type: Annotated[DataType | None, NotNull] = None
    is_kpi: Annotated[bool | None, NotNull] = None
    is_power: Annotated[bool | None, NotNull] = None
    warning_low: Threshold | None = None
    warning_high: Threshold | None = None
    critical_low: Threshold | None = None
    critical_high: Threshold | None = None


class ParameterOut(ResponseModel):
    id: int
    device_id: int
    key: str
    display_name: str | None
    unit: str | None
    data_type: str
    is_kpi: bool
    is_power: bool
    warning_low: float | None
    warning_high: float | None
    critical_low: float | None
    critical_high: float | None
    discovered_at: dt.datetime
    updated_at: dt.datetime


THRESHOLD_FIELDS = ("critical_low", "warning_low", "warning_high", "critical_high")


def threshold_error(values: dict[str, float | None], changed: set[str]) -> tuple[str, str] | None:
    """The first violated limit order as (field, message), or None if the limits are sane.

    Order: critical_low <= warning_low < warning_high <= critical_high, over the
    limits that are set. A low limit must lie strictly below a high one. The
    field reported is one the caller changed where possible.
    """
    for i, low_name in enumerate(THRESHOLD_FIELDS):
        low = values.get(low_name)
        if low is None:
            continue
        for high_name in THRESHOLD_FIELDS[i + 1 :]:
            high = values.get(high_name)
            if high is None:
                continue
            strict = low_name.endswith("_low") and high_name.endswith("_high")
            if (low >= high) if strict else (low > high):
                field = high_name if high_name in changed or low_name not in changed else low_name
                relation = "<" if strict else "<="
                return field, f"{low_name} ({low:g}) must be {relation} {high_name} ({high:g})"
    return None


# --- device keys -----------------------------------------------------------------


class DeviceKeyCreate(RequestModel):
    name: KeyName | None = None


class DeviceKeyIssued(BaseModel):
    """The only response that ever carries the key itself."""

    id: int
    key: str
    prefix: str
    name: str | None
    created_at: dt.datetime


class DeviceKeyOut(ResponseModel):
    id: int
    device_id: int
    prefix: str
    name: str | None
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None


# --- the device's own view -----------------------------------------------------------


class DeviceFactory(BaseModel):
    id: int
    slug: str
    name: str


class DeviceSelf(BaseModel):
    device: DeviceOut
    factory: DeviceFactory
    mqtt_topic: str
