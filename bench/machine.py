"""Machine facts recorded with every run: CPU, memory, Python, SQLite, PostgreSQL, date."""

from __future__ import annotations

import datetime
import os
import platform
import sqlite3
import sys
from typing import Any

__all__ = ["machine_facts"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


async def _pg_version(dsn: str) -> str | None:
    try:
        import asyncpg

        conn = await asyncpg.connect(dsn, timeout=5)
    except Exception:
        return None
    try:
        value: str = await conn.fetchval("SHOW server_version")
        return value
    finally:
        await conn.close()


async def machine_facts(pg_dsn: str) -> dict[str, Any]:
    """Everything needed to compare a run with another one."""
    try:
        import psutil  # type: ignore[import-untyped,unused-ignore]

        memory = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        memory = None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": memory,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "postgresql": await _pg_version(pg_dsn),
        "packages": {
            name: _package_version(name)
            for name in (
                "uvicorn",
                "websockets",
                "starlette",
                "asyncpg",
                "msgspec",
                "uvloop",
                "dbos",
            )
        },
    }
