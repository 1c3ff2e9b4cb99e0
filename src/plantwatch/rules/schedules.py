"""When a rule is armed: always, weekly time windows in the factory's timezone,
and date ranges. Pure: no I/O.

    {"type": "always"}
    {"type": "time_window", "windows": [{"days": [1,2,3,4,5], "start": "06:00", "end": "22:00"}],
     "timezone": "Europe/Berlin"}            # days: ISO weekday, 1 = Monday
    {"type": "date_range", "start_date": "2026-01-01", "end_date": "2026-12-31"}

A window whose end is before its start runs over midnight (22:00-06:00 is a
night shift starting on the listed day). Times are wall-clock times in the
zone, so a 06:00 start stays 06:00 across daylight-saving changes.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass
from typing import Any

from plantwatch.rules.conditions import ConditionError


@dataclass(frozen=True)
class Window:
    days: frozenset[int]
    start: dt.time
    end: dt.time


@dataclass(frozen=True)
class Schedule:
    kind: str  # always | time_window | date_range
    windows: tuple[Window, ...] = ()
    zone: zoneinfo.ZoneInfo | None = None
    start_date: dt.date | None = None
    end_date: dt.date | None = None

    def active(self, at: dt.datetime) -> bool:
        if self.kind == "always":
            return True
        zone = self.zone or zoneinfo.ZoneInfo("UTC")
        local = at.astimezone(zone)
        if self.kind == "date_range":
            assert self.start_date is not None and self.end_date is not None
            return self.start_date <= local.date() <= self.end_date
        now = local.time().replace(tzinfo=None)
        weekday = local.isoweekday()
        yesterday = 7 if weekday == 1 else weekday - 1
        for window in self.windows:
            if window.start <= window.end:
                if weekday in window.days and window.start <= now < window.end:
                    return True
            else:  # over midnight: the late part today, or the early part of a day after
                if weekday in window.days and now >= window.start:
                    return True
                if yesterday in window.days and now < window.end:
                    return True
        return False


ALWAYS = Schedule("always")


def _time(value: Any, path: str, problems: list[tuple[str, str]]) -> dt.time | None:
    if isinstance(value, str):
        try:
            parsed = dt.time.fromisoformat(value)
            if parsed.tzinfo is None:
                return parsed
        except ValueError:
            pass
    problems.append((path, "must be a time like 06:00"))
    return None


def parse_schedule(raw: Any, default_timezone: str, path: str = "schedule") -> Schedule:
    """A validated schedule, or ConditionError with the path of every problem."""
    if raw is None:
        return ALWAYS
    problems: list[tuple[str, str]] = []
    if not isinstance(raw, dict):
        raise ConditionError([(path, "must be an object")])
    kind = raw.get("type", "always")
    allowed = {
        "always": {"type"},
        "time_window": {"type", "windows", "timezone"},
        "date_range": {"type", "start_date", "end_date", "timezone"},
    }
    if kind not in allowed:
        raise ConditionError([(f"{path}.type", "must be always, time_window or date_range")])
    for key in raw.keys() - allowed[kind]:
        problems.append((f"{path}.{key}", f"unknown field for a {kind} schedule"))
    zone_name = raw.get("timezone", default_timezone)
    zone: zoneinfo.ZoneInfo | None = None
    try:
        zone = zoneinfo.ZoneInfo(str(zone_name))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        problems.append((f"{path}.timezone", f"unknown timezone '{zone_name}'"))
    if kind == "always":
        if problems:
            raise ConditionError(problems)
        return ALWAYS
    if kind == "date_range":
        dates: list[dt.date | None] = []
        for key in ("start_date", "end_date"):
            try:
                dates.append(dt.date.fromisoformat(str(raw[key])))
            except (KeyError, ValueError):
                problems.append((f"{path}.{key}", "must be a date like 2026-01-31"))
                dates.append(None)
        if dates[0] and dates[1] and dates[0] > dates[1]:
            problems.append((f"{path}.end_date", "must not be before start_date"))
        if problems:
            raise ConditionError(problems)
        return Schedule("date_range", zone=zone, start_date=dates[0], end_date=dates[1])
    windows_raw = raw.get("windows")
    windows: list[Window] = []
    if not isinstance(windows_raw, list) or not windows_raw or len(windows_raw) > 28:
        problems.append((f"{path}.windows", "must be a list of 1 to 28 windows"))
    else:
        for i, item in enumerate(windows_raw):
            where = f"{path}.windows[{i}]"
            if not isinstance(item, dict):
                problems.append((where, "must be an object"))
                continue
            days = item.get("days", [1, 2, 3, 4, 5, 6, 7])
            if (
                not isinstance(days, list)
                or not days
                or any(isinstance(d, bool) or d not in range(1, 8) for d in days)
            ):
                problems.append((f"{where}.days", "must list ISO weekdays 1 (Mon) to 7 (Sun)"))
                days = []
            start = _time(item.get("start"), f"{where}.start", problems)
            end = _time(item.get("end"), f"{where}.end", problems)
            if start is not None and end is not None:
                if start == end:
                    problems.append((f"{where}.end", "must differ from start"))
                windows.append(Window(frozenset(days), start, end))
    if problems:
        raise ConditionError(problems)
    return Schedule("time_window", windows=tuple(windows), zone=zone)
