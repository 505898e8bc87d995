"""Make text that a step or a downstream hands back storable on both backends.

Theory of operation
-------------------
Clients' text is checked at the door (``protocol.codec.check_text`` refuses U+0000), but
a step's error message, its result and a downstream's report are not the client's: they
must be *recorded*, whatever they hold, or the workflow never ends (SPEC promise 2).
PostgreSQL stores U+0000 neither in ``text`` nor in ``jsonb``, and no UTF-8 encoder takes
a lone surrogate (U+D800..U+DFFF, which Python strings may hold), so one such character
in one checkpoint used to fail the whole batched transaction, again and again (issue 11,
finding 12). Both are replaced by U+FFFD REPLACEMENT CHARACTER where the text enters the
saga (the runner's attempt outcome, progress messages, reconciliation reports), so the
same text is stored alike on SQLite and PostgreSQL.

``refused_by_database`` tells such a deterministic refusal (the database or its driver
rejected the *data*) from an outage (worth retrying): the runner and the push path use
it to isolate one bad item instead of retrying its whole batch forever.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["REPLACEMENT", "refused_by_database", "storable_json", "storable_text"]

REPLACEMENT = "\ufffd"
"""What an unstorable character becomes."""

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(text: str) -> str:
    """``text`` with U+0000 and lone surrogates replaced by U+FFFD.

    Args:
        text: any Python string.

    Returns:
        The same string when it was storable already (the common case, no copy).
    """
    if text.isascii() and "\x00" not in text:
        return text
    return _UNSTORABLE.sub(REPLACEMENT, text)


def storable_json(value: Any) -> Any:
    """``value`` with every string and key made storable (``storable_text``), recursively
    through dicts, lists and tuples (a tuple becomes a list, as JSON would make it).

    Other values are returned as they are; the caller still checks that the whole is
    JSON.
    """
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {
            (storable_text(k) if isinstance(k, str) else k): storable_json(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [storable_json(item) for item in value]
    return value


def refused_by_database(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is the database or its driver
    refusing the *data* — retrying the same write can never succeed — rather than the
    database being unreachable or busy.

    PostgreSQL's class 22 (data exception: bad encoding, value out of range), asyncpg's
    own argument check and any encoder error (``ValueError``, e.g. a lone surrogate that
    sqlite3 cannot bind) count; connection loss, timeouts and deadlocks do not.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ValueError):  # asyncpg's client-side DataError is one too
            return True
        if type(current).__module__.startswith("asyncpg") and _is_pg_data_error(current):
            return True
        current = current.__cause__
    return False


def _is_pg_data_error(exc: BaseException) -> bool:
    import asyncpg

    return isinstance(exc, asyncpg.DataError)
