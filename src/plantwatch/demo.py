"""The demo factory: `plantwatch up --demo`.

A small plant ("Demo Plant", slug `demo`) with one user per role and a
realistic asset tree: one site, four areas, seven lines, 21 machines of nine
kinds, device groups, and every machine's parameters with limits that make
sense for the kind of machine.

The machine-kind catalogue below is plain data on purpose: the simulator reuses
it, so each parameter also says how it behaves (nominal value, noise, physical
bounds, how wear moves it). Change a limit here and the demo, the simulator
and the default thresholds all follow.

Seeding is idempotent: when the demo factory exists nothing is added or
changed. The demo password is `PLANTWATCH_DEMO_PASSWORD` when set, else
generated once and kept in `<data_dir>/demo.json` (mode 0600), so it survives
restarts; it is never a constant in the code.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from plantwatch.assets.models import (
    Area,
    Device,
    DeviceGroup,
    DeviceParameter,
    Line,
    Site,
    device_group_members,
)
from plantwatch.core.config import Settings
from plantwatch.core.db import Database
from plantwatch.core.errors import Conflict
from plantwatch.rules import service as rules_service
from plantwatch.rules.schemas import RuleBody
from plantwatch.tenancy import audit
from plantwatch.tenancy import service as tenancy_service
from plantwatch.tenancy.models import Factory, User
from plantwatch.tenancy.permissions import Role
from plantwatch.tenancy.schemas import FactoryCreate

DEMO_SLUG = "demo"
DEMO_NAME = "Demo Plant"
DEMO_TIMEZONE = "Europe/Berlin"
DEMO_EMAIL_DOMAIN = "demo.plantwatch.example"  # RFC 2606: reserved for examples
DEMO_FILE = "demo.json"
MIN_PASSWORD_LENGTH = 8

DataType = Literal["float", "int", "bool", "string"]
Criticality = Literal["low", "medium", "high", "critical"]


# --- the machine-kind catalogue ------------------------------------------------


@dataclass(frozen=True)
class ParameterSpec:
    """One measured value of a kind of machine.

    `nominal` and `noise` (one standard deviation) describe a healthy machine
    in steady operation; `minimum`/`maximum` are physical bounds no reading
    crosses; `wear_per_day` is how far a degrading machine's value moves each
    day (signed: bearings run hotter, flows fall). For a `counter` the nominal
    value is the increase per minute of running time instead.
    """

    key: str
    display_name: str
    unit: str | None
    nominal: float
    noise: float
    data_type: DataType = "float"
    is_kpi: bool = False
    # Electrical power draw (kW): the dashboard's power and energy-today figures.
    is_power: bool = False
    warning_low: float | None = None
    warning_high: float | None = None
    critical_low: float | None = None
    critical_high: float | None = None
    minimum: float | None = 0.0
    maximum: float | None = None
    wear_per_day: float = 0.0
    counter: bool = False


@dataclass(frozen=True)
class MachineKind:
    kind: str
    label: str
    parameters: tuple[ParameterSpec, ...]

    def parameter(self, key: str) -> ParameterSpec:
        for spec in self.parameters:
            if spec.key == key:
                return spec
        raise KeyError(key)


# Vibration limits follow ISO 10816-3 zones for medium machines on rigid
# foundations (mm/s RMS): B/C boundary 4.5 (warning), C/D boundary 7.1 (critical).
def _vibration(nominal: float, wear: float = 0.35) -> ParameterSpec:
    return ParameterSpec(
        "vibration",
        "Vibration",
        "mm/s",
        nominal,
        0.25,
        is_kpi=True,
        warning_high=4.5,
        critical_high=7.1,
        wear_per_day=wear,
    )


def _cycle_count(per_minute: float) -> ParameterSpec:
    return ParameterSpec(
        "cycle_count", "Cycle count", "cycles", per_minute, 0.0, data_type="int", counter=True
    )


# fmt: off
MACHINE_KINDS: dict[str, MachineKind] = {
    k.kind: k
    for k in (
        MachineKind(
            "cnc_mill",
            "CNC machining centre",
            (
                ParameterSpec(
                    "spindle_temp", "Spindle temperature", "°C", 52.0, 1.2, is_kpi=True,
                    warning_high=70.0, critical_high=80.0, maximum=120.0, wear_per_day=2.5,
                ),
                _vibration(2.1),
                ParameterSpec(
                    "spindle_rpm", "Spindle speed", "rpm", 10000.0, 120.0, data_type="int",
                    warning_high=14000.0, critical_high=15000.0, maximum=15000.0,
                ),
                ParameterSpec(
                    "motor_current", "Spindle motor current", "A", 18.0, 0.9,
                    warning_high=28.0, critical_high=32.0, wear_per_day=0.4,
                ),
                ParameterSpec(
                    "power", "Power", "kW", 11.5, 0.7, is_power=True, is_kpi=True,
                    warning_high=18.0, critical_high=22.0, wear_per_day=0.15,
                ),
                ParameterSpec(
                    "coolant_flow", "Coolant flow", "l/min", 20.0, 0.8,
                    warning_low=12.0, critical_low=8.0, wear_per_day=-0.6,
                ),
                _cycle_count(0.5),
            ),
        ),
        MachineKind(
            "cnc_lathe",
            "CNC turning centre",
            (
                ParameterSpec(
                    "spindle_temp", "Spindle temperature", "°C", 48.0, 1.0, is_kpi=True,
                    warning_high=68.0, critical_high=78.0, maximum=120.0, wear_per_day=2.0,
                ),
                _vibration(1.8),
                ParameterSpec(
                    "spindle_rpm", "Spindle speed", "rpm", 2800.0, 40.0, data_type="int",
                    warning_high=4200.0, critical_high=4500.0, maximum=4500.0,
                ),
                ParameterSpec(
                    "motor_current", "Spindle motor current", "A", 24.0, 1.1,
                    warning_high=34.0, critical_high=40.0, wear_per_day=0.5,
                ),
                ParameterSpec(
                    "power", "Power", "kW", 15.0, 0.9, is_power=True, is_kpi=True,
                    warning_high=22.0, critical_high=26.0, wear_per_day=0.2,
                ),
                ParameterSpec(
                    "chuck_pressure", "Chuck clamping pressure", "bar", 30.0, 0.4,
                    warning_low=24.0, critical_low=20.0, maximum=45.0, wear_per_day=-0.5,
                ),
                _cycle_count(0.8),
            ),
        ),
        MachineKind(
            "injection_moulder",
            "Injection moulding machine",
            (
                ParameterSpec(
                    "barrel_temp", "Barrel temperature (zone 3)", "°C", 230.0, 1.5,
                    is_kpi=True, warning_low=215.0, warning_high=245.0,
                    critical_low=205.0, critical_high=255.0, maximum=350.0,
                ),
                ParameterSpec(
                    "mould_temp", "Mould temperature", "°C", 60.0, 0.8,
                    warning_low=52.0, warning_high=68.0, critical_low=45.0, critical_high=75.0,
                    wear_per_day=0.8,
                ),
                ParameterSpec(
                    "injection_pressure", "Injection pressure", "bar", 1150.0, 25.0,
                    warning_high=1500.0, critical_high=1700.0, maximum=2200.0,
                    wear_per_day=12.0,
                ),
                ParameterSpec(
                    "hydraulic_oil_temp", "Hydraulic oil temperature", "°C", 45.0, 0.6,
                    warning_high=55.0, critical_high=60.0, wear_per_day=0.7,
                ),
                ParameterSpec(
                    "cycle_time", "Cycle time", "s", 28.0, 0.3, is_kpi=True,
                    warning_high=32.0, critical_high=36.0, wear_per_day=0.25,
                ),
                ParameterSpec(
                    "power", "Power", "kW", 38.0, 2.0, is_power=True,
                    warning_high=60.0, critical_high=70.0, wear_per_day=0.4,
                ),
                _cycle_count(2.1),
            ),
        ),
        MachineKind(
            "conveyor",
            "Belt conveyor",
            (
                ParameterSpec(
                    "belt_speed", "Belt speed", "m/s", 0.8, 0.01, is_kpi=True,
                    warning_low=0.65, critical_low=0.5, maximum=1.5, wear_per_day=-0.01,
                ),
                ParameterSpec(
                    "motor_current", "Drive motor current", "A", 4.2, 0.15,
                    warning_high=6.0, critical_high=7.5, wear_per_day=0.1,
                ),
                ParameterSpec(
                    "motor_temp", "Drive motor temperature", "°C", 46.0, 0.8,
                    warning_high=75.0, critical_high=90.0, maximum=150.0, wear_per_day=1.5,
                ),
                _vibration(1.4, wear=0.25),
            ),
        ),
        MachineKind(
            "robot",
            "Industrial robot (pick and place)",
            (
                ParameterSpec(
                    "joint_temp", "Axis 2 motor temperature", "°C", 42.0, 0.7,
                    warning_high=60.0, critical_high=70.0, maximum=120.0, wear_per_day=1.2,
                ),
                ParameterSpec(
                    "motor_current", "Axis 2 motor current", "A", 3.6, 0.2,
                    warning_high=5.5, critical_high=6.5, wear_per_day=0.08,
                ),
                ParameterSpec(
                    "cycle_time", "Pick cycle time", "s", 4.8, 0.1, is_kpi=True,
                    warning_high=5.8, critical_high=6.8, wear_per_day=0.05,
                ),
                ParameterSpec(
                    "gripper_vacuum", "Gripper vacuum", "kPa", -68.0, 1.0,
                    warning_high=-55.0, critical_high=-45.0, minimum=-95.0, maximum=0.0,
                    wear_per_day=1.0,
                ),
                ParameterSpec(
                    "pick_count", "Picks", "picks", 12.0, 0.0, data_type="int", counter=True
                ),
            ),
        ),
        MachineKind(
            "flow_wrapper",
            "Horizontal flow wrapper",
            (
                ParameterSpec(
                    "speed", "Output speed", "packs/min", 110.0, 2.0, is_kpi=True,
                    warning_low=90.0, critical_low=70.0, maximum=200.0, wear_per_day=-1.5,
                ),
                ParameterSpec(
                    "seal_temp", "Cross-seal jaw temperature", "°C", 165.0, 1.0,
                    warning_low=155.0, warning_high=175.0, critical_low=148.0,
                    critical_high=182.0, maximum=250.0,
                ),
                ParameterSpec(
                    "film_tension", "Film tension", "N", 28.0, 0.8,
                    warning_low=22.0, warning_high=36.0, critical_low=18.0, critical_high=40.0,
                ),
                ParameterSpec(
                    "reject_rate", "Reject rate", "%", 0.6, 0.15, is_kpi=True,
                    warning_high=2.0, critical_high=4.0, maximum=100.0, wear_per_day=0.15,
                ),
                ParameterSpec(
                    "pack_count", "Packs", "packs", 110.0, 0.0, data_type="int", counter=True
                ),
            ),
        ),
        MachineKind(
            "air_compressor",
            "Oil-injected screw compressor",
            (
                ParameterSpec(
                    "discharge_pressure", "Discharge pressure", "bar", 7.5, 0.06, is_kpi=True,
                    warning_low=6.8, warning_high=8.3, critical_low=6.3, critical_high=8.8,
                    maximum=13.0, wear_per_day=-0.03,
                ),
                ParameterSpec(
                    "discharge_temp", "Element outlet temperature", "°C", 78.0, 1.0,
                    warning_high=95.0, critical_high=105.0, maximum=130.0, wear_per_day=1.2,
                ),
                ParameterSpec(
                    "flow", "Free air delivery", "m³/min", 5.8, 0.1,
                    warning_low=4.8, critical_low=4.0, maximum=7.5, wear_per_day=-0.05,
                ),
                ParameterSpec(
                    "power", "Power", "kW", 33.0, 1.0, is_power=True, is_kpi=True,
                    warning_high=40.0, critical_high=44.0, wear_per_day=0.3,
                ),
                ParameterSpec(
                    "motor_current", "Motor current", "A", 60.0, 1.5,
                    warning_high=72.0, critical_high=78.0, wear_per_day=0.5,
                ),
                _vibration(2.4),
                ParameterSpec(
                    "running_hours", "Running hours", "h", 1.0 / 60.0, 0.0, counter=True
                ),
            ),
        ),
        MachineKind(
            "pump",
            "Centrifugal pump",
            (
                ParameterSpec(
                    "pressure", "Discharge pressure", "bar", 4.2, 0.05, is_kpi=True,
                    warning_low=3.5, warning_high=5.5, critical_low=3.0, critical_high=6.2,
                    maximum=10.0, wear_per_day=-0.03,
                ),
                ParameterSpec(
                    "flow", "Flow", "l/min", 350.0, 5.0, is_kpi=True,
                    warning_low=280.0, critical_low=220.0, maximum=600.0, wear_per_day=-4.0,
                ),
                ParameterSpec(
                    "motor_current", "Motor current", "A", 14.0, 0.4,
                    warning_high=19.0, critical_high=22.0, wear_per_day=0.15,
                ),
                ParameterSpec(
                    "bearing_temp", "Drive-end bearing temperature", "°C", 45.0, 0.7,
                    warning_high=70.0, critical_high=85.0, maximum=150.0, wear_per_day=1.8,
                ),
                _vibration(1.9, wear=0.45),
            ),
        ),
        MachineKind(
            "chiller",
            "Process water chiller",
            (
                ParameterSpec(
                    "supply_temp", "Chilled water supply temperature", "°C", 12.0, 0.2,
                    is_kpi=True, warning_low=8.0, warning_high=15.0, critical_low=6.0,
                    critical_high=18.0, minimum=0.0, maximum=40.0, wear_per_day=0.3,
                ),
                ParameterSpec(
                    "return_temp", "Chilled water return temperature", "°C", 17.0, 0.3,
                    warning_high=22.0, critical_high=25.0, maximum=45.0, wear_per_day=0.3,
                ),
                ParameterSpec(
                    "flow", "Chilled water flow", "l/min", 400.0, 6.0,
                    warning_low=320.0, critical_low=260.0, maximum=700.0, wear_per_day=-3.0,
                ),
                ParameterSpec(
                    "power", "Compressor power", "kW", 24.0, 0.8, is_power=True,
                    warning_high=32.0, critical_high=36.0, wear_per_day=0.3,
                ),
            ),
        ),
    )
}
# fmt: on


# --- the plant ------------------------------------------------------------------


@dataclass(frozen=True)
class MachineSpec:
    device_key: str
    name: str
    kind: str
    manufacturer: str
    model: str
    serial_number: str
    area: str
    line: str
    criticality: Criticality
    installed: str  # year-month the machine was commissioned
    groups: tuple[str, ...] = ()


SITE_NAME = "Main site"
SITE_ADDRESS = "Industriestraße 12, 70565 Stuttgart, Germany"

# area -> its lines, in display order
AREAS: dict[str, tuple[str, ...]] = {
    "Machining": ("CNC Cell 1", "CNC Cell 2"),
    "Moulding": ("Moulding Line 1",),
    "Assembly": ("Assembly Line A", "Packaging Line"),
    "Utilities": ("Compressor Room", "Cooling Water"),
}

GROUPS: dict[str, str] = {
    "Critical assets": "Machines whose failure stops production; watched most closely.",
    "CNC machines": "Every machining and turning centre.",
    "Compressed air": "Compressors supplying the 7.5 bar compressed-air network.",
    "Cooling water": "Chiller and pumps of the process cooling-water loop.",
}

_CRIT = "Critical assets"

# fmt: off
MACHINES: tuple[MachineSpec, ...] = (
    # Machining
    MachineSpec("cnc-mill-01", "CNC Mill 01", "cnc_mill", "DMG MORI", "DMU 50 3rd Gen",
                "DMU50-2019-10473", "Machining", "CNC Cell 1", "high", "2019-04",
                (_CRIT, "CNC machines")),
    MachineSpec("cnc-mill-02", "CNC Mill 02", "cnc_mill", "Haas Automation", "VF-4SS",
                "HAAS-1158322", "Machining", "CNC Cell 1", "medium", "2020-09",
                ("CNC machines",)),
    MachineSpec("cnc-mill-03", "CNC Mill 03", "cnc_mill", "Hermle", "C 42 U",
                "HER-C42-37781", "Machining", "CNC Cell 2", "high", "2021-02",
                (_CRIT, "CNC machines")),
    MachineSpec("cnc-lathe-01", "CNC Lathe 01", "cnc_lathe", "Okuma", "LB3000 EX II",
                "OK-LB3-210934", "Machining", "CNC Cell 1", "medium", "2018-11",
                ("CNC machines",)),
    MachineSpec("cnc-lathe-02", "CNC Lathe 02", "cnc_lathe", "Mazak", "QUICK TURN 250MSY",
                "MZK-QT250-55120", "Machining", "CNC Cell 2", "medium", "2020-03",
                ("CNC machines",)),
    MachineSpec("cnc-lathe-03", "CNC Lathe 03", "cnc_lathe", "DMG MORI", "CLX 350",
                "CLX350-2022-00881", "Machining", "CNC Cell 2", "low", "2022-06",
                ("CNC machines",)),
    # Moulding
    MachineSpec("imm-01", "Injection Moulder 01", "injection_moulder", "ENGEL",
                "victory 200/50 tech", "ENG-V200-284455", "Moulding", "Moulding Line 1",
                "critical", "2017-08", (_CRIT,)),
    MachineSpec("imm-02", "Injection Moulder 02", "injection_moulder", "Arburg",
                "ALLROUNDER 570 A", "ARB-570A-336201", "Moulding", "Moulding Line 1",
                "high", "2019-01", (_CRIT,)),
    MachineSpec("imm-03", "Injection Moulder 03", "injection_moulder", "KraussMaffei",
                "CX 160-750", "KM-CX160-90417", "Moulding", "Moulding Line 1", "medium",
                "2021-10"),
    MachineSpec("robot-01", "Sprue Picker Robot 01", "robot", "FANUC", "M-10iD/12",
                "FANUC-E17A-44321", "Moulding", "Moulding Line 1", "medium", "2019-01"),
    # Assembly
    MachineSpec("conveyor-01", "Assembly Conveyor 01", "conveyor", "Interroll",
                "Modular Conveyor Platform 1.2", "IRL-MCP-778012", "Assembly",
                "Assembly Line A", "medium", "2018-05"),
    MachineSpec("conveyor-02", "Assembly Conveyor 02", "conveyor", "Dorner", "2200 Series",
                "DOR-2200-104938", "Assembly", "Assembly Line A", "low", "2018-05"),
    MachineSpec("robot-02", "Assembly Robot 02", "robot", "ABB", "IRB 1300-11/0.9",
                "ABB-1300-5520197", "Assembly", "Assembly Line A", "high", "2021-07",
                (_CRIT,)),
    MachineSpec("robot-03", "Assembly Robot 03", "robot", "KUKA", "KR 10 R1100-2",
                "KUKA-KR10-3021754", "Assembly", "Assembly Line A", "medium", "2021-07"),
    MachineSpec("wrapper-01", "Flow Wrapper 01", "flow_wrapper", "Syntegon", "Pack 202",
                "SYN-P202-61840", "Assembly", "Packaging Line", "high", "2020-11",
                (_CRIT,)),
    MachineSpec("conveyor-03", "Packaging Conveyor 03", "conveyor", "FlexLink", "X85",
                "FLX-X85-230077", "Assembly", "Packaging Line", "low", "2020-11"),
    # Utilities
    MachineSpec("compressor-01", "Air Compressor 01", "air_compressor", "Atlas Copco",
                "GA 37 VSD+", "AII-751203", "Utilities", "Compressor Room", "critical",
                "2018-02", (_CRIT, "Compressed air")),
    MachineSpec("compressor-02", "Air Compressor 02", "air_compressor", "Kaeser", "ASD 40 T",
                "KAE-ASD40-1107", "Utilities", "Compressor Room", "high", "2022-01",
                ("Compressed air",)),
    MachineSpec("pump-01", "Cooling Water Pump 01", "pump", "Grundfos", "CR 32-2",
                "GRU-CR32-96543210", "Utilities", "Cooling Water", "high", "2017-06",
                (_CRIT, "Cooling water")),
    MachineSpec("pump-02", "Cooling Water Pump 02", "pump", "KSB", "Etanorm 065-050-200",
                "KSB-ETN-9362271", "Utilities", "Cooling Water", "medium", "2017-06",
                ("Cooling water",)),
    MachineSpec("chiller-01", "Process Chiller 01", "chiller", "Carrier", "AquaSnap 30RB-060",
                "CAR-30RB-3817Q", "Utilities", "Cooling Water", "high", "2019-05",
                (_CRIT, "Cooling water")),
)
# fmt: on


@dataclass(frozen=True)
class DemoUserSpec:
    role: Role
    local_part: str
    full_name: str

    @property
    def email(self) -> str:
        return f"{self.local_part}@{DEMO_EMAIL_DOMAIN}"


DEMO_USERS: tuple[DemoUserSpec, ...] = (
    DemoUserSpec(Role.SUPER_ADMIN, "admin", "Alex Admin"),
    DemoUserSpec(Role.FACTORY_MANAGER, "manager", "Maria Weber"),
    DemoUserSpec(Role.MAINTENANCE_MANAGER, "maintenance.manager", "Jonas Becker"),
    DemoUserSpec(Role.MAINTENANCE_ENGINEER, "engineer", "Priya Nair"),
    DemoUserSpec(Role.TECHNICIAN, "technician", "Tom Schulz"),
    DemoUserSpec(Role.DATA_SCIENTIST, "data.scientist", "Lena Hoffmann"),
    DemoUserSpec(Role.QUALITY_INSPECTOR, "quality", "Samuel Okafor"),
    DemoUserSpec(Role.VIEWER, "viewer", "Vera Klein"),
)


# --- the password ----------------------------------------------------------------

PasswordSource = Literal["settings", "stored", "generated", "unknown"]


class DemoError(Exception):
    """The demo cannot be seeded as configured (e.g. a too-short demo password)."""


def _demo_file(settings: Settings) -> Path:
    return settings.data_dir / DEMO_FILE


def _read_stored_password(settings: Settings) -> str | None:
    path = _demo_file(settings)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    password = data.get("password") if isinstance(data, dict) else None
    return password if isinstance(password, str) and password else None


def _store_password(settings: Settings, password: str) -> None:
    path = settings.ensure_data_dir() / DEMO_FILE
    tmp = path.with_name(f".{DEMO_FILE}.{secrets.token_hex(4)}.tmp")
    # 0600 from creation; rename is atomic, so a reader sees the old file or the new one.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"factory": DEMO_SLUG, "password": password}, fh)
    tmp.replace(path)


def demo_password(settings: Settings, *, create: bool) -> tuple[str | None, PasswordSource]:
    """The demo users' password and where it came from.

    `PLANTWATCH_DEMO_PASSWORD` wins; else the one stored in the data dir; else,
    when `create`, a new random one, stored for the next start.
    """
    if settings.demo_password is not None:
        password = settings.demo_password.get_secret_value()
        if len(password) < MIN_PASSWORD_LENGTH:
            raise DemoError(
                f"PLANTWATCH_DEMO_PASSWORD must be at least {MIN_PASSWORD_LENGTH} characters"
            )
        return password, "settings"
    stored = _read_stored_password(settings)
    if stored is not None:
        return stored, "stored"
    if not create:
        return None, "unknown"
    password = secrets.token_urlsafe(12)
    _store_password(settings, password)
    return password, "generated"


# --- seeding ---------------------------------------------------------------------


@dataclass(frozen=True)
class DemoLogin:
    role: str
    email: str


@dataclass
class DemoInfo:
    """What `up --demo` prints: where to log in and as whom."""

    factory_slug: str
    factory_name: str
    timezone: str
    created: bool
    password: str | None = field(repr=False)
    password_source: PasswordSource
    logins: list[DemoLogin]
    devices: int


async def ensure_demo(db: Database, settings: Settings) -> DemoInfo:
    """Create the demo factory unless it exists; either way say how to log in."""
    async with db.session() as session:
        existing = await session.scalar(select(Factory).where(Factory.slug == DEMO_SLUG))
    created = False
    if existing is None:
        password, source = demo_password(settings, create=True)
        assert password is not None
        async with db.session() as session:
            try:
                factory = await seed(session, password)
                await session.commit()
                created = True
            except Conflict:
                # Another process seeded it between our check and our insert: theirs stands.
                await session.rollback()
        if created:
            await seed_rules(db, factory.id)
    else:
        password, source = demo_password(settings, create=False)
    return await _describe(db, created, password, source)


async def _describe(
    db: Database, created: bool, password: str | None, source: PasswordSource
) -> DemoInfo:
    async with db.session() as session:
        factory = await tenancy_service.factory_by_slug(session, DEMO_SLUG)
        emails = {u.email for u in DEMO_USERS}
        users = (
            await session.scalars(
                select(User).where(User.factory_id == factory.id, User.email.in_(emails))
            )
        ).all()
        present = {u.email: u.role for u in users}
        devices = await session.scalar(
            select(func.count(Device.id)).where(Device.factory_id == factory.id)
        )
    logins = [DemoLogin(u.role.value, u.email) for u in DEMO_USERS if u.email in present]
    return DemoInfo(
        factory_slug=factory.slug,
        factory_name=factory.name,
        timezone=factory.timezone,
        created=created,
        password=password,
        password_source=source,
        logins=logins,
        devices=int(devices or 0),
    )


def demo_rules(device_ids: dict[str, int]) -> list[RuleBody]:
    """One alert rule per machine kind and parameter with a critical limit: the value
    beyond it for a minute, on every machine of that kind. The degrading demo
    machines cross them, so alerts appear on their own. `device_ids`: key -> id."""
    rules: list[RuleBody] = []
    for kind_name, kind in MACHINE_KINDS.items():
        ids = [device_ids[m.device_key] for m in MACHINES if m.kind == kind_name]
        if not ids:
            continue
        for spec in kind.parameters:
            unit = f" {spec.unit}" if spec.unit else ""
            for operator, limit, word in (
                ("gt", spec.critical_high, "above"),
                ("lt", spec.critical_low, "below"),
            ):
                if limit is None:
                    continue
                rules.append(
                    RuleBody.model_validate(
                        {
                            "name": f"{kind.label}: {spec.display_name} {word} {limit:g}{unit}",
                            "conditions": {
                                "parameter": spec.key,
                                "operator": operator,
                                "threshold": limit,
                                "for": "1m",
                            },
                            "scope": {"type": "devices", "device_ids": ids},
                            "severity": "critical",
                            "cooldown": 900,
                        }
                    )
                )
    return rules


async def seed_rules(db: Database, factory_id: int) -> int:
    """Create the demo's alert rules (once, with the factory); returns how many."""
    actor = tenancy_service.SystemActor(factory_id, email="system:demo")
    async with db.session() as session:
        rows = await session.execute(
            select(Device.device_key, Device.id).where(Device.factory_id == factory_id)
        )
        bodies = demo_rules({key: device_id for key, device_id in rows})
        for body in bodies:
            await rules_service.create_rule(session, actor, body)
    return len(bodies)


