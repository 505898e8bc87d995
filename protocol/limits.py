"""Byte budgets of the wire, and the checks that hold payloads to them.

Every batch, page, queue and free-text field is bounded in bytes as well as in count
(SPEC promise 7). The budgets live here, once, so the SDK can refuse before queueing
exactly what the server would refuse after (no accepted submit ever waits behind one
that can never be accepted), and the README's "Limits" table names these constants.

JSON payloads (workflow input, step results, report detail) are measured as their
compact JSON encoding. Non-finite numbers (NaN, ±inf) are refused everywhere: JSON has
no spelling for them (they would be stored as ``null``) and a stored ``inf`` makes
every later comparison on the value throw.
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec

from protocol.errors import ValidationError

__all__ = [
    "DEFAULT_PUSH_BYTES",
    "MAX_DETAIL_BYTES",
    "MAX_INPUT_BYTES",
    "MAX_MUTATION_BYTES",
    "MAX_PAGE_BYTES",
    "MAX_PROGRESS_MESSAGE",
    "MAX_RECEIVE_BYTES",
    "MAX_RESULT_BYTES",
    "PUSH_OVERHEAD_BYTES",
    "SEND_QUEUE_BYTES",
    "check_finite",
    "check_payload",
    "finite_float",
    "payload_bytes",
]

MAX_INPUT_BYTES = 64 * 1024
"""Largest workflow input (encoded JSON)."""
MAX_RESULT_BYTES = 64 * 1024
"""Largest step result, and so largest workflow output (encoded JSON)."""
MAX_DETAIL_BYTES = 16 * 1024
"""Largest ``detail`` of a state report (encoded JSON)."""
MAX_MUTATION_BYTES = 96 * 1024
"""Largest single encoded mutation the SDK queues (an input at its limit fits)."""
MAX_PROGRESS_MESSAGE = 1024
"""Longest progress message (characters); a step's longer text is cut to it."""
MAX_PAGE_BYTES = 1024 * 1024
"""Byte budget of one catch-up or pull page (one larger event still travels alone)."""
MAX_RECEIVE_BYTES = 8 * 1024 * 1024
"""Largest frame (or pull body) the SDK accepts from a server."""
SEND_QUEUE_BYTES = 4 * 1024 * 1024
"""Encoded frames queued per connection before a slow reader is cut with 1013."""
DEFAULT_PUSH_BYTES = 256 * 1024
"""Push budget the SDK assumes when the server's ``Welcome`` declares no limit."""
PUSH_OVERHEAD_BYTES = 1024
"""Head room kept below the declared frame limit for the Push envelope itself."""

_json_encoder = msgspec.json.Encoder()
_MAX_FLOAT = 1.7976931348623157e308


def payload_bytes(value: Any) -> int:
    """Size of ``value`` as compact JSON, in bytes (how every payload cap is measured)."""
    try:
        return len(_json_encoder.encode(value))
    except UnicodeEncodeError:  # a lone surrogate: measure it escaped
        return len(json.dumps(value, separators=(",", ":"), default=str).encode())


def check_finite(value: Any, what: str) -> None:
    """Refuse NaN and ±inf anywhere in ``value`` (a JSON-like payload).

    Raises:
        ValidationError: ``value`` holds a non-finite number.
    """
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"{what} holds a non-finite number ({value})")
        return
    if not isinstance(value, dict | list | tuple):
        return
    try:
        # One C-level pass; anything json cannot encode is someone else's check.
        json.dumps(value, allow_nan=False, default=_ignore, check_circular=False)
    except ValueError as exc:
        raise ValidationError(f"{what} holds a non-finite number (NaN or infinity)") from exc
    except (TypeError, RecursionError):
        return


def _ignore(value: Any) -> None:
    return None


def check_payload(value: Any, what: str, limit: int) -> int:
    """Refuse a payload over ``limit`` bytes or holding a non-finite number.

    Returns:
        Its encoded size in bytes.

    Raises:
        ValidationError: too large, or not finite.
    """
    check_finite(value, what)
    size = payload_bytes(value)
    if size > limit:
        raise ValidationError(f"{what} is {size} bytes, over the limit of {limit} bytes")
    return size


def finite_float(value: float, what: str) -> float:
    """``value`` if finite.

    Raises:
        ValidationError: NaN or ±inf.
    """
    if not -_MAX_FLOAT <= value <= _MAX_FLOAT:
        raise ValidationError(f"{what} must be a finite number, got {value}")
    return value
