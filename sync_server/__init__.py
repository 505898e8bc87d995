"""The Tether sync server: event store, saga engine, sync endpoint, CLI.

Define ``Workflow``s of ``Step``s and serve them with ``create_app``; see SPEC's Server
section and the README's tour.

The names are resolved lazily (PEP 562 ``__getattr__``, as websockets does): importing a
pure core such as ``sync_server.saga.machine`` runs this ``__init__`` first, and it must
not drag in the app and its I/O libraries (Starlette, httpx, prometheus_client).
``tests/test_layering.py`` checks it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.lazy import lazy_exports

if TYPE_CHECKING:
    from sync_server.app import create_app
    from sync_server.saga.definitions import (
        Limit,
        PermanentError,
        RetryPolicy,
        Step,
        StepContext,
        Workflow,
    )

__all__ = [
    "Limit",
    "PermanentError",
    "RetryPolicy",
    "Step",
    "StepContext",
    "Workflow",
    "create_app",
]

_LAZY = {
    "Limit": "sync_server.saga.definitions",
    "PermanentError": "sync_server.saga.definitions",
    "RetryPolicy": "sync_server.saga.definitions",
    "Step": "sync_server.saga.definitions",
    "StepContext": "sync_server.saga.definitions",
    "Workflow": "sync_server.saga.definitions",
    "create_app": "sync_server.app",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