async def seed(session: AsyncSession, password: str) -> Factory:
    """Insert the demo factory, its users and its asset tree. Flushes; the caller commits.

    Raises `Conflict` when a factory with the demo slug exists.
    """
    factory = await tenancy_service.create_factory(
        session, FactoryCreate(name=DEMO_NAME, slug=DEMO_SLUG, timezone=DEMO_TIMEZONE)
    )
    actor = tenancy_service.SystemActor(factory.id, email="system:demo")
    for spec in DEMO_USERS:
        await tenancy_service.add_user(
            session,
            factory.id,
            email=spec.email,
            role=spec.role.value,
            password=password,
            full_name=spec.full_name,
            actor=actor,
        )

    site = Site(factory_id=factory.id, name=SITE_NAME, address=SITE_ADDRESS)
    session.add(site)
    await session.flush()
    lines: dict[tuple[str, str], Line] = {}
    for area_name, line_names in AREAS.items():
        area = Area(factory_id=factory.id, site_id=site.id, name=area_name)
        session.add(area)
        await session.flush()
        for line_name in line_names:
            line = Line(factory_id=factory.id, area_id=area.id, name=line_name)
            session.add(line)
            lines[(area_name, line_name)] = line
    groups = {
        name: DeviceGroup(factory_id=factory.id, name=name, description=description)
        for name, description in GROUPS.items()
    }
    session.add_all(groups.values())
    await session.flush()

    members: list[dict[str, int]] = []
    for machine in MACHINES:
        kind = MACHINE_KINDS[machine.kind]
        device = Device(
            factory_id=factory.id,
            device_key=machine.device_key,
            name=machine.name,
            kind=machine.kind,
            manufacturer=machine.manufacturer,
            model=machine.model,
            serial_number=machine.serial_number,
            location=f"{SITE_NAME} / {machine.area} / {machine.line}",
            line_id=lines[(machine.area, machine.line)].id,
            criticality=machine.criticality,
            meta={"kind_label": kind.label, "installed": machine.installed, "demo": True},
            is_active=True,
        )
        session.add(device)
        await session.flush()
        session.add_all(
            DeviceParameter(
                factory_id=factory.id,
                device_id=device.id,
                key=p.key,
                display_name=p.display_name,
                unit=p.unit,
                data_type=p.data_type,
                is_kpi=p.is_kpi,
                is_power=p.is_power,
                warning_low=p.warning_low,
                warning_high=p.warning_high,
                critical_low=p.critical_low,
                critical_high=p.critical_high,
            )
            for p in kind.parameters
        )
        members.extend({"group_id": groups[g].id, "device_id": device.id} for g in machine.groups)
    if members:
        await session.execute(device_group_members.insert(), members)
    audit.record(
        session,
        actor,
        "demo.seed",
        "factory",
        factory.id,
        after={
            "users": len(DEMO_USERS),
            "devices": len(MACHINES),
            "groups": len(GROUPS),
            "lines": sum(len(v) for v in AREAS.values()),
        },
    )
    await session.flush()
    return factory
