"""OpenTelemetry on the server: one trace from the device's submit to the job service.

Theory of operation
-------------------
Off unless the ``OTEL_*`` environment asks for traces (``configure_from_env``) or a test
or embedding application calls ``install``. Every entry point below first reads one
module global and returns at once when it is None: tracing off costs no allocation and
OpenTelemetry is not imported.

The trace of a workflow, and who writes each span::

    submit_workflow                        client SDK (context stored with the mutation)
    └─ tether.push submit_workflow         push transaction; its traceparent is kept in
       │                                   the workflow's state["trace"]
       ├─ tether.step <step>               each attempt, on whichever instance runs it
       │  └─ (job service spans)           ctx.http sends ``traceparent``
       ├─ tether.compensate <step>
       ├─ tether.dlq <step>                a dead letter was added
       ├─ tether.outbox deliver            the completion notice
       └─ tether.workflow <name>           created → ended or parked, written at the end

Because the parent of everything after the push is the *persisted* traceparent, an
instance that takes a workflow over after a SIGKILL continues the same trace, and so
does a submit pushed hours after it was made offline. Events carry ``trace_id`` (see
``sync_server.snapshots.append_event``).
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx

from protocol.tracecontext import TracerSlot, format_traceparent, valid_traceparent

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

__all__ = [
    "configure_from_env",
    "enabled",
    "end_span",
    "inject_traceparent",
    "install",
    "record_span",
    "span_context",
    "start_span",
    "traceparent",
]

SERVICE_NAME = "tether-sync-server"
"""``service.name`` when ``OTEL_SERVICE_NAME`` does not set one."""

_slot = TracerSlot("tether.sync_server", SERVICE_NAME)


def enabled() -> bool:
    """True while spans are recorded."""
    return _slot.tracer is not None


def install(provider: TracerProvider | None) -> None:
    """Use ``provider``'s tracer from now on (None: tracing off)."""
    _slot.install(provider)


def configure_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Set tracing up once from the ``OTEL_*`` variables; returns whether it is on."""
    return _slot.configure_from_env(environ)


def flush(timeout_millis: int = 5000) -> None:
    """Export the spans still buffered (at shutdown)."""
    provider = _slot.provider
    flush_spans = getattr(provider, "force_flush", None)
    if flush_spans is not None:
        flush_spans(timeout_millis)


def _parent(traceparent: str | None) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if not traceparent or not valid_traceparent(traceparent):
        return None
    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def start_span(
    name: str,
    parent: str | None,
    attributes: Mapping[str, Any],
    *,
    kind: str = "internal",
    start: float | None = None,
) -> Span | None:
    """Start a span under the traceparent ``parent`` (a new trace if None or invalid).

    ``kind`` is ``internal``, ``server``, ``client``, ``producer`` or ``consumer``;
    ``start`` a unix time (default now). Returns None when tracing is off.
    """
    tracer = _slot.tracer
    if tracer is None:
        return None
    from opentelemetry.trace import SpanKind

    return tracer.start_span(
        name,
        context=_parent(parent),
        kind=SpanKind[kind.upper()],
        attributes={k: v for k, v in attributes.items() if v is not None},
        start_time=None if start is None else int(start * 1e9),
    )


def end_span(
    span: Span | None,
    *,
    error: str | None = None,
    end: float | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> None:
    """End ``span`` (no-op for None) with more ``attributes``, marking it as an error if
    ``error`` is given."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    for key, value in (attributes or {}).items():
        if value is not None:
            span.set_attribute(key, value)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error[:512]))
    span.end(end_time=None if end is None else int(end * 1e9))


def record_span(
    name: str,
    parent: str | None,
    attributes: Mapping[str, Any],
    *,
    start: float | None = None,
    end: float | None = None,
    error: str | None = None,
) -> None:
    """Write a span that already happened (a dead letter, a whole workflow)."""
    if _slot.tracer is None:
        return
    end_span(start_span(name, parent, attributes, start=start), error=error, end=end)


def traceparent(span: Span | None) -> str:
    """The W3C traceparent of ``span`` ("" for None)."""
    if span is None:
        return ""
    context = span.get_span_context()
    return format_traceparent(context.trace_id, context.span_id, context.trace_flags)


def span_context(span: Span) -> contextvars.Context:
    """A copy of the current context in which ``span`` is the active span; a task
    created with it (``asyncio.create_task(..., context=...)``) runs inside the span."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    copied = contextvars.copy_context()
    copied.run(otel_context.attach, trace.set_span_in_context(span))
    return copied


async def inject_traceparent(request: httpx.Request) -> None:
    """httpx request hook: send the active span's ``traceparent`` (W3C) downstream."""
    if _slot.tracer is None or "traceparent" in request.headers:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.get_span_context().is_valid:
        request.headers["traceparent"] = traceparent(span)


def start_push_spans(mutations: list[Any], client_id: str) -> dict[int, Span]:
    """One span per pushed ``submit_workflow``, child of the client's span if it sent
    one (``Mutation.traceparent``); the caller ends them with ``end_push_spans``."""
    spans: dict[int, Span] = {}
    for mutation in mutations:
        if mutation.name != "submit_workflow":
            continue
        args = mutation.args if isinstance(mutation.args, dict) else {}
        span = start_span(
            "tether.push submit_workflow",
            mutation.traceparent or None,
            {
                "tether.client_id": client_id,
                "tether.mutation_id": mutation.id,
                "tether.workflow.id": str(args.get("workflow_id", ""))[:64],
                "tether.workflow.name": str(args.get("name", ""))[:128],
            },
            kind="consumer",
        )
        if span is not None:
            spans[mutation.id] = span
    return spans


def end_push_spans(spans: Mapping[int, Span], results: list[Any]) -> None:
    """End the push spans with each mutation's outcome (error if none was recorded)."""
    outcomes = {result.id: result for result in results}
    for mutation_id, span in spans.items():
        result = outcomes.get(mutation_id)
        if result is None:
            end_span(span, error="the push transaction failed")
            continue
        error = result.error if result.status == "rejected" else None
        end_span(span, error=error, attributes={"tether.mutation.status": str(result.status)})


def current_trace_id() -> str | None:
    """The trace id (32 hex digits) of the active span, if tracing is on and one is."""
    if _slot.tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None
