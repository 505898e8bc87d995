"""Unit tests of the pure client session (no sockets, no clock, no DB).

A ``FakeServer`` applies the real protocol rules (exactly-once by (client, id),
``conflict:`` on a gap, paging, live events) and is wired back to back with
``SyncSession``; a Hypothesis state machine drives both through random interleavings,
drops, disconnects and client crashes, and checks SPEC promises 1 and 4.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

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
    Event,
    Events,
    Forbidden,
    Hello,
    Mutation,
    MutationResult,
    Progress,
    ProtocolVersionError,
    Push,
    PushResult,
    RateLimited,
    Unauthorized,
    Welcome,
)

pytestmark = pytest.mark.timeout(60)

TENANT = "acme"


def submit(mid: int) -> Mutation:
    args = {"workflow_id": str(uuid.UUID(int=mid)), "name": "noop", "input": {}}
    return Mutation(id=mid, name="submit_workflow", args=args, created_at=1.0)


def event(seq: int, wf: str = "w", version: int = 1) -> Event:
    return Event(seq=seq, workflow_id=wf, type="t", data={"workflow": {"id": wf}}, at=1.0)


@dataclass
class FakeServer:
    """The server's rules, in memory: exactly-once per (client, id), gapless log."""

    page_size: int = 3
    log: list[tuple[int, str, str]] = field(default_factory=list)  # seq, tenant, wf
    last: dict[str, int] = field(default_factory=dict)
    outcomes: dict[tuple[str, int], str | None] = field(default_factory=dict)
    applied: list[tuple[str, int]] = field(default_factory=list)
    reject_names: set[str] = field(default_factory=lambda: {"bad"})

    def append(self, tenant: str, wf: str) -> Event:
        seq = len(self.log) + 1
        self.log.append((seq, tenant, wf))
        return event(seq, wf)

    def tenant_seqs(self) -> list[int]:
        return [s for s, t, _ in self.log if t == TENANT]

    def page(self, after: int) -> Events:
        mine = [event(s, wf) for s, t, wf in self.log if t == TENANT and s > after]
        page = mine[: self.page_size]
        cursor = page[-1].seq if page else after
        return Events(events=page, cursor=cursor, has_more=len(mine) > len(page))

    def handle(self, client_id: str, message: object) -> list[object]:
        """One client message in, the server's answers out (pages sent eagerly)."""
        if isinstance(message, Hello):
            out: list[object] = [
                Welcome(
                    server_id="s1",
                    protocol_version=PROTOCOL_VERSION,
                    last_mutation_id=self.last.get(client_id, 0),
                    head=len(self.log),
                )
            ]
            after = message.cursor
            while True:
                page = self.page(after)
                out.append(page)
                after = page.cursor
                if not page.has_more:
                    return out
        if isinstance(message, Push):
            results, live = [], []
            for m in message.mutations:
                last = self.last.get(client_id, 0)
                if m.id <= last:
                    error = self.outcomes[(client_id, m.id)]
                    results.append(MutationResult(m.id, "duplicate", error))
                elif m.id != last + 1:
                    results.append(MutationResult(m.id, "rejected", f"conflict: gap at {m.id}"))
                elif m.args.get("name") in self.reject_names:
                    self.last[client_id] = m.id
                    self.outcomes[(client_id, m.id)] = "unknown workflow"
                    self.applied.append((client_id, m.id))
                    results.append(MutationResult(m.id, "rejected", "unknown workflow"))
                else:
                    self.last[client_id] = m.id
                    self.outcomes[(client_id, m.id)] = None
                    self.applied.append((client_id, m.id))
                    live.append(self.append(TENANT, m.args["workflow_id"]))
                    results.append(MutationResult(m.id, "applied", None))
            out = [PushResult(results=results)]
            if live:
                out.append(Events(events=live, cursor=live[-1].seq, has_more=False))
            return out
        return []


def connect(session: SyncSession) -> list[object]:
    session.connection_made()
    return session.messages_to_send()


# ------------------------------------------------------------------ examples


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


# --------------------------------------------------------------- state machine


