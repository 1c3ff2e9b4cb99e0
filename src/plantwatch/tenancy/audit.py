"""The audit log: who changed what, when, with before/after where it is cheap.

Services call `record()` in the same transaction as the change, so an audit
row exists exactly when the change committed.
"""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.inspection import inspect

from plantwatch.tenancy.models import AuditEntry

# Never copied into the audit log, whatever the entity.
_SECRET_FIELDS = frozenset({"password_hash", "key_hash", "token_hash", "password"})


class Actor(Protocol):
    @property
    def factory_id(self) -> int: ...
    @property
    def user_id(self) -> int | None: ...
    @property
    def email(self) -> str: ...
    @property
    def request_id(self) -> str | None: ...
    @property
    def ip(self) -> str | None: ...


def snapshot(obj: Any) -> dict[str, Any]:
    """A JSON-safe dict of an ORM object's columns, without secrets."""
    out: dict[str, Any] = {}
    for attr in inspect(obj).mapper.column_attrs:
        if attr.key in _SECRET_FIELDS:
            continue
        value = getattr(obj, attr.key)
        if isinstance(value, dt.datetime):
            value = value.isoformat()
        elif isinstance(value, list | dict):
            # A copy: a later in-place change must not rewrite the "before" picture.
            value = copy.deepcopy(value)
        out[attr.key] = value
    return out


def record(
    session: AsyncSession,
    actor: Actor,
    action: str,
    entity_type: str,
    entity_id: int | str | None,
    *,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    if before is not None and after is not None:
        # Keep only what changed: smaller rows, and the diff is what a reader wants.
        changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        changed.discard("updated_at")
        before = {k: before.get(k) for k in changed}
        after = {k: after.get(k) for k in changed}
    session.add(
        AuditEntry(
            factory_id=actor.factory_id,
            user_id=actor.user_id,
            actor=actor.email,
            action=action,
            entity_type=entity_type,
            entity_id=None if entity_id is None else str(entity_id),
            before=before,
            after=after,
            request_id=actor.request_id,
            ip=actor.ip,
        )
    )
