"""Structured log lines for ``sync-server serve --log-format json``.

One JSON object per line: ``at`` (unix seconds), ``level``, ``logger``, ``message``, and
where known ``workflow_id``, ``step``, ``attempt`` and ``trace_id`` — taken from the
record's extras (a step's ``ctx.log`` carries the first three) and, for the trace id,
from the active OpenTelemetry span when tracing is on (``sync_server.tracing``), so a
log line of a step attempt names the trace of its workflow.
"""

from __future__ import annotations

import json
import logging
import sys

from sync_server import tracing

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "configure_logging"]

CONTEXT_FIELDS = ("workflow_id", "step", "attempt", "trace_id")
"""Record attributes copied into a JSON line when present."""
MAX_MESSAGE = 8192
"""A message longer than this is cut (bounded lines)."""


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        """One JSON object (no newline) for ``record``; see the module docstring."""
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        line: dict[str, object] = {
            "at": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message[:MAX_MESSAGE],
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if "trace_id" not in line and tracing.enabled():
            trace_id = tracing.current_trace_id()
            if trace_id:
                line["trace_id"] = trace_id
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(level: str) -> None:
    """Send every log line (Tether's and uvicorn's) to stderr as JSON."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
