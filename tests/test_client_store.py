"""The client's SQLite file: durability rules, group commit, convergence, bad files."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path

import pytest

from client_sdk.errors import LocalStoreError
from client_sdk.localstore import LocalStore, Settlement
from client_sdk.views import Overlay, build_view
from protocol import Event

pytestmark = pytest.mark.timeout(60)


def wid(i: int) -> str:
    return str(uuid.UUID(int=i))


def snap(i: int, version: int, status: str = "running") -> dict:
    return {
        "id": wid(i),
        "name": "noop",
        "status": status,
        "version": version,
        "steps": {"only": {"status": "running", "attempts": 1}},
        "updated_at": 1.0,
    }


def ev(seq: int, i: int, version: int, status: str = "running") -> Event:
    return Event(
        seq=seq, workflow_id=wid(i), type="t", data={"workflow": snap(i, version, status)}, at=1.0
    )


@pytest.fixture
def store(tmp_path: Path):
    s = LocalStore(tmp_path / "c.db", client_id="client-1")
    s.open()
    yield s
    s.close()


OVERLAYS: dict[int, Overlay] = {}


def overlay(store: LocalStore) -> Overlay:
    return OVERLAYS.setdefault(id(store), Overlay())


async def submit(store: LocalStore, i: int, name: str = "noop"):
    args = {"workflow_id": wid(i), "name": name, "input": {"i": i}}
    m = await store.enqueue("submit_workflow", wid(i), args, created_at=1.0, workflow_name=name)
    if m is not None:
        overlay(store).add(m)
    return m


async def settle(store: LocalStore, settlements: list[Settlement]) -> set[str]:
    changed = await store.settle(settlements)
    overlay(store).remove(s.id for s in settlements)
    return changed


def view(store: LocalStore, i: int):
    v = build_view(store.get_row(wid(i)), overlay(store).pending_for(wid(i)))
    assert v is not None
    return v


async def test_identity_and_ids_survive_reopen(tmp_path: Path) -> None:
    s = LocalStore(tmp_path / "c.db")
    opened = s.open()
    assert opened.last_mutation_id == 0 and opened.cursor == 0
    assert [(await submit(s, i)).id for i in range(1, 4)] == [1, 2, 3]
    await settle(s, [Settlement(1, True), Settlement(2, True)])
    s.close()
    s2 = LocalStore(tmp_path / "c.db")
    again = s2.open()
    assert again.client_id == opened.client_id
    assert again.last_mutation_id == 3 and [m.id for m in again.pending] == [3]
    assert (await submit(s2, 4)).id == 4  # ids never reused, even after compaction
    s2.close()
    with pytest.raises(LocalStoreError, match="belongs to client"):
        LocalStore(tmp_path / "c.db", client_id="someone-else").open()


async def test_submit_is_pending_and_idempotent(store: LocalStore) -> None:
    m = await submit(store, 1)
    assert m is not None and m.args["workflow_id"] == wid(1)
    v = view(store, 1)
    assert v.status == "pending" and v.pending and v.name == "noop"
    assert await submit(store, 1) is None  # same workflow id: not queued twice
    assert store.pending_count() == 1


async def test_confirmation_then_snapshot(store: LocalStore) -> None:
    await submit(store, 1)
    await settle(store, [Settlement(1, True)])
    assert view(store, 1).pending  # applied, but not yet seen in the event stream
    await store.apply_events([ev(5, 1, 1)], 5)
    v = view(store, 1)
    assert not v.pending and v.status == "running" and v.version == 1
    assert store.cursor() == 5 and store.event_seqs() == [5]


async def test_rejection_rolls_back_with_reason(store: LocalStore) -> None:
    await submit(store, 1, name="nope")
    changed = await settle(store, [Settlement(1, False, "unknown workflow 'nope'")])
    assert changed == {wid(1)}
    v = view(store, 1)
    assert v.status == "failed" and v.error == "unknown workflow 'nope'"
    assert not v.pending and v.terminal
    # A rejected cancel keeps the confirmed state and shows the reason.
    await store.apply_events([ev(1, 2, 3, "completed")], 1)
    m = await store.enqueue("cancel_workflow", wid(2), {"workflow_id": wid(2)}, created_at=1.0)
    overlay(store).add(m)
    assert view(store, 2).pending and view(store, 2).status == "completed"
    await settle(store, [Settlement(2, False, "workflow already completed")])
    v = view(store, 2)
    assert v.status == "completed" and v.error == "workflow already completed"


async def test_newest_snapshot_wins_in_any_order(store: LocalStore) -> None:
    await store.apply_snapshots([snap(1, 5, "completed")])
    await store.apply_events([ev(1, 1, 1), ev(2, 1, 2)], 2)  # older backlog
    assert view(store, 1).status == "completed" and view(store, 1).version == 5
    await store.apply_events([ev(3, 1, 6, "failed")], 3)
    assert view(store, 1).status == "failed"


async def test_page_is_applied_once(store: LocalStore) -> None:
    await store.apply_events([ev(1, 1, 1), ev(4, 1, 2)], 4)
    await store.apply_events([ev(4, 1, 2), ev(6, 1, 3)], 6)  # overlaps: 4 skipped
    assert store.event_seqs() == [1, 4, 6] and store.cursor() == 6


async def test_group_commit_shares_commits_and_keeps_ids_contiguous(store: LocalStore) -> None:
    before = store.commit_queue.commits
    results = await asyncio.gather(*(submit(store, i) for i in range(1, 129)))
    ids = sorted(m.id for m in results)
    assert ids == list(range(1, 129))
    commits = store.commit_queue.commits - before
    assert commits < 64, f"{commits} commits for 128 concurrent submits"


async def test_failing_op_is_isolated_in_its_batch(store: LocalStore) -> None:
    def bad(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO nowhere VALUES (1)")

    futures = [store.commit_queue.submit(bad)] + [
        asyncio.ensure_future(submit(store, i)) for i in range(1, 6)
    ]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert isinstance(results[0], LocalStoreError)
    assert sorted(m.id for m in results[1:]) == [1, 2, 3, 4, 5]


def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(LocalStoreError, match="not a SQLite database"):
        LocalStore(path).open()


def test_truncated_sqlite_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    s = LocalStore(path)
    s.open()
    s.close()
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\xff" * 3000)  # header kept, pages smashed
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    with pytest.raises(LocalStoreError):
        LocalStore(path).open()


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices(id INTEGER)")
    with pytest.raises(LocalStoreError, match="not created by Tether"):
        LocalStore(path).open()
    with sqlite3.connect(path) as conn:  # untouched
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("invoices",)]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    s = LocalStore(path)
    s.open()
    s.close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(LocalStoreError, match="newer"):
        LocalStore(path).open()


def test_second_client_on_the_same_file_is_refused(store: LocalStore) -> None:
    with pytest.raises(LocalStoreError, match="in use"):
        LocalStore(store.path).open()


def test_durability_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LocalStore(tmp_path / "x.db", durability="fast")  # type: ignore[arg-type]
    s = LocalStore(tmp_path / "n.db", durability="normal")
    s.open()
    sync = s.commit_queue.run_sync(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
    mode = s.commit_queue.run_sync(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
    assert (sync, mode) == (1, "wal")  # NORMAL
    s.close()
    s = LocalStore(tmp_path / "f.db")
    s.open()
    assert s.commit_queue.run_sync(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2
    s.close()


async def test_closed_store_refuses_work(tmp_path: Path) -> None:
    s = LocalStore(tmp_path / "c.db")
    s.open()
    s.close()
    s.close()
    with pytest.raises(LocalStoreError, match="closed"):
        await submit(s, 1)
    with pytest.raises(LocalStoreError, match="closed"):
        s.get_row(wid(1))
    with pytest.raises(LocalStoreError, match="closed"):
        s.list_rows()


async def test_traceparent_is_kept_with_the_queued_mutation_and_old_files_gain_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "traced.db"
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    s = LocalStore(path)
    s.open()
    args = {"workflow_id": wid(1), "name": "noop", "input": {}}
    queued = await s.enqueue(
        "submit_workflow", wid(1), args, created_at=1.0, workflow_name="noop", traceparent=parent
    )
    assert queued is not None and queued.traceparent == parent
    s.close()
    # Reopened (an app restarted while offline): the pending mutation still has it.
    s = LocalStore(path)
    assert [m.traceparent for m in s.open().pending] == [parent]
    s.close()
    # A file written before the column existed: opening adds it; old rows read as "".
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE mutations DROP COLUMN traceparent")
    s = LocalStore(path)
    assert [m.traceparent for m in s.open().pending] == [""]
    s.close()
    with sqlite3.connect(path) as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(mutations)")]
    assert "traceparent" in columns


class _SlowDisk:
    """Stands in for the reader connection of a file that does not answer: every query
    blocks (until ``released``, at most 2 s) and then fails."""

    def __init__(self) -> None:
        import threading

        self.released = threading.Event()
        self.queries = 0

    def execute(self, *args: object) -> object:
        self.queries += 1
        self.released.wait(2)
        raise AssertionError("a view read touched SQLite on the caller's thread")

    def close(self) -> None:
        pass


async def test_view_reads_never_wait_on_the_file(store: LocalStore) -> None:
    """Issue 12: ``get_workflow``/``list_workflows`` run on the event loop, so their reads
    (``get_row``, ``list_rows``) must not wait on SQLite — neither on the file (a slow
    disk, a lock) nor on the writer thread busy with a long transaction."""
    await store.apply_events([ev(1, 1, 1), ev(2, 2, 1)], 2)
    await submit(store, 3)
    await settle(store, [Settlement(1, applied=False, error="nope")])
    expected_one, expected_all = store.get_row(wid(1)), store.list_rows()

    import threading

    entered, release = threading.Event(), threading.Event()

    def long_op(conn: sqlite3.Connection) -> None:  # the writer is busy meanwhile
        entered.set()
        release.wait(10)

    busy = store.commit_queue.run(long_op)
    busy_task = asyncio.ensure_future(busy)
    assert await asyncio.to_thread(entered.wait, 10)
    disk = _SlowDisk()
    reader, store._reader = store._reader, disk  # type: ignore[assignment]
    try:
        assert store.get_row(wid(1)) == expected_one
        assert store.get_row(wid(9)) is None
        assert store.list_rows() == expected_all
        assert disk.queries == 0
    finally:
        disk.released.set()
        store._reader = reader
        release.set()
        await busy_task
    rows = {row.id: row for row in expected_all}
    assert set(rows) == {wid(1), wid(2), wid(3)}
    assert rows[wid(3)].rejected == "submit_workflow" and rows[wid(3)].rejection == "nope"


async def test_the_row_mirror_forgets_an_op_that_failed_in_a_batch(store: LocalStore) -> None:
    """An op that changed the in-memory rows and then failed is undone in both: in its
    batch it is rolled back to its SAVEPOINT, and the mirror must follow the file (a
    view must not show a workflow the file does not have)."""
    import threading

    entered, release = threading.Event(), threading.Event()

    def long_op(conn: sqlite3.Connection) -> None:  # holds the writer: the next ops batch
        entered.set()
        release.wait(10)

    def half_done(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO workflows(id, name, created_at) VALUES (?, 'ghost', 1.0)", (wid(7),)
        )
        store._rows.placeholder(wid(7), "ghost", 1.0)
        raise RuntimeError("the op fails after changing the rows")

    busy = asyncio.ensure_future(store.commit_queue.run(long_op))
    assert await asyncio.to_thread(entered.wait, 10)
    failing = store.commit_queue.submit(half_done)
    good = store.commit_queue.submit(lambda conn: conn.execute("SELECT 1").fetchone()[0])
    release.set()  # both ops were queued meanwhile: they run as one batch
    await busy
    results = await asyncio.gather(failing, good, return_exceptions=True)
    assert isinstance(results[0], RuntimeError)
    assert results[1] == 1
    assert store.get_row(wid(7)) is None
    assert [row.id for row in store.list_rows()] == [
        r[0] for r in store._read().execute("SELECT id FROM workflows")
    ]
