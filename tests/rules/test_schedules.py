"""Rule schedules: weekday windows in the factory's zone across DST, night shifts,
date ranges, and validation paths."""

from __future__ import annotations

import datetime as dt

import pytest

from plantwatch.rules.conditions import ConditionError
from plantwatch.rules.schedules import parse_schedule

UTC = dt.UTC


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).astimezone(UTC)


def test_always_and_missing() -> None:
    assert parse_schedule(None, "UTC").active(at("2026-03-01T03:00:00+00:00"))
    assert parse_schedule({"type": "always"}, "UTC").active(at("2026-03-01T03:00:00+00:00"))


def test_day_shift_on_weekdays_in_local_time_across_dst() -> None:
    schedule = parse_schedule(
        {
            "type": "time_window",
            "windows": [{"days": [1, 2, 3, 4, 5], "start": "06:00", "end": "22:00"}],
        },
        "Europe/Berlin",
    )
    # Friday 27 March 2026 (CET, UTC+1) and Monday 30 March (CEST, UTC+2): 06:00 local both.
    assert not schedule.active(at("2026-03-27T04:59:00+00:00"))
    assert schedule.active(at("2026-03-27T05:00:00+00:00"))
    assert not schedule.active(at("2026-03-30T03:59:00+00:00"))
    assert schedule.active(at("2026-03-30T04:00:00+00:00"))
    # Saturday is off.
    assert not schedule.active(at("2026-03-28T10:00:00+00:00"))


def test_night_shift_runs_over_midnight_from_its_start_day() -> None:
    schedule = parse_schedule(
        {"type": "time_window", "windows": [{"days": [5], "start": "22:00", "end": "06:00"}]},
        "UTC",
    )
    assert schedule.active(at("2026-03-27T23:00:00+00:00"))  # Friday night
    assert schedule.active(at("2026-03-28T05:59:00+00:00"))  # ...into Saturday morning
    assert not schedule.active(at("2026-03-28T22:30:00+00:00"))  # Saturday night is not
    assert not schedule.active(at("2026-03-27T05:00:00+00:00"))  # Friday morning is not


def test_date_range_in_the_zone() -> None:
    schedule = parse_schedule(
        {
            "type": "date_range",
            "start_date": "2026-01-01",
            "end_date": "2026-01-31",
            "timezone": "Asia/Tokyo",
        },
        "UTC",
    )
    assert schedule.active(at("2025-12-31T15:00:00+00:00"))  # already 1 Jan in Tokyo
    assert not schedule.active(at("2026-01-31T15:00:00+00:00"))  # 1 Feb in Tokyo


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"type": "weekly"}, "schedule.type"),
        ({"type": "time_window", "windows": []}, "schedule.windows"),
        (
            {"type": "time_window", "windows": [{"days": [0], "start": "06:00", "end": "07:00"}]},
            "schedule.windows[0].days",
        ),
        (
            {"type": "time_window", "windows": [{"start": "25:00", "end": "07:00"}]},
            "schedule.windows[0].start",
        ),
        (
            {
                "type": "time_window",
                "timezone": "Mars/Olympus",
                "windows": [{"start": "06:00", "end": "07:00"}],
            },
            "schedule.timezone",
        ),
        (
            {"type": "date_range", "start_date": "2026-02-01", "end_date": "2026-01-01"},
            "schedule.end_date",
        ),
        ({"type": "always", "windows": []}, "schedule.windows"),
    ],
)
def test_bad_schedules_name_the_path(raw: dict[str, object], path: str) -> None:
    with pytest.raises(ConditionError) as caught:
        parse_schedule(raw, "UTC")
    assert path in {p for p, _ in caught.value.problems}
