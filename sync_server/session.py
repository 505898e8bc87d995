"""The server side of one sync session, as a pure state machine (Sans-I/O).

Theory of operation
-------------------
States::

    AWAITING_HELLO --Hello--> WELCOMING --client state--> CATCHING_UP <--> LIVE
          any state --fail(error)--> CLOSED

The shell (``sync_server.ws``) decodes frames and feeds them to ``receive_message``;
it feeds store answers back with ``receive_client_state``, ``receive_page`` and
``receive_push_results``, and live hub batches with ``receive_live``. It drains
``commands_to_run()`` (store work) and ``messages_to_send()`` (frames) after each input,
and closes the socket when ``close_code`` is set. The commands are carried out by
``sync_server.sync_core.SessionCore``, which the HTTP fallback calls too (``POST
/v1/push`` is one ``ApplyPush``, ``GET /v1/pull`` one ``ReadEvents``).

Ordered, gapless delivery (SPEC promise 4): while CATCHING_UP the session pages the
store from its cursor and ignores live batches except to remember the highest live
``seq`` it heard of. When a page says ``has_more=False`` and nothing newer was heard,
the session is LIVE: from then on the hub's gapless, ordered batches are forwarded,
skipping anything at or below the cursor. If a newer ``seq`` was heard while paging, one
more page is read first. Because the hub only announces committed events, and the store
assigns positions in commit order, the pages plus live batches cover every event once.

Flags (issue 15): a client whose Hello sets ``flags`` gets its tenant's flag set
(``receive_flags``) right after Welcome — before any PushResult — and again on every
change; a set older than the last one sent is dropped.

Flow control: at most ``window`` catch-up pages are outstanding beyond the client's
last ``Ack``; the next page is read only when the client has acknowledged enough, so a
100,000-event backlog never sits in memory at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from protocol import (
    PROTOCOL_VERSION,
    Ack,
    BadMessage,
    ClientMessage,
    Conflict,
    Error,
    Event,
    Events,
    Flags,
    Hello,
    Mutation,
    MutationResult,
    Progress,
    ProtocolVersionError,
    Push,
    PushResult,
    ServerMessage,
    TetherError,
    ValidationError,
    Welcome,
)
from protocol.codec import check_text

__all__ = [
    "ApplyPush",
    "Command",
    "LoadClient",
    "ReadEvents",
    "ServerSession",
    "ServerSessionState",
]


class ServerSessionState(StrEnum):
    """Where a server session stands."""

    AWAITING_HELLO = "awaiting_hello"
    WELCOMING = "welcoming"
    CATCHING_UP = "catching_up"
    LIVE = "live"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class LoadClient:
    """Look up the client's last applied mutation id and the log head."""

    client_id: str


@dataclass(frozen=True, slots=True)
class ApplyPush:
    """Apply a batch of mutations exactly once."""

    client_id: str
    mutations: list[Mutation]


@dataclass(frozen=True, slots=True)
class ReadEvents:
    """Read a page of the tenant's events with ``seq > after``."""

    after: int
    limit: int


Command = LoadClient | ApplyPush | ReadEvents


