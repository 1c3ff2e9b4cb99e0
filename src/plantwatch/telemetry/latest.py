"""Latest value per series, in memory (DESIGN.md §4: `series_latest` "and in memory").

Dashboards read the latest values of every series of a factory, ten thousand at a
time, many times a second across screens. Reading them from `series_latest` each
time costs more than the rest of the request; this cache answers from memory:

- this process's ingest writes through after each commit (`apply`), so its own
  points show at once;
- a factory's values are reloaded from `series_latest` when first asked for, and
  again once `refresh_s` has passed, which brings in points that other processes
  (a separate ingest role, a CLI import) committed. A reload keeps, per series,
  whichever value is newer, so it never steps back past a point applied meanwhile.

So values written elsewhere show within `refresh_s`; with a shared bus, other
processes' commits could be applied as they happen.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection

from plantwatch.telemetry import queries
from plantwatch.telemetry.store import LatestValues

# (device_id, ts, value, text) per series id
Entry = tuple[int, int, float | None, str | None]


@dataclass
class _FactoryLatest:
    values: dict[int, Entry]
    loaded_at: float


class LatestCache:
    def __init__(self, refresh_s: float = 2.0, max_factories: int = 64) -> None:
        self.refresh_s = refresh_s
        # Bounded: an embedded database holds a few factories; beyond the bound the
        # least recently loaded is dropped and read again when next asked for.
        self.max_factories = max_factories
        self._factories: dict[int, _FactoryLatest] = {}

    def apply(self, rows: Iterable[LatestValues]) -> None:
        """Committed latest values (series_id, factory_id, device_id, ts, value, text)."""
        factories = self._factories
        for sid, fid, did, ts, value, text in rows:
            cached = factories.get(fid)
            if cached is None:  # not loaded: the next read loads it from the table
                continue
            current = cached.values.get(sid)
            if current is None or ts >= current[1]:
                cached.values[sid] = (did, ts, value, text)

    def forget(self, factory_id: int | None = None) -> None:
        if factory_id is None:
            self._factories.clear()
        else:
            self._factories.pop(factory_id, None)

    async def values(self, conn: AsyncConnection, factory_id: int) -> dict[int, Entry]:
        """Series id -> (device_id, ts, value, text) of every series of the factory
        (shared: do not modify)."""
        now = time.monotonic()
        cached = self._factories.get(factory_id)
        if cached is not None and now - cached.loaded_at < self.refresh_s:
            return cached.values
        rows = await queries.latest_rows(conn, factory_id)
        loaded: dict[int, Entry] = {sid: (did, ts, v, text) for sid, did, ts, v, text in rows}
        if cached is not None:
            # Points applied while the table was read may be newer than what it returned.
            for sid, entry in cached.values.items():
                stored = loaded.get(sid)
                if stored is not None and entry[1] > stored[1]:
                    loaded[sid] = entry
        if cached is None and len(self._factories) >= self.max_factories:
            oldest = min(self._factories, key=lambda f: self._factories[f].loaded_at)
            del self._factories[oldest]
        self._factories[factory_id] = _FactoryLatest(loaded, now)
        return loaded


def of_devices(values: dict[int, Entry], device_ids: Sequence[int]) -> dict[int, Entry]:
    wanted = set(device_ids)
    return {sid: entry for sid, entry in values.items() if entry[0] in wanted}
