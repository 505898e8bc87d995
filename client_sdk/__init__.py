"""Tether client SDK: a durable offline queue, optimistic views and background sync.

The public API is this ``__all__`` (SPEC, Client SDK); everything else is internal.

Names resolve lazily (PEP 562, as websockets does) so importing a pure core such as
``client_sdk.session`` does not load the client and its I/O libraries (SQLite, httpx,
websockets); ``tests/test_layering.py`` checks it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.lazy import lazy_exports

if TYPE_CHECKING:
    from client_sdk.client import SyncClient
    from client_sdk.errors import ClientClosed, LocalStoreError, SyncStopped
    from client_sdk.views import StepView, WorkflowHandle, WorkflowView
    from protocol.errors import (
        Forbidden,
        ProtocolError,
        RateLimited,
        TetherError,
        Unauthorized,
        ValidationError,
    )

__all__ = [
    "ClientClosed",
    "Forbidden",
    "LocalStoreError",
    "ProtocolError",
    "RateLimited",
    "StepView",
    "SyncClient",
    "SyncStopped",
    "TetherError",
    "Unauthorized",
    "ValidationError",
    "WorkflowHandle",
    "WorkflowView",
]

_LAZY = {
    "SyncClient": "client_sdk.client",
    "ClientClosed": "client_sdk.errors",
    "LocalStoreError": "client_sdk.errors",
    "SyncStopped": "client_sdk.errors",
    "StepView": "client_sdk.views",
    "WorkflowHandle": "client_sdk.views",
    "WorkflowView": "client_sdk.views",
    "Forbidden": "protocol.errors",
    "ProtocolError": "protocol.errors",
    "RateLimited": "protocol.errors",
    "TetherError": "protocol.errors",
    "Unauthorized": "protocol.errors",
    "ValidationError": "protocol.errors",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
