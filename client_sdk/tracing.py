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
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from protocol.tracecontext import tracing_requested

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer, TracerProvider

__all__ = ["configure_from_env", "enabled", "install", "start_submit"]

log = logging.getLogger("client_sdk.tracing")

SERVICE_NAME = "tether-client"
"""``service.name`` when ``OTEL_SERVICE_NAME`` does not set one."""

_tracer: Tracer | None = None
_configured = False
_lock = threading.Lock()


def enabled() -> bool:
    """True while spans are recorded."""
    return _tracer is not None


def install(provider: TracerProvider | None) -> None:
    """Use ``provider``'s tracer from now on (None: tracing off)."""
    global _tracer
    if provider is None:
        _tracer = None
        return
    _tracer = provider.get_tracer("tether.client_sdk")


def configure_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Set tracing up once from the ``OTEL_*`` variables; returns whether it is on.

    An application that already set a global OpenTelemetry tracer provider keeps it
    (its spans and ours then share one pipeline); otherwise an SDK provider with a
    batching OTLP/HTTP exporter (configured by ``OTEL_EXPORTER_OTLP_*``) is installed.
    """
    global _configured
    with _lock:
        if _configured or _tracer is not None:
            return enabled()
        _configured = True
        if not tracing_requested(os.environ if environ is None else environ):
            return False
        install(sdk_provider(SERVICE_NAME))
        return True


def sdk_provider(default_service: str) -> TracerProvider:
    """The global provider if the application set one, else a new SDK provider."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    current = trace.get_tracer_provider()
    if isinstance(current, SdkProvider):
        return current
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": default_service}
    provider = SdkProvider(resource=Resource.create(attributes))
    exporter: Any
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def start_submit(name: str, workflow_id: str) -> tuple[Any, str]:
    """Start the ``submit_workflow`` span; returns it and its traceparent.

    Returns ``(None, "")`` when tracing is off. The caller ends the span.
    """
    tracer = _tracer
    if tracer is None:
        return None, ""
    from opentelemetry.trace import SpanKind

    span = tracer.start_span(
        "submit_workflow",
        kind=SpanKind.PRODUCER,
        attributes={"tether.workflow.name": name, "tether.workflow.id": workflow_id},
    )
    context = span.get_span_context()
    traceparent = (
        f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
    )
    return span, traceparent
