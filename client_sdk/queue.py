"""Group commit: one writer thread, one SQLite connection, one commit per batch.

Theory of operation
-------------------
Every write of the client (a submit, a page of events, a batch of push results) is an
*op*: a function of the writer's connection. Callers queue ops from any thread or event
loop and await their result. The writer thread takes the first queued op, then
everything else already queued (up to ``max_batch``), runs them inside one
``BEGIN IMMEDIATE … COMMIT`` and only then resolves their futures. So:

* an op's result is delivered only after its transaction is durable (LESSONS:
  "ack only after fsync" — with ``synchronous=FULL`` the COMMIT returns after fsync);
* concurrent submitters share one fsync: while commit N runs, ops N+1… pile up and
  commit together (B1g), and a lone caller still commits immediately (B1 latency);
* a failing op fails alone: the batch is rolled back and run again with one
  SAVEPOINT per op (the common, error-free path pays for no savepoints);
* whenever ops are undone (a failed COMMIT, or one op rolled back to its SAVEPOINT),
  ``on_rollback`` lets the owner reload the in-memory state the ops changed
  (counters, ``client_sdk.rows.RowMirror``).

Ops run in queue order, so FIFO callers (pages of events) commit in order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from client_sdk.errors import LocalStoreError

__all__ = ["CommitQueue", "Op"]

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]

log = logging.getLogger("client_sdk.queue")

_STOP = object()


class _OpFailed(Exception):
    """An op raised inside an unisolated batch (its error is the ``__cause__``)."""


_Waiter = asyncio.Future[Any] | concurrent.futures.Future[Any]


def convert_sqlite_error(exc: BaseException, path: str) -> LocalStoreError:
    """Turn a sqlite3 exception into a ``LocalStoreError`` naming the file."""
    text = str(exc)
    transient = isinstance(exc, sqlite3.OperationalError) and any(
        word in text for word in ("locked", "busy", "full", "I/O")
    )
    return LocalStoreError(f"local store {path}: {text}", retryable=transient)


class CommitQueue:
    """A writer thread committing queued ops in batches.

    Args:
        connect: opens the writer's connection (called on the writer thread).
        path: the file, for error messages.
        on_rollback: called on the writer thread after ops were undone (a failed
            COMMIT, or an op rolled back to its SAVEPOINT).
        max_batch: most ops in one transaction.
    """

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        *,
        path: str,
        on_rollback: Callable[[sqlite3.Connection], None] | None = None,
        max_batch: int = 1024,
    ) -> None:
        self._connect = connect
        self._path = path
        self._on_rollback = on_rollback
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._tick: list[tuple[Op, _Waiter, asyncio.AbstractEventLoop | None]] = []
        self.commits = 0
        """Transactions committed so far (a test and benchmark probe)."""
        self.ops = 0
        """Ops committed so far."""

    def start(self) -> None:
        """Open the connection on a new writer thread.

        Raises:
            LocalStoreError: the connection could not be opened.
        """
        opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._main, args=(opened,), name="tether-writer", daemon=True
        )
        self._thread.start()
        opened.result()

    async def run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Queue ``op`` and return its result once its transaction has committed.

        Raises:
            LocalStoreError: the op or the commit failed (sqlite errors are converted),
                or the queue is closed.
        """
        return await self.submit(op)

    def submit(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``op``; the future resolves (on this loop) after its commit.

        Futures of one batch resolve in queue order, so their done-callbacks run in
        commit order.

        Raises:
            LocalStoreError: the queue is closed.
        """
        if self._closed:
            raise LocalStoreError(f"local store {self._path} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        # Ops submitted in one turn of the loop travel to the writer together: one
        # wake-up of the writer thread, and they share one commit.
        self._tick.append((op, future, loop))
        if len(self._tick) == 1:
            loop.call_soon(self._hand_over)
        return future

    def _hand_over(self) -> None:
        tick, self._tick = self._tick, []
        self._queue.put(tick)

    def run_sync(self, op: Callable[[sqlite3.Connection], T], timeout: float | None = None) -> T:
        """Like ``run`` but blocking, for callers outside an event loop."""
        if self._closed:
            raise LocalStoreError(f"local store {self._path} is closed")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put([(op, future, None)])
        return future.result(timeout)

    def close(self) -> None:
        """Finish the queued ops, close the connection and join the thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._tick:
            self._hand_over()
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()

    # ------------------------------------------------------------ writer thread
    def _main(self, opened: concurrent.futures.Future[None]) -> None:
        try:
            self._conn = self._connect()
        except BaseException as exc:  # converted and handed to start()
            opened.set_exception(exc)
            return
        opened.set_result(None)
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                batch = list(item)
                stop = False
                while len(batch) < self._max_batch:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is _STOP:
                        stop = True
                        break
                    batch.extend(more)
                self._commit(batch)
                if stop:
                    break
        finally:
            self._conn.close()

    def _commit(self, batch: list[tuple[Op, _Waiter, asyncio.AbstractEventLoop | None]]) -> None:
        try:
            outcomes = self._transaction(batch, isolate=False)
        except _OpFailed:
            # Some op raised: undo the whole batch and run it again with each op in its
            # own SAVEPOINT, so only the failing op fails (the fast path has none).
            try:
                outcomes = self._transaction(batch, isolate=True)
            except Exception as exc:
                outcomes = [(False, exc)] * len(batch)
        except Exception as exc:
            outcomes = [(False, exc)] * len(batch)
        self._deliver(batch, outcomes)

    def _transaction(
        self, batch: list[tuple[Op, _Waiter, asyncio.AbstractEventLoop | None]], isolate: bool
    ) -> list[tuple[bool, Any]]:
        conn = self._conn
        assert conn is not None
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, _future, _loop in batch:
                if not isolate:
                    try:
                        outcomes.append((True, op(conn)))
                    except Exception as exc:
                        raise _OpFailed from exc
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, op(conn)))
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    if self._on_rollback is not None:
                        # The op may have changed in-memory state (counters, the row
                        # mirror) before failing: re-read it as the transaction now is.
                        self._on_rollback(conn)
                    outcomes.append((False, exc))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
            self.commits += 1
            self.ops += len(batch)
            return outcomes
        except BaseException as exc:
            if not isinstance(exc, _OpFailed) or len(batch) == 1:
                log.error(
                    "local store %s: commit of %d op(s) failed: %s", self._path, len(batch), exc
                )
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if self._on_rollback is not None:
                    self._on_rollback(conn)
            except Exception as again:  # the file is unusable; every op fails
                log.error("local store %s: rollback failed: %s", self._path, again)
            if isinstance(exc, _OpFailed) and len(batch) == 1:
                # A lone op: its own error is the answer, no second run needed.
                return [(False, exc.__cause__)]
            raise

    def _deliver(
        self,
        batch: list[tuple[Op, _Waiter, asyncio.AbstractEventLoop | None]],
        outcomes: list[tuple[bool, Any]],
    ) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Waiter, bool, Any]]] = {}
        for (_op, future, loop), (ok, value) in zip(batch, outcomes, strict=True):
            if not ok and isinstance(value, sqlite3.Error):
                value = convert_sqlite_error(value, self._path)
            if loop is None:
                assert isinstance(future, concurrent.futures.Future)
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
            else:
                by_loop.setdefault(loop, []).append((future, ok, value))
        for loop, items in by_loop.items():
            # One wake-up of the loop per batch, not per op.
            # RuntimeError: the loop is closed, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, items)


def _resolve(items: list[tuple[_Waiter, bool, Any]]) -> None:
    for future, ok, value in items:
        if future.done():  # the awaiting task was cancelled
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
