"""The demo factory: a consistent catalogue, seeded once, with working logins."""

from __future__ import annotations

import json
import math
import re
import stat
from collections import Counter

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import func, select

from plantwatch import demo
from plantwatch.app import Container
from plantwatch.assets.models import (
    Area,
    Device,
    DeviceGroup,
    DeviceParameter,
    Line,
    Site,
    device_group_members,
)
from plantwatch.assets.schemas import (
    DEVICE_KEY_PATTERN,
    PARAMETER_KEY_PATTERN,
    DeviceCreate,
    ParameterCreate,
)
from plantwatch.core.config import Settings
from plantwatch.rules.models import Rule, rule_devices
from plantwatch.tenancy.models import Factory, User
from plantwatch.tenancy.permissions import Role
from plantwatch.tenancy.schemas import UserCreate

# --- the catalogue, as data ---------------------------------------------------------


def test_the_plant_is_big_and_varied_enough() -> None:
    assert len(demo.MACHINES) >= 12
    assert {"Machining", "Moulding", "Assembly", "Utilities"} <= set(demo.AREAS)
    assert sum(len(lines) for lines in demo.AREAS.values()) >= 4
    kinds = Counter(m.kind for m in demo.MACHINES)
    assert len(kinds) >= 6
    assert {"cnc_mill", "cnc_lathe", "injection_moulder", "conveyor", "pump", "air_compressor"} <= (
        set(kinds)
    )
    assert {"Critical assets", "Compressed air"} <= set(demo.GROUPS)
    assert {m.criticality for m in demo.MACHINES} >= {"low", "medium", "high", "critical"}


def test_machines_are_unique_and_placed_in_the_tree() -> None:
    keys = [m.device_key for m in demo.MACHINES]
    serials = [m.serial_number for m in demo.MACHINES]
    assert len(set(keys)) == len(keys)
    assert len(set(serials)) == len(serials)
    for machine in demo.MACHINES:
        assert re.match(DEVICE_KEY_PATTERN, machine.device_key)
        assert machine.kind in demo.MACHINE_KINDS
        assert machine.line in demo.AREAS[machine.area]
        assert set(machine.groups) <= set(demo.GROUPS)
        assert re.fullmatch(r"(19|20)\d\d-(0[1-9]|1[0-2])", machine.installed)
        # Valid by the same rules as a device created through the API.
        DeviceCreate(
            device_key=machine.device_key,
            name=machine.name,
            kind=machine.kind,
            manufacturer=machine.manufacturer,
            model=machine.model,
            serial_number=machine.serial_number,
            criticality=machine.criticality,
        )
        if machine.criticality == "critical":
            assert "Critical assets" in machine.groups
    for group in demo.GROUPS:
        assert any(group in m.groups for m in demo.MACHINES), f"empty group {group}"


def _kind_params() -> list[tuple[str, demo.ParameterSpec]]:
    return [(k.kind, p) for k in demo.MACHINE_KINDS.values() for p in k.parameters]


@pytest.mark.parametrize(("kind", "spec"), _kind_params(), ids=lambda v: getattr(v, "key", v))
def test_parameter_limits_make_sense(kind: str, spec: demo.ParameterSpec) -> None:
    ParameterCreate(
        key=spec.key,
        display_name=spec.display_name,
        unit=spec.unit,
        data_type=spec.data_type,
        is_kpi=spec.is_kpi,
        warning_low=spec.warning_low,
        warning_high=spec.warning_high,
        critical_low=spec.critical_low,
        critical_high=spec.critical_high,
    )
    assert re.match(PARAMETER_KEY_PATTERN, spec.key)
    assert spec.noise >= 0
    if spec.counter:
        assert spec.noise == 0 and spec.nominal > 0
        return
    lows = [v for v in (spec.critical_low, spec.warning_low) if v is not None]
    highs = [v for v in (spec.warning_high, spec.critical_high) if v is not None]
    assert lows or highs, f"{kind}.{spec.key} has no limits"
    # critical_low <= warning_low < nominal < warning_high <= critical_high
    assert lows == sorted(lows) and highs == sorted(highs)
    if spec.warning_low is not None and spec.critical_low is not None:
        assert spec.critical_low < spec.warning_low
    if spec.warning_high is not None and spec.critical_high is not None:
        assert spec.warning_high < spec.critical_high
    # A healthy machine (nominal +- 3 sigma) raises no warning.
    if lows:
        assert spec.nominal - 3 * spec.noise > max(lows), f"{kind}.{spec.key}"
    if highs:
        assert spec.nominal + 3 * spec.noise < min(highs), f"{kind}.{spec.key}"
    if spec.minimum is not None:
        assert spec.minimum <= spec.nominal
        assert all(spec.minimum <= v for v in lows + highs)
    if spec.maximum is not None:
        assert spec.nominal <= spec.maximum
        assert all(v <= spec.maximum for v in lows + highs)
    # Wear drifts a value towards a limit that will catch it.
    if spec.wear_per_day > 0:
        assert highs, f"{kind}.{spec.key} rises with wear but has no high limit"
    if spec.wear_per_day < 0:
        assert lows, f"{kind}.{spec.key} falls with wear but has no low limit"
    assert all(math.isfinite(v) for v in lows + highs + [spec.nominal, spec.noise])


