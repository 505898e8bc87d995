"""Finding workflows: query parsing, keyset cursors and bounded pages for the listing.

Theory of operation
-------------------
``GET /v1/workflows`` lists a tenant's workflows newest first — ordered by
(``created_at``, ``id``) descending, which the listing indexes of migration 8 serve
with the tenant as their leading column. Paging is *keyset*, not offset: the cursor is
the (``created_at``, ``id``) of the last row sent, and the next page is the rows after
it in that order. A workflow submitted between two pages is newer than the cursor, so
it can neither shift nor repeat the rows still to come (stable under inserts).

A page is bounded in rows (``limit``) and in bytes (``MAX_PAGE_BYTES`` of encoded
snapshots): when the bytes run out first, the page ends early and ``next_cursor`` says
where to resume. The cursor is opaque to clients (URL-safe base64 of JSON); a malformed
one is refused with 400 like any bad value.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from datetime import UTC, datetime
from typing import Any

import msgspec

from protocol import BadMessage, WorkflowSnapshot

__all__ = [
    "MAX_PAGE_BYTES",
    "decode_cursor",
    "encode_cursor",
    "fit_page",
    "parse_since",
    "parse_time",
]

MAX_PAGE_BYTES = 4 * 1024 * 1024
"""Most bytes of encoded snapshots in one listing page."""

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_encoder = msgspec.json.Encoder()


def parse_time(text: str, what: str) -> float:
    """A time given as unix seconds (``1767225600``, ``1767225600.5``) or ISO 8601
    (``2026-01-01T00:00:00Z``; without an offset it is UTC).

    Raises:
        BadMessage: neither form, or not a finite non-negative time.
    """
    try:
        value = float(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as exc:
            raise BadMessage(f"{what} must be unix seconds or an ISO 8601 time") from exc
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        value = parsed.timestamp()
    if not math.isfinite(value) or value < 0:
        raise BadMessage(f"{what} must be a finite time >= 0")
    return value


def parse_since(text: str, now: float) -> float:
    """``--since``: a duration back from ``now`` (``90s``, ``15m``, ``1h``, ``7d``) or a
    time (see ``parse_time``).

    Raises:
        BadMessage: neither a duration nor a time.
    """
    match = _DURATION.fullmatch(text.strip())
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    return parse_time(text, "--since")


def encode_cursor(created_at: float, workflow_id: str) -> str:
    """The opaque cursor after the row (``created_at``, ``workflow_id``)."""
    raw = _encoder.encode([created_at, workflow_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[float, str]:
    """The (``created_at``, ``id``) a cursor stands for.

    Raises:
        BadMessage: the cursor was not made by ``encode_cursor``.
    """
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        created_at, workflow_id = msgspec.json.decode(raw, type=tuple[float, str])
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise BadMessage("cursor is malformed") from exc
    if not math.isfinite(created_at):
        raise BadMessage("cursor is malformed")
    return created_at, workflow_id


def fit_page(
    snapshots: list[WorkflowSnapshot], keys: list[tuple[float, str]], limit: int
) -> dict[str, Any]:
    """The answer ``{workflows, next_cursor}`` for rows fetched with ``limit + 1``.

    Rows beyond ``limit`` or beyond ``MAX_PAGE_BYTES`` are left for the next page; the
    first row is always sent, whatever its size, so paging always moves on.
    """
    page: list[WorkflowSnapshot] = []
    size = 0
    for snap in snapshots[:limit]:
        size += len(_encoder.encode(snap))
        if page and size > MAX_PAGE_BYTES:
            break
        page.append(snap)
    more = len(page) < len(snapshots)
    cursor = encode_cursor(*keys[len(page) - 1]) if more and page else None
    return {"workflows": page, "next_cursor": cursor}
