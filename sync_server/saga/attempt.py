"""The saga runner's step attempts: starting, running and stopping them.

Theory of operation
-------------------
After each commit, ``_sync_tasks`` makes the local tasks match the workflow's state:
attempts the state no longer runs are stopped (their ``StepContext.stop_reason`` says
why), the attempts the machine commanded are launched, and a timer ``tick`` is armed
for the next retry or the workflow's deadline. ``_launch`` builds the step's context
(results of its dependencies, progress reporter, job recorder, the shared HTTP client)
and starts one asyncio task per attempt — none once the runner is stopping, so no
attempt outlives it. ``_attempt`` runs the action under the step's timeout and turns
every outcome — result, timeout, permanent or other error — into one ``Input`` for the
writer; it never raises but ``CancelledError``, which ends the attempt's span and
propagates. Results are checked to be storable JSON within ``MAX_RESULT_BYTES``
(``json_result``), errors become bounded storable text (``describe``). Nothing an
attempt does is written outside a checkpoint, and only while its lease is still held.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from protocol import ValidationError
from protocol.jsontypes import JSON
from protocol.limits import MAX_RESULT_BYTES, check_finite
from sync_server import tracing
from sync_server.saga import spans
from sync_server.saga.checkpoint import Input
from sync_server.saga.definitions import (
    STOP_CANCELLED,
    STOP_INTERRUPTED,
    JobRecorder,
    PermanentError,
    StepContext,
)
from sync_server.saga.inputs import (
    CompensationFailed,
    CompensationSucceeded,
    JobStarted,
    MachineInput,
    StepFailed,
    StepSucceeded,
    Tick,
)
from sync_server.saga.machine import RunCompensation, RunStep
from sync_server.saga.sagastate import Job, attempt_alive, cancel_applied, deadline_of, steps_wire
from sync_server.saga.state import Held, RunnerState
from sync_server.saga.storable import storable_json, storable_text
from sync_server.store.base import WorkflowRecord

__all__ = ["Attempts", "describe", "json_result"]

log = logging.getLogger("tether.saga")


class Attempts(RunnerState):
    """The runner's step attempts (a part of ``SagaRunner``)."""

    def _sync_tasks(
        self, held: Held, record: WorkflowRecord, commands: list[RunStep | RunCompensation]
    ) -> None:
        """Start the commanded attempts; cancel local attempts the state no longer runs."""
        steps = steps_wire(record.state)
        reason = STOP_CANCELLED if cancel_applied(record.state) else STOP_INTERRUPTED
        for (step, compensation), task in list(held.tasks.items()):
            if not attempt_alive(steps.get(step, {}), compensation):
                held.stop((step, compensation), task, reason)
                del held.tasks[(step, compensation)]
        for command in commands:
            self._launch(held, record, command)
        if held.tick is not None:
            held.tick.cancel()
            held.tick = None
        due = record.due_at
        now = self.clock()
        deadline = deadline_of(record.state) if record.status == "running" else None
        if deadline is not None and (due is None or due <= now or deadline < due):
            due = deadline  # the workflow's deadline passes while its attempts run
        if due is not None and due > now:
            # A sibling's retry falls due while other attempts still run: tick then.
            fence = held.fence
            held.tick = asyncio.get_running_loop().call_later(
                due - now, lambda: self._enqueue(Input(Tick(), held.id, fence, tenant=held.tenant))
            )

    def _launch(
        self, held: Held, record: WorkflowRecord, command: RunStep | RunCompensation
    ) -> None:
        if not self._running:
            # Stopping: the lease is released below and the next holder re-runs the
            # attempt (as after a takeover); a task started now would outlive the runner.
            return
        definition = self.checkpointer.workflows[(record.name, record.workflow_version)]
        step = definition.steps[command.step]
        compensation = isinstance(command, RunCompensation)
        steps = steps_wire(record.state)
        results = {dep: steps[dep].get("result") for dep in step.depends_on}
        if compensation:
            results[step.name] = steps[step.name].get("result")
        assert self._http is not None
        ctx = StepContext(
            workflow_id=record.id,
            step=step.name,
            input=record.input,
            results=results,
            attempt=command.attempt,
            idempotency_key=command.idempotency_key,
            http=self._http,
            log=logging.LoggerAdapter(
                logging.getLogger("tether.step"),
                {"workflow_id": record.id, "step": step.name, "attempt": command.attempt},
            ),
            tenant=record.tenant,
            compensating=compensation,
            reporter=self.progress.reporter(
                record.tenant, record.id, held.fence, step.name, command.attempt
            ),
            timeout=step.timeout,
            job_recorder=self._job_recorder(held, step.name, command.attempt),
        )
        key = (step.name, compensation)
        old = held.tasks.pop(key, None)
        if old is not None:
            held.stop(key, old, STOP_INTERRUPTED)
        action = step.compensate if compensation else step.action
        assert action is not None
        self.stats["attempts"] += 1
        if self.metrics is not None:
            self.metrics.step_attempt(record.name, step.name, command.attempt, compensation)
        held.contexts[key] = ctx
        span = None
        if tracing.enabled():
            breaker = self.checkpointer.breaker_seen.get(step.breaker or "", "closed")
            span = spans.start_attempt(
                record, step, command.attempt, compensation, breaker, self.instance_id
            )
        run = self._attempt(held, key, action, ctx, step.timeout, step.breaker, span)
        held.tasks[key] = (
            asyncio.create_task(run)
            if span is None
            else asyncio.create_task(run, context=tracing.span_context(span))
        )

    def _job_recorder(self, held: Held, step: str, attempt: int) -> JobRecorder:
        """``ctx.record_job``: the step's state names the job's source (for the sweep)."""

        def record(source: str, adapter: str) -> None:
            if self._held.get(held.key) is held:
                event = JobStarted(step, attempt, Job(source, adapter))
                self._enqueue(Input(event, held.id, held.fence, tenant=held.tenant))

        return record

    async def _attempt(
        self,
        held: Held,
        key: tuple[str, bool],
        action: Callable[[StepContext], Any],
        ctx: StepContext,
        timeout: float | None,
        breaker: str | None,
        span: Any = None,
    ) -> None:
        """Run one attempt and queue its outcome (never raises but CancelledError)."""
        step, attempt = ctx.step, ctx.attempt
        error: str | None = None
        permanent = timed_out = False
        result: JSON = None
        try:
            async with asyncio.timeout(timeout) as scope:
                result = json_result(await action(ctx))
        except TimeoutError as exc:
            timed_out = scope.expired()
            error = f"timed out after {timeout} s" if timed_out else describe(exc)
        except PermanentError as exc:
            permanent = True
            error = describe(exc)
        except asyncio.CancelledError:
            tracing.end_span(span, error="attempt interrupted (lease lost, cancel or stop)")
            raise
        except Exception as exc:
            error = describe(exc)
            log.debug(
                "attempt %s of %s/%s failed: %s",
                attempt,
                ctx.workflow_id,
                step,
                error,
                extra={"workflow_id": ctx.workflow_id, "step": step, "attempt": attempt},
            )
        finally:
            if held.tasks.get(key) is asyncio.current_task():
                del held.tasks[key]
                held.contexts.pop(key, None)
        tracing.end_span(span, error=error, attributes={"tether.permanent": permanent or None})
        self.progress.finish(held.tenant, ctx.workflow_id, step)
        event: MachineInput
        if ctx.compensating:
            if error is None:
                event = CompensationSucceeded(step, attempt)
            else:
                event = CompensationFailed(step, attempt, error)
        elif error is None:
            event = StepSucceeded(step, attempt, result)
        else:
            event = StepFailed(step, attempt, error, permanent=permanent, timed_out=timed_out)
        if self._held.get(held.key) is held:
            self._enqueue(
                Input(event, ctx.workflow_id, held.fence, tenant=held.tenant, breaker=breaker)
            )


