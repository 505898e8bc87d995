"""A deadline for complete request headers: half-open connections are cut (issue 11).

Theory of operation
-------------------
uvicorn (0.54, h11 and httptools alike) has no request-header timeout: its keep-alive
timer starts only after a response, and any byte received disarms it. A peer that opens
a connection and sends a partial request line, or trickles headers, holds a socket and
a protocol object forever; 200 of them were all still open after 75 s, and
``max_connections`` counts WebSockets only (the "slowloris" attack).

``header_deadline_protocol(seconds)`` returns a subclass of uvicorn's h11 protocol that
is handed to uvicorn as its ``http`` protocol class. A connection must complete the
headers of each request within ``seconds`` of when the server starts waiting for them:
from the connection being made for the first request, and from the first byte of each
later request on a kept-alive connection (uvicorn's own keep-alive timeout covers the
silent gap between requests). The deadline is a single timer per connection, armed
while h11 waits for a request (``their_state`` IDLE) and cancelled as soon as the
headers are in (a ``Request`` event moves h11 on; a WebSocket upgrade leaves this
protocol altogether). When it fires on a connection still waiting for headers, the
server answers ``408 Request Timeout`` and closes. Request *bodies* are not covered:
every route bounds its body in bytes (``max_frame_bytes``) and reads it as it comes.

Behind a proxy the proxy's own limit applies first (``timeout http-request`` in
``deploy/haproxy.cfg``); this guard protects an instance that is reached directly.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "HeaderDeadlineProtocol",
    "header_deadline_protocol",
    "raise_fd_limit",
]

log = logging.getLogger("tether.http")

DEFAULT_HEADER_TIMEOUT = 10.0
"""Seconds a client has to send complete request headers (``serve --header-timeout``)."""

_TIMEOUT_BODY = b"request headers not received in time\r\n"
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for complete request headers.

    Use ``header_deadline_protocol(seconds)`` to get a subclass with another deadline.
    """

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    cut = 0
    """Connections cut for slow headers, by every instance of this class (a counter)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Still waiting for (the rest of) a request's headers: keep, or start, the clock.
        # Otherwise the headers are in (or the connection switched protocols): stop it.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_header_deadline()
        else:
            self._disarm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        # Between requests uvicorn's keep-alive timer guards a silent connection; the
        # deadline starts again with the first byte of the next request.
        self._disarm_header_deadline()
        super().on_response_complete()

    def _arm_header_deadline(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_deadline)

    def _disarm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_deadline(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        type(self).cut += 1
        log.info(
            "closing a connection from %s: no complete request headers within %g s",
            self.client,
            self.header_timeout,
        )
        self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()


def header_deadline_protocol(seconds: float) -> type[HeaderDeadlineProtocol]:
    """The uvicorn ``http`` protocol class that cuts connections whose request headers
    are not complete within ``seconds``.

    Args:
        seconds: the deadline; must be positive.

    Returns:
        A subclass of ``HeaderDeadlineProtocol`` (pass it as ``uvicorn.Config(http=...)``).

    Raises:
        ValueError: ``seconds`` is not positive.
    """
    if not seconds > 0:
        raise ValueError(f"header timeout must be positive, got {seconds!r}")
    return type(
        "HeaderDeadlineProtocol",
        (HeaderDeadlineProtocol,),
        {"header_timeout": float(seconds), "cut": 0},
    )


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise this process's soft file-descriptor limit towards ``wanted`` (at most the
    hard limit): every connection, half-open ones included, holds a descriptor, and a
    soft limit of 1,024 would stop ``accept`` long before 2,000 of them.

    Returns:
        The soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the file-descriptor limit to %d: %s", target, exc)
            return soft
        return target
    return soft
