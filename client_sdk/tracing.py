"""OpenTelemetry on the device: the ``submit_workflow`` span whose context travels with
the queued mutation.

Off unless the standard ``OTEL_*`` environment asks for traces
(``protocol.tracecontext.tracing_requested``) or the application installs a tracer
provider with ``install``. Off costs one module-level test per submit: OpenTelemetry is
not even imported.

When on, ``submit_workflow`` starts a span (kind PRODUCER) and its W3C ``traceparent``
is written into the same SQLite row as the mutation, so a submit made offline and pushed
hours later — after a restart of the app even — still joins its trace on the server.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from protocol.tracecontext import TracerSlot, format_traceparent

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

__all__ = ["configure_from_env", "enabled", "install", "start_submit"]

log = logging.getLogger("client_sdk.tracing")

SERVICE_NAME = "tether-client"
"""``service.name`` when ``OTEL_SERVICE_NAME`` does not set one."""


_slot = TracerSlot("tether.client_sdk", SERVICE_NAME)


def enabled() -> bool:
    """True while spans are recorded."""
    return _slot.tracer is not None


def install(provider: TracerProvider | None) -> None:
    """Use ``provider``'s tracer from now on (None: tracing off)."""
    _slot.install(provider)


def configure_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Set tracing up once from the ``OTEL_*`` variables; returns whether it is on
    (``TracerSlot.configure_from_env``)."""
    return _slot.configure_from_env(environ)


def start_submit(name: str, workflow_id: str) -> tuple[Any, str]:
    """Start the ``submit_workflow`` span; returns it and its traceparent.

    Returns ``(None, "")`` when tracing is off. The caller ends the span.
    """
    tracer = _slot.tracer
    if tracer is None:
        return None, ""
    from opentelemetry.trace import SpanKind

    span = tracer.start_span(
        "submit_workflow",
        kind=SpanKind.PRODUCER,
        attributes={"tether.workflow.name": name, "tether.workflow.id": workflow_id},
    )
    context = span.get_span_context()
    traceparent = format_traceparent(context.trace_id, context.span_id, context.trace_flags)
    return span, traceparent
