"""Shared fixtures: databases (SQLite files and private PostgreSQL schemas), time scale.

``TETHER_PG_DSN`` names the PostgreSQL the tests use (default
``postgresql://127.0.0.1:5432/test``). When it is unreachable, PostgreSQL tests skip —
unless ``TETHER_REQUIRE_PG=1`` (as ``.ci/run`` sets), where they fail instead.
Each test gets its own schema, dropped afterwards, so tests never see each other's data.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_DSN = os.environ.get("TETHER_PG_DSN", "postgresql://127.0.0.1:5432/test")
REQUIRE_PG = os.environ.get("TETHER_REQUIRE_PG") == "1"

_pg_checked: bool | None = None


def _pg_available() -> bool:
    global _pg_checked
    if _pg_checked is None:
        import asyncpg

        async def probe() -> bool:
            try:
                conn = await asyncpg.connect(PG_DSN, timeout=5)
            except Exception:
                return False
            await conn.close()
            return True

        _pg_checked = asyncio.run(probe())
    return _pg_checked


def need_pg() -> None:
    """Skip (or fail, under TETHER_REQUIRE_PG=1) when PostgreSQL is not reachable."""
    if not _pg_available():
        message = f"PostgreSQL not reachable at {PG_DSN}"
        if REQUIRE_PG:
            pytest.fail(message + " and TETHER_REQUIRE_PG=1")
        pytest.skip(message)


def pg_url_with_schema(schema: str) -> str:
    sep = "&" if "?" in PG_DSN else "?"
    return f"{PG_DSN}{sep}schema={schema}"


async def _drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL with a private, fresh schema for this test."""
    need_pg()
    schema = "t_" + uuid.uuid4().hex[:12]
    yield pg_url_with_schema(schema)
    asyncio.run(_drop_schema(schema))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite URL on a fresh file for this test."""
    return f"sqlite:///{tmp_path / 'sync.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each storage-touching test runs on both backends."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sync.db'}"
        return
    need_pg()
    schema = "t_" + uuid.uuid4().hex[:12]
    yield pg_url_with_schema(schema)
    asyncio.run(_drop_schema(schema))


TIME_SCALE = float(os.environ.get("TETHER_TIME_SCALE", "1"))


def scaled(seconds: float) -> float:
    """A deadline scaled by TETHER_TIME_SCALE (slow machines set it above 1)."""
    return seconds * TIME_SCALE


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01, message: str = ""):
    """Poll ``predicate`` (sync or async) until truthy, failing after ``timeout`` seconds.

    This waits on a *condition* with a deadline; it is not a fixed sleep.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(timeout)
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {message or predicate}")
        await asyncio.sleep(interval)