def test_every_kind_has_unique_parameters_and_a_kpi() -> None:
    for kind in demo.MACHINE_KINDS.values():
        keys = [p.key for p in kind.parameters]
        assert len(set(keys)) == len(keys), kind.kind
        assert any(p.is_kpi for p in kind.parameters), kind.kind
        assert kind.parameter(keys[0]).key == keys[0]
    with pytest.raises(KeyError):
        demo.MACHINE_KINDS["pump"].parameter("warp_drive")


def test_one_demo_user_per_role_with_a_valid_email() -> None:
    assert sorted(u.role for u in demo.DEMO_USERS) == sorted(Role)
    assert demo.DEMO_USERS[0].email == "admin@demo.plantwatch.example"
    for user in demo.DEMO_USERS:
        UserCreate(email=user.email, password="x" * 12, role=user.role, full_name=user.full_name)


# --- the password -----------------------------------------------------------------------


def test_generated_password_is_stored_0600_and_reused(settings: Settings) -> None:
    assert demo.demo_password(settings, create=False) == (None, "unknown")
    password, source = demo.demo_password(settings, create=True)
    assert source == "generated"
    assert password is not None and len(password) >= 16
    path = settings.data_dir / demo.DEMO_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["password"] == password
    assert demo.demo_password(settings, create=True) == (password, "stored")
    other = settings.model_copy(update={"data_dir": settings.data_dir.parent / "other"})
    assert demo.demo_password(other, create=True)[0] != password


def test_configured_password_wins_and_is_not_written(settings: Settings) -> None:
    configured = settings.model_copy(update={"demo_password": SecretStr("from-settings-1")})
    assert demo.demo_password(configured, create=True) == ("from-settings-1", "settings")
    assert not (settings.data_dir / demo.DEMO_FILE).exists()
    short = settings.model_copy(update={"demo_password": SecretStr("short")})
    with pytest.raises(demo.DemoError):
        demo.demo_password(short, create=True)


# --- seeding ----------------------------------------------------------------------------


async def _counts(container: Container) -> dict[str, int]:
    async with container.db.session() as session:
        out = {}
        for name, model in (
            ("factories", Factory),
            ("users", User),
            ("sites", Site),
            ("areas", Area),
            ("lines", Line),
            ("devices", Device),
            ("groups", DeviceGroup),
            ("parameters", DeviceParameter),
            ("rules", Rule),
        ):
            out[name] = int(await session.scalar(select(func.count()).select_from(model)) or 0)
        out["memberships"] = int(
            await session.scalar(select(func.count()).select_from(device_group_members)) or 0
        )
        return out


