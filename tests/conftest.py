"""Shared fixtures: a migrated database per test (SQLite always, PostgreSQL when
PLANTWATCH_TEST_DATABASE_URL is set), the app, an HTTP client, and logged-in
users of two factories so every test can check tenant isolation.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher
from sqlalchemy import text
from sqlalchemy.engine import make_url

from plantwatch.api import create_app
from plantwatch.app import Container
from plantwatch.core import migrate
from plantwatch.core.config import Settings
from plantwatch.core.db import Base, make_engine
from plantwatch.tenancy import service as tenancy_service
from plantwatch.tenancy import tokens
from plantwatch.tenancy.models import Factory
from plantwatch.tenancy.schemas import FactoryCreate

PG_URL = os.environ.get("PLANTWATCH_TEST_DATABASE_URL")
PASSWORD = "correct-horse-battery"

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session", autouse=True)
def _fast_password_hashing() -> Iterator[None]:
    # Production argon2id parameters cost ~50 ms a hash; tests hash hundreds of times.
    original = tokens._hasher
    tokens._hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    yield
    tokens._hasher = original


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    asyncio.run(migrate.upgrade(f"sqlite+aiosqlite:///{path}"))
    return path


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A database of our own on the test server, migrated once, dropped at the end."""
    if not PG_URL:
        pytest.skip("PLANTWATCH_TEST_DATABASE_URL not set")
    name = f"plantwatch_test_{uuid.uuid4().hex[:8]}"
    admin_url = make_url(PG_URL)

    async def run(sql: str) -> None:
        engine = make_engine(
            admin_url.render_as_string(hide_password=False), isolation_level="AUTOCOMMIT"
        )
        async with engine.connect() as conn:
            await conn.execute(text(sql))
        await engine.dispose()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    asyncio.run(migrate.upgrade(url))
    yield url
    asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _truncate_all(url: str) -> None:
    engine = make_engine(url)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    await engine.dispose()


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database for this test."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "plantwatch.db"
        shutil.copy(template, path)
        return f"sqlite+aiosqlite:///{path}"
    url: str = request.getfixturevalue("postgres_database")
    asyncio.run(_truncate_all(url))
    return url


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=database_url)


@pytest.fixture
async def container(settings: Settings) -> AsyncIterator[Container]:
    c = Container.build(settings)
    yield c
    await c.close()


@pytest.fixture
async def app(container: Container) -> AsyncIterator[Any]:
    application = create_app(container.settings, container=container)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@dataclass
class LoggedIn:
    """A user of one factory with a live session."""

    user_id: int
    factory_id: int
    factory_slug: str
    email: str
    role: str
    access_token: str
    refresh_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


MakeFactory = Callable[..., Awaitable[Factory]]
LoginAs = Callable[..., Awaitable[LoggedIn]]


@pytest.fixture
def make_factory(container: Container) -> MakeFactory:
    async def make(slug: str, name: str | None = None, timezone: str = "UTC") -> Factory:
        async with container.db.session() as session:
            factory = await tenancy_service.create_factory(
                session, FactoryCreate(name=name or slug.title(), slug=slug, timezone=timezone)
            )
            await session.commit()
            return factory

    return make


@pytest.fixture
def login_as(container: Container, client: httpx.AsyncClient) -> LoginAs:
    """Create a user with `role` in `factory` and log in through the API."""

    async def login(
        factory: Factory,
        role: str = "super_admin",
        email: str | None = None,
        grants: list[str] | None = None,
    ) -> LoggedIn:
        email = email or f"{role}.{uuid.uuid4().hex[:6]}@{factory.slug}.example"
        async with container.db.session() as session:
            user = await tenancy_service.add_user(
                session, factory.id, email=email, role=role, password=PASSWORD, grants=grants
            )
            await session.commit()
        response = await client.post(
            "/api/v1/auth/login",
            json={"factory_slug": factory.slug, "email": email, "password": PASSWORD},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        return LoggedIn(
            user_id=user.id,
            factory_id=factory.id,
            factory_slug=factory.slug,
            email=email,
            role=role,
            access_token=body["access_token"],
            refresh_token=body["refresh_token"],
        )

    return login


@pytest.fixture
async def factory_a(make_factory: MakeFactory) -> Factory:
    return await make_factory("acme", "Acme Precision")


@pytest.fixture
async def factory_b(make_factory: MakeFactory) -> Factory:
    return await make_factory("globex", "Globex Plastics")


@pytest.fixture
async def admin_a(login_as: LoginAs, factory_a: Factory) -> LoggedIn:
    return await login_as(factory_a, "super_admin")


@pytest.fixture
async def admin_b(login_as: LoginAs, factory_b: Factory) -> LoggedIn:
    return await login_as(factory_b, "super_admin")


def assert_problem(
    response: httpx.Response, status: int, code: str | None = None
) -> dict[str, Any]:
    """The response is RFC 9457 problem+json with this status (and stable code)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    if code is not None:
        assert body["code"] == code, body
    return body
