"""``serve --log-format json``'s formatter: one JSON object per line, context fields where
known (the real-process check is in tests/test_tracing.py)."""

from __future__ import annotations

import json
import logging

from sync_server.logs import MAX_MESSAGE, JsonFormatter


def _record(message: str, **extra) -> logging.LogRecord:
    record = logging.LogRecord("tether.step", logging.WARNING, __file__, 1, message, (), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_a_line_carries_the_context_it_knows():
    line = json.loads(JsonFormatter().format(_record("x", workflow_id="w1", step="s", attempt=3)))
    assert line["message"] == "x" and line["level"] == "warning"
    assert line["logger"] == "tether.step" and isinstance(line["at"], float)
    assert (line["workflow_id"], line["step"], line["attempt"]) == ("w1", "s", 3)
    assert "trace_id" not in line  # tracing is off and no extra named one
    bare = json.loads(JsonFormatter().format(_record("plain")))
    assert set(bare) == {"at", "level", "logger", "message"}


def test_lines_stay_single_and_bounded():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys

        record = _record("failed " + "y" * (2 * MAX_MESSAGE))
        record.exc_info = sys.exc_info()
    text = JsonFormatter().format(record)
    assert "\n" not in text
    line = json.loads(text)
    assert len(line["message"]) == MAX_MESSAGE and line["message"].startswith("failed y")
