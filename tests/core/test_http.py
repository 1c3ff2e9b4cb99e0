"""API conventions every endpoint shares: request ids, problem+json, headers,
health, readiness, metrics, OpenAPI, CORS."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from plantwatch.api import create_app
from plantwatch.app import Container
from plantwatch.core.config import Settings
from tests.conftest import LoggedIn, assert_problem


async def test_request_id_is_echoed_and_generated(client: httpx.AsyncClient) -> None:
    given = await client.get("/health", headers={"X-Request-ID": "plc-7.job:42"})
    assert given.headers["x-request-id"] == "plc-7.job:42"
    generated = await client.get("/health")
    assert len(generated.headers["x-request-id"]) == 32
    # A header that could inject into logs is replaced, not trusted.
    hostile = await client.get("/health", headers={"X-Request-ID": "a b\tc" + "x" * 200})
    assert hostile.headers["x-request-id"] != "a b\tc" + "x" * 200
    assert " " not in hostile.headers["x-request-id"]


async def test_problem_json_carries_code_and_request_id(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/no-such-thing", headers={"X-Request-ID": "abc123"})
    body = assert_problem(response, 404, "not_found")
    assert body["request_id"] == "abc123"
    assert body["type"] == "urn:plantwatch:problem:not_found"
    assert body["instance"] == "/api/v1/no-such-thing"
    wrong_method = await client.delete("/api/v1/auth/login")
    assert_problem(wrong_method, 405, "method_not_allowed")


async def test_validation_errors_name_the_field_path(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/auth/login",
        json={"factory_slug": "acme", "email": "a@b.c", "password": "x" * 300, "extra": 1},
    )
    body = assert_problem(response, 422, "validation_error")
    paths = {e["path"] for e in body["errors"]}
    assert {"body.password", "body.extra"} <= paths


async def test_malformed_json_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/auth/login", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_problem(response, 422, "validation_error")


async def test_security_headers_on_every_response(client: httpx.AsyncClient) -> None:
    for path in ("/health", "/api/v1/nope"):
        response = await client.get(path)
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


async def test_health_checks_the_database(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"]["status"] == "ok"
    assert body["checks"]["database"]["backend"] in {"sqlite", "postgresql"}


async def test_ready_once_started_and_migrated(client: httpx.AsyncClient) -> None:
    response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


@pytest.fixture
async def unmigrated_client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        data_dir=tmp_path / "d", database_url=f"sqlite+aiosqlite:///{tmp_path}/empty.db"
    )
    container = Container.build(settings)
    app = create_app(settings, container=container)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client
    await container.close()


async def test_ready_refuses_when_schema_is_behind(unmigrated_client: httpx.AsyncClient) -> None:
    response = await unmigrated_client.get("/ready")
    assert response.status_code == 503
    assert response.json()["status"] == "migration_pending"


async def test_health_is_503_when_database_is_down(tmp_path: Path) -> None:
    missing_dir = tmp_path / "gone" / "x.db"  # parent doesn't exist: SQLite can't open it
    settings = Settings(data_dir=tmp_path / "d", database_url=f"sqlite+aiosqlite:///{missing_dir}")
    container = Container.build(settings)
    app = create_app(settings, container=container)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/health")
    await container.close()
    assert response.status_code == 503
    assert response.json()["checks"]["database"]["status"] == "error"


async def test_metrics_count_requests_by_route_template(
    client: httpx.AsyncClient, admin_a: LoggedIn
) -> None:
    await client.get("/api/v1/auth/me", headers=admin_a.headers)
    text = (await client.get("/metrics")).text
    assert (
        'plantwatch_http_requests_total{method="GET",route="/api/v1/auth/me",status="200"}' in text
    )
    assert "plantwatch_http_request_duration_seconds_bucket" in text


async def test_openapi_lists_the_api(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/api/openapi.json")).json()
    assert "/api/v1/auth/login" in spec["paths"]
    docs = await client.get("/api/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


async def test_cors_allows_only_configured_origins(tmp_path: Path, database_url: str) -> None:
    settings = Settings(
        data_dir=tmp_path / "d",
        database_url=database_url,
        cors_origins=["https://hmi.plant.example"],
    )
    container = Container.build(settings)
    app = create_app(settings, container=container)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            allowed = await client.options(
                "/api/v1/auth/login",
                headers={
                    "Origin": "https://hmi.plant.example",
                    "Access-Control-Request-Method": "POST",
                },
            )
            denied = await client.options(
                "/api/v1/auth/login",
                headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
            )
    await container.close()
    assert allowed.headers["access-control-allow-origin"] == "https://hmi.plant.example"
    assert "access-control-allow-origin" not in denied.headers


async def test_access_log_is_json_with_request_id(
    client: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    from plantwatch.core.logging import configure_logging

    configure_logging("info", "json")
    await client.get("/health", headers={"X-Request-ID": "trace-me-1"})
    lines = [
        json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")
    ]
    request_lines = [line for line in lines if line.get("event") == "request"]
    assert any(
        line["request_id"] == "trace-me-1" and line["route"] == "/health" and line["status"] == 200
        for line in request_lines
    )
