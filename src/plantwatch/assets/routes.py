"""Assets API: sites, areas, lines, devices, groups, parameters, device keys.

Routes parse, call the service and shape the response; the logic, tenant
scoping and audit live in `service.py`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Query, Response
from sqlalchemy.ext.asyncio import AsyncSession

from plantwatch.assets import service
from plantwatch.assets.auth import AuthenticatedDevice, authenticated_device
from plantwatch.assets.schemas import (
    AreaCreate,
    AreaOut,
    AreaUpdate,
    AssetTree,
    Criticality,
    DeviceCreate,
    DeviceKeyCreate,
    DeviceKeyIssued,
    DeviceKeyOut,
    DeviceOut,
    DeviceSelf,
    DeviceStatus,
    DeviceUpdate,
    GroupCreate,
    GroupMembers,
    GroupOut,
    GroupUpdate,
    LineCreate,
    LineOut,
    LineUpdate,
    ParameterCreate,
    ParameterOut,
    ParameterUpdate,
    SiteCreate,
    SiteOut,
    SiteUpdate,
)
from plantwatch.core.schemas import (
    MAX_DB_ID,
    QUERY_TEXT,
    Item,
    Page,
    PageParams,
    PathId,
    page_params,
)
from plantwatch.tenancy.auth import Principal, db_session, require

router = APIRouter(prefix="/api/v1")
T = TypeVar("T")

Session = Annotated[AsyncSession, Depends(db_session)]
Reader = Annotated[Principal, Depends(require("assets:read"))]
Writer = Annotated[Principal, Depends(require("assets:write"))]
KeyManager = Annotated[Principal, Depends(require("devices:keys"))]
Paging = Annotated[PageParams, Depends(page_params)]

SiteId = PathId
AreaId = PathId
LineId = PathId
DeviceId = PathId
GroupId = PathId
ParameterId = PathId
KeyId = PathId

Search = Annotated[
    str | None,
    Query(max_length=200, pattern=QUERY_TEXT, description="Case-insensitive substring"),
]
Sort = Annotated[
    str | None,
    Query(
        max_length=200,
        pattern=QUERY_TEXT,
        description="Comma-separated fields, `-field` for descending",
    ),
]
IdFilter = Annotated[int | None, Query(ge=1, le=MAX_DB_ID)]


def _no_content() -> Response:
    return Response(status_code=204)


# --- sites ------------------------------------------------------------------------------


@router.get("/sites", tags=["assets"], summary="List sites")
async def list_sites(
    principal: Reader, session: Session, params: Paging, search: Search = None, sort: Sort = None
) -> Page[SiteOut]:
    rows, total = await service.list_sites(
        session, principal.factory_id, params, search=search, sort=sort
    )
    return Page.of([SiteOut.model_validate(s) for s in rows], total, params)


@router.post("/sites", tags=["assets"], status_code=201, summary="Create a site")
async def create_site(body: SiteCreate, principal: Writer, session: Session) -> Item[SiteOut]:
    site = await service.create_site(session, principal, body)
    return Item(data=SiteOut.model_validate(site))


@router.get("/sites/{site_id}", tags=["assets"], summary="Get a site")
async def get_site(site_id: SiteId, principal: Reader, session: Session) -> Item[SiteOut]:
    site = await service.get_site(session, principal.factory_id, site_id)
    return Item(data=SiteOut.model_validate(site))


@router.patch("/sites/{site_id}", tags=["assets"], summary="Change a site")
async def update_site(
    site_id: SiteId, body: SiteUpdate, principal: Writer, session: Session
) -> Item[SiteOut]:
    site = await service.update_site(session, principal, site_id, body)
    return Item(data=SiteOut.model_validate(site))


@router.delete(
    "/sites/{site_id}",
    tags=["assets"],
    status_code=204,
    summary="Delete a site (409 site_has_areas while it has areas)",
)
async def delete_site(site_id: SiteId, principal: Writer, session: Session) -> Response:
    await service.delete_site(session, principal, site_id)
    return _no_content()


# --- areas ------------------------------------------------------------------------------


@router.get("/areas", tags=["assets"], summary="List areas")
async def list_areas(
    principal: Reader,
    session: Session,
    params: Paging,
    site_id: IdFilter = None,
    search: Search = None,
    sort: Sort = None,
) -> Page[AreaOut]:
    rows, total = await service.list_areas(
        session, principal.factory_id, params, site_id=site_id, search=search, sort=sort
    )
    return Page.of(rows, total, params)


@router.post("/areas", tags=["assets"], status_code=201, summary="Create an area in a site")
async def create_area(body: AreaCreate, principal: Writer, session: Session) -> Item[AreaOut]:
    return Item(data=await service.create_area(session, principal, body))


@router.get("/areas/{area_id}", tags=["assets"], summary="Get an area")
async def get_area(area_id: AreaId, principal: Reader, session: Session) -> Item[AreaOut]:
    return Item(data=await service.get_area(session, principal.factory_id, area_id))


@router.patch("/areas/{area_id}", tags=["assets"], summary="Change or move an area")
async def update_area(
    area_id: AreaId, body: AreaUpdate, principal: Writer, session: Session
) -> Item[AreaOut]:
    return Item(data=await service.update_area(session, principal, area_id, body))


@router.delete(
    "/areas/{area_id}",
    tags=["assets"],
    status_code=204,
    summary="Delete an area (409 area_has_lines while it has lines)",
)
async def delete_area(area_id: AreaId, principal: Writer, session: Session) -> Response:
    await service.delete_area(session, principal, area_id)
    return _no_content()


# --- lines ------------------------------------------------------------------------------


@router.get("/lines", tags=["assets"], summary="List lines")
async def list_lines(
    principal: Reader,
    session: Session,
    params: Paging,
    area_id: IdFilter = None,
    site_id: IdFilter = None,
    search: Search = None,
    sort: Sort = None,
) -> Page[LineOut]:
    rows, total = await service.list_lines(
        session,
        principal.factory_id,
        params,
        area_id=area_id,
        site_id=site_id,
        search=search,
        sort=sort,
    )
    return Page.of(rows, total, params)


@router.post("/lines", tags=["assets"], status_code=201, summary="Create a line in an area")
async def create_line(body: LineCreate, principal: Writer, session: Session) -> Item[LineOut]:
    return Item(data=await service.create_line(session, principal, body))


@router.get("/lines/{line_id}", tags=["assets"], summary="Get a line")
async def get_line(line_id: LineId, principal: Reader, session: Session) -> Item[LineOut]:
    return Item(data=await service.get_line(session, principal.factory_id, line_id))


@router.patch("/lines/{line_id}", tags=["assets"], summary="Change or move a line")
async def update_line(
    line_id: LineId, body: LineUpdate, principal: Writer, session: Session
) -> Item[LineOut]:
    return Item(data=await service.update_line(session, principal, line_id, body))


@router.delete(
    "/lines/{line_id}",
    tags=["assets"],
    status_code=204,
    summary="Delete a line (409 line_has_devices while devices are on it)",
)
async def delete_line(line_id: LineId, principal: Writer, session: Session) -> Response:
    await service.delete_line(session, principal, line_id)
    return _no_content()


@router.get(
    "/asset-tree",
    tags=["assets"],
    summary="Sites > areas > lines with device counts, plus devices on no line",
)
async def asset_tree(principal: Reader, session: Session) -> Item[AssetTree]:
    return Item(data=await service.asset_tree(session, principal.factory_id))


# --- devices ----------------------------------------------------------------------------


def device_filters(
    search: Search = None,
    line_id: IdFilter = None,
    area_id: IdFilter = None,
    site_id: IdFilter = None,
    kind: Annotated[str | None, Query(max_length=64, pattern=QUERY_TEXT)] = None,
    criticality: Criticality | None = None,
    is_active: bool | None = None,
    status: DeviceStatus | None = None,
) -> service.DeviceFilters:
    return service.DeviceFilters(
        search=search,
        line_id=line_id,
        area_id=area_id,
        site_id=site_id,
        kind=kind,
        criticality=criticality.value if criticality is not None else None,
        is_active=is_active,
        status=status.value if status is not None else None,
    )


Filters = Annotated[service.DeviceFilters, Depends(device_filters)]


@router.get("/devices", tags=["devices"], summary="List devices")
async def list_devices(
    principal: Reader,
    session: Session,
    params: Paging,
    filters: Filters,
    group_id: IdFilter = None,
    sort: Sort = None,
) -> Page[DeviceOut]:
    filters = replace(filters, group_id=group_id)
    rows, total = await service.list_devices(session, principal.factory_id, params, filters, sort)
    return Page.of(rows, total, params)


@router.post("/devices", tags=["devices"], status_code=201, summary="Register a device")
async def create_device(body: DeviceCreate, principal: Writer, session: Session) -> Item[DeviceOut]:
    return Item(data=await service.create_device(session, principal, body))


@router.get("/devices/{device_id}", tags=["devices"], summary="Get a device")
async def get_device(device_id: DeviceId, principal: Reader, session: Session) -> Item[DeviceOut]:
    return Item(data=await service.get_device(session, principal.factory_id, device_id))


@router.patch(
    "/devices/{device_id}",
    tags=["devices"],
    summary="Change a device (is_active=true re-enables a decommissioned one)",
)
async def update_device(
    device_id: DeviceId, body: DeviceUpdate, principal: Writer, session: Session
) -> Item[DeviceOut]:
    return Item(data=await service.update_device(session, principal, device_id, body))


@router.delete(
    "/devices/{device_id}",
    tags=["devices"],
    status_code=204,
    summary="Decommission a device (revokes its keys); purge=true deletes it for good",
)
async def delete_device(
    device_id: DeviceId,
    principal: Writer,
    session: Session,
    purge: Annotated[bool, Query(description="Delete the device and all it owns")] = False,
) -> Response:
    if purge:
        await service.purge_device(session, principal, device_id)
    else:
        await service.decommission_device(session, principal, device_id)
    return _no_content()


# --- groups -----------------------------------------------------------------------------


@router.get("/groups", tags=["devices"], summary="List device groups with member counts")
async def list_groups(
    principal: Reader, session: Session, params: Paging, search: Search = None, sort: Sort = None
) -> Page[GroupOut]:
    rows, total = await service.list_groups(
        session, principal.factory_id, params, search=search, sort=sort
    )
    return Page.of(rows, total, params)


@router.post("/groups", tags=["devices"], status_code=201, summary="Create a device group")
async def create_group(body: GroupCreate, principal: Writer, session: Session) -> Item[GroupOut]:
    return Item(data=await service.create_group(session, principal, body))


@router.get("/groups/{group_id}", tags=["devices"], summary="Get a device group")
async def get_group(group_id: GroupId, principal: Reader, session: Session) -> Item[GroupOut]:
    return Item(data=await service.get_group(session, principal.factory_id, group_id))


@router.patch("/groups/{group_id}", tags=["devices"], summary="Change a device group")
async def update_group(
    group_id: GroupId, body: GroupUpdate, principal: Writer, session: Session
) -> Item[GroupOut]:
    return Item(data=await service.update_group(session, principal, group_id, body))


@router.delete("/groups/{group_id}", tags=["devices"], status_code=204, summary="Delete a group")
async def delete_group(group_id: GroupId, principal: Writer, session: Session) -> Response:
    await service.delete_group(session, principal, group_id)
    return _no_content()


@router.get("/groups/{group_id}/devices", tags=["devices"], summary="A group's devices")
async def list_group_devices(
    group_id: GroupId,
    principal: Reader,
    session: Session,
    params: Paging,
    filters: Filters,
    sort: Sort = None,
) -> Page[DeviceOut]:
    rows, total = await service.list_group_devices(
        session, principal.factory_id, group_id, params, filters, sort
    )
    return Page.of(rows, total, params)


@router.put("/groups/{group_id}/devices", tags=["devices"], summary="Replace a group's membership")
async def set_group_devices(
    group_id: GroupId, body: GroupMembers, principal: Writer, session: Session
) -> Item[GroupOut]:
    return Item(data=await service.set_group_devices(session, principal, group_id, body.device_ids))


@router.post("/groups/{group_id}/devices", tags=["devices"], summary="Add devices to a group")
async def add_group_devices(
    group_id: GroupId, body: GroupMembers, principal: Writer, session: Session
) -> Item[GroupOut]:
    return Item(data=await service.add_group_devices(session, principal, group_id, body.device_ids))


@router.delete(
    "/groups/{group_id}/devices/{device_id}",
    tags=["devices"],
    status_code=204,
    summary="Remove a device from a group",
)
async def remove_group_device(
    group_id: GroupId, device_id: DeviceId, principal: Writer, session: Session
) -> Response:
    await service.remove_group_device(session, principal, group_id, device_id)
    return _no_content()


# --- parameters -------------------------------------------------------------------------


@router.get("/devices/{device_id}/parameters", tags=["devices"], summary="A device's parameters")
async def list_parameters(
    device_id: DeviceId,
    principal: Reader,
    session: Session,
    params: Paging,
    search: Search = None,
    is_kpi: bool | None = None,
    sort: Sort = None,
) -> Page[ParameterOut]:
    rows, total = await service.list_parameters(
        session, principal.factory_id, device_id, params, search=search, is_kpi=is_kpi, sort=sort
    )
    return Page.of([ParameterOut.model_validate(p) for p in rows], total, params)


@router.post(
    "/devices/{device_id}/parameters",
    tags=["devices"],
    status_code=201,
    summary="Define a parameter before the device first reports it",
)
async def create_parameter(
    device_id: DeviceId, body: ParameterCreate, principal: Writer, session: Session
) -> Item[ParameterOut]:
    parameter = await service.create_parameter(session, principal, device_id, body)
    return Item(data=ParameterOut.model_validate(parameter))


@router.get(
    "/devices/{device_id}/parameters/{parameter_id}", tags=["devices"], summary="Get a parameter"
)
async def get_parameter(
    device_id: DeviceId, parameter_id: ParameterId, principal: Reader, session: Session
) -> Item[ParameterOut]:
    parameter = await service.get_parameter(session, principal.factory_id, device_id, parameter_id)
    return Item(data=ParameterOut.model_validate(parameter))


@router.patch(
    "/devices/{device_id}/parameters/{parameter_id}",
    tags=["devices"],
    summary="Change a parameter's name, unit, type, KPI flag or limits",
)
async def update_parameter(
    device_id: DeviceId,
    parameter_id: ParameterId,
    body: ParameterUpdate,
    principal: Writer,
    session: Session,
) -> Item[ParameterOut]:
    parameter = await service.update_parameter(session, principal, device_id, parameter_id, body)
    return Item(data=ParameterOut.model_validate(parameter))


@router.delete(
    "/devices/{device_id}/parameters/{parameter_id}",
    tags=["devices"],
    status_code=204,
    summary="Delete a parameter",
)
async def delete_parameter(
    device_id: DeviceId, parameter_id: ParameterId, principal: Writer, session: Session
) -> Response:
    await service.delete_parameter(session, principal, device_id, parameter_id)
    return _no_content()


# --- device keys ------------------------------------------------------------------------


@router.get(
    "/devices/{device_id}/keys", tags=["devices"], summary="A device's keys (never the key itself)"
)
async def list_device_keys(
    device_id: DeviceId, principal: KeyManager, session: Session, params: Paging
) -> Page[DeviceKeyOut]:
    rows, total = await service.list_device_keys(session, principal.factory_id, device_id, params)
    return Page.of([DeviceKeyOut.model_validate(k) for k in rows], total, params)


@router.post(
    "/devices/{device_id}/keys",
    tags=["devices"],
    status_code=201,
    summary="Issue a device key; the response is the only time the key is shown",
)
async def create_device_key(
    device_id: DeviceId,
    principal: KeyManager,
    session: Session,
    body: DeviceKeyCreate | None = None,
) -> Item[DeviceKeyIssued]:
    issued = await service.create_device_key(
        session, principal, device_id, body or DeviceKeyCreate()
    )
    return Item(data=issued)


@router.delete(
    "/devices/{device_id}/keys/{key_id}",
    tags=["devices"],
    status_code=204,
    summary="Revoke a device key",
)
async def revoke_device_key(
    device_id: DeviceId, key_id: KeyId, principal: KeyManager, session: Session
) -> Response:
    await service.revoke_device_key(session, principal, device_id, key_id)
    return _no_content()


# --- the device's own view ----------------------------------------------------------------


@router.get(
    "/device/me",
    tags=["devices"],
    summary="For devices (X-Device-Key): who am I, and where do I publish",
)
async def device_me(
    session: Session, caller: Annotated[AuthenticatedDevice, Depends(authenticated_device)]
) -> Item[DeviceSelf]:
    return Item(data=await service.device_self(session, caller))
