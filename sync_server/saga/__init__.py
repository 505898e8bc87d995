"""The saga engine: durable, multi-step workflows with retries, breakers and compensation.

Users declare ``Workflow``s of ``Step``s (``definitions``); the pure ``SagaMachine``
(``machine``) decides; the ``SagaRunner`` (``runner``) claims, runs and checkpoints;
``intake`` is how client requests enter; ``outbox`` relays external notices.

Names resolve lazily (PEP 562) so importing the pure ``machine`` does not run anything
else in this package first (``tests/test_layering.py``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sync_server.saga.definitions import (
        DefinitionError,
        Limit,
        PermanentError,
        RetryPolicy,
        Step,
        StepContext,
        Workflow,
        load_workflows,
    )

__all__ = [
    "DefinitionError",
    "Limit",
    "PermanentError",
    "RetryPolicy",
    "Step",
    "StepContext",
    "Workflow",
    "load_workflows",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("sync_server.saga.definitions"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