class ServerSession:
    """One client's sync session, without I/O.

    Args:
        server_id: identifies this instance in ``Welcome``.
        page_size: events per catch-up page.
        window: catch-up pages allowed beyond the client's last Ack.
        max_frame_bytes: the frame limit declared in ``Welcome`` (the SDK cuts its
            Push batches to it).
    """

    __slots__ = (
        "_commands",
        "_flags_revision",
        "_heard",
        "_messages",
        "_page_ends",
        "_reading",
        "acked",
        "client_id",
        "close_code",
        "close_reason",
        "cursor",
        "max_frame_bytes",
        "page_size",
        "server_id",
        "state",
        "wants_flags",
        "window",
    )

    def __init__(
        self, *, server_id: str, page_size: int = 500, window: int = 2, max_frame_bytes: int = 0
    ) -> None:
        self.server_id = server_id
        self.max_frame_bytes = max_frame_bytes
        self.page_size = page_size
        self.window = window
        self.state = ServerSessionState.AWAITING_HELLO
        self.client_id: str | None = None
        self.cursor = 0  # highest seq sent to the client
        self.acked = 0  # highest seq the client acknowledged
        self.close_code: int | None = None
        self.close_reason = ""
        self.wants_flags = False  # the client said it understands Flags
        self._flags_revision = -1  # revision of the last Flags sent
        self._heard = 0  # highest live seq announced while catching up
        self._reading = False  # a ReadEvents is outstanding
        self._page_ends: list[int] = []  # cursors of unacknowledged catch-up pages
        self._messages: list[ServerMessage] = []
        self._commands: list[Command] = []

    # ----------------------------------------------------------------- drains
    def messages_to_send(self) -> list[ServerMessage]:
        """Frames to write, in order; drains the buffer."""
        messages, self._messages = self._messages, []
        return messages

    def commands_to_run(self) -> list[Command]:
        """Store work to do, in order; drains the buffer."""
        commands, self._commands = self._commands, []
        return commands

    @property
    def closed(self) -> bool:
        """True once the session failed or was closed."""
        return self.state is ServerSessionState.CLOSED

    # ----------------------------------------------------------------- inputs
    def receive_message(self, message: ClientMessage) -> None:
        """Feed one decoded client message; protocol violations close the session."""
        if self.closed:
            return
        if isinstance(message, Hello):
            self._receive_hello(message)
        elif self.state is ServerSessionState.AWAITING_HELLO:
            self.fail(BadMessage(f"expected Hello first, got {type(message).__name__}"))
        elif isinstance(message, Push):
            assert self.client_id is not None
            self._commands.append(ApplyPush(self.client_id, list(message.mutations)))
        else:
            self._receive_ack(message)

    def _receive_hello(self, hello: Hello) -> None:
        if self.state is not ServerSessionState.AWAITING_HELLO:
            self.fail(BadMessage("Hello sent twice"))
            return
        if hello.protocol_version != PROTOCOL_VERSION:
            self.fail(
                ProtocolVersionError(
                    f"protocol version {hello.protocol_version} is not supported "
                    f"(server speaks {PROTOCOL_VERSION})"
                )
            )
            return
        try:  # the same rule as a push's client id (PostgreSQL cannot store a NUL) ...
            check_text(hello.client_id, "client_id")
        except ValidationError as exc:  # ... but in a Hello it breaks the protocol (4400)
            self.fail(BadMessage(exc.message))
            return
        self.client_id = hello.client_id
        self.wants_flags = hello.flags
        self.cursor = self.acked = hello.cursor
        self.state = ServerSessionState.WELCOMING
        self._commands.append(LoadClient(hello.client_id))

    def _receive_ack(self, ack: Ack) -> None:
        if ack.cursor > self.cursor:
            self.fail(BadMessage(f"Ack({ack.cursor}) is beyond the last sent cursor {self.cursor}"))
            return
        self.acked = max(self.acked, ack.cursor)
        while self._page_ends and self._page_ends[0] <= self.acked:
            self._page_ends.pop(0)
        self._maybe_read()

    def receive_client_state(self, last_mutation_id: int, head: int, horizon: int = 0) -> None:
        """The store's answer to ``LoadClient``: send Welcome and start catching up.

        ``horizon`` (the tenant's highest pruned seq) goes into the Welcome: a client
        below it resets from snapshots and then pages what is retained, as usual.
        """
        if self.state is not ServerSessionState.WELCOMING:
            return
        if self.cursor > head:
            self.fail(Conflict(f"cursor {self.cursor} is ahead of the server's head {head}"))
            return
        self._messages.append(
            Welcome(
                server_id=self.server_id,
                protocol_version=PROTOCOL_VERSION,
                last_mutation_id=last_mutation_id,
                head=head,
                horizon=horizon,
                max_frame_bytes=self.max_frame_bytes,
            )
        )
        self.state = ServerSessionState.CATCHING_UP
        self._maybe_read()

    def receive_push_results(self, results: list[MutationResult]) -> None:
        """The store's answer to ``ApplyPush``."""
        if not self.closed:
            self._messages.append(PushResult(results=results))

    def receive_page(self, events: list[Event], has_more: bool) -> None:
        """The store's answer to ``ReadEvents``."""
        self._reading = False
        if self.closed:
            return
        fresh = [event for event in events if event.seq > self.cursor]
        if fresh:
            self.cursor = fresh[-1].seq
            self._heard = max(self._heard, self.cursor)
        more = has_more or self._heard > self.cursor
        if fresh or not more:
            self._messages.append(Events(events=fresh, cursor=self.cursor, has_more=more))
        if fresh:
            self._page_ends.append(self.cursor)
        if more:
            self._maybe_read()
        else:
            self.state = ServerSessionState.LIVE
            self._page_ends.clear()

    def receive_live(self, events: list[Event]) -> None:
        """A gapless, ordered batch of the tenant's newly committed events."""
        if self.closed or not events:
            return
        if self.state is not ServerSessionState.LIVE:
            self._heard = max(self._heard, events[-1].seq)
            self._maybe_read()
            return
        # The hub's own list when nothing is skipped: its encoding is then shared.
        fresh = (
            events
            if events[0].seq > self.cursor
            else [event for event in events if event.seq > self.cursor]
        )
        if fresh:
            self.cursor = fresh[-1].seq
            self._messages.append(Events(events=fresh, cursor=self.cursor, has_more=False))

    def receive_flags(self, flags: Flags) -> None:
        """The tenant's flag set: sent once Welcome is out (never before it) to a client
        that asked for flags, unless a newer revision was already sent."""
        if not self.wants_flags or flags.revision <= self._flags_revision:
            return
        if self.state in (ServerSessionState.CATCHING_UP, ServerSessionState.LIVE):
            self._flags_revision = flags.revision
            self._messages.append(flags)

    def receive_progress(self, progress: Progress) -> None:
        """Ephemeral progress: forwarded only while live (it is not part of the log)."""
        if self.state is ServerSessionState.LIVE:
            self._messages.append(progress)

    def fail(self, error: TetherError) -> None:
        """Close the session with ``error`` (an Error frame, then its close code)."""
        if self.closed:
            return
        self._messages.append(
            Error(code=error.code.value, message=error.message, retryable=error.retryable)
        )
        self.close(error.close_code, error.message)

    def close(self, code: int, reason: str = "") -> None:
        """Close without an Error frame (e.g. 1012 on shutdown)."""
        if self.closed:
            return
        self.state = ServerSessionState.CLOSED
        self.close_code = code
        self.close_reason = reason[:120]
        self._commands.clear()

    # ---------------------------------------------------------------- helpers
    def _maybe_read(self) -> None:
        if self.state is not ServerSessionState.CATCHING_UP or self._reading:
            return
        if len(self._page_ends) >= self.window:
            return
        self._reading = True
        self._commands.append(ReadEvents(after=self.cursor, limit=self.page_size))
