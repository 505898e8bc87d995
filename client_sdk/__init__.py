"""Tether client SDK: a durable offline queue, optimistic views and background sync.

The public API is this ``__all__`` (SPEC, Client SDK); everything else is internal.
"""

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
