"""Alembic, driven from code: `plantwatch migrate`, `up`, and the tests use this."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

from plantwatch.core.db import make_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _run(fn_name: str, url: str, revision: str) -> None:
    cfg = alembic_config(url)
    getattr(command, fn_name)(cfg, revision)


async def upgrade(url: str, revision: str = "head") -> None:
    # Alembic's env runs its own event loop for async engines; keep it off ours.
    await asyncio.to_thread(_run, "upgrade", url, revision)


async def downgrade(url: str, revision: str) -> None:
    await asyncio.to_thread(_run, "downgrade", url, revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(
            lambda sync_conn: MigrationContext.configure(sync_conn).get_current_revision()
        )


async def is_at_head(url: str) -> bool:
    engine = make_engine(url)
    try:
        return await current_revision(engine) == head_revision()
    finally:
        await engine.dispose()
