"""Unit tests of the pure client session (no sockets, no clock, no DB).

A ``FakeServer`` applies the real protocol rules (exactly-once by (client, id),
``conflict:`` on a gap, paging, live events) and is wired back to back with
``SyncSession``; a Hypothesis state machine drives both through random interleavings,
drops, disconnects and client crashes, and checks SPEC promises 1 and 4.

Split by topic: this file (scripted exchanges), test_client_session_machine.py
(stateful machine); shared helpers in client_session_helpers.py.
"""

from __future__ import annotations

import pytest

from client_sdk.session import (
    ApplyEvents,
    Close,
    FetchSnapshots,
    SessionState,
    Settle,
    ShowProgress,
    Stop,
    SyncSession,
    classify_close,
)
from protocol import (
    PROTOCOL_VERSION,
    Ack,
    Conflict,
    Error,
    Events,
    Forbidden,
    Hello,
    MutationResult,
    Progress,
    ProtocolVersionError,
    Push,
    PushResult,
    RateLimited,
    Unauthorized,
    Welcome,
)
from tests.client_session_helpers import TENANT, FakeServer, event, submit

pytestmark = pytest.mark.timeout(60)


def connect(session: SyncSession) -> list[object]:
    session.connection_made()
    return session.messages_to_send()


def test_hello_carries_cursor_and_last_confirmed_id() -> None:
    s = SyncSession("c1", cursor=7, last_mutation_id=5, pending=[submit(4), submit(5)])
    assert s.state is SessionState.IDLE
    [hello] = connect(s)
    assert hello == Hello(
        client_id="c1", protocol_version=PROTOCOL_VERSION, cursor=7, last_mutation_id=3, flags=True
    )
    assert s.state is SessionState.HANDSHAKE and s.expecting_reply


def test_push_in_batches_one_in_flight() -> None:
    s = SyncSession("c1", pending=[submit(i) for i in range(1, 8)], max_batch=3)
    connect(s)
    s.receive_message(Welcome(server_id="s", protocol_version=1, last_mutation_id=0, head=0))
    [push] = s.messages_to_send()
    assert isinstance(push, Push) and [m.id for m in push.mutations] == [1, 2, 3]
    s.send_mutation(submit(8))
    assert s.messages_to_send() == []  # one push in flight
    s.receive_message(PushResult(results=[MutationResult(i, "applied") for i in (1, 2, 3)]))
    assert s.commands_to_run() == [Settle([(1, True, None), (2, True, None), (3, True, None)])]
    [push] = s.messages_to_send()
    assert [m.id for m in push.mutations] == [4, 5, 6]


def test_results_duplicate_rejected_and_conflict() -> None:
    s = SyncSession("c1", pending=[submit(i) for i in range(1, 5)])
    connect(s)
    s.receive_message(Welcome(server_id="s", protocol_version=1, last_mutation_id=2, head=0))
    s.messages_to_send()
    s.receive_message(
        PushResult(
            results=[
                MutationResult(1, "duplicate", None),
                MutationResult(2, "duplicate", "unknown workflow"),
                MutationResult(3, "rejected", "bad input"),
                MutationResult(4, "rejected", "conflict: skips ahead"),
            ]
        )
    )
    settle, close = s.commands_to_run()
    assert settle == Settle(
        [(1, True, None), (2, False, "unknown workflow"), (3, False, "bad input")]
    )
    assert isinstance(close, Close) and isinstance(close.error, Conflict)
    assert s.pending_ids == [4] and s.state is SessionState.IDLE
    assert s.counters.conflicts == 1
    connect(s)  # the conflicted mutation is pushed again after the next Welcome
    s.receive_message(Welcome(server_id="s", protocol_version=1, last_mutation_id=3, head=0))
    [push] = s.messages_to_send()
    assert [m.id for m in push.mutations] == [4]


def test_gap_confirmed_by_welcome_stops() -> None:
    s = SyncSession("c1", pending=[submit(3)], last_mutation_id=3)
    s.connection_made(handshake=False)
    s.messages_to_send()
    s.receive_push_results([MutationResult(3, "rejected", "conflict: gap")])
    assert isinstance(s.commands_to_run()[-1], Close)
    connect(s)
    s.receive_message(Welcome(server_id="s", protocol_version=1, last_mutation_id=1, head=0))
    [stop] = s.commands_to_run()
    assert isinstance(stop, Stop) and isinstance(stop.error, Conflict)
    assert s.state is SessionState.FAILED


