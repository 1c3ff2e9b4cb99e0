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

ROLE_DESCRIPTIONS: dict[Role, str] = {
    Role.SUPER_ADMIN: "Everything, including users, roles and the audit log",
    Role.FACTORY_MANAGER: "Runs the plant: settings, approvals, alert policy, reports, audit",
    Role.MAINTENANCE_MANAGER: "Plans maintenance: rules, work orders, approvals, spare parts",
    Role.MAINTENANCE_ENGINEER: "Configures assets, devices, rules and analytics; runs commands",
    Role.TECHNICIAN: "Works the floor: responds to alerts and logs work on work orders",
    Role.DATA_SCIENTIST: "Reads everything operational and runs analytics jobs",
    Role.QUALITY_INSPECTOR: "Reads everything operational, responds to alerts, makes reports",
    Role.VIEWER: "Reads everything operational, changes nothing",
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
    """Only a super admin may create or promote another super admin.

    The same rule guards changes to an existing super admin: only a super admin
    may edit, demote or deactivate one.
    """
    return target_role != Role.SUPER_ADMIN or actor_role == Role.SUPER_ADMIN


def escalation(
    actor_permissions: Iterable[str], before: Iterable[str], after: Iterable[str]
) -> list[str]:
    """Permissions a change would hand out that the actor does not hold itself.

    A user manager may pass on only what they have: `users:manage` granted to a
    factory manager does not let them give anyone (themselves included)
    `commands:execute`. Empty means the change is allowed.
    """
    return sorted(frozenset(after) - frozenset(before) - frozenset(actor_permissions))


def permissions_table_markdown() -> str:
    """The role x permission table of docs/security.md, rendered from the data above."""
    roles = list(Role)
    lines = [
        "| Permission | Meaning | " + " | ".join(f"`{r.value}`" for r in roles) + " |",
        "|---|---|" + "|".join(":-:" for _ in roles) + "|",
    ]
    for name, description in PERMISSIONS.items():
        marks = " | ".join("✓" if name in ROLE_PERMISSIONS[r] else "" for r in roles)
        lines.append(f"| `{name}` | {description} | {marks} |")
    return "\n".join(lines) + "\n"


def roles_table_markdown() -> str:
    """One line per role: what it is for and how many permissions it carries."""
    lines = ["| Role | For | Permissions |", "|---|---|--:|"]
    for role in Role:
        count = len(ROLE_PERMISSIONS[role])
        lines.append(f"| `{role.value}` | {ROLE_DESCRIPTIONS[role]} | {count} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover - `python -m plantwatch.tenancy.permissions`
    print(roles_table_markdown())
    print(permissions_table_markdown(), end="")
