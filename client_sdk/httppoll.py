"""The HTTP fallback of ``SyncConnection``: push and pull over plain requests.

Used when WebSocket upgrades keep being refused (a proxy that does not pass them).
The same ``SyncSession`` drives it, started without a handshake: pending mutations go
out as ``POST /v1/push`` (one batch in flight), pages come in from ``GET /v1/pull``
and are applied durably before the next is requested (bounded memory), and the
cursor is the session's — so switching transports never skips or repeats an event.
401/403 stop syncing (the real server refused the token); 429 waits ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import httpx

from protocol import (
    MAX_EVENTS_PAGE,
    MAX_FRAME_BYTES,
    Events,
    Forbidden,
    PullResponse,
    Push,
    PushRequest,
    PushResponse,
    Unauthorized,
    decode_json,
    encode_json,
)

if TYPE_CHECKING:
    from client_sdk.connection import SyncConnection

__all__ = ["run_http"]

log = logging.getLogger("client_sdk")


async def run_http(conn: SyncConnection) -> None:
    """Sync over HTTP until ``ws_retry_interval`` passed, the link fails or we close."""
    client = conn.http_client()
    started = conn.clock()
    conn.session.connection_made(handshake=False)
    conn.transport = "http"
    first = True
    while not conn.closing.is_set():
        for message in conn.session.messages_to_send():
            if isinstance(message, Push):
                body = encode_json(
                    PushRequest(client_id=conn.session.client_id, mutations=message.mutations)
                )
                response = await _call(
                    conn,
                    client.post(
                        "/v1/push",
                        content=body,
                        headers={"content-type": "application/json"},
                    ),
                )
                if response is None:
                    return
                results = decode_json(response.content, PushResponse).results
                conn.session.receive_push_results(results)
                conn.pump()
        more = True
        while more and not conn.closing.is_set():
            response = await _call(
                conn,
                client.get(
                    "/v1/pull",
                    params={"cursor": conn.session.received_cursor, "limit": MAX_EVENTS_PAGE},
                ),
            )
            if response is None:
                return
            page = decode_json(response.content, PullResponse, limit=16 * MAX_FRAME_BYTES)
            if first:
                first = False
                log.info(
                    "syncing over HTTP with %s (cursor %d)", conn.http_url, conn.session.cursor
                )
                conn.mark_connected()
            conn.session.receive_horizon(page.horizon)
            conn.session.receive_message(
                Events(events=page.events, cursor=page.cursor, has_more=page.has_more)
            )
            conn.pump()
            more = page.has_more
            # Bounded memory: let the applier catch up before the next page.
            await conn.idle_event.wait()
            if conn.session.pending_count and not conn.session.push_in_flight:
                break
        if conn.clock() - started > conn.ws_retry_interval:
            log.info("trying the WebSocket again after %.0f s over HTTP", conn.ws_retry_interval)
            conn.refused_upgrades = 0
            return
        if not conn.session.push_in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.wake.wait(), conn.http_poll_interval)
            conn.wake.clear()


async def _call(conn: SyncConnection, request: Any) -> httpx.Response | None:
    response: httpx.Response = await request
    if response.status_code in (401, 403):
        error = (Unauthorized if response.status_code == 401 else Forbidden)(
            f"HTTP {response.status_code} from {response.url}: {response.text[:200]}"
        )
        conn.session.fail(error)
        conn.pump()
        return None
    if response.status_code == 413 and conn.session.push_in_flight:
        # Something in between allows less than our budget: push smaller batches.
        log.warning("push refused as too large over HTTP; halving the push budget")
        conn.session.refused_too_large()
        return None
    if response.status_code == 429:
        retry = float(response.headers.get("retry-after", "1") or 1)
        log.info("rate limited over HTTP; waiting %.1f s", retry)
        await conn.sleep(retry)
        return None
    response.raise_for_status()
    return response
