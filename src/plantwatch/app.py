"""Composition root: settings -> backends -> services, shared by the API and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

from plantwatch.core.config import Settings
from plantwatch.core.db import Database


@dataclass
class Container:
    settings: Settings
    db: Database
    secret: str = field(repr=False)

    @classmethod
    def build(cls, settings: Settings) -> Container:
        settings.ensure_data_dir()
        return cls(
            settings=settings,
            db=Database(settings.resolved_database_url),
            secret=settings.secret(),
        )

    async def close(self) -> None:
        await self.db.dispose()
