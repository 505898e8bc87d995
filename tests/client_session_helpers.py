"""Helpers shared by the test_client_session test files (moved from test_client_session.py)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from protocol import (
    PROTOCOL_VERSION,
    Event,
    Events,
    Hello,
    Mutation,
    MutationResult,
    Push,
    PushResult,
    Welcome,
)

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