def json_result(result: JSON) -> JSON:
    """The result as plain JSON data whose text every backend can store (U+0000 and lone
    surrogates become U+FFFD: ``sync_server.saga.storable``).

    Raises:
        PermanentError: the result cannot be stored: not JSON-serialisable, over
            ``MAX_RESULT_BYTES`` or holding a NaN/±inf (issue 11) — the step fails
            with that reason instead of bloating every reader's log.
    """
    try:
        try:
            encoded = msgspec.json.encode(result)
        except UnicodeEncodeError:  # a lone surrogate somewhere in a string or key
            encoded = msgspec.json.encode(storable_json(result))
        check_finite(result, "step result")
        if len(encoded) > MAX_RESULT_BYTES:
            raise ValidationError(
                f"step result is {len(encoded)} bytes, over the limit of {MAX_RESULT_BYTES} bytes"
            )
    except ValidationError as exc:
        raise PermanentError(exc.message) from exc
    except (TypeError, ValueError, msgspec.EncodeError) as exc:
        raise PermanentError(f"step result is not JSON-serialisable: {exc}") from exc
    decoded = msgspec.json.decode(encoded)
    return storable_json(decoded) if b"\\u0000" in encoded else decoded


def describe(exc: BaseException) -> str:
    """An attempt's error as storable text (``storable_text``), at most 2,000 characters."""
    try:
        text = str(exc)
    except Exception:  # a user exception whose __str__ itself fails
        text = ""
    name = type(exc).__name__
    return storable_text(f"{name}: {text}"[:2000] if text else name)
