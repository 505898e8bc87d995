"""W3C Trace Context on the wire, when OpenTelemetry tracing is asked for, and the tracer
slot the SDK and the server each keep (``TracerSlot``). OpenTelemetry is imported only
once tracing is configured on.

A ``traceparent`` (W3C Trace Context, level 1) is ``00-<trace id>-<parent id>-<flags>``:
32 and 16 lower-case hex digits, neither all zeros, and two hex digits of flags. The SDK
stores the one of its ``submit_workflow`` span with the queued mutation and sends it as
``Mutation.traceparent``; the server keeps the one of its push span with the workflow.
A value that is not a valid traceparent is treated as absent (a new trace starts), never
as an error: tracing must not make a request fail.

Tracing is *off* unless the standard OpenTelemetry environment asks for it
(``tracing_requested``): an OTLP endpoint, or an explicit ``OTEL_TRACES_EXPORTER``.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer, TracerProvider

__all__ = [
    "TRACEPARENT_LENGTH",
    "TracerSlot",
    "format_traceparent",
    "sdk_provider",
    "trace_id_of",
    "tracing_requested",
    "valid_traceparent",
]

TRACEPARENT_LENGTH = 55
"""Length of a version-00 traceparent (the wire bound of ``Mutation.traceparent``)."""

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def valid_traceparent(value: object) -> bool:
    """True if ``value`` is a usable version-00 traceparent."""
    if not isinstance(value, str):
        return False
    match = _TRACEPARENT.fullmatch(value)
    return match is not None and match[1] != _ZERO_TRACE and match[2] != _ZERO_SPAN


def format_traceparent(trace_id: int, span_id: int, flags: int) -> str:
    """The version-00 traceparent of a span's ids and trace flags (as OpenTelemetry's
    ``SpanContext`` holds them: integers)."""
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


def trace_id_of(traceparent: object) -> str | None:
    """The 32-hex-digit trace id of a traceparent, or None if it is not valid."""
    if not valid_traceparent(traceparent):
        return None
    assert isinstance(traceparent, str)
    return traceparent[3:35]


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """Whether the OpenTelemetry environment variables ask for traces.

    ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn tracing off; any
    other ``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` turns it on. Nothing set: off.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    )


class TracerSlot:
    """One component's tracer: None (tracing off) until installed or configured.

    The SDK and the server each keep one (``_slot``); reading ``tracer`` is the whole
    cost of tracing while it is off.

    Args:
        scope: the instrumentation scope of its spans.
        service: ``service.name`` when ``OTEL_SERVICE_NAME`` does not set one.
    """

    def __init__(self, scope: str, service: str) -> None:
        self.scope = scope
        self.service = service
        self.tracer: Tracer | None = None
        self.provider: TracerProvider | None = None
        self._configured = False
        self._lock = threading.Lock()

    def install(self, provider: TracerProvider | None) -> None:
        """Use ``provider``'s tracer from now on (None: tracing off)."""
        self.provider = provider
        self.tracer = None if provider is None else provider.get_tracer(self.scope)

    def configure_from_env(self, environ: Mapping[str, str] | None = None) -> bool:
        """Set tracing up once from the ``OTEL_*`` variables; returns whether it is on.

        An application that already set a global OpenTelemetry tracer provider keeps it
        (its spans and ours then share one pipeline); otherwise an SDK provider with a
        batching OTLP/HTTP exporter (configured by ``OTEL_EXPORTER_OTLP_*``) is installed.
        """
        with self._lock:
            if self._configured or self.tracer is not None:
                return self.tracer is not None
            self._configured = True
            if not tracing_requested(os.environ if environ is None else environ):
                return False
            self.install(sdk_provider(self.service))
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
