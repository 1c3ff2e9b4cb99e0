"""Database.run_write on SQLite: one write transaction, run on the event loop's thread
when the write lock is free, and never blocking the loop while another connection
holds it."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from plantwatch.core.db import Database


@pytest.fixture
async def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
    async with database.engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (n INTEGER)"))
    return database


def _insert(n: int, threads: list[str]) -> Callable[[Session], int]:
    def work(session: Session) -> int:
        threads.append(threading.current_thread().name)
        session.execute(text("INSERT INTO t (n) VALUES (:n)"), {"n": n})
        session.commit()
        return n

    return work


async def test_a_free_lock_writes_on_the_loops_thread(db: Database) -> None:
    threads: list[str] = []
    try:
        assert await db.run_write(_insert(1, threads)) == 1
        assert await db.run_write(_insert(2, threads)) == 2
        assert threads == [threading.current_thread().name] * 2
        async with db.engine.connect() as conn:
            assert (await conn.execute(text("SELECT n FROM t ORDER BY n"))).all() == [(1,), (2,)]
    finally:
        await db.dispose()


async def test_a_held_lock_hands_the_write_to_the_worker_without_blocking_the_loop(
    db: Database, tmp_path: Path
) -> None:
    """Another connection holds the write lock for 0.3 s: the write waits for it in the
    worker thread while the loop keeps running, then commits once."""
    holder = sqlite3.connect(tmp_path / "w.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO t (n) VALUES (0)")
    release = asyncio.get_running_loop().call_later(0.3, holder.execute, "COMMIT")
    threads: list[str] = []
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.create_task(ticker())
    try:
        started = time.monotonic()
        assert await db.run_write(_insert(7, threads)) == 7
        waited = time.monotonic() - started
        assert waited >= 0.25
        assert ticks >= 10  # the loop ran while the write waited for the lock
        # The attempt on the loop's thread gave up at BEGIN, before calling the work.
        assert threads == ["plantwatch-write_0"]
        async with db.engine.connect() as conn:
            assert (await conn.execute(text("SELECT n FROM t ORDER BY n"))).all() == [(0,), (7,)]
    finally:
        release.cancel()
        beat.cancel()
        holder.close()
        await db.dispose()
