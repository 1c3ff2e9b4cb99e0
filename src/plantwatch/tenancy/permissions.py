"""Roles and the permissions each carries. Pure data and functions: no I/O.

A user's effective permissions are their role's set plus any per-user grants.
docs/security.md renders this table; keep them in step.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Role(StrEnum):
    SUPER_ADMIN = "super_admin"
    FACTORY_MANAGER = "factory_manager"
    MAINTENANCE_MANAGER = "maintenance_manager"
    MAINTENANCE_ENGINEER = "maintenance_engineer"
    TECHNICIAN = "technician"
    DATA_SCIENTIST = "data_scientist"
    QUALITY_INSPECTOR = "quality_inspector"
    VIEWER = "viewer"


# Permission names are `area:verb`. Each capability checks exactly one.
PERMISSIONS: dict[str, str] = {
    "factory:read": "See the factory's settings",
    "factory:manage": "Change the factory's settings (name, timezone, SLA, policies)",
    "users:read": "List users and their roles",
    "users:manage": "Invite users, change roles and grants, deactivate users",
    "audit:read": "Read the audit log",
    "assets:read": "See sites, areas, lines, devices, groups and parameters",
    "assets:write": "Create, change and delete sites, areas, lines, devices, groups, parameters",
    "devices:keys": "Issue and revoke device credentials",
    "telemetry:read": "Read live values and history",
    "telemetry:write": "Import telemetry and replay dead letters",
    "rules:read": "See alert rules",
    "rules:write": "Create, change, toggle and backtest alert rules",
    "alerts:read": "See alerts",
    "alerts:respond": "Acknowledge, assign, comment on and resolve alerts",
    "alerts:manage": "Escalate alerts and configure SLAs and notification channels",
    "workorders:read": "See work orders, schedules and spare parts",
    "workorders:write": "Create and update work orders and log work",
    "workorders:approve": "Approve work orders and preventive schedules",
    "parts:write": "Manage spare-part stock",
    "analytics:read": "See health, predictions and analytics results",
    "analytics:run": "Run analytics jobs and manage models",
    "reports:read": "See and download reports",
    "reports:generate": "Generate and schedule reports",
    "commands:execute": "Send commands to devices",
    "commands:approve": "Approve device commands",
}

_READ_ALL = frozenset(p for p in PERMISSIONS if p.endswith(":read") and p != "audit:read")

ROLE_PERMISSIONS: dict[Role, frozenset[str]] = {
    Role.SUPER_ADMIN: frozenset(PERMISSIONS),
    Role.FACTORY_MANAGER: _READ_ALL
    | {
        "factory:manage",
        "audit:read",
        "assets:write",
        "alerts:respond",
        "alerts:manage",
        "workorders:approve",
        "reports:generate",
        "commands:approve",
    },
    Role.MAINTENANCE_MANAGER: _READ_ALL
    | {
        "assets:write",
        "rules:write",
        "alerts:respond",
        "alerts:manage",
        "workorders:write",
        "workorders:approve",
        "parts:write",
        "reports:generate",
        "commands:approve",
    },
    Role.MAINTENANCE_ENGINEER: _READ_ALL
    | {
        "assets:write",
        "devices:keys",
        "telemetry:write",
        "rules:write",
        "alerts:respond",
        "workorders:write",
        "analytics:run",
        "reports:generate",
        "commands:execute",
    },
    Role.TECHNICIAN: frozenset(
        {
            "factory:read",
            "assets:read",
            "telemetry:read",
            "rules:read",
            "alerts:read",
            "alerts:respond",
            "workorders:read",
            "workorders:write",
        }
    ),
    Role.DATA_SCIENTIST: _READ_ALL - {"users:read"} | {"analytics:run", "reports:generate"},
    Role.QUALITY_INSPECTOR: _READ_ALL - {"users:read"} | {"alerts:respond", "reports:generate"},
    Role.VIEWER: _READ_ALL - {"users:read"},
}


def effective_permissions(role: str, grants: Iterable[str] = ()) -> frozenset[str]:
    try:
        base = ROLE_PERMISSIONS[Role(role)]
    except ValueError:
        base = frozenset()
    return base | frozenset(g for g in grants if g in PERMISSIONS)


def unknown_permissions(grants: Iterable[str]) -> list[str]:
    return sorted({g for g in grants if g not in PERMISSIONS})


def can_assign_role(actor_role: str, target_role: str) -> bool:
    """Only a super admin may create or promote another super admin."""
    return target_role != Role.SUPER_ADMIN or actor_role == Role.SUPER_ADMIN
