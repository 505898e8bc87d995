"""The client's sync session: pure protocol logic, no I/O (Sans-I/O).

Theory of operation
-------------------
The shell feeds the session what happened — ``connection_made``, ``receive_message``,
``receive_close``, ``connection_lost``, ``events_applied`` (a page is durable),
``send_mutation`` (a mutation is durable) — and drains what it should do:
``messages_to_send()`` (Hello, Push, Ack) and ``commands_to_run()`` (apply a page,
settle mutations, fetch snapshots, show progress, close, stop). No asyncio, socket,
SQL, clock or randomness lives here.

States::

    IDLE ──connection_made──▶ HANDSHAKE ──Welcome──▶ CATCHING_UP ──Events(has_more=False)──▶ LIVE
      ▲                           │                        │                                  │
      └──── connection_lost / receive_close (retryable) ◀──┴──────────────────────────────────┘
    any ── fatal close (4401, 4403, protocol version) or fatal Welcome ──▶ FAILED (terminal)

Over HTTP (``connection_made(handshake=False)``) there is no Welcome: the session starts
in CATCHING_UP and sends no Acks.

Invariants:

* **Exactly once** (SPEC promise 1): mutations are pushed in id order, one Push in
  flight; after any reconnect every unconfirmed mutation is pushed again, and the
  server's (client_id, id) dedupe answers ``duplicate`` for those it already applied.
  A result is final only when it is ``applied``/``duplicate`` (success) or
  ``rejected``/``duplicate`` with an error (rejection); code ``gap`` (from an
  older server: a ``conflict:`` error) means
  "an earlier id is missing" — the mutation stays pending, the session reconnects and
  the Welcome decides: resend from the first pending id, or stop if the server lost
  mutations this client had confirmed.
* **Ordered, gapless delivery** (promise 4): events must come in strictly increasing
  ``seq`` above the cursor; anything at or below it is dropped (never applied twice),
  a page out of order is a protocol violation (close, reconnect from the durable
  cursor). An Ack names only a cursor that the shell reported durable.
* **Progressive sync**: when Welcome's ``head`` is more than ``snapshot_threshold``
  events ahead, the session asks the shell to fetch current snapshots first, so every
  workflow's newest state shows before the backlog is paged through.
* **Flags**: Hello says the client understands ``Flags``; each one (after Welcome only)
  becomes an ``ApplyFlags`` command, which the shell applies at once.
* **Reset behind the retention horizon** (SPEC promise 8): when the server says it
  pruned events above the cursor (``Welcome.horizon`` / a pull's ``horizon``), the
  missed events are gone; the session asks for a *reset* — the tenant's current
  snapshots, newest first, applied before any further page — then pages what is still
  retained from the cursor as usual, so nothing retained is skipped. Pending mutations
  are untouched (they stay queued and are laid over the new snapshots). A reset is
  asked once per horizon; ``reset_failed`` re-arms it.
* **Nothing wedges the queue** (promise 7, issue 11): a Push holds at most
  ``max_batch`` mutations *and* fits the server's declared frame limit (``Welcome``'s
  ``max_frame_bytes``, less an envelope margin; ``DEFAULT_PUSH_BYTES`` for a server
  that declares none). A single mutation over that budget (only an old file or a
  server with a tiny limit can hold one: ``submit_workflow`` refuses them) is sent as
  a small stand-in without its args, which the server records as ``rejected``; the
  session settles it with its own "too large" reason and the queue moves on. A Push
  refused as too large all the same (4413, or 413 over HTTP: a proxy that allows less)
  halves the budget for good (``refused_too_large``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice

from client_sdk.backoff import Disposition, classify_close
from client_sdk.pushbudget import MIN_PUSH_BYTES, mutation_bytes, oversized
from client_sdk.session_types import (
    ApplyEvents,
    ApplyFlags,
    Close,
    Command,
    FetchSnapshots,
    SessionState,
    Settle,
    ShowProgress,
    Stop,
)
from protocol import (
    MAX_BATCH,
    MAX_EVENTS_PAGE,
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
    MutationStatus,
    Progress,
    ProtocolVersionError,
    Push,
    PushResult,
    ServerMessage,
    TetherError,
    Welcome,
    error_from_code,
)
from protocol.limits import DEFAULT_PUSH_BYTES, PUSH_OVERHEAD_BYTES

__all__ = [
    "ApplyEvents",
    "ApplyFlags",
    "Close",
    "Command",
    "Disposition",
    "FetchSnapshots",
    "SessionState",
    "Settle",
    "ShowProgress",
    "Stop",
    "SyncSession",
    "classify_close",
    "mutation_bytes",
]


@dataclass(slots=True)
class _Counters:
    pushes: int = 0
    pages: int = 0
    events: int = 0
    duplicates_dropped: int = 0
    reconnects: int = 0
    conflicts: int = 0
    resets: int = 0


class SyncSession:
    """Client end of one sync relationship, across any number of connections.

    Args:
        client_id: this client's id.
        cursor: the durable cursor (highest applied ``seq``).
        last_mutation_id: the highest mutation id ever assigned locally.
        pending: unconfirmed mutations, in id order.
        max_batch: most mutations per Push.
        max_batch_bytes: byte budget of a Push until a ``Welcome`` declares the
            server's limit.
        snapshot_threshold: a Welcome ``head`` this far ahead triggers ``FetchSnapshots``.
        close_policy: the retryable-or-fatal policy (``classify_close`` by default).
    """

    def __init__(
        self,
        client_id: str,
        *,
        cursor: int = 0,
        last_mutation_id: int = 0,
        pending: Iterable[Mutation] = (),
        max_batch: int = MAX_BATCH,
        max_batch_bytes: int = DEFAULT_PUSH_BYTES - PUSH_OVERHEAD_BYTES,
        snapshot_threshold: int = MAX_EVENTS_PAGE,
        close_policy: Callable[[int | None, str, Error | None], Disposition] = classify_close,
    ) -> None:
        self.client_id = client_id
        self.cursor = cursor
        """Highest seq reported durable by the shell."""
        self.received_cursor = cursor
        """Highest seq handed to the shell for applying."""
        self.last_mutation_id = last_mutation_id
        self._pending: dict[int, Mutation] = {m.id: m for m in pending}
        if self._pending:
            self.last_mutation_id = max(self.last_mutation_id, max(self._pending))
        self._in_flight: list[int] = []
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self._ceiling = 2**62  # lowered only by refusals (4413 / 413)
        self._sizes: dict[int, int] = {}  # mutation id -> encoded bytes (pending only)
        self._oversized: dict[int, str] = {}  # in-flight stand-ins -> the local reason
        self.snapshot_threshold = snapshot_threshold
        self._policy = close_policy
        self.state = SessionState.IDLE
        self.handshake = True
        self.error: TetherError | None = None
        """The error that stopped the session (FAILED), or the last server error."""
        self.server_error: Error | None = None
        self.server_id: str | None = None
        self.head = 0
        self.reset_horizon = 0
        """The horizon of the last reset asked for (0: none)."""
        self.counters = _Counters()
        self._outgoing: list[ClientMessage] = []
        self._commands: list[Command] = []

    # ------------------------------------------------------------ properties
    @property
    def pending_count(self) -> int:
        """Mutations not yet settled by the server."""
        return len(self._pending)

    @property
    def pending_ids(self) -> list[int]:
        """Ids of the unsettled mutations, in order."""
        return list(self._pending)

    @property
    def oldest_pending(self) -> Mutation | None:
        """The oldest unsettled mutation, if any."""
        return next(iter(self._pending.values()), None)

    @property
    def push_in_flight(self) -> bool:
        """A Push awaits its PushResult."""
        return bool(self._in_flight)

    @property
    def synced(self) -> bool:
        """Connected past the handshake (WebSocket) or polling (HTTP)."""
        return self.state in (SessionState.CATCHING_UP, SessionState.LIVE)

    @property
    def expecting_reply(self) -> bool:
        """The server owes an answer (Welcome or PushResult): the shell's stall timer runs."""
        return self.state is SessionState.HANDSHAKE or bool(self._in_flight)

    # ----------------------------------------------------------------- drains
    def messages_to_send(self) -> list[ClientMessage]:
        """Messages for the server, in order; the list is handed over and cleared."""
        out, self._outgoing = self._outgoing, []
        return out

    def commands_to_run(self) -> list[Command]:
        """Local actions for the shell, in order; handed over and cleared."""
        out, self._commands = self._commands, []
        return out

    # ----------------------------------------------------------------- inputs
    def connection_made(self, *, handshake: bool = True) -> None:
        """A transport is up: over WebSocket say Hello; over HTTP start pushing at once."""
        if self.state is SessionState.FAILED:
            return
        self.handshake = handshake
        self._in_flight = []
        self.server_error = None
        if handshake:
            self.state = SessionState.HANDSHAKE
            self._outgoing.append(
                Hello(
                    client_id=self.client_id,
                    protocol_version=PROTOCOL_VERSION,
                    cursor=self.received_cursor,
                    last_mutation_id=self._last_confirmed(),
                    flags=True,
                )
            )
        else:
            self.state = SessionState.CATCHING_UP
            self._push()

    def connection_lost(self) -> None:
        """The transport is gone; unanswered pushes will be sent again on the next one."""
        if self.state is SessionState.FAILED:
            return
        if self.state is not SessionState.IDLE:
            self.counters.reconnects += 1
        self.state = SessionState.IDLE
        self._in_flight = []
        self._outgoing = []

    def receive_close(self, code: int | None, reason: str = "") -> Disposition:
        """The server closed the connection (or it dropped, ``code=None``).

        Returns:
            The disposition: retry (with a minimum delay) or stop (session FAILED).
        """
        disposition = self._policy(code, reason, self.server_error)
        if code == 4413 and self._in_flight:
            self.refused_too_large()
        self.connection_lost()
        if not disposition.retry and self.state is not SessionState.FAILED:
            self._fail(disposition.error or TetherError(f"closed with {code}"))
        elif disposition.error is not None:
            self.error = disposition.error
        return disposition

    def receive_message(self, message: ServerMessage) -> None:
        """A message from the server (decoded)."""
        if self.state in (SessionState.IDLE, SessionState.FAILED):
            return
        if isinstance(message, Welcome):
            self._receive_welcome(message)
        elif isinstance(message, Events):
            self._receive_events(message)
        elif isinstance(message, PushResult):
            self._receive_push_result(message.results)
        elif isinstance(message, Progress):
            self._commands.append(ShowProgress(message))
        elif isinstance(message, Flags):
            if self.state is SessionState.HANDSHAKE:
                self._violation("Flags before Welcome")
                return
            self._commands.append(ApplyFlags(message))
        elif isinstance(message, Error):
            self.server_error = message
            self.error = error_from_code(message.code, message.message)

    def receive_push_results(self, results: list[MutationResult]) -> None:
        """Results of an HTTP push (same rules as a ``PushResult``)."""
        if self.synced:
            self._receive_push_result(results)

    def events_applied(self, cursor: int) -> None:
        """The shell made every event up to ``cursor`` durable; acknowledge it."""
        if cursor <= self.cursor:
            return
        self.cursor = cursor
        if self.handshake and self.synced:
            self._outgoing.append(Ack(cursor=cursor))

    def refused_too_large(self) -> None:
        """Our Push was refused as too large (4413 / HTTP 413) although it fitted the
        budget: something in between (a proxy) allows less. Halve the budget and keep
        it below that for good, so the same batch is never resent as it was."""
        self._ceiling = max(MIN_PUSH_BYTES, min(self._ceiling, self.max_batch_bytes // 2))
        self.max_batch_bytes = min(self.max_batch_bytes, self._ceiling)

    def send_mutation(self, mutation: Mutation) -> None:
        """A new mutation is durable locally; push it when the link allows."""
        if mutation.id in self._pending:
            return
        self._pending[mutation.id] = mutation
        self.last_mutation_id = max(self.last_mutation_id, mutation.id)
        self._push()

    def receive_horizon(self, horizon: int) -> None:
        """The server pruned the tenant's events up to ``horizon``: a cursor below it
        (not already being reset for it) asks for a reset from current snapshots."""
        if horizon > self.received_cursor and horizon > self.reset_horizon:
            self.reset_horizon = horizon
            self.counters.resets += 1
            self._commands.append(FetchSnapshots(reset=True, horizon=horizon))

    def reset_failed(self) -> None:
        """The shell could not fetch the snapshots of a reset: forget the pages handed
        over since (they must not advance the cursor past the missed events) and ask
        again on the next Welcome."""
        self.reset_horizon = 0
        self.received_cursor = self.cursor

    def fail(self, error: TetherError) -> None:
        """Stop for good (e.g. the shell found the token refused over HTTP)."""
        if self.state is not SessionState.FAILED:
            self.connection_lost()
            self._fail(error)

    # -------------------------------------------------------------- handlers
    def _fail(self, error: TetherError) -> None:
        self.state = SessionState.FAILED
        self.error = error
        self._outgoing = []
        self._commands.append(Stop(error))

    def _violation(self, text: str) -> None:
        error = BadMessage(text)
        self.error = error
        self._commands.append(Close(error))
        self.connection_lost()

    def _last_confirmed(self) -> int:
        if self._pending:
            return next(iter(self._pending)) - 1
        return self.last_mutation_id

    def _receive_welcome(self, welcome: Welcome) -> None:
        if self.state is not SessionState.HANDSHAKE:
            self._violation("unexpected Welcome")
            return
        if welcome.protocol_version != PROTOCOL_VERSION:
            self._fail(
                ProtocolVersionError(
                    f"server speaks protocol {welcome.protocol_version}, client {PROTOCOL_VERSION}"
                )
            )
            return
        if welcome.last_mutation_id > self.last_mutation_id:
            # Mutations we never issued would be answered "duplicate" and silently lost.
            self._fail(
                Conflict(
                    f"server has applied mutation {welcome.last_mutation_id} of client "
                    f"{self.client_id} but this file only issued {self.last_mutation_id}: the "
                    "local file was restored from an old copy or the client id is shared"
                )
            )
            return
        if welcome.last_mutation_id < self._last_confirmed():
            self._fail(
                Conflict(
                    f"server knows mutations of client {self.client_id} only up to "
                    f"{welcome.last_mutation_id}, but {self._last_confirmed()} were confirmed: "
                    "the server lost data"
                )
            )
            return
        self.server_id = welcome.server_id
        self.head = welcome.head
        declared = welcome.max_frame_bytes or DEFAULT_PUSH_BYTES
        self.max_batch_bytes = min(max(1, declared - PUSH_OVERHEAD_BYTES), self._ceiling)
        self.state = (
            SessionState.CATCHING_UP if welcome.head > self.received_cursor else SessionState.LIVE
        )
        if welcome.horizon > self.received_cursor:
            self.receive_horizon(welcome.horizon)
        elif welcome.head - self.received_cursor > self.snapshot_threshold:
            self._commands.append(FetchSnapshots())
        self._push()

    def _receive_events(self, message: Events) -> None:
        if not self.synced:
            self._violation("Events before Welcome")
            return
        fresh: list[Event] = []
        last = self.received_cursor
        for event in message.events:
            if event.seq <= self.received_cursor:
                self.counters.duplicates_dropped += 1
                continue
            if event.seq <= last:
                self._violation(f"events out of order: seq {event.seq} after {last}")
                return
            last = event.seq
            fresh.append(event)
        if message.cursor < last:
            self._violation(f"page cursor {message.cursor} below its last event {last}")
            return
        cursor = max(self.received_cursor, message.cursor)
        self.counters.pages += 1
        self.counters.events += len(fresh)
        if fresh or cursor > self.received_cursor:
            self.received_cursor = cursor
            self._commands.append(ApplyEvents(fresh, cursor))
        if not message.has_more and self.state is SessionState.CATCHING_UP:
            self.state = SessionState.LIVE

    def _receive_push_result(self, results: list[MutationResult]) -> None:
        expected = self._in_flight
        ids = [r.id for r in results]
        if ids != expected:
            self._violation(f"push results for ids {ids[:5]}… do not answer {expected[:5]}…")
            return
        self._in_flight = []
        settled: list[tuple[int, bool, str | None]] = []
        conflict: str | None = None
        for result in results:
            mid, status, error = result.id, result.status, result.error
            if result.gap:
                # Not applied because an earlier id is missing: keep it pending.
                self.counters.conflicts += 1
                conflict = conflict or f"mutation {mid}: {error}"
                continue
            applied = status == MutationStatus.APPLIED or (
                status == MutationStatus.DUPLICATE and error is None
            )
            local = self._oversized.pop(mid, None)
            if local is not None and not applied:
                error = local  # the server only saw the stand-in: our reason is the real one
            settled.append((mid, applied, None if applied else (error or "rejected")))
            self._pending.pop(mid, None)
            self._sizes.pop(mid, None)
        if settled:
            self._commands.append(Settle(settled))
        if conflict is not None:
            # Reconnect: the next Welcome re-states the server's last id, and either the
            # push resumes from the first pending id or the Welcome check stops the
            # session with a clear "server lost data" error.
            self._commands.append(Close(Conflict(f"server reports a gap at {conflict}")))
            self.connection_lost()
            return
        self._push()

    def _size(self, mutation: Mutation) -> int:
        if (size := self._sizes.get(mutation.id)) is None:
            size = self._sizes[mutation.id] = mutation_bytes(mutation)
        return size

    def _push(self) -> None:
        if not self.synced or self._in_flight or not self._pending:
            return
        # The dict is in id order: ids only grow, and settled ones are popped. Cut the
        # batch by count and by bytes; the first mutation always goes (alone if need be).
        batch: list[Mutation] = []
        total, budget = 0, self.max_batch_bytes
        for mutation in islice(self._pending.values(), self.max_batch):
            size = self._size(mutation)
            if batch and total + size > budget:
                break
            batch.append(mutation)
            total += size
        self._oversized.clear()
        if len(batch) == 1 and total > budget:
            stand_in, self._oversized[batch[0].id] = oversized(batch[0], total, budget)
            batch = [stand_in]
        self._in_flight = [m.id for m in batch]
        self.counters.pushes += 1
        self._outgoing.append(Push(mutations=batch))