class SessionMachine(RuleBasedStateMachine):
    """Random schedules of submit / deliver / drop / disconnect / crash, with checks.

    The network holds messages in two FIFO queues; a disconnect drops them. Durable
    client state (cursor, applied seqs, pending queue) survives a crash; the session's
    memory and undone commands do not.
    """

    def __init__(self) -> None:
        super().__init__()
        self.server = FakeServer(page_size=2)
        self.next_id = 1
        self.durable_pending: dict[int, Mutation] = {}
        self.durable_cursor = 0
        self.durable_seqs: list[int] = []
        self.returned: set[int] = set()
        self.rejected: set[int] = set()
        self.to_server: list[object] = []
        self.to_client: list[object] = []
        self.commands: list[object] = []
        self.new_session()

    def new_session(self) -> None:
        self.s = SyncSession(
            "c1",
            cursor=self.durable_cursor,
            last_mutation_id=self.next_id - 1,
            pending=sorted(self.durable_pending.values(), key=lambda m: m.id),
            max_batch=3,
            snapshot_threshold=4,
        )
        self.commands = []
        self.to_server, self.to_client = [], []
        self.link_open = False

    def pump(self) -> None:
        self.to_server.extend(self.s.messages_to_send())
        for command in self.s.commands_to_run():
            if isinstance(command, Close):
                self.drop_link()
            elif isinstance(command, Stop):
                raise AssertionError(f"session stopped: {command.error}")
            elif isinstance(command, ApplyEvents | Settle):
                self.commands.append(command)

    def drop_link(self) -> None:
        self.to_server, self.to_client = [], []
        self.link_open = False
        self.s.connection_lost()

    @rule(bad=st.booleans())
    def submit(self, bad: bool) -> None:
        m = submit(self.next_id)
        if bad:
            m = Mutation(id=m.id, name=m.name, args={**m.args, "name": "bad"})
        self.next_id += 1
        self.durable_pending[m.id] = m  # committed before "submit_workflow returns"
        self.returned.add(m.id)
        self.s.send_mutation(m)
        self.pump()

    @rule(tenant=st.sampled_from([TENANT, "other"]))
    def server_event(self, tenant: str) -> None:
        e = self.server.append(tenant, "w-live")
        if tenant == TENANT and self.link_open:  # the server streams it live
            self.to_client.append(Events(events=[e], cursor=e.seq, has_more=False))

    @precondition(lambda self: self.s.state is SessionState.IDLE)
    @rule()
    def connect(self) -> None:
        self.s.connection_made()
        self.pump()

    @rule()
    def disconnect(self) -> None:
        self.drop_link()

    @precondition(lambda self: bool(self.to_server))
    @rule()
    def deliver_to_server(self) -> None:
        message = self.to_server.pop(0)
        if isinstance(message, Hello):
            self.link_open = True  # pages up to now follow; later events go live
        self.to_client.extend(self.server.handle("c1", message))

    @precondition(lambda self: bool(self.to_client))
    @rule()
    def deliver_to_client(self) -> None:
        self.s.receive_message(self.to_client.pop(0))  # type: ignore[arg-type]
        self.pump()

    @precondition(lambda self: bool(self.commands))
    @rule()
    def run_command(self) -> None:
        command = self.commands.pop(0)
        if isinstance(command, ApplyEvents):
            fresh = [e.seq for e in command.events if e.seq > self.durable_cursor]
            self.durable_seqs.extend(fresh)
            self.durable_cursor = max(self.durable_cursor, command.cursor)
            self.s.events_applied(command.cursor)
        elif isinstance(command, Settle):
            for mid, ok, _ in command.results:
                self.durable_pending.pop(mid, None)
                if not ok:
                    self.rejected.add(mid)
        self.pump()

    @rule()
    def crash(self) -> None:
        self.new_session()

    @invariant()
    def exactly_once_in_order(self) -> None:
        ids = [i for c, i in self.server.applied if c == "c1"]
        assert ids == list(range(1, len(ids) + 1))

    @invariant()
    def durable_log_is_gapless_prefix(self) -> None:
        mine = [s for s in self.server.tenant_seqs() if s <= self.durable_cursor]
        assert self.durable_seqs == mine

    def teardown(self) -> None:
        # Heal the network and run to quiescence: everything converges.
        self.drop_link()
        for _ in range(200):
            if self.s.state is SessionState.IDLE:
                self.s.connection_made()
            self.pump()
            while self.to_server or self.to_client or self.commands:
                if self.to_server:
                    self.deliver_to_server()
                elif self.to_client:
                    self.deliver_to_client()
                else:
                    self.run_command()
            if not self.durable_pending and self.s.state is SessionState.LIVE:
                break
        assert not self.durable_pending
        ids = [i for c, i in self.server.applied if c == "c1"]
        assert set(ids) == self.returned  # every returned submit applied exactly once
        assert self.rejected == {i for i in ids if self.server.outcomes[("c1", i)]}
        assert self.durable_seqs == self.server.tenant_seqs()


TestSessionMachine = SessionMachine.TestCase
TestSessionMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
