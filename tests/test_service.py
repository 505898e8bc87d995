"""``sync_server.service``: the one start/stop/loop of the background services.

Every wait here is on an event the test controls (no sleep stands in for ordering):

* ``stop()`` while a tick is running cancels the tick and returns;
* the *caller's* own cancellation during ``stop()`` propagates (it is not swallowed as
  if it were the service's), here and in the hub (``Hub.stop``);
* the same for ``client_sdk.tasks.cancel_and_wait`` and ``PostgresStore.close``;
* a tick that raises is logged and the loop goes on; a ``wake()`` runs the next tick now.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from sync_server.service import PeriodicService, cancel_and_wait

pytestmark = pytest.mark.timeout(30)


class Ticker(PeriodicService):
    """Each tick waits on ``gate``; its cleanup (after a cancel) waits on ``release``."""

    def __init__(self, interval: float = 60.0, *, slow_cleanup: bool = False) -> None:
        super().__init__(name="test-ticker", interval=interval)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.cleanup_started = asyncio.Event()
        self.release = asyncio.Event()
        self.slow_cleanup = slow_cleanup
        self.ticks = 0
        self.cancelled = 0
        self.fail_next = 0

    async def tick(self) -> float | None:
        self.ticks += 1
        self.entered.set()
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError(f"tick {self.ticks} broke")
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            self.cleanup_started.set()
            if self.slow_cleanup:
                await self.release.wait()
            raise
        return None


async def test_stop_while_a_tick_is_running_cancels_it() -> None:
    ticker = Ticker()
    await ticker.start()
    await asyncio.wait_for(ticker.entered.wait(), 10)
    await ticker.stop()
    assert ticker.cancelled == 1
    await ticker.stop()  # idempotent


async def test_the_callers_cancellation_during_stop_propagates() -> None:
    ticker = Ticker(slow_cleanup=True)
    await ticker.start()
    await asyncio.wait_for(ticker.entered.wait(), 10)
    stopping = asyncio.create_task(ticker.stop())
    await asyncio.wait_for(ticker.cleanup_started.wait(), 10)  # stop() waits on the tick
    stopping.cancel()  # whoever called stop() is being cancelled itself
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert stopping.cancelled()


async def test_a_failing_tick_is_logged_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ticker = Ticker(interval=0.01)
    ticker.fail_next = 1
    ticker.gate.set()
    with caplog.at_level(logging.ERROR, logger="tether.service"):
        await ticker.start()
        while ticker.ticks < 3:
            ticker.entered.clear()
            await asyncio.wait_for(ticker.entered.wait(), 10)
        await ticker.stop()
    assert "test-ticker: tick failed" in caplog.text
    assert "tick 1 broke" in caplog.text
    assert ticker.failures == 0  # reset by the good ticks after it


async def test_wake_runs_the_next_tick_at_once() -> None:
    ticker = Ticker(interval=3600.0)
    ticker.gate.set()
    await ticker.start()
    await asyncio.wait_for(ticker.entered.wait(), 10)
    ticker.entered.clear()
    ticker.wake()  # without it the next tick is an hour away
    await asyncio.wait_for(ticker.entered.wait(), 10)
    assert ticker.ticks == 2
    await ticker.stop()


async def test_cancel_and_wait_absorbs_only_the_tasks_cancellation() -> None:
    never = asyncio.Event()
    task = asyncio.create_task(never.wait())
    await cancel_and_wait(task)
    assert task.cancelled()
    await cancel_and_wait(None)


async def test_hub_stop_lets_the_callers_cancellation_propagate() -> None:
    from sync_server.hub import Hub

    class _Store:
        multi_instance = False

        def unlisten(self, channel: str, callback: object) -> None:
            pass

    hub = Hub(_Store())  # type: ignore[arg-type]
    started, cleanup_started, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def flushing() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:  # a flush that takes its time to end
            cleanup_started.set()
            await release.wait()

    hub._flusher = asyncio.create_task(flushing())
    await asyncio.wait_for(started.wait(), 10)
    stopping = asyncio.create_task(hub.stop())
    await asyncio.wait_for(cleanup_started.wait(), 10)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert stopping.cancelled()


async def _slow_to_end(
    started: asyncio.Event, cleanup: asyncio.Event, release: asyncio.Event
) -> None:
    try:
        started.set()
        await asyncio.Event().wait()
    finally:  # a task that takes its time to end once cancelled
        cleanup.set()
        await release.wait()


async def _cancel_the_caller_while_it_waits(
    stop: Callable[[asyncio.Task[None]], Awaitable[None]],
) -> None:
    started, cleanup, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(_slow_to_end(started, cleanup, release))
    await asyncio.wait_for(started.wait(), 10)
    stopping = asyncio.create_task(stop(task))
    await asyncio.wait_for(cleanup.wait(), 10)
    stopping.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert stopping.cancelled()
    assert task.cancelled()


async def test_client_cancel_and_wait_absorbs_only_the_tasks_cancellation() -> None:
    from client_sdk.tasks import cancel_and_wait as client_cancel_and_wait

    task = asyncio.create_task(asyncio.Event().wait())
    await client_cancel_and_wait(task)
    assert task.cancelled()
    await client_cancel_and_wait(None)
    await _cancel_the_caller_while_it_waits(client_cancel_and_wait)


async def test_client_cancel_and_wait_absorbs_expected_errors_only() -> None:
    from client_sdk.tasks import cancel_and_wait as client_cancel_and_wait

    async def failing(started: asyncio.Event) -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            raise KeyError("gone")

    for expected in (True, False):
        started = asyncio.Event()
        task = asyncio.create_task(failing(started))
        await asyncio.wait_for(started.wait(), 10)
        if expected:
            await client_cancel_and_wait(task, expected=(KeyError,))
        else:
            with pytest.raises(KeyError):
                await client_cancel_and_wait(task)


async def test_postgres_close_lets_the_callers_cancellation_propagate() -> None:
    from sync_server.store.postgres import PostgresStore

    store = PostgresStore("postgresql://127.0.0.1:1/test")  # never opened

    async def close_with(task: asyncio.Task[None]) -> None:
        store._listener_task = task
        await store.close()

    await _cancel_the_caller_while_it_waits(close_with)
