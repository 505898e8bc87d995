"""The Tether sync server: event store, saga engine, sync endpoint, CLI.

Define ``Workflow``s of ``Step``s and serve them with ``create_app``; see SPEC's Server
section and the README's tour.
"""

from sync_server.app import create_app
from sync_server.saga import Limit, PermanentError, RetryPolicy, Step, StepContext, Workflow

__all__ = [
    "Limit",
    "PermanentError",
    "RetryPolicy",
    "Step",
    "StepContext",
    "Workflow",
    "create_app",
]
