"""The saga engine: durable, multi-step workflows with retries, breakers and compensation.

Users declare ``Workflow``s of ``Step``s (``definitions``); the pure ``SagaMachine``
(``machine``) decides; the ``SagaRunner`` (``runner``) claims, runs and checkpoints;
``intake`` is how client requests enter; ``outbox`` relays external notices.
"""

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
