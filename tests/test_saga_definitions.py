"""Definition-time validation of workflows, steps and retry policies."""

from __future__ import annotations

import pytest

import sync_server.saga as saga
from protocol import UsageError
from sync_server.saga import (
    DefinitionError,
    PermanentError,
    RetryPolicy,
    Step,
    StepContext,
    Workflow,
    load_workflows,
)
from sync_server.saga.backoff import exponential_delay, jittered, no_delay

pytestmark = pytest.mark.timeout(30)


async def act(ctx):
    return None


def test_public_names():
    assert set(saga.__all__) >= {"Workflow", "Step", "RetryPolicy", "StepContext", "PermanentError"}


def test_topological_order_and_dependents():
    wf = Workflow(
        "w",
        [
            Step("c", act, depends_on=["b"]),
            Step("a", act),
            Step("b", act, depends_on="a"),
            Step("d", act, depends_on=["a"]),
        ],
    )
    assert wf.step_names == ("a", "b", "d", "c")
    assert wf.dependents["a"] == ("b", "d")
    assert wf.leaves == ("d", "c")
    assert wf.on_failure == "compensate"
    assert "Workflow('w'" in repr(wf) and "Step('a'" in repr(wf.steps["a"])


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([Step("a", act), Step("a", act)], "duplicate step name 'a'"),
        ([Step("a", act, depends_on=["x"])], "depends on unknown step 'x'"),
        ([Step("a", act, depends_on=["a"])], "depends on itself"),
        (
            [
                Step("a", act, depends_on=["c"]),
                Step("b", act, depends_on=["a"]),
                Step("c", act, depends_on=["b"]),
                Step("d", act, depends_on=["c"]),
            ],
            "dependency cycle among a -> c -> b -> a",
        ),
        ([], "has no steps"),
        (["not a step"], "is not a Step"),
    ],
)
def test_invalid_dags(steps, message):
    with pytest.raises(DefinitionError, match=message):
        Workflow("w", steps)


def test_invalid_arguments():
    with pytest.raises(DefinitionError):
        Workflow("", [Step("a", act)])
    with pytest.raises(DefinitionError, match="on_failure"):
        Workflow("w", [Step("a", act)], on_failure="explode")  # type: ignore[arg-type]
    with pytest.raises(DefinitionError):
        Step("", act)
    with pytest.raises(DefinitionError):
        Step("a:b", act)
    with pytest.raises(DefinitionError):
        Step("a", "nope")  # type: ignore[arg-type]
    with pytest.raises(DefinitionError):
        Step("a", act, compensate="nope")  # type: ignore[arg-type]
    with pytest.raises(DefinitionError):
        Step("a", act, timeout=0)
    for bad in ({"max_attempts": 0}, {"base_delay": -1}, {"multiplier": 0.5}):
        with pytest.raises(DefinitionError):
            RetryPolicy(**bad)
    assert issubclass(DefinitionError, UsageError) and issubclass(DefinitionError, ValueError)


def test_step_defaults():
    step = Step("a", act)
    assert step.retry == RetryPolicy() and step.compensate_retry is step.retry
    assert step.timeout is None and step.breaker is None


def test_permanent_error_is_not_retryable():
    assert PermanentError("no").retryable is False
    assert str(PermanentError("no")) == "no"


async def test_step_context_progress_clamps():
    seen = []
    ctx = StepContext(
        workflow_id="w",
        step="s",
        input={},
        results={},
        attempt=1,
        idempotency_key="w:s",
        http=None,  # type: ignore[arg-type]
        log=None,  # type: ignore[arg-type]
        reporter=lambda f, m: seen.append((f, m)),
    )
    await ctx.progress(2.0, "x")
    await ctx.progress(-1)
    assert seen == [(1.0, "x"), (0.0, None)]
    bare = StepContext("w", "s", {}, {}, 1, "w:s", None, None)  # type: ignore[arg-type]
    await bare.progress(0.5)  # no reporter: ignored


def test_load_workflows():
    loaded = load_workflows(f"{__name__}:EXAMPLE")
    assert [w.name for w in loaded] == ["example"]
    assert load_workflows(f"{__name__}:EXAMPLES") == EXAMPLES
    for bad in (
        "nocolon",
        "no_such_module_x:y",
        f"{__name__}:missing",
        f"{__name__}:NOT_WORKFLOWS",
    ):
        with pytest.raises(DefinitionError):
            load_workflows(bad)


def test_backoff():
    policy = RetryPolicy(base_delay=1, max_delay=5, multiplier=2, jitter=False)
    assert [exponential_delay(policy, n, None) for n in (1, 2, 3, 4, 100)] == [1, 2, 4, 5, 5]

    class Top:
        def uniform(self, a, b):
            return b

    jitter = RetryPolicy(base_delay=1, max_delay=5, multiplier=2, jitter=True)
    assert exponential_delay(jitter, 3, Top()) == 4
    delay = jittered()
    assert all(0 <= delay(jitter, n) <= 5 for n in range(1, 20))
    assert no_delay(jitter, 3) == 0.0


EXAMPLE = Workflow("example", [Step("a", act)])
EXAMPLES = [EXAMPLE]
NOT_WORKFLOWS = [1, 2]
