"""Read a window of the event log for the SLOs (the thin shell of ``sync_server.slo``),
and serve them: ``GET /v1/slo?window=24h&tenant=&workflow=`` (admins).

The window's first position is found by a binary search over ``seq`` (the primary key:
one indexed ``LIMIT 1`` read per step, about 24 for 10 M events), then the events are
paged forward by ``seq`` (of one tenant through the ``(tenant, seq)`` index). Nothing
scans the table, and the read is bounded: at most ``MAX_ROWS`` events.

An event's time is taken before its position (assigned at COMMIT), so times are not
strictly increasing with ``seq``; the search starts ``SKEW`` seconds early, and the
population rule of ``compute_slos`` (submitted within the window) keeps the figures
exact.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgspec

from protocol import BadMessage, Role, encode_json
from protocol.http import SloItem, SloList
from sync_server.slo import (
    ALL,
    SloRow,
    SloValue,
    compute_slos,
    parse_window,
    row_from_event,
    scope_values,
)
from sync_server.store.base import Store

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = ["MAX_ROWS", "current_slos", "read_window", "routes", "window_start"]

log = logging.getLogger("tether.slo")

MAX_ROWS = 200_000
"""Most events one SLO computation reads (bounded memory)."""
SKEW = 300.0
"""Seconds the search starts before the window (event time vs commit order)."""
PAGE = 1000


async def window_start(store: Store, since: float) -> int:
    """The position after which every event at or after ``since`` lies."""
    low, high = 0, await store.head()
    while low < high:
        middle = (low + high) // 2
        rows = await store.read_events(middle, 1)  # the first event after ``middle``
        if not rows or rows[0].at >= since:
            high = middle
        else:
            low = rows[0].seq  # > middle: the search always moves
    return low


async def read_window(
    store: Store, since: float, *, tenant: str | None = None, max_rows: int = MAX_ROWS
) -> list[SloRow]:
    """The events of ``since`` onwards (of one tenant or all), as ``SloRow``s."""
    after = await window_start(store, since - SKEW)
    rows: list[SloRow] = []
    while len(rows) < max_rows:
        page = await store.read_events(after, min(PAGE, max_rows - len(rows)), tenant=tenant)
        rows.extend(row_from_event(e.tenant, e.workflow_id, e.type, e.data, e.at) for e in page)
        if len(page) < PAGE:
            break
        after = page[-1].seq
    else:
        log.warning("SLO window holds more than %d events; computed over the first", max_rows)
    return rows


async def current_slos(
    store: Store, now: float, window: float, *, tenant: str | None = None
) -> list[SloValue]:
    """Every objective over ``window`` seconds before ``now`` (one tenant's, or all)."""
    return compute_slos(await read_window(store, now - window, tenant=tenant), now, window)


async def slo_endpoint(request: Request) -> Response:
    """``GET /v1/slo?window=24h[&tenant=T][&workflow=W]`` (admin) → ``SloList``.

    A tenant admin sees its own tenant only (``tenant`` is then ignored); a global admin
    sees the aggregate over all tenants unless it names one.
    """
    import time

    from starlette.responses import Response

    from sync_server.auth import bearer_token, verify_token

    tether: Any = request.app.state.tether
    principal = verify_token(
        tether.config.auth_secret, bearer_token(request.headers.get("authorization"))
    )
    principal.require(Role.ADMIN)
    try:
        window = parse_window(request.query_params.get("window", "24h"))
    except ValueError as exc:
        raise BadMessage(str(exc)) from exc
    tenant = principal.scope or request.query_params.get("tenant") or None
    workflow = request.query_params.get("workflow") or ALL
    for text in (tenant or "", workflow):
        if len(text) > 128 or "\x00" in text:
            raise BadMessage("tenant and workflow must be at most 128 characters, without NUL")
    values = await current_slos(tether.store, time.time(), window, tenant=tenant)
    chosen = scope_values(values, window, tenant or ALL, workflow)
    body = SloList(slos=[msgspec.convert(v.as_json(), SloItem) for v in chosen])
    return Response(encode_json(body), media_type="application/json")


def _routes() -> list[Any]:
    from starlette.routing import Route

    return [Route("/v1/slo", slo_endpoint, methods=["GET"])]


routes = _routes()
