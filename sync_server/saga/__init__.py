"""The saga engine: durable, multi-step workflows with retries, breakers and compensation.

Users declare ``Workflow``s of ``Step``s (``definitions``); the pure ``SagaMachine``
(``machine``, on ``planner`` and ``compensation``) decides from typed, frozen state
(``sagastate``, the one codec of the ``workflows.state`` JSON) and typed inputs
(``inputs``), through one transition table of moves and their effects
(``transitions``); the ``SagaRunner`` (``runner``) claims, runs and checkpoints,
carrying the effects out; ``intake`` is how client requests enter; ``outbox`` relays
external notices.

Names resolve lazily (PEP 562) so importing the pure ``machine`` does not run anything
else in this package first (``tests/test_layering.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(
    __name__, dict.fromkeys(__all__, "sync_server.saga.definitions")
)