def test_reconnect_resends_every_unconfirmed_mutation() -> None:
    s = SyncSession("c1", pending=[submit(1), submit(2)])
    connect(s)
    s.receive_message(Welcome(server_id="s", protocol_version=1, last_mutation_id=0, head=0))
    assert s.push_in_flight
    s.connection_lost()
    assert not s.push_in_flight and s.pending_count == 2
    connect(s)
    s.receive_message(Welcome(server_id="s", protocol_version=1, last_mutation_id=2, head=0))
    [push] = s.messages_to_send()
    assert [m.id for m in push.mutations] == [1, 2]


def test_push_results_that_do_not_match_close_the_connection() -> None:
    s = SyncSession("c1", pending=[submit(1)])
    connect(s)
    s.receive_message(Welcome(server_id="s", protocol_version=1, last_mutation_id=0, head=0))
    s.messages_to_send()
    s.receive_message(PushResult(results=[MutationResult(9, "applied")]))
    [close] = s.commands_to_run()
    assert isinstance(close, Close) and s.state is SessionState.IDLE


def test_events_applied_then_acked_duplicates_dropped() -> None:
    s = SyncSession("c1", cursor=2)
    connect(s)
    s.receive_message(Welcome(server_id="s", protocol_version=1, last_mutation_id=0, head=9))
    assert s.state is SessionState.CATCHING_UP
    s.receive_message(Events(events=[event(2), event(4), event(7)], cursor=7, has_more=True))
    [apply] = s.commands_to_run()
    assert apply == ApplyEvents([event(4), event(7)], 7)
    assert s.messages_to_send() == []  # no Ack before the page is durable
    assert s.cursor == 2 and s.received_cursor == 7
    s.events_applied(7)
    assert s.messages_to_send() == [Ack(cursor=7)]
    s.receive_message(Events(events=[event(9)], cursor=9, has_more=False))
    assert s.state is SessionState.LIVE
    assert s.counters.duplicates_dropped == 1


def test_out_of_order_events_are_a_violation() -> None:
    s = SyncSession("c1")
    connect(s)
    s.receive_message(Welcome(server_id="s", protocol_version=1, last_mutation_id=0, head=9))
    s.receive_message(Events(events=[event(5), event(3)], cursor=5))
    [close] = s.commands_to_run()
    assert isinstance(close, Close)
    assert s.received_cursor == 0  # nothing of the bad page is applied


def test_events_before_welcome_and_second_welcome_are_violations() -> None:
    s = SyncSession("c1")
    connect(s)
    s.receive_message(Events(events=[event(1)], cursor=1))
    assert isinstance(s.commands_to_run()[0], Close)
    connect(s)
    welcome = Welcome(server_id="s", protocol_version=1, last_mutation_id=0, head=0)
    s.receive_message(welcome)
    s.receive_message(welcome)
    assert isinstance(s.commands_to_run()[-1], Close)


def test_cursor_without_events_still_advances() -> None:
    s = SyncSession("c1")
    connect(s)
    s.receive_message(Welcome(server_id="s", protocol_version=1, last_mutation_id=0, head=5))
    s.receive_message(Events(events=[], cursor=5, has_more=False))
    assert s.commands_to_run() == [ApplyEvents([], 5)]


def test_far_behind_fetches_snapshots_first() -> None:
    s = SyncSession("c1", snapshot_threshold=100)
    connect(s)
    s.receive_message(Welcome(server_id="s", protocol_version=1, last_mutation_id=0, head=101))
    assert s.commands_to_run() == [FetchSnapshots()]


def test_progress_is_forwarded() -> None:
    s = SyncSession("c1")
    connect(s)
    s.receive_message(Welcome(server_id="s", protocol_version=1, last_mutation_id=0, head=0))
    p = Progress(workflow_id="w", step="a", fraction=0.5)
    s.receive_message(p)
    assert s.commands_to_run() == [ShowProgress(p)]


