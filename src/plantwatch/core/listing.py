"""Paginated, sorted list queries: one implementation for every list endpoint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Select, func, nulls_last, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import QueryableAttribute
from sqlalchemy.sql.elements import ColumnElement

from plantwatch.core.errors import Problem
from plantwatch.core.schemas import PageParams

# A select of any number of columns.
AnySelect = Select[*tuple[Any, ...]]
# A column, expression or mapped attribute that can be sorted on.
Sortable = ColumnElement[Any] | QueryableAttribute[Any]


def _expr(column: Sortable) -> ColumnElement[Any]:
    return column.expression if isinstance(column, QueryableAttribute) else column


def parse_sort(
    sort: str | None, allowed: Mapping[str, Sortable], default: str
) -> list[ColumnElement[Any]]:
    """`sort=name,-last_seen` -> ORDER BY clauses; unknown fields are a 422 on `query.sort`.

    NULLs sort last in both directions, so SQLite and PostgreSQL page alike.
    """
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
        expr = _expr(column)
        clauses.append(nulls_last(expr.desc() if descending else expr.asc()))
    return clauses


async def paginate(
    session: AsyncSession,
    stmt: AnySelect,
    params: PageParams,
    order_by: Sequence[ColumnElement[Any]],
    tiebreak: Sortable | None = None,
    *,
    rows: bool = False,
) -> tuple[Sequence[Any], int]:
    """One page and the total. Entities by default; whole rows with `rows=True`
    (for selects of several columns, e.g. a device with its line's name)."""
    total = await session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery()))
    ordered = stmt.order_by(*order_by, *([_expr(tiebreak)] if tiebreak is not None else []))
    page = ordered.offset(params.offset).limit(params.per_page)
    found: Sequence[Any] = (
        (await session.execute(page)).all() if rows else (await session.scalars(page)).all()
    )
    return found, int(total or 0)


def like_pattern(text: str) -> str:
    """A LIKE pattern matching `text` literally anywhere (escapes % and _)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped.lower()}%"
