"""Paginated, sorted list queries: one implementation for every list endpoint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from plantwatch.core.errors import Problem
from plantwatch.core.schemas import PageParams

T = TypeVar("T")


def parse_sort(
    sort: str | None, allowed: Mapping[str, ColumnElement[Any]], default: str
) -> list[ColumnElement[Any]]:
    """`sort=name,-last_seen` -> ORDER BY clauses; unknown fields are a 422 on `query.sort`."""
    spec = sort or default
    clauses: list[ColumnElement[Any]] = []
    for raw in spec.split(","):
        field = raw.strip()
        if not field:
            continue
        descending = field.startswith("-")
        name = field.lstrip("-+")
        column = allowed.get(name)
        if column is None:
            raise Problem(
                f"cannot sort by '{name}'; allowed: {', '.join(sorted(allowed))}",
                status=422,
                code="validation_error",
                errors=[
                    {
                        "path": "query.sort",
                        "message": f"unknown sort field '{name}'",
                        "type": "value_error",
                    }
                ],
            )
        clauses.append(column.desc() if descending else column.asc())
    return clauses


async def paginate(
    session: AsyncSession,
    stmt: Select[Any],
    params: PageParams,
    order_by: Sequence[ColumnElement[Any]],
    tiebreak: ColumnElement[Any] | None = None,
) -> tuple[Sequence[Any], int]:
    total = await session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery()))
    ordered = stmt.order_by(*order_by, *([tiebreak] if tiebreak is not None else []))
    rows: Sequence[Any] = (
        await session.scalars(ordered.offset(params.offset).limit(params.per_page))
    ).all()
    return rows, int(total or 0)


def like_pattern(text: str) -> str:
    """A LIKE pattern matching `text` literally anywhere (escapes % and _)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped.lower()}%"
