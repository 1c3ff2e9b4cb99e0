"""Builds the FastAPI app from the domain routers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from plantwatch import __version__
from plantwatch.alerts.routes import router as alerts_router
from plantwatch.app import Container
from plantwatch.assets.routes import router as assets_router
from plantwatch.connectors.mqtt import mqtt_health
from plantwatch.core import migrate
from plantwatch.core.config import Settings
from plantwatch.core.errors import install_error_handlers
from plantwatch.core.http import RequestContextMiddleware
from plantwatch.core.jsonutil import dumps
from plantwatch.notify.routes import router as notify_router
from plantwatch.rules.routes import router as rules_router
from plantwatch.stream.routes import router as stream_router
from plantwatch.telemetry.kpi_routes import router as kpi_router
from plantwatch.telemetry.routes import router as telemetry_router
from plantwatch.telemetry.transfer_routes import router as transfer_router
from plantwatch.tenancy.routes import router as tenancy_router
from plantwatch.web.routes import install_web
from plantwatch.web.views.dashboard import warm_energy

DOMAIN_ROUTERS = [
    tenancy_router,
    assets_router,
    telemetry_router,
    transfer_router,
    rules_router,
    alerts_router,
    notify_router,
    kpi_router,
    stream_router,
]


def create_app(settings: Settings | None = None, container: Container | None = None) -> FastAPI:
    """The API app. Give a `container` to share backends with other roles in one process."""
    owns_container = container is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal container
        if container is None:
            container = Container.build(settings or Settings())
        app.state.container = container
        await container.start()
        app.state.ready = True
        warming = asyncio.create_task(warm_energy(container.db), name="web:warm-energy")
        try:
            yield
        finally:
            app.state.ready = False
            warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warming
            if owns_container:
                await container.close()

    app = FastAPI(
        title="plantwatch",
        version=__version__,
        description="Industrial IoT monitoring and predictive maintenance.",
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/openapi.json",
        lifespan=lifespan,
    )
    app.state.ready = False
    app.state.schema_current = False
    install_error_handlers(app)
    cors_origins = (settings.cors_origins if settings else []) or (
        container.settings.cors_origins if container else []
    )
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_credentials=True,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "X-Request-ID",
                "X-Device-Key",
                "Last-Event-ID",
            ],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestContextMiddleware)

    for router in DOMAIN_ROUTERS:
        app.include_router(router)
    install_web(app)

    @app.get("/health", tags=["system"], summary="Liveness and each dependency's state")
    async def health(request: Request) -> Response:
        c: Container = request.app.state.container
        checks: dict[str, dict[str, Any]] = {}
        started = time.perf_counter()
        try:
            await c.db.ping()
            checks["database"] = {
                "status": "ok",
                "backend": c.db.dialect,
                "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            }
        except Exception as exc:
            checks["database"] = {"status": "error", "backend": c.db.dialect, "error": str(exc)}
        mqtt = mqtt_health()
        if mqtt is not None:  # the `ingest` role runs in this process (`plantwatch up`)
            checks["mqtt"] = mqtt
        ok = all(check["status"] == "ok" for check in checks.values())
        body = {"status": "ok" if ok else "error", "version": __version__, "checks": checks}
        return Response(dumps(body), status_code=200 if ok else 503, media_type="application/json")

    @app.get("/ready", tags=["system"], summary="Ready to serve: started and schema at head")
    async def ready(request: Request) -> Response:
        state = request.app.state
        status = "starting"
        if state.ready:
            if not state.schema_current:
                c: Container = state.container
                try:
                    revision = await migrate.current_revision(c.db.engine)
                    state.schema_current = revision == migrate.head_revision()
                except Exception:
                    state.schema_current = False
            status = "ready" if state.schema_current else "migration_pending"
        return Response(
            dumps({"status": status}),
            status_code=200 if status == "ready" else 503,
            media_type="application/json",
        )

    @app.get("/metrics", tags=["system"], summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
