"""W3C Trace Context on the wire, and when OpenTelemetry tracing is asked for. No I/O.

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

import re
from collections.abc import Mapping

__all__ = ["TRACEPARENT_LENGTH", "trace_id_of", "tracing_requested", "valid_traceparent"]

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
