"""Alembic migrations: empty -> head -> base -> head on SQLite and PostgreSQL, each
revision's downgrade undoes its upgrade, and the models match the migrated schema
exactly (no autogenerate diff), so nobody can change a model without a migration.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, make_url

import plantwatch.models  # noqa: F401  (registers every table)
from plantwatch.core import migrate
from plantwatch.core.db import Base, make_engine

PG_URL = os.environ.get("PLANTWATCH_TEST_DATABASE_URL")
OUR_TABLES = frozenset(Base.metadata.tables)


def _pg_admin(sql: str) -> None:
    assert PG_URL is not None

    async def run() -> None:
        engine = make_engine(PG_URL, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                await conn.execute(text(sql))
        finally:
            await engine.dispose()

    asyncio.run(run())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A brand-new, empty database (a throwaway one on the PostgreSQL test server)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'migrations.db'}"
        return
    if not PG_URL:
        pytest.skip("PLANTWATCH_TEST_DATABASE_URL not set")
    name = f"plantwatch_mig_{uuid.uuid4().hex[:10]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _inspect(url: str, fn: Any) -> Any:
    async def run() -> Any:
        engine = make_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(fn)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _tables(url: str) -> set[str]:
    return set(_inspect(url, lambda conn: inspect(conn).get_table_names()))


def _revision(url: str) -> str | None:
    async def run() -> str | None:
        engine = make_engine(url)
        try:
            return await migrate.current_revision(engine)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _revisions_base_to_head() -> list[tuple[str, str]]:
    """(revision, down_revision or 'base') from the first migration to the head."""
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    revisions = list(script.walk_revisions("base", "heads"))
    revisions.reverse()
    out = []
    for rev in revisions:
        down = rev.down_revision
        assert down is None or isinstance(down, str), f"{rev.revision}: merge revisions unhandled"
        out.append((rev.revision, down or "base"))
    return out


def test_the_history_is_linear_with_one_head() -> None:
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1
    revisions = _revisions_base_to_head()
    assert revisions[0][1] == "base"
    assert revisions[-1][0] == migrate.head_revision()


def test_upgrade_to_head_then_down_to_base_and_up_again(empty_database: str) -> None:
    url = empty_database
    asyncio.run(migrate.upgrade(url))
    assert _revision(url) == migrate.head_revision()
    tables = _tables(url)
    missing = OUR_TABLES - tables
    assert not missing, f"tables the models declare but head lacks: {sorted(missing)}"
    assert "alembic_version" in tables

    asyncio.run(migrate.downgrade(url, "base"))
    assert _revision(url) is None
    left = _tables(url) - {"alembic_version"}
    assert not left, f"tables left behind by the downgrades: {sorted(left)}"
    if url.startswith("postgresql"):
        assert _pg_leftovers(url) == {}

    asyncio.run(migrate.upgrade(url))
    assert _revision(url) == migrate.head_revision()
    assert _tables(url) >= OUR_TABLES


def _pg_leftovers(url: str) -> dict[str, list[str]]:
    """Types and sequences a downgrade forgot (PostgreSQL keeps them after DROP TABLE)."""

    def query(conn: Connection) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        types = conn.execute(
            text(
                "SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
                "WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd')"
            )
        ).scalars()
        sequences = conn.execute(
            text("SELECT sequence_name FROM information_schema.sequences")
        ).scalars()
        for kind, names in (("types", list(types)), ("sequences", list(sequences))):
            if names:
                found[kind] = sorted(names)
        return found

    result: dict[str, list[str]] = _inspect(url, query)
    return result


def test_each_revision_downgrades_cleanly_and_upgrades_again(empty_database: str) -> None:
    """The 'stairway': every step up, down and up again, so each downgrade is exercised."""
    url = empty_database
    for revision, down in _revisions_base_to_head():
        asyncio.run(migrate.upgrade(url, revision))
        after_up = _tables(url)
        asyncio.run(migrate.downgrade(url, down))
        assert _revision(url) == (None if down == "base" else down)
        asyncio.run(migrate.upgrade(url, revision))
        assert _revision(url) == revision
        assert _tables(url) == after_up, f"{revision}: up/down/up changed the tables"


def test_models_match_the_migrated_schema(empty_database: str) -> None:
    """No autogenerate diff between the models and head: a model change needs a migration."""
    url = empty_database
    asyncio.run(migrate.upgrade(url))

    def diff(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "render_as_batch": conn.dialect.name == "sqlite",
            },
        )
        return list(compare_metadata(context, Base.metadata))

    differences = _inspect(url, diff)
    assert differences == [], "models differ from the migrations:\n" + "\n".join(
        map(repr, differences)
    )