async def test_seed_builds_the_plant_once(
    container: Container, settings: Settings, client: httpx.AsyncClient
) -> None:
    info = await demo.ensure_demo(container.db, settings)
    assert info.created
    assert (info.factory_slug, info.factory_name, info.timezone) == (
        "demo",
        "Demo Plant",
        "Europe/Berlin",
    )
    assert info.password_source == "generated"
    assert info.devices == len(demo.MACHINES)
    assert [login.role for login in info.logins] == [u.role.value for u in demo.DEMO_USERS]
    counts = await _counts(container)
    assert counts == {
        "factories": 1,
        "users": len(demo.DEMO_USERS),
        "sites": 1,
        "areas": len(demo.AREAS),
        "lines": sum(len(v) for v in demo.AREAS.values()),
        "devices": len(demo.MACHINES),
        "groups": len(demo.GROUPS),
        "parameters": sum(len(demo.MACHINE_KINDS[m.kind].parameters) for m in demo.MACHINES),
        "memberships": sum(len(m.groups) for m in demo.MACHINES),
        "rules": sum(
            (p.critical_high is not None) + (p.critical_low is not None)
            for kind in {m.kind for m in demo.MACHINES}
            for p in demo.MACHINE_KINDS[kind].parameters
        ),
    }

    async with container.db.session() as session:
        mill = await session.scalar(select(Device).where(Device.device_key == "cnc-mill-01"))
        assert mill is not None
        assert (mill.manufacturer, mill.kind, mill.criticality) == ("DMG MORI", "cnc_mill", "high")
        assert mill.line_id is not None
        temp = await session.scalar(
            select(DeviceParameter).where(
                DeviceParameter.device_id == mill.id, DeviceParameter.key == "spindle_temp"
            )
        )
        assert temp is not None
        assert (temp.unit, temp.is_kpi, temp.warning_high, temp.critical_high) == (
            "°C",
            True,
            70.0,
            80.0,
        )
        # Every machine's electrical power feeds the dashboard's power and energy card.
        power = list(
            await session.scalars(
                select(DeviceParameter.is_power).where(DeviceParameter.key == "power")
            )
        )
        assert power and all(power)
        others = await session.scalar(
            select(func.count())
            .select_from(DeviceParameter)
            .where(DeviceParameter.is_power, DeviceParameter.key != "power")
        )
        assert others == 0

    # One critical-limit rule per kind and parameter, live, on every machine of the kind.
    async with container.db.session() as session:
        rule = await session.scalar(
            select(Rule).where(Rule.name.like("%Spindle temperature above 80 °C"))
        )
        assert rule is not None and rule.is_active and rule.severity == "critical"
        assert rule.conditions == {
            "parameter": "spindle_temp",
            "operator": "gt",
            "threshold": 80.0,
            "for": "1m",
        }
        covered = set(
            await session.scalars(
                select(rule_devices.c.device_id).where(rule_devices.c.rule_id == rule.id)
            )
        )
        mills = await session.scalars(select(Device.id).where(Device.kind == "cnc_mill"))
        assert covered == set(mills) and mill.id in covered

    # Every role logs in with the demo password.
    assert info.password is not None
    for login in info.logins:
        response = await client.post(
            "/api/v1/auth/login",
            json={"factory_slug": "demo", "email": login.email, "password": info.password},
        )
        assert response.status_code == 200, response.text
        assert response.json()["user"]["role"] == login.role

    # A second run changes nothing and reports the same logins and password.
    again = await demo.ensure_demo(container.db, settings)
    assert not again.created
    assert (again.password, again.password_source) == (info.password, "stored")
    assert again.logins == info.logins
    assert await _counts(container) == counts


async def test_seed_uses_the_configured_password(
    container: Container, settings: Settings, client: httpx.AsyncClient
) -> None:
    configured = settings.model_copy(update={"demo_password": SecretStr("configured-pass-1")})
    info = await demo.ensure_demo(container.db, configured)
    assert info.password_source == "settings"
    assert not (settings.data_dir / demo.DEMO_FILE).exists()
    response = await client.post(
        "/api/v1/auth/login",
        json={
            "factory_slug": "demo",
            "email": "viewer@demo.plantwatch.example",
            "password": "configured-pass-1",
        },
    )
    assert response.status_code == 200, response.text


async def test_existing_demo_without_its_password_file_says_so(
    container: Container, settings: Settings
) -> None:
    await demo.ensure_demo(container.db, settings)
    (settings.data_dir / demo.DEMO_FILE).unlink()
    info = await demo.ensure_demo(container.db, settings)
    assert not info.created
    assert (info.password, info.password_source) == (None, "unknown")
    assert not (settings.data_dir / demo.DEMO_FILE).exists()
    assert (await _counts(container))["devices"] == len(demo.MACHINES)
