"""The scheduler role: its jobs run, one leader per deployment, orphan cleanup."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
from sqlalchemy import text

from plantwatch.app import Container
from plantwatch.scheduler import Job, SchedulerRole, jobs_for, run_job
from plantwatch.telemetry.service import purge_orphans
from tests.telemetry.conftest import KeyedDevice


async def _count(container: Container, table: str) -> int:
    async with container.db.engine.connect() as conn:
        return int((await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar() or 0)


async def test_deleting_a_parameter_purges_its_data(
    client: httpx.AsyncClient, container: Container, device_a: KeyedDevice
) -> None:
    sent = await client.post(
        "/api/v1/ingest", json={"values": {"temp": 20.0, "rpm": 900}}, headers=device_a.headers
    )
    assert sent.status_code == 200
    params = await client.get(
        f"/api/v1/devices/{device_a.id}/parameters", headers=device_a.owner.headers
    )
    temp = next(p for p in params.json()["data"] if p["key"] == "temp")
    deleted = await client.delete(
        f"/api/v1/devices/{device_a.id}/parameters/{temp['id']}", headers=device_a.owner.headers
    )
    assert deleted.status_code == 204
    assert await purge_orphans(container.db.engine) == 1
    for table in ("telemetry_raw", "telemetry_1m", "telemetry_1h", "series_latest"):
        assert await _count(container, table) == 1, table  # rpm stays
    assert await purge_orphans(container.db.engine) == 0


async def test_every_job_runs_and_a_failing_job_is_not_fatal(container: Container) -> None:
    for job in jobs_for(container):
        await run_job(job)  # on an empty plant each is a no-op, and none raises

    async def broken() -> None:
        raise RuntimeError("boom")

    assert await run_job(Job("broken", 1, broken)) is None


async def test_only_one_scheduler_leads(container: Container) -> None:
    def role(c: Container) -> SchedulerRole:
        return SchedulerRole(SimpleNamespace(container=c), standby_poll_s=0.05)  # type: ignore[arg-type]

    other = Container.build(container.settings)
    first, second = role(container), role(other)
    try:
        await first.start()
        await asyncio.sleep(0.1)
        await second.start()
        await asyncio.sleep(0.2)
        assert first.is_leader
        if container.db.dialect == "postgresql":
            assert not second.is_leader  # a hot standby while the leader holds the lock
            first.request_stop()
            await first.wait()
            for _ in range(100):
                if second.is_leader:
                    break
                await asyncio.sleep(0.05)
            assert second.is_leader
    finally:
        for r in (first, second):
            r.request_stop()
            await r.wait()
        await other.close()


async def test_a_new_parameter_never_inherits_a_deleted_ones_data(
    client: httpx.AsyncClient, container: Container, device_a: KeyedDevice
) -> None:
    await client.post("/api/v1/ingest", json={"values": {"old": 1.0}}, headers=device_a.headers)
    url = f"/api/v1/devices/{device_a.id}/parameters"
    [old] = (await client.get(url, headers=device_a.owner.headers)).json()["data"]
    deleted = await client.delete(f"{url}/{old['id']}", headers=device_a.owner.headers)
    assert deleted.status_code == 204
    created = await client.post(url, json={"key": "new"}, headers=device_a.owner.headers)
    assert created.status_code == 201, created.text
    assert created.json()["data"]["id"] != old["id"]  # ids are never reused (series ids)
