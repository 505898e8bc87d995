"""Visible layering (ARCHITECTURE.md, "Layers"): checked in fresh interpreters.

* Each pure core imports no I/O library and no asyncio (STYLE: "Decide in pure code, act
  in shells"): a fresh ``sys.executable`` imports the module alone and reports which of
  the forbidden top-level packages ended up in ``sys.modules``. A package ``__init__``
  that imports the app (issue 12) is exactly what this catches.
* The server does not import the demo package: ``sync_server.app`` and the CLI as
  ``serve`` uses it stay free of the ``examples`` package (the demo, its pipeline
  and its job service); only ``sync-server demo`` and ``serve --workflows demo`` load it.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# I/O libraries (and asyncio: a core is fed inputs and drained, it never awaits).
FORBIDDEN = frozenset(
    {
        "aiosqlite",
        "asyncio",
        "asyncpg",
        "h11",
        "httpx",
        "prometheus_client",
        "psycopg",
        "psycopg2",
        "sqlite3",
        "_sqlite3",
        "starlette",
        "uvicorn",
        "uvloop",
        "websockets",
    }
)

# ARCHITECTURE.md's "Wire" and "Pure cores" rows, by module name.
PURE_CORES = [
    "protocol",
    *sorted(f"protocol.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "protocol")])),
    "client_sdk.session",
    "client_sdk.views",
    "client_sdk.backoff",
    "sync_server.session",
    "sync_server.saga.machine",
    "sync_server.saga.transitions",
    "sync_server.saga.sagastate",
    "sync_server.saga.inputs",
    "sync_server.saga.planner",
    "sync_server.saga.compensation",
    "sync_server.saga.decide",
    "sync_server.saga.backoff",
    "sync_server.saga.breaker",
    "sync_server.saga.definitions",
    "sync_server.reconcile.rules",
    "sync_server.slo",
    "sync_server.adapters.keyed",
    "sync_server.adapters.emp_seen",
]


def _modules_after(code: str) -> set[str]:
    """``sys.modules`` of a fresh interpreter after it ran ``code``."""
    code += "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.splitlines()[-1]))


@pytest.mark.parametrize("module", PURE_CORES)
def test_pure_core_imports_no_io(module: str) -> None:
    loaded = _modules_after(f"import importlib\nimportlib.import_module({module!r})")
    top_level = {name.split(".")[0] for name in loaded}
    assert not top_level & FORBIDDEN, f"{module} loads {sorted(top_level & FORBIDDEN)}"


SERVER_IMPORTS = {
    "the app": "import sync_server.app",
    "the CLI as serve uses it": (
        "from sync_server import cli\n"
        "argv = ['serve', '--workflows', 'tests.sync_helpers:NOOP']\n"
        "args = cli.build_parser().parse_args(argv)\n"
        "cli.load_workflows(args.workflows)\n"
        "from sync_server.cli_serve import load_sources\n"
        "load_sources(args.sources, args.job_step, default=False)\n"
    ),
}


@pytest.mark.parametrize("what", sorted(SERVER_IMPORTS))
def test_server_does_not_import_the_demo_package(what: str) -> None:
    loaded = _modules_after(SERVER_IMPORTS[what])
    assert not {name for name in loaded if name.split(".")[0] == "examples"}, what


def test_the_demo_is_loaded_only_when_asked_for() -> None:
    from sync_server.cli_serve import load_workflows

    assert [w.name for w in load_workflows("demo")] == ["generate_image"]
