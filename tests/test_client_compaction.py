"""The client's file stays bounded under continuous traffic (compaction, SPEC promise 8).

A soak feeds a real ``LocalStore`` file page after page of events (new workflows that
run and finish) with a moving clock, compacting as ``SyncClient`` does; the file's size
and row counts reach a plateau. The same soak without compaction keeps growing, so the
bound is the compaction's doing.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from client_sdk.compaction import CompactionPolicy
from client_sdk.localstore import LocalStore
from protocol import Event

pytestmark = pytest.mark.timeout(120)

PER_ROUND = 60  # workflows started and finished per round
EVENTS = 5  # events per workflow
STEP = 10.0  # seconds of fake time per round


def page(round_no: int, seq: int, now: float) -> list[Event]:
    events: list[Event] = []
    for w in range(PER_ROUND):
        wid = f"r{round_no:04d}-w{w:03d}"
        for v in range(1, EVENTS + 1):
            seq += 1
            status = "completed" if v == EVENTS else "running"
            snap: dict[str, Any] = {
                "id": wid,
                "name": "generate_image",
                "status": status,
                "steps": {"render": {"status": "running", "attempts": 1, "progress": v / 5}},
                "progress": v / EVENTS,
                "result": {"url": "s3://bucket/" + "x" * 80} if status == "completed" else None,
                "updated_at": now,
                "version": v,
            }
            events.append(Event(seq, wid, "step.progress", {"workflow": snap}, now))
    return events


def counts(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path)
    try:
        return (
            conn.execute("SELECT count(*) FROM events").fetchone()[0],
            conn.execute("SELECT count(*) FROM workflows").fetchone()[0],
        )
    finally:
        conn.close()


async def soak(path: Path, rounds: int, policy: CompactionPolicy | None) -> list[int]:
    store = LocalStore(path, durability="normal")
    store.open()
    sizes: list[int] = []
    seq = 0
    now = 1.8e9
    try:
        for r in range(rounds):
            events = page(r, seq, now)
            seq = events[-1].seq
            await store.apply_events(events, seq)
            if policy is not None:
                await store.compact(policy, now)
            sizes.append(store.file_bytes())
            now += STEP
    finally:
        store.close()
    return sizes


async def test_file_stays_bounded_under_a_soak(tmp_path: Path):
    policy = CompactionPolicy(event_log_limit=1000, finished_retention=100.0, every=1)
    rounds = 150
    sizes = await soak(tmp_path / "c.db", rounds, policy)
    events, workflows = counts(tmp_path / "c.db")
    assert events == 1000
    # Finished workflows older than 100 s (10 rounds) are gone: at most 11 rounds' worth.
    assert workflows <= 11 * PER_ROUND
    plateau = max(sizes[30:60])
    assert max(sizes[60:]) <= plateau * 1.25, (plateau, max(sizes[60:]))

    # The WAL is capped (journal_size_limit) either way; the database file itself is
    # what compaction bounds: without it the same traffic keeps growing the file.
    unbounded = await soak(tmp_path / "raw.db", rounds, None)
    assert unbounded[-1] > sizes[-1] * 1.5 and unbounded[-1] > unbounded[75] * 1.4
    compacted_db = (tmp_path / "c.db").stat().st_size
    assert (tmp_path / "raw.db").stat().st_size > 10 * compacted_db


async def test_compaction_keeps_what_is_still_needed(tmp_path: Path):
    store = LocalStore(tmp_path / "c.db", durability="normal")
    store.open()
    try:
        old = 1.8e9
        events = page(0, 0, old)
        await store.apply_events(events, events[-1].seq)
        # A running workflow (its last event says running) and a finished one with a
        # pending mutation (a retry queued offline) must both stay.
        await store.apply_events(
            [
                Event(
                    10_000,
                    "r0000-w000",
                    "x",
                    {
                        "workflow": {
                            "id": "r0000-w000",
                            "status": "running",
                            "version": 99,
                            "updated_at": old,
                            "name": "n",
                        }
                    },
                    old,
                )
            ],
            10_000,
        )
        await store.enqueue(
            "retry_workflow", "r0000-w001", {"workflow_id": "r0000-w001"}, created_at=old
        )
        policy = CompactionPolicy(event_log_limit=10, finished_retention=60.0)
        deleted = await store.compact(policy, old + 3600)
        assert deleted == (PER_ROUND * EVENTS + 1 - 10, PER_ROUND - 2)
        assert {r.id for r in store.list_rows()} == {"r0000-w000", "r0000-w001"}
        assert store.event_seqs()[-1] == 10_000 and len(store.event_seqs()) == 10
        assert store.cursor() == 10_000
    finally:
        store.close()


def test_bad_policy_is_refused():
    for bad in (
        {"event_log_limit": -1},
        {"finished_retention": -1.0},
        {"finished_retention": float("nan")},
        {"every": 0},
    ):
        with pytest.raises(ValueError):
            CompactionPolicy(**bad)
