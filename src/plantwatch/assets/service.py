"""Assets logic: the site > area > line hierarchy, devices, groups, parameters and
device credentials.

Every function takes the tenant from its `actor` / `factory_id` argument (the
caller's token), never from request data, and every lookup is scoped by it: an
object of another factory is indistinguishable from a missing one. Mutations
record an audit row and commit in one transaction; an error before the commit
leaves nothing written.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from sqlalchemy import (
    ColumnElement,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from plantwatch.assets.models import (
    Area,
    Device,
    DeviceGroup,
    DeviceKey,
    DeviceParameter,
    Line,
    Site,
    device_group_members,
)
from plantwatch.assets.schemas import (
    CRITICALITY_RANK,
    AreaCreate,
    AreaOut,
    AreaUpdate,
    AssetTree,
    DataType,
    DeviceCreate,
    DeviceFactory,
    DeviceKeyCreate,
    DeviceKeyIssued,
    DeviceOut,
    DeviceSelf,
    DeviceUpdate,
    GroupCreate,
    GroupOut,
    GroupUpdate,
    LineCreate,
    LineOut,
    LineUpdate,
    ParameterCreate,
    ParameterUpdate,
    SiteCreate,
    SiteUpdate,
    TreeArea,
    TreeLine,
    TreeSite,
    TreeUnassigned,
    threshold_error,
)
from plantwatch.core.db import utcnow
from plantwatch.core.errors import Conflict, InvalidInput, NotFound, Unauthorized
from plantwatch.core.listing import AnySelect, Sortable, like_pattern, paginate, parse_sort
from plantwatch.core.schemas import PageParams
from plantwatch.tenancy.audit import Actor, record, snapshot
from plantwatch.tenancy.models import Factory
from plantwatch.tenancy.tokens import new_opaque_token, token_digest

DEVICE_KEY_PREFIX = "pwd_"
# Shown in listings so people can tell keys apart: "pwd_" and 8 random characters.
DISPLAY_PREFIX_LEN = 12
# Longest X-Device-Key worth hashing; issued keys are 47 characters.
MAX_PRESENTED_KEY_LEN = 200
# `last_used_at` is refreshed at most this often, so authenticating is mostly read-only.
LAST_USED_RESOLUTION = dt.timedelta(seconds=60)


# --- shared helpers ----------------------------------------------------------------

Col = Sortable


def _search(text: str | None, *columns: Col) -> ColumnElement[bool] | None:
    if not text:
        return None
    pattern = like_pattern(text)
    return or_(*(func.lower(column).like(pattern, escape="\\") for column in columns))


async def _flush(session: AsyncSession, conflict: Conflict) -> None:
    """Flush; a unique-constraint race (the pre-check passed, a twin committed) is a 409."""
    try:
        await session.flush()
    except IntegrityError as exc:
        await session.rollback()
        raise conflict from exc


async def _commit(session: AsyncSession, conflict: Conflict) -> None:
    try:
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        raise conflict from exc


def _changes(data: Any) -> dict[str, Any]:
    """The fields a PATCH body set, as plain JSON-ish values."""
    changes: dict[str, Any] = data.model_dump(mode="json", exclude_unset=True)
    return changes


# --- sites -----------------------------------------------------------------------------


async def _site(session: AsyncSession, factory_id: int, site_id: int) -> Site:
    site = await session.scalar(
        select(Site).where(Site.id == site_id, Site.factory_id == factory_id)
    )
    if site is None:
        raise NotFound(f"no site {site_id}", code="site_not_found")
    return site


def _site_conflict(name: str) -> Conflict:
    return Conflict(f"a site named '{name}' exists", code="site_exists")


async def _check_site_name(
    session: AsyncSession, factory_id: int, name: str, exclude_id: int | None = None
) -> None:
    stmt = select(Site.id).where(Site.factory_id == factory_id, Site.name == name)
    if exclude_id is not None:
        stmt = stmt.where(Site.id != exclude_id)
    if await session.scalar(stmt) is not None:
        raise _site_conflict(name)


async def list_sites(
    session: AsyncSession,
    factory_id: int,
    params: PageParams,
    *,
    search: str | None = None,
    sort: str | None = None,
) -> tuple[Sequence[Site], int]:
    stmt = select(Site).where(Site.factory_id == factory_id)
    if (clause := _search(search, Site.name, Site.address)) is not None:
        stmt = stmt.where(clause)
    order = parse_sort(sort, {"name": func.lower(Site.name), "created_at": Site.created_at}, "name")
    rows, total = await paginate(session, stmt, params, order, Site.id, rows=True)
    return [row[0] for row in rows], total


async def get_site(session: AsyncSession, factory_id: int, site_id: int) -> Site:
    return await _site(session, factory_id, site_id)


async def create_site(session: AsyncSession, actor: Actor, data: SiteCreate) -> Site:
    await _check_site_name(session, actor.factory_id, data.name)
    site = Site(factory_id=actor.factory_id, name=data.name, address=data.address)
    session.add(site)
    await _flush(session, _site_conflict(data.name))
    record(session, actor, "site.create", "site", site.id, after=snapshot(site))
    await _commit(session, _site_conflict(data.name))
    return site


async def update_site(session: AsyncSession, actor: Actor, site_id: int, data: SiteUpdate) -> Site:
    site = await _site(session, actor.factory_id, site_id)
    changes = _changes(data)
    if "name" in changes:
        await _check_site_name(session, actor.factory_id, changes["name"], exclude_id=site.id)
    before = snapshot(site)
    for field, value in changes.items():
        setattr(site, field, value)
    after = snapshot(site)
    if before != after:
        record(session, actor, "site.update", "site", site.id, before=before, after=after)
        await _commit(session, _site_conflict(site.name))
    return site


async def delete_site(session: AsyncSession, actor: Actor, site_id: int) -> None:
    site = await _site(session, actor.factory_id, site_id)
    areas = await session.scalar(select(func.count()).where(Area.site_id == site.id))
    if areas:
        raise Conflict(
            f"site {site.id} still has {areas} area(s); delete or move them first",
            code="site_has_areas",
        )
    record(session, actor, "site.delete", "site", site.id, before=snapshot(site))
    await session.execute(delete(Site).where(Site.id == site.id))
    await _commit(session, Conflict("site is in use", code="site_in_use"))


# --- areas -----------------------------------------------------------------------------


def _area_select() -> AnySelect:
    return select(Area, Site.name).join(Site, Site.id == Area.site_id)


def area_out(row: Any) -> AreaOut:
    area, site_name = row
    return AreaOut(
        id=area.id,
        site_id=area.site_id,
        site_name=site_name,
        name=area.name,
        created_at=area.created_at,
        updated_at=area.updated_at,
    )


async def _area_row(session: AsyncSession, factory_id: int, area_id: int) -> Any:
    row = (
        await session.execute(
            _area_select().where(Area.id == area_id, Area.factory_id == factory_id)
        )
    ).first()
    if row is None:
        raise NotFound(f"no area {area_id}", code="area_not_found")
    return row


async def _parent_site(session: AsyncSession, factory_id: int, site_id: int) -> Site:
    site = await session.scalar(
        select(Site).where(Site.id == site_id, Site.factory_id == factory_id)
    )
    if site is None:
        raise InvalidInput(["site_id"], f"no site {site_id}")
    return site


def _area_conflict(name: str) -> Conflict:
    return Conflict(f"this site already has an area named '{name}'", code="area_exists")


async def _check_area_name(
    session: AsyncSession, site_id: int, name: str, exclude_id: int | None = None
) -> None:
    stmt = select(Area.id).where(Area.site_id == site_id, Area.name == name)
    if exclude_id is not None:
        stmt = stmt.where(Area.id != exclude_id)
    if await session.scalar(stmt) is not None:
        raise _area_conflict(name)


async def list_areas(
    session: AsyncSession,
    factory_id: int,
    params: PageParams,
    *,
    site_id: int | None = None,
    search: str | None = None,
    sort: str | None = None,
) -> tuple[list[AreaOut], int]:
    stmt = _area_select().where(Area.factory_id == factory_id)
    if site_id is not None:
        stmt = stmt.where(Area.site_id == site_id)
    if (clause := _search(search, Area.name)) is not None:
        stmt = stmt.where(clause)
    allowed: dict[str, Col] = {
        "name": func.lower(Area.name),
        "created_at": Area.created_at,
        "site_name": func.lower(Site.name),
    }
    order = parse_sort(sort, allowed, "name")
    rows, total = await paginate(session, stmt, params, order, Area.id, rows=True)
    return [area_out(row) for row in rows], total


async def get_area(session: AsyncSession, factory_id: int, area_id: int) -> AreaOut:
    return area_out(await _area_row(session, factory_id, area_id))


async def create_area(session: AsyncSession, actor: Actor, data: AreaCreate) -> AreaOut:
    site = await _parent_site(session, actor.factory_id, data.site_id)
    await _check_area_name(session, site.id, data.name)
    area = Area(factory_id=actor.factory_id, site_id=site.id, name=data.name)
    session.add(area)
    await _flush(session, _area_conflict(data.name))
    record(session, actor, "area.create", "area", area.id, after=snapshot(area))
    await _commit(session, _area_conflict(data.name))
    return area_out((area, site.name))


async def update_area(
    session: AsyncSession, actor: Actor, area_id: int, data: AreaUpdate
) -> AreaOut:
    area, site_name = await _area_row(session, actor.factory_id, area_id)
    changes = _changes(data)
    if "site_id" in changes:
        site_name = (await _parent_site(session, actor.factory_id, changes["site_id"])).name
    target_site = changes.get("site_id", area.site_id)
    target_name = changes.get("name", area.name)
    if (target_site, target_name) != (area.site_id, area.name):
        await _check_area_name(session, target_site, target_name, exclude_id=area.id)
    before = snapshot(area)
    for field, value in changes.items():
        setattr(area, field, value)
    after = snapshot(area)
    if before != after:
        record(session, actor, "area.update", "area", area.id, before=before, after=after)
        await _commit(session, _area_conflict(area.name))
    return area_out((area, site_name))


async def delete_area(session: AsyncSession, actor: Actor, area_id: int) -> None:
    area, _ = await _area_row(session, actor.factory_id, area_id)
    lines = await session.scalar(select(func.count()).where(Line.area_id == area.id))
    if lines:
        raise Conflict(
            f"area {area.id} still has {lines} line(s); delete or move them first",
            code="area_has_lines",
        )
    record(session, actor, "area.delete", "area", area.id, before=snapshot(area))
    await session.execute(delete(Area).where(Area.id == area.id))
    await _commit(session, Conflict("area is in use", code="area_in_use"))


# --- lines -----------------------------------------------------------------------------


def _line_select() -> AnySelect:
    return (
        select(Line, Area.name, Area.site_id, Site.name)
        .join(Area, Area.id == Line.area_id)
        .join(Site, Site.id == Area.site_id)
    )


def line_out(row: Any) -> LineOut:
    line, area_name, site_id, site_name = row
    return LineOut(
        id=line.id,
        area_id=line.area_id,
        area_name=area_name,
        site_id=site_id,
        site_name=site_name,
        name=line.name,
        created_at=line.created_at,
        updated_at=line.updated_at,
    )


async def _line_row(session: AsyncSession, factory_id: int, line_id: int) -> Any:
    row = (
        await session.execute(
            _line_select().where(Line.id == line_id, Line.factory_id == factory_id)
        )
    ).first()
    if row is None:
        raise NotFound(f"no line {line_id}", code="line_not_found")
    return row


async def _parent_area(session: AsyncSession, factory_id: int, area_id: int) -> Any:
    row = (
        await session.execute(
            select(Area, Site)
            .join(Site, Site.id == Area.site_id)
            .where(Area.id == area_id, Area.factory_id == factory_id)
        )
    ).first()
    if row is None:
        raise InvalidInput(["area_id"], f"no area {area_id}")
    return row


def _line_conflict(name: str) -> Conflict:
    return Conflict(f"this area already has a line named '{name}'", code="line_exists")


async def _check_line_name(
    session: AsyncSession, area_id: int, name: str, exclude_id: int | None = None
) -> None:
    stmt = select(Line.id).where(Line.area_id == area_id, Line.name == name)
    if exclude_id is not None:
        stmt = stmt.where(Line.id != exclude_id)
    if await session.scalar(stmt) is not None:
        raise _line_conflict(name)


async def list_lines(
    session: AsyncSession,
    factory_id: int,
    params: PageParams,
    *,
    area_id: int | None = None,
    site_id: int | None = None,
    search: str | None = None,
    sort: str | None = None,
) -> tuple[list[LineOut], int]:
    stmt = _line_select().where(Line.factory_id == factory_id)
    if area_id is not None:
        stmt = stmt.where(Line.area_id == area_id)
    if site_id is not None:
        stmt = stmt.where(Area.site_id == site_id)
    if (clause := _search(search, Line.name)) is not None:
        stmt = stmt.where(clause)
    allowed: dict[str, Col] = {
        "name": func.lower(Line.name),
        "created_at": Line.created_at,
        "area_name": func.lower(Area.name),
        "site_name": func.lower(Site.name),
    }
    order = parse_sort(sort, allowed, "name")
    rows, total = await paginate(session, stmt, params, order, Line.id, rows=True)
    return [line_out(row) for row in rows], total


async def get_line(session: AsyncSession, factory_id: int, line_id: int) -> LineOut:
    return line_out(await _line_row(session, factory_id, line_id))


async def create_line(session: AsyncSession, actor: Actor, data: LineCreate) -> LineOut:
    area, site = await _parent_area(session, actor.factory_id, data.area_id)
    await _check_line_name(session, area.id, data.name)
    line = Line(factory_id=actor.factory_id, area_id=area.id, name=data.name)
    session.add(line)
    await _flush(session, _line_conflict(data.name))
    record(session, actor, "line.create", "line", line.id, after=snapshot(line))
    await _commit(session, _line_conflict(data.name))
    return line_out((line, area.name, site.id, site.name))


async def update_line(
    session: AsyncSession, actor: Actor, line_id: int, data: LineUpdate
) -> LineOut:
    line, area_name, site_id, site_name = await _line_row(session, actor.factory_id, line_id)
    changes = _changes(data)
    if "area_id" in changes:
        area, site = await _parent_area(session, actor.factory_id, changes["area_id"])
        area_name, site_id, site_name = area.name, site.id, site.name
    target_area = changes.get("area_id", line.area_id)
    target_name = changes.get("name", line.name)
    if (target_area, target_name) != (line.area_id, line.name):
        await _check_line_name(session, target_area, target_name, exclude_id=line.id)
    before = snapshot(line)
    for field, value in changes.items():
        setattr(line, field, value)
    after = snapshot(line)
    if before != after:
        record(session, actor, "line.update", "line", line.id, before=before, after=after)
        await _commit(session, _line_conflict(line.name))
    return line_out((line, area_name, site_id, site_name))


async def delete_line(session: AsyncSession, actor: Actor, line_id: int) -> None:
    line, *_ = await _line_row(session, actor.factory_id, line_id)
    devices = await session.scalar(select(func.count()).where(Device.line_id == line.id))
    if devices:
        raise Conflict(
            f"line {line.id} still has {devices} device(s) (decommissioned ones included); "
            "move them to another line first",
            code="line_has_devices",
        )
    record(session, actor, "line.delete", "line", line.id, before=snapshot(line))
    await session.execute(delete(Line).where(Line.id == line.id))
    await _commit(session, Conflict("line is in use", code="line_in_use"))


# --- the asset tree ------------------------------------------------------------------


async def asset_tree(session: AsyncSession, factory_id: int) -> AssetTree:
    """Sites > areas > lines with device counts, in four queries whatever the size."""
    active = func.count(Device.id).filter(Device.is_active.is_(True))
    sites = (
        await session.execute(
            select(Site.id, Site.name)
            .where(Site.factory_id == factory_id)
            .order_by(func.lower(Site.name), Site.id)
        )
    ).all()
    areas = (
        await session.execute(
            select(Area.id, Area.site_id, Area.name)
            .where(Area.factory_id == factory_id)
            .order_by(func.lower(Area.name), Area.id)
        )
    ).all()
    lines = (
        await session.execute(
            select(Line.id, Line.area_id, Line.name, func.count(Device.id), active)
            .outerjoin(Device, Device.line_id == Line.id)
            .where(Line.factory_id == factory_id)
            .group_by(Line.id, Line.area_id, Line.name)
            .order_by(func.lower(Line.name), Line.id)
        )
    ).all()
    unassigned_total, unassigned_active = (
        await session.execute(
            select(func.count(Device.id), active).where(
                Device.factory_id == factory_id, Device.line_id.is_(None)
            )
        )
    ).one()

    lines_by_area: dict[int, list[TreeLine]] = {}
    for line_id, area_id, name, total, active_count in lines:
        lines_by_area.setdefault(area_id, []).append(
            TreeLine(
                id=line_id,
                name=name,
                device_count=int(total),
                active_device_count=int(active_count),
            )
        )
    areas_by_site: dict[int, list[TreeArea]] = {}
    for area_id, site_id, name in areas:
        area_lines = lines_by_area.get(area_id, [])
        areas_by_site.setdefault(site_id, []).append(
            TreeArea(
                id=area_id,
                name=name,
                device_count=sum(x.device_count for x in area_lines),
                active_device_count=sum(x.active_device_count for x in area_lines),
                lines=area_lines,
            )
        )
    tree_sites = []
    for site_id, name in sites:
        site_areas = areas_by_site.get(site_id, [])
        tree_sites.append(
            TreeSite(
                id=site_id,
                name=name,
                device_count=sum(x.device_count for x in site_areas),
                active_device_count=sum(x.active_device_count for x in site_areas),
                areas=site_areas,
            )
        )
    return AssetTree(
        sites=tree_sites,
        unassigned=TreeUnassigned(
            device_count=int(unassigned_total), active_device_count=int(unassigned_active or 0)
        ),
    )


# --- devices ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceFilters:
    search: str | None = None
    line_id: int | None = None
    area_id: int | None = None
    site_id: int | None = None
    group_id: int | None = None
    kind: str | None = None
    criticality: str | None = None
    is_active: bool | None = None
    status: str | None = None


_CRITICALITY_ORDER = case(CRITICALITY_RANK, value=Device.criticality, else_=-1)

DEVICE_SORTS: dict[str, Col] = {
    "name": func.lower(Device.name),
    "device_key": Device.device_key,
    "last_seen": Device.last_seen,
    "created_at": Device.created_at,
    "criticality": _CRITICALITY_ORDER,
    "kind": Device.kind,
    "status": Device.status,
}


def _device_select() -> AnySelect:
    """A device with its line, area and site names: one query, outer joins."""
    return (
        select(Device, Line.name, Area.id, Area.name, Site.id, Site.name)
        .outerjoin(Line, Line.id == Device.line_id)
        .outerjoin(Area, Area.id == Line.area_id)
        .outerjoin(Site, Site.id == Area.site_id)
    )


def device_out(row: Any) -> DeviceOut:
    device, line_name, area_id, area_name, site_id, site_name = row
    return DeviceOut(
        id=device.id,
        device_key=device.device_key,
        name=device.name,
        kind=device.kind,
        manufacturer=device.manufacturer,
        model=device.model,
        serial_number=device.serial_number,
        location=device.location,
        line_id=device.line_id,
        line_name=line_name,
        area_id=area_id,
        area_name=area_name,
        site_id=site_id,
        site_name=site_name,
        criticality=device.criticality,
        metadata=device.meta or {},
        is_active=device.is_active,
        status=device.status,
        last_seen=device.last_seen,
        offline_after_s=device.offline_after_s,
        created_at=device.created_at,
        updated_at=device.updated_at,
    )


async def _device(session: AsyncSession, factory_id: int, device_id: int) -> Device:
    device = await session.scalar(
        select(Device).where(Device.id == device_id, Device.factory_id == factory_id)
    )
    if device is None:
        raise NotFound(f"no device {device_id}", code="device_not_found")
    return device


async def _device_row(session: AsyncSession, factory_id: int, device_id: int) -> Any:
    row = (
        await session.execute(
            _device_select().where(Device.id == device_id, Device.factory_id == factory_id)
        )
    ).first()
    if row is None:
        raise NotFound(f"no device {device_id}", code="device_not_found")
    return row


async def _device_line(session: AsyncSession, factory_id: int, line_id: int) -> None:
    exists = await session.scalar(
        select(Line.id).where(Line.id == line_id, Line.factory_id == factory_id)
    )
    if exists is None:
        raise InvalidInput(["line_id"], f"no line {line_id}")


def _device_key_conflict(key: str) -> Conflict:
    return Conflict(f"a device with key '{key}' exists", code="device_key_exists")


async def _check_device_key(
    session: AsyncSession, factory_id: int, key: str, exclude_id: int | None = None
) -> None:
    stmt = select(Device.id).where(Device.factory_id == factory_id, Device.device_key == key)
    if exclude_id is not None:
        stmt = stmt.where(Device.id != exclude_id)
    if await session.scalar(stmt) is not None:
        raise _device_key_conflict(key)


def _filtered_devices(factory_id: int, filters: DeviceFilters) -> AnySelect:
    stmt = _device_select().where(Device.factory_id == factory_id)
    clause = _search(
        filters.search,
        Device.name,
        Device.device_key,
        Device.serial_number,
        Device.manufacturer,
        Device.model,
    )
    if clause is not None:
        stmt = stmt.where(clause)
    if filters.line_id is not None:
        stmt = stmt.where(Device.line_id == filters.line_id)
    if filters.area_id is not None:
        stmt = stmt.where(Line.area_id == filters.area_id)
    if filters.site_id is not None:
        stmt = stmt.where(Area.site_id == filters.site_id)
    if filters.group_id is not None:
        stmt = stmt.where(
            Device.id.in_(
                select(device_group_members.c.device_id).where(
                    device_group_members.c.group_id == filters.group_id
                )
            )
        )
    if filters.kind is not None:
        stmt = stmt.where(Device.kind == filters.kind)
    if filters.criticality is not None:
        stmt = stmt.where(Device.criticality == filters.criticality)
    if filters.is_active is not None:
        stmt = stmt.where(Device.is_active.is_(filters.is_active))
    if filters.status is not None:
        stmt = stmt.where(Device.status == filters.status)
    return stmt


async def list_devices(
    session: AsyncSession,
    factory_id: int,
    params: PageParams,
    filters: DeviceFilters,
    sort: str | None = None,
) -> tuple[list[DeviceOut], int]:
    stmt = _filtered_devices(factory_id, filters)
    order = parse_sort(sort, DEVICE_SORTS, "name")
    rows, total = await paginate(session, stmt, params, order, Device.id, rows=True)
    return [device_out(row) for row in rows], total


async def device_status_counts(
    session: AsyncSession, factory_id: int
) -> dict[tuple[str, bool], int]:
    """How many devices the factory has per (status, is_active): one GROUP BY, for
    dashboards (status: online / offline / unknown = never seen)."""
    rows = await session.execute(
        select(Device.status, Device.is_active, func.count())
        .where(Device.factory_id == factory_id)
        .group_by(Device.status, Device.is_active)
    )
    return {(status, bool(active)): n for status, active, n in rows.all()}


class DeviceBrief(NamedTuple):
    id: int
    device_key: str
    name: str
    status: str


async def offline_and_inactive_ids(
    session: AsyncSession, factory_id: int
) -> tuple[list[int], set[int]]:
    """Ids of the factory's active devices that are offline (ascending), and of its
    decommissioned ones: what ranking machines by health needs, without loading every
    device (online and never-seen devices cost a health score nothing)."""
    conn = await session.connection()
    rows = await conn.execute(
        select(Device.id, Device.is_active)
        .where(
            Device.factory_id == factory_id,
            or_(Device.status == "offline", Device.is_active.is_(False)),
        )
        .order_by(Device.id)
    )
    offline: list[int] = []
    inactive: set[int] = set()
    for device_id, is_active in rows.all():
        if is_active:
            offline.append(device_id)
        else:
            inactive.add(device_id)
    return offline, inactive


async def device_briefs(
    session: AsyncSession, factory_id: int, ids: Sequence[int]
) -> list[DeviceBrief]:
    """Id, key, name and status of a few devices of the factory (a page's worth)."""
    if not ids:
        return []
    rows = await session.execute(
        select(Device.id, Device.device_key, Device.name, Device.status).where(
            Device.factory_id == factory_id, Device.id.in_(list(ids))
        )
    )
    return [DeviceBrief(*r) for r in rows.all()]


async def get_device(session: AsyncSession, factory_id: int, device_id: int) -> DeviceOut:
    return device_out(await _device_row(session, factory_id, device_id))


async def create_device(session: AsyncSession, actor: Actor, data: DeviceCreate) -> DeviceOut:
    if data.line_id is not None:
        await _device_line(session, actor.factory_id, data.line_id)
    await _check_device_key(session, actor.factory_id, data.device_key)
    device = Device(
        factory_id=actor.factory_id,
        device_key=data.device_key,
        name=data.name,
        kind=data.kind,
        manufacturer=data.manufacturer,
        model=data.model,
        serial_number=data.serial_number,
        location=data.location,
        line_id=data.line_id,
        criticality=data.criticality.value,
        meta=data.metadata,
        is_active=data.is_active,
        offline_after_s=data.offline_after_s,
    )
    session.add(device)
    await _flush(session, _device_key_conflict(data.device_key))
    record(session, actor, "device.create", "device", device.id, after=snapshot(device))
    await _commit(session, _device_key_conflict(data.device_key))
    return await get_device(session, actor.factory_id, device.id)


async def update_device(
    session: AsyncSession, actor: Actor, device_id: int, data: DeviceUpdate
) -> DeviceOut:
    device = await _device(session, actor.factory_id, device_id)
    changes = _changes(data)
    if changes.get("line_id") is not None:
        await _device_line(session, actor.factory_id, changes["line_id"])
    if "device_key" in changes and changes["device_key"] != device.device_key:
        await _check_device_key(
            session, actor.factory_id, changes["device_key"], exclude_id=device.id
        )
    if "metadata" in changes:
        changes["meta"] = changes.pop("metadata")
    before = snapshot(device)
    for field, value in changes.items():
        setattr(device, field, value)
    after = snapshot(device)
    if before != after:
        record(session, actor, "device.update", "device", device.id, before=before, after=after)
        await _commit(session, _device_key_conflict(device.device_key))
    return await get_device(session, actor.factory_id, device.id)


async def decommission_device(session: AsyncSession, actor: Actor, device_id: int) -> None:
    """Soft delete: the device stays (with its history) but is inactive and keyless."""
    device = await _device(session, actor.factory_id, device_id)
    before = snapshot(device)
    device.is_active = False
    revoked = await session.execute(
        update(DeviceKey)
        .where(DeviceKey.device_id == device.id, DeviceKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    keys_revoked: int = revoked.rowcount  # type: ignore[attr-defined]
    if not before["is_active"] and not keys_revoked:
        return  # already decommissioned: nothing to change or record
    after = snapshot(device)
    after["keys_revoked"] = keys_revoked
    record(session, actor, "device.delete", "device", device.id, before=before, after=after)
    await session.commit()


async def purge_device(session: AsyncSession, actor: Actor, device_id: int) -> None:
    """Hard delete: the device row goes, and with it its keys, parameters and memberships."""
    device = await _device(session, actor.factory_id, device_id)
    record(session, actor, "device.purge", "device", device.id, before=snapshot(device))
    await session.execute(delete(Device).where(Device.id == device.id))
    await _commit(
        session,
        Conflict(
            "the device still has data that refers to it; decommission it instead",
            code="device_in_use",
        ),
    )


# --- groups ----------------------------------------------------------------------------


_member_count = (
    select(func.count())
    .where(device_group_members.c.group_id == DeviceGroup.id)
    .correlate(DeviceGroup)
    .scalar_subquery()
)


def group_out(row: Any) -> GroupOut:
    group, count = row
    return GroupOut(
        id=group.id,
        name=group.name,
        description=group.description,
        device_count=int(count or 0),
        created_at=group.created_at,
        updated_at=group.updated_at,
    )


async def _group(session: AsyncSession, factory_id: int, group_id: int) -> DeviceGroup:
    group = await session.scalar(
        select(DeviceGroup).where(DeviceGroup.id == group_id, DeviceGroup.factory_id == factory_id)
    )
    if group is None:
        raise NotFound(f"no group {group_id}", code="group_not_found")
    return group


def _group_conflict(name: str) -> Conflict:
    return Conflict(f"a group named '{name}' exists", code="group_exists")


async def _check_group_name(
    session: AsyncSession, factory_id: int, name: str, exclude_id: int | None = None
) -> None:
    stmt = select(DeviceGroup.id).where(
        DeviceGroup.factory_id == factory_id, DeviceGroup.name == name
    )
    if exclude_id is not None:
        stmt = stmt.where(DeviceGroup.id != exclude_id)
    if await session.scalar(stmt) is not None:
        raise _group_conflict(name)


async def _member_ids(session: AsyncSession, group_id: int) -> list[int]:
    rows = await session.scalars(
        select(device_group_members.c.device_id)
        .where(device_group_members.c.group_id == group_id)
        .order_by(device_group_members.c.device_id)
    )
    return list(rows.all())


async def list_groups(
    session: AsyncSession,
    factory_id: int,
    params: PageParams,
    *,
    search: str | None = None,
    sort: str | None = None,
) -> tuple[list[GroupOut], int]:
    stmt = select(DeviceGroup, _member_count).where(DeviceGroup.factory_id == factory_id)
    if (clause := _search(search, DeviceGroup.name, DeviceGroup.description)) is not None:
        stmt = stmt.where(clause)
    allowed: dict[str, Col] = {
        "name": func.lower(DeviceGroup.name),
        "created_at": DeviceGroup.created_at,
        "device_count": _member_count,
    }
    order = parse_sort(sort, allowed, "name")
    rows, total = await paginate(session, stmt, params, order, DeviceGroup.id, rows=True)
    return [group_out(row) for row in rows], total


async def get_group(session: AsyncSession, factory_id: int, group_id: int) -> GroupOut:
    row = (
        await session.execute(
            select(DeviceGroup, _member_count).where(
                DeviceGroup.id == group_id, DeviceGroup.factory_id == factory_id
            )
        )
    ).first()
    if row is None:
        raise NotFound(f"no group {group_id}", code="group_not_found")
    return group_out(row)


async def create_group(session: AsyncSession, actor: Actor, data: GroupCreate) -> GroupOut:
    await _check_group_name(session, actor.factory_id, data.name)
    group = DeviceGroup(factory_id=actor.factory_id, name=data.name, description=data.description)
    session.add(group)
    await _flush(session, _group_conflict(data.name))
    record(session, actor, "group.create", "device_group", group.id, after=snapshot(group))
    await _commit(session, _group_conflict(data.name))
    return group_out((group, 0))


async def update_group(
    session: AsyncSession, actor: Actor, group_id: int, data: GroupUpdate
) -> GroupOut:
    group = await _group(session, actor.factory_id, group_id)
    changes = _changes(data)
    if "name" in changes:
        await _check_group_name(session, actor.factory_id, changes["name"], exclude_id=group.id)
    before = snapshot(group)
    for field, value in changes.items():
        setattr(group, field, value)
    after = snapshot(group)
    if before != after:
        record(session, actor, "group.update", "device_group", group.id, before=before, after=after)
        await _commit(session, _group_conflict(group.name))
    return await get_group(session, actor.factory_id, group.id)


async def delete_group(session: AsyncSession, actor: Actor, group_id: int) -> None:
    group = await _group(session, actor.factory_id, group_id)
    before = snapshot(group)
    before["device_ids"] = await _member_ids(session, group.id)
    record(session, actor, "group.delete", "device_group", group.id, before=before)
    await session.execute(delete(DeviceGroup).where(DeviceGroup.id == group.id))
    await session.commit()


async def _own_device_ids(session: AsyncSession, factory_id: int, ids: list[int]) -> list[int]:
    """`ids` deduplicated, in order; any not of this factory is a 422 at its index."""
    found = set(
        (
            await session.scalars(
                select(Device.id).where(Device.factory_id == factory_id, Device.id.in_(set(ids)))
            )
        ).all()
        if ids
        else ()
    )
    for index, device_id in enumerate(ids):
        if device_id not in found:
            raise InvalidInput(["device_ids", index], f"no device {device_id}")
    return list(dict.fromkeys(ids))


async def _insert_members(session: AsyncSession, group_id: int, device_ids: list[int]) -> None:
    if not device_ids:
        return
    try:
        await session.execute(
            insert(device_group_members),
            [{"group_id": group_id, "device_id": d} for d in device_ids],
        )
    except IntegrityError as exc:
        # A concurrent change added the same member or deleted a device meanwhile.
        await session.rollback()
        raise Conflict(
            "the group's membership changed concurrently; retry", code="group_changed"
        ) from exc


async def list_group_devices(
    session: AsyncSession,
    factory_id: int,
    group_id: int,
    params: PageParams,
    filters: DeviceFilters,
    sort: str | None = None,
) -> tuple[list[DeviceOut], int]:
    await _group(session, factory_id, group_id)
    scoped = replace(filters, group_id=group_id)
    return await list_devices(session, factory_id, params, scoped, sort)


async def set_group_devices(
    session: AsyncSession, actor: Actor, group_id: int, device_ids: list[int]
) -> GroupOut:
    group = await _group(session, actor.factory_id, group_id)
    wanted = await _own_device_ids(session, actor.factory_id, device_ids)
    current = await _member_ids(session, group.id)
    if set(wanted) != set(current):
        await session.execute(
            delete(device_group_members).where(device_group_members.c.group_id == group.id)
        )
        await _insert_members(session, group.id, wanted)
        record(
            session,
            actor,
            "group.members_set",
            "device_group",
            group.id,
            before={"device_ids": current},
            after={"device_ids": sorted(wanted)},
        )
        await session.commit()
    return await get_group(session, actor.factory_id, group.id)


async def add_group_devices(
    session: AsyncSession, actor: Actor, group_id: int, device_ids: list[int]
) -> GroupOut:
    group = await _group(session, actor.factory_id, group_id)
    wanted = await _own_device_ids(session, actor.factory_id, device_ids)
    current = await _member_ids(session, group.id)
    new = [d for d in wanted if d not in set(current)]
    if new:
        await _insert_members(session, group.id, new)
        record(
            session,
            actor,
            "group.members_add",
            "device_group",
            group.id,
            after={"device_ids": sorted(new)},
        )
        await session.commit()
    return await get_group(session, actor.factory_id, group.id)


async def remove_group_device(
    session: AsyncSession, actor: Actor, group_id: int, device_id: int
) -> None:
    group = await _group(session, actor.factory_id, group_id)
    removed = await session.execute(
        delete(device_group_members).where(
            device_group_members.c.group_id == group.id,
            device_group_members.c.device_id == device_id,
        )
    )
    if removed.rowcount != 1:  # type: ignore[attr-defined]
        raise NotFound(f"device {device_id} is not in group {group.id}", code="member_not_found")
    record(
        session,
        actor,
        "group.members_remove",
        "device_group",
        group.id,
        before={"device_ids": [device_id]},
    )
    await session.commit()


# --- parameters -------------------------------------------------------------------------


_NUMERIC_TYPES = {DataType.FLOAT.value, DataType.INT.value}
_LIMITS = ("warning_low", "warning_high", "critical_low", "critical_high")


def _check_limits(values: dict[str, Any], changed: set[str]) -> None:
    if values.get("data_type") not in _NUMERIC_TYPES:
        for name in _LIMITS:
            if values.get(name) is not None:
                raise InvalidInput(
                    [name] if name in changed else ["data_type"],
                    f"limits apply to numeric parameters only, not '{values.get('data_type')}'",
                )
    problem = threshold_error({name: values.get(name) for name in _LIMITS}, changed)
    if problem is not None:
        raise InvalidInput([problem[0]], problem[1])


async def _parameter(
    session: AsyncSession, factory_id: int, device_id: int, parameter_id: int
) -> DeviceParameter:
    parameter = await session.scalar(
        select(DeviceParameter).where(
            DeviceParameter.id == parameter_id,
            DeviceParameter.device_id == device_id,
            DeviceParameter.factory_id == factory_id,
        )
    )
    if parameter is None:
        raise NotFound(f"no parameter {parameter_id} on this device", code="parameter_not_found")
    return parameter


def _parameter_conflict(key: str) -> Conflict:
    return Conflict(f"this device already has a parameter '{key}'", code="parameter_exists")


async def list_parameters(
    session: AsyncSession,
    factory_id: int,
    device_id: int,
    params: PageParams,
    *,
    search: str | None = None,
    is_kpi: bool | None = None,
    sort: str | None = None,
) -> tuple[list[DeviceParameter], int]:
    await _device(session, factory_id, device_id)
    stmt = select(DeviceParameter).where(
        DeviceParameter.factory_id == factory_id, DeviceParameter.device_id == device_id
    )
    if (clause := _search(search, DeviceParameter.key, DeviceParameter.display_name)) is not None:
        stmt = stmt.where(clause)
    if is_kpi is not None:
        stmt = stmt.where(DeviceParameter.is_kpi.is_(is_kpi))
    allowed: dict[str, Col] = {
        "key": DeviceParameter.key,
        "display_name": DeviceParameter.display_name,
        "discovered_at": DeviceParameter.discovered_at,
    }
    order = parse_sort(sort, allowed, "key")
    rows, total = await paginate(session, stmt, params, order, DeviceParameter.id, rows=True)
    return [row[0] for row in rows], total


async def get_parameter(
    session: AsyncSession, factory_id: int, device_id: int, parameter_id: int
) -> DeviceParameter:
    await _device(session, factory_id, device_id)
    return await _parameter(session, factory_id, device_id, parameter_id)


async def create_parameter(
    session: AsyncSession, actor: Actor, device_id: int, data: ParameterCreate
) -> DeviceParameter:
    device = await _device(session, actor.factory_id, device_id)
    values = data.model_dump(mode="json")
    _check_limits(values, set(data.model_fields_set))
    exists = await session.scalar(
        select(DeviceParameter.id).where(
            DeviceParameter.device_id == device.id, DeviceParameter.key == data.key
        )
    )
    if exists is not None:
        raise _parameter_conflict(data.key)
    parameter = DeviceParameter(factory_id=actor.factory_id, device_id=device.id, **values)
    session.add(parameter)
    await _flush(session, _parameter_conflict(data.key))
    record(
        session,
        actor,
        "parameter.create",
        "device_parameter",
        parameter.id,
        after=snapshot(parameter),
    )
    await _commit(session, _parameter_conflict(data.key))
    return parameter


async def update_parameter(
    session: AsyncSession,
    actor: Actor,
    device_id: int,
    parameter_id: int,
    data: ParameterUpdate,
) -> DeviceParameter:
    await _device(session, actor.factory_id, device_id)
    parameter = await _parameter(session, actor.factory_id, device_id, parameter_id)
    changes = _changes(data)
    before = snapshot(parameter)
    _check_limits({**before, **changes}, set(changes))
    for field, value in changes.items():
        setattr(parameter, field, value)
    after = snapshot(parameter)
    if before != after:
        record(
            session,
            actor,
            "parameter.update",
            "device_parameter",
            parameter.id,
            before=before,
            after=after,
        )
        await session.commit()
    return parameter


async def delete_parameter(
    session: AsyncSession, actor: Actor, device_id: int, parameter_id: int
) -> None:
    await _device(session, actor.factory_id, device_id)
    parameter = await _parameter(session, actor.factory_id, device_id, parameter_id)
    record(
        session,
        actor,
        "parameter.delete",
        "device_parameter",
        parameter.id,
        before=snapshot(parameter),
    )
    await session.execute(delete(DeviceParameter).where(DeviceParameter.id == parameter.id))
    await session.commit()


# --- device keys -------------------------------------------------------------------------


async def list_device_keys(
    session: AsyncSession, factory_id: int, device_id: int, params: PageParams
) -> tuple[list[DeviceKey], int]:
    await _device(session, factory_id, device_id)
    stmt = select(DeviceKey).where(
        DeviceKey.factory_id == factory_id, DeviceKey.device_id == device_id
    )
    keys, total = await paginate(
        session, stmt, params, [DeviceKey.created_at.desc()], DeviceKey.id.desc()
    )
    return list(keys), total


async def create_device_key(
    session: AsyncSession, actor: Actor, device_id: int, data: DeviceKeyCreate
) -> DeviceKeyIssued:
    device = await _device(session, actor.factory_id, device_id)
    if not device.is_active:
        raise Conflict(
            f"device {device.id} is decommissioned; re-enable it before issuing keys",
            code="device_inactive",
        )
    key = new_opaque_token(DEVICE_KEY_PREFIX)
    credential = DeviceKey(
        factory_id=actor.factory_id,
        device_id=device.id,
        name=data.name,
        prefix=key[:DISPLAY_PREFIX_LEN],
        key_hash=token_digest(key),
        created_at=utcnow(),
    )
    session.add(credential)
    await session.flush()
    # snapshot() leaves key_hash out; the key itself is never anywhere but the response.
    record(
        session, actor, "device_key.create", "device_key", credential.id, after=snapshot(credential)
    )
    await session.commit()
    return DeviceKeyIssued(
        id=credential.id,
        key=key,
        prefix=credential.prefix,
        name=credential.name,
        created_at=credential.created_at,
    )


async def revoke_device_key(
    session: AsyncSession, actor: Actor, device_id: int, key_id: int
) -> None:
    await _device(session, actor.factory_id, device_id)
    credential = await session.scalar(
        select(DeviceKey).where(
            DeviceKey.id == key_id,
            DeviceKey.device_id == device_id,
            DeviceKey.factory_id == actor.factory_id,
        )
    )
    if credential is None:
        raise NotFound(f"no key {key_id} on this device", code="device_key_not_found")
    if credential.revoked_at is not None:
        return
    before = snapshot(credential)
    credential.revoked_at = utcnow()
    record(
        session,
        actor,
        "device_key.revoke",
        "device_key",
        credential.id,
        before=before,
        after=snapshot(credential),
    )
    await session.commit()


# --- device authentication ------------------------------------------------------------------


class AuthenticatedDevice(NamedTuple):
    factory_id: int
    device: Device


def _invalid_key() -> Unauthorized:
    return Unauthorized(
        "Invalid, revoked or unknown device key",
        code="device_key_invalid",
        headers={"WWW-Authenticate": 'X-Device-Key realm="plantwatch"'},
    )


async def authenticate_device(session: AsyncSession, presented: str | None) -> AuthenticatedDevice:
    """The device a key belongs to, if the key is live and the device active.

    One indexed lookup by digest; `last_used_at` is written only when it is more
    than LAST_USED_RESOLUTION old, so a busy device doesn't turn every call into a
    write. Used by HTTP (`X-Device-Key`) and by any other transport that carries a key.
    """
    if not presented or len(presented) > MAX_PRESENTED_KEY_LEN:
        raise _invalid_key()
    row = (
        await session.execute(
            select(DeviceKey, Device)
            .join(
                Device,
                (Device.id == DeviceKey.device_id) & (Device.factory_id == DeviceKey.factory_id),
            )
            .where(DeviceKey.key_hash == token_digest(presented))
        )
    ).first()
    if row is None:
        raise _invalid_key()
    credential, device = row
    if credential.revoked_at is not None or not device.is_active:
        raise _invalid_key()
    now = utcnow()
    if credential.last_used_at is None or now - credential.last_used_at > LAST_USED_RESOLUTION:
        await session.execute(
            update(DeviceKey).where(DeviceKey.id == credential.id).values(last_used_at=now)
        )
        await session.commit()
    return AuthenticatedDevice(factory_id=device.factory_id, device=device)


async def device_self(session: AsyncSession, caller: AuthenticatedDevice) -> DeviceSelf:
    device = await get_device(session, caller.factory_id, caller.device.id)
    factory = await session.get(Factory, caller.factory_id)
    if factory is None:
        raise _invalid_key()
    return DeviceSelf(
        device=device,
        factory=DeviceFactory(id=factory.id, slug=factory.slug, name=factory.name),
        mqtt_topic=telemetry_topic(factory.slug, device.device_key),
    )


def telemetry_topic(factory_slug: str, device_key: str) -> str:
    return f"factories/{factory_slug}/devices/{device_key}/telemetry"


# --- for the machines pages ------------------------------------------------------------


async def device_kinds(session: AsyncSession, factory_id: int) -> list[str]:
    """The distinct kinds of the factory's devices, sorted (for a filter's choices)."""
    rows = await session.scalars(
        select(Device.kind)
        .where(Device.factory_id == factory_id, Device.kind.is_not(None))
        .distinct()
        .order_by(Device.kind)
    )
    return [kind for kind in rows.all() if kind]


async def groups_of_device(
    session: AsyncSession, factory_id: int, device_id: int
) -> list[DeviceGroup]:
    """The groups a device belongs to, by name."""
    rows = await session.scalars(
        select(DeviceGroup)
        .join(device_group_members, device_group_members.c.group_id == DeviceGroup.id)
        .where(
            DeviceGroup.factory_id == factory_id,
            device_group_members.c.device_id == device_id,
        )
        .order_by(func.lower(DeviceGroup.name))
    )
    return list(rows.all())
