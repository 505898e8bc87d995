"""Client session: stateful Hypothesis machine against a fake wire.

Split from test_client_session.py."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from client_sdk.session import (
    ApplyEvents,
    Close,
    SessionState,
    Settle,
    Stop,
    SyncSession,
)
from protocol import (
    Events,
    Hello,
    Mutation,
)
from tests.client_session_helpers import TENANT, FakeServer, submit

pytestmark = pytest.mark.timeout(60)


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
