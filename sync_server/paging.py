"""Read a page of the log bounded in count *and* bytes (SPEC promise 7, issue 11).

A catch-up page (WebSocket) or a pull page (HTTP) holds at most ``limit`` events and
at most ``max_bytes`` of encoded events — except that the first event always goes, so
one event larger than the budget still travels, alone. The store is read in chunks of
at most ``CHUNK`` rows, so a log of large events never sits in memory a page at a time
before it is cut.
"""

from __future__ import annotations

from collections.abc import Callable

from protocol import Event, encode, encode_json
from sync_server.store.base import Store

__all__ = ["CHUNK", "json_bytes", "msgpack_bytes", "read_page"]

CHUNK = 100
"""Rows per store round trip while filling a page."""


def msgpack_bytes(event: Event) -> int:
    """Size of ``event`` in a WebSocket frame."""
    return len(encode(event))


def json_bytes(event: Event) -> int:
    """Size of ``event`` in an HTTP pull body."""
    return len(encode_json(event))


async def read_page(
    store: Store,
    after: int,
    limit: int,
    max_bytes: int,
    *,
    tenant: str | None,
    size: Callable[[Event], int] = msgpack_bytes,
) -> tuple[list[Event], bool]:
    """The events after ``after``, cut at ``limit`` events or ``max_bytes`` bytes.

    Returns:
        The page and whether more events follow it.
    """
    page: list[Event] = []
    total = 0
    while len(page) < limit:
        want = min(CHUNK, limit - len(page))
        rows = await store.read_events(after, want + 1, tenant=tenant)
        for row in rows[:want]:
            event = row.to_wire()
            cost = size(event)
            if page and total + cost > max_bytes:
                return page, True
            page.append(event)
            total += cost
            after = row.seq
        if len(rows) <= want:
            return page, False
    return page, True