@pytest.mark.parametrize(
    ("welcome", "error"),
    [
        (
            Welcome(server_id="s", protocol_version=99, last_mutation_id=0, head=0),
            ProtocolVersionError,
        ),
        (Welcome(server_id="s", protocol_version=1, last_mutation_id=9, head=0), Conflict),
        (Welcome(server_id="s", protocol_version=1, last_mutation_id=1, head=0), Conflict),
    ],
)
def test_fatal_welcomes(welcome: Welcome, error: type[Exception]) -> None:
    # Local: ids 1..5 issued, 3..5 pending (so 2 were confirmed).
    s = SyncSession("c1", last_mutation_id=5, pending=[submit(3), submit(4), submit(5)])
    connect(s)
    s.receive_message(welcome)
    [stop] = s.commands_to_run()
    assert isinstance(stop, Stop) and isinstance(stop.error, error)
    assert s.state is SessionState.FAILED
    s.connection_made()  # a failed session stays failed
    assert s.messages_to_send() == []


@pytest.mark.parametrize(
    ("code", "server_error", "retry", "error", "min_delay"),
    [
        (4401, None, False, Unauthorized, 0),
        (1008, Error(code="unauthorized", message="expired"), False, Unauthorized, 0),
        (4403, None, False, Forbidden, 0),
        (4409, Error(code="protocol_version", message="v"), False, ProtocolVersionError, 0),
        (4409, Error(code="conflict", message="c"), True, Conflict, 0),
        (4429, None, True, RateLimited, 1.0),
        (1012, None, True, None, 0),
        (1013, Error(code="unavailable", message="full", retryable=True), True, Exception, 0),
        (None, None, True, None, 0),
        (4400, Error(code="bad_message", message="?"), True, Exception, 0),
    ],
)
def test_close_policy(code, server_error, retry, error, min_delay) -> None:
    d = classify_close(code, "", server_error)
    assert d.retry is retry and d.min_delay == min_delay
    if error is None:
        assert d.error is None
    else:
        assert isinstance(d.error, error)


def test_receive_close_after_error_message_stops_on_bad_token() -> None:
    s = SyncSession("c1")
    connect(s)
    s.receive_message(Error(code="unauthorized", message="token expired"))
    d = s.receive_close(4401, "unauthorized")
    assert not d.retry and s.state is SessionState.FAILED
    assert isinstance(s.error, Unauthorized) and "expired" in s.error.message


def test_http_mode_has_no_hello_and_no_ack() -> None:
    s = SyncSession("c1", pending=[submit(1)])
    s.connection_made(handshake=False)
    [push] = s.messages_to_send()
    assert isinstance(push, Push)
    s.receive_message(Events(events=[event(1)], cursor=1))
    s.commands_to_run()
    s.events_applied(1)
    assert s.messages_to_send() == []


def test_back_to_back_with_fake_server() -> None:
    server = FakeServer()
    server.append("other", "x")
    for _ in range(4):
        server.append(TENANT, "w0")
    s = SyncSession("c1", pending=[submit(1), submit(2)])
    client = Wire(s, server)
    client.connect()
    client.run()
    assert s.state is SessionState.LIVE and s.pending_count == 0
    assert client.applied == server.tenant_seqs()
    assert [i for _, i in server.applied] == [1, 2]


class Wire:
    """Runs a session against a FakeServer until quiet (durable work done at once)."""

    def __init__(self, session: SyncSession, server: FakeServer) -> None:
        self.s = session
        self.server = server
        self.applied: list[int] = []
        self.settled: dict[int, bool] = {}

    def connect(self) -> None:
        self.s.connection_made()

    def run(self) -> None:
        while True:
            out = self.s.messages_to_send()
            commands = self.s.commands_to_run()
            if not out and not commands:
                return
            for command in commands:
                self.execute(command)
            for message in out:
                for answer in self.server.handle(self.s.client_id, message):
                    self.s.receive_message(answer)  # type: ignore[arg-type]

    def execute(self, command: object) -> None:
        if isinstance(command, ApplyEvents):
            self.applied.extend(e.seq for e in command.events)
            self.s.events_applied(command.cursor)
        elif isinstance(command, Settle):
            for mid, ok, _ in command.results:
                self.settled[mid] = ok
