"""ServerSession: the pure core of one sync session (no sockets, no store)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    PROTOCOL_VERSION,
    Ack,
    Error,
    Event,
    Events,
    Hello,
    Mutation,
    MutationResult,
    Progress,
    Push,
    PushResult,
    Welcome,
)
from protocol.errors import StorageError
from sync_server.session import ApplyPush, LoadClient, ReadEvents, ServerSession, ServerSessionState


def ev(seq: int) -> Event:
    return Event(seq=seq, workflow_id="w", type="t", data={}, at=1.0)


def hello(cursor: int = 0, version: int = PROTOCOL_VERSION) -> Hello:
    return Hello(client_id="c1", protocol_version=version, cursor=cursor)


def welcomed(cursor: int = 0, head: int = 0, **kw) -> ServerSession:
    s = ServerSession(server_id="s1", **kw)
    s.receive_message(hello(cursor))
    assert s.commands_to_run() == [LoadClient("c1")]
    s.receive_client_state(last_mutation_id=7, head=head)
    return s


def test_hello_then_welcome_then_first_page():
    s = welcomed(cursor=3, head=10, page_size=50)
    assert s.messages_to_send() == [
        Welcome(server_id="s1", protocol_version=PROTOCOL_VERSION, last_mutation_id=7, head=10)
    ]
    assert s.commands_to_run() == [ReadEvents(after=3, limit=50)]
    assert s.state is ServerSessionState.CATCHING_UP


def test_anything_before_hello_is_a_protocol_error():
    s = ServerSession(server_id="s1")
    s.receive_message(Ack(cursor=0))
    [error] = s.messages_to_send()
    assert isinstance(error, Error) and error.code == "bad_message"
    assert s.close_code == 4400 and s.closed
    s.receive_message(hello())  # ignored once closed
    assert s.messages_to_send() == [] and s.commands_to_run() == []


def test_wrong_protocol_version_closes_4409():
    s = ServerSession(server_id="s1")
    s.receive_message(hello(version=PROTOCOL_VERSION + 1))
    [error] = s.messages_to_send()
    assert error.code == "protocol_version" and s.close_code == 4409


def test_second_hello_is_refused():
    s = welcomed()
    s.receive_message(hello())
    assert s.close_code == 4400


def test_cursor_ahead_of_head_is_a_conflict():
    s = ServerSession(server_id="s1")
    s.receive_message(hello(cursor=100))
    s.receive_client_state(0, head=5)
    [error] = s.messages_to_send()
    assert error.code == "conflict" and s.close_code == 4409


def test_push_becomes_apply_and_results_are_sent():
    s = welcomed()
    s.messages_to_send(), s.commands_to_run()
    m = Mutation(id=1, name="cancel_workflow", args={})
    s.receive_message(Push(mutations=[m]))
    assert s.commands_to_run() == [ApplyPush("c1", [m])]
    s.receive_push_results([MutationResult(1, "applied")])
    assert s.messages_to_send() == [PushResult(results=[MutationResult(1, "applied")])]


def test_paging_waits_for_acks_beyond_the_window():
    s = welcomed(page_size=2, window=2)
    s.messages_to_send()
    assert s.commands_to_run() == [ReadEvents(0, 2)]
    s.receive_page([ev(1), ev(2)], has_more=True)
    assert s.commands_to_run() == [ReadEvents(2, 2)]
    s.receive_page([ev(3), ev(4)], has_more=True)
    assert s.commands_to_run() == []  # two pages unacknowledged: wait
    assert [m.cursor for m in s.messages_to_send()] == [2, 4]
    s.receive_message(Ack(cursor=2))
    assert s.commands_to_run() == [ReadEvents(4, 2)]
    s.receive_page([ev(5)], has_more=False)
    assert s.state is ServerSessionState.LIVE
    assert s.messages_to_send() == [Events(events=[ev(5)], cursor=5, has_more=False)]


def test_ack_beyond_what_was_sent_is_a_protocol_error():
    s = welcomed()
    s.receive_message(Ack(cursor=99))
    assert s.close_code == 4400


def test_live_events_while_catching_up_trigger_one_more_read():
    s = welcomed(page_size=10)
    s.commands_to_run()
    s.receive_live([ev(4)])  # committed after the read began
    assert s.commands_to_run() == []  # a read is already outstanding
    s.receive_page([ev(1), ev(2)], has_more=False)
    assert s.commands_to_run() == [ReadEvents(2, 10)]
    assert s.state is ServerSessionState.CATCHING_UP
    s.receive_page([ev(3), ev(4)], has_more=False)
    assert s.state is ServerSessionState.LIVE
    sent = [e.seq for m in s.messages_to_send() if isinstance(m, Events) for e in m.events]
    assert sent == [1, 2, 3, 4]


def test_live_forwarding_skips_what_was_already_sent():
    s = welcomed()
    s.commands_to_run()
    s.receive_page([ev(1), ev(2)], has_more=False)
    s.messages_to_send()
    s.receive_live([ev(2), ev(3)])
    assert s.messages_to_send() == [Events(events=[ev(3)], cursor=3, has_more=False)]
    s.receive_live([])
    assert s.messages_to_send() == []


def test_progress_only_when_live():
    s = welcomed()
    p = Progress(workflow_id="w", step="a", fraction=0.5)
    s.receive_progress(p)
    assert [m for m in s.messages_to_send() if isinstance(m, Progress)] == []
    s.commands_to_run()
    s.receive_page([], has_more=False)
    s.messages_to_send()
    s.receive_progress(p)
    assert s.messages_to_send() == [p]


def test_fail_sends_error_then_closes_once():
    s = welcomed()
    s.messages_to_send()
    s.fail(StorageError("disk"))
    s.fail(StorageError("again"))
    msgs = s.messages_to_send()
    assert len(msgs) == 1 and msgs[0].retryable
    assert s.close_code == 1011
    s.receive_push_results([])
    s.receive_page([ev(1)], has_more=False)
    s.receive_live([ev(1)])
    assert s.messages_to_send() == []


@settings(max_examples=200, deadline=None)
@given(
    commits=st.lists(st.integers(1, 5), min_size=1, max_size=20),
    page=st.integers(1, 7),
    read_lags=st.lists(st.integers(0, 3), max_size=40),
)
def test_catch_up_and_live_cover_every_event_once(commits, page, read_lags):
    """Interleave commits (announced live) with paged reads: the client gets 1..N once."""
    log: list[Event] = []
    s = welcomed(page_size=page, window=2)
    s.messages_to_send()
    pending = list(s.commands_to_run())
    received: list[int] = []
    lags = iter(read_lags)

    def deliver():
        for m in s.messages_to_send():
            if isinstance(m, Events):
                received.extend(e.seq for e in m.events)
                s.receive_message(Ack(cursor=m.cursor))
        pending.extend(s.commands_to_run())

    for n in commits:
        new = [ev(len(log) + i + 1) for i in range(n)]
        log.extend(new)
        s.receive_live(new)
        deliver()
        # Serve a read only sometimes: reads and commits interleave.
        if pending and next(lags, 0) == 0:
            cmd = pending.pop(0)
            rows = [e for e in log if e.seq > cmd.after][: cmd.limit + 1]
            s.receive_page(rows[: cmd.limit], has_more=len(rows) > cmd.limit)
            deliver()
    while pending:
        cmd = pending.pop(0)
        rows = [e for e in log if e.seq > cmd.after][: cmd.limit + 1]
        s.receive_page(rows[: cmd.limit], has_more=len(rows) > cmd.limit)
        deliver()
    assert received == list(range(1, len(log) + 1))
    assert s.state is ServerSessionState.LIVE
