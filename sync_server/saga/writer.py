"""The saga runner's writer: the group-commit queue of checkpoint inputs.

Theory of operation
-------------------
Step outcomes, durable progress, job records and timer ticks are queued
(``_enqueue``) and a single writer task commits them: whatever queued while a commit
was in flight goes into the next one, so inputs of many workflows share a
transaction. Inputs are grouped per workflow and fence (an input of an older lease is
fenced out), chunked by ``max_batch``, first tried as one fenced write computed from
this instance's copy of each row (``_commit_fenced``, no locked read), and otherwise
checkpointed under row locks (``Checkpointer.checkpoint``, which refuses a stale
owner). Each committed outcome goes to ``_after_commit``. A database that is down
makes the writer retry the whole batch with backoff; a chunk the database refuses or
a bug are isolated workflow by workflow, and the one that fails is quarantined — its
outcomes become permanent failures — or dropped (no poison batch). ``_drain`` waits
(on the ``_idle`` event, no polling) until the queue is empty and no commit is in
flight (used by ``stop``). Breaker transitions come back in each ``Applied`` and are
reported by ``_after_commit``, i.e. only for what committed.
"""

from __future__ import annotations

import asyncio
import logging
import time

from protocol import StorageError
from sync_server.saga.attempt import describe
from sync_server.saga.checkpoint import Applied, Input
from sync_server.saga.inputs import (
    CompensationFailed,
    CompensationSucceeded,
    MachineInput,
    StepFailed,
    StepSucceeded,
    Tick,
)
from sync_server.saga.state import RunnerState
from sync_server.saga.storable import refused_by_database, storable_text
from sync_server.store.base import Transaction, WorkflowKey

__all__ = ["Writer"]

log = logging.getLogger("tether.saga")


class Writer(RunnerState):
    """The runner's group-commit writer (a part of ``SagaRunner``)."""

    _idle: asyncio.Event
    """Set while the queue is empty and no commit is in flight (``_drain`` waits on it);
    cleared by ``_enqueue``, set by the writer when it has committed everything."""

    async def _drain(self) -> None:
        """Wait until every queued input is committed — including the batch being
        committed: cancelling the writer mid-COMMIT would leave its outcome's fate
        unknown to this runner."""
        await self._idle.wait()

    def _enqueue(self, item: Input) -> None:
        self._queue.append(item)
        self._idle.clear()
        self._queued.set()

    def _queue_progress(self, item: Input) -> None:
        held = self._held.get(item.key)
        if held is not None and held.fence == item.fence:
            self._enqueue(item)

    async def _writer(self) -> None:
        failures = 0
        while True:
            await self._queued.wait()
            self._queued.clear()
            while self._queue:
                batch = self._queue
                self._queue = []
                self._committing = True
                try:
                    await self._commit(batch)
                    failures = 0
                except StorageError as exc:
                    failures += 1
                    log.warning("checkpoint of %d inputs failed (%s); retrying", len(batch), exc)
                    self._queue[:0] = batch
                    await asyncio.sleep(min(2.0, 0.05 * 2**failures))
                finally:
                    self._committing = False
            self._idle.set()  # the queue is empty and nothing is being committed

    async def _commit(self, batch: list[Input]) -> None:
        grouped: dict[WorkflowKey, tuple[int, list[Input]]] = {}
        for item in batch:
            entry = grouped.get(item.key)
            if entry is None or entry[0] != item.fence:
                if entry is not None and entry[0] > item.fence:
                    self.stats["refused"] += 1
                    continue  # an input of an older lease: fenced out
                grouped[item.key] = (item.fence, [item])
            else:
                entry[1].append(item)
        keys = list(grouped)
        for start in range(0, len(keys), self.max_batch):
            chunk = {key: grouped[key] for key in keys[start : start + self.max_batch]}
            try:
                await self._commit_chunk(chunk)
            except StorageError as exc:
                if not refused_by_database(exc):
                    raise  # the database is down or busy: the writer retries the batch
                log.warning("checkpoint of %d workflows refused (%s); one by one", len(chunk), exc)
                await self._commit_each(chunk)
            except Exception:
                # A bug, not the database: isolate the workflow that triggers it.
                log.exception("checkpoint of %d workflows failed; retrying one by one", len(chunk))
                await self._commit_each(chunk)

    async def _commit_fenced(
        self, chunk: dict[WorkflowKey, tuple[int, list[Input]]], now: float
    ) -> dict[WorkflowKey, tuple[int, list[Input]]]:
        """Checkpoint what can be computed from this instance's copies of the rows with
        one fenced write (no locked read); returns the workflows left for the locked
        checkpoint (not eligible, or changed since the copy)."""
        computed = {}
        for key, (fence, inputs) in chunk.items():
            held = self._held.get(key)
            if held is None or held.fence != fence or held.record is None:
                continue
            outcome = await self.checkpointer.compute_fenced(held.record, fence, inputs, now)
            if outcome is not None:
                computed[key] = outcome
        if not computed:
            return chunk
        writes = [write for _, write, _ in computed.values()]
        notes = [note for _, _, notes in computed.values() for note in notes]
        started = time.perf_counter()
        try:
            written = await self.store.write_fenced(self.instance_id, writes, notes)
        except StorageError as exc:
            log.debug("fenced checkpoint failed (%s); taking the locked path", exc)
            return chunk
        if written:
            if self.metrics is not None:
                self.metrics.observe_append("saga", time.perf_counter() - started)
            self.stats["checkpoint_txns"] += 1
            self.stats["fenced_checkpoints"] += len(written)
            self.stats["checkpoints"] += len(written)
            for key in written:
                self._after_commit(computed[key][0], fence_hint=chunk[key][0])
        return {key: entry for key, entry in chunk.items() if key not in written}

    async def _commit_each(self, chunk: dict[WorkflowKey, tuple[int, list[Input]]]) -> None:
        """No poison batch (issue 11): commit each workflow of a failed chunk on its own,
        so the others commit; the one that fails is quarantined (``_quarantine``)."""
        for key, entry in chunk.items():
            try:
                await self._commit_chunk({key: entry})
            except StorageError as exc:
                if not refused_by_database(exc):
                    raise
                await self._quarantine(key, entry, exc)
            except Exception as exc:
                log.exception("checkpoint of workflow %s failed", key.id)
                await self._quarantine(key, entry, exc)

    async def _quarantine(
        self, key: WorkflowKey, entry: tuple[int, list[Input]], exc: BaseException
    ) -> None:
        """End a workflow whose checkpoint the database refuses, instead of retrying it
        forever: its step outcomes become permanent failures that carry the reason (no
        result, no free text but the reason), so the machine fails the step at once and
        the workflow compensates or parks by its ``on_failure``. If even that cannot be
        written, the workflow is dropped here and its lease lapses (a takeover retries
        it, bounded by ``MAX_INTERRUPTS``)."""
        fence, inputs = entry
        reason = storable_text(f"checkpoint refused by the store: {describe(exc)}")[:500]
        safe: list[Input] = []
        for item in inputs:
            event = item.event
            instead: MachineInput
            if isinstance(event, StepSucceeded | StepFailed):
                instead = StepFailed(event.step, event.attempt, reason, permanent=True)
            elif isinstance(event, CompensationSucceeded | CompensationFailed):
                instead = CompensationFailed(event.step, event.attempt, reason)
            elif isinstance(event, Tick):
                instead = event
            else:
                continue  # progress, a job: dropped (their text may be what was refused)
            safe.append(Input(instead, item.workflow_id, fence, tenant=key.tenant))
        self.stats["quarantined"] += 1
        try:
            await self._commit_chunk({key: (fence, safe)})
        except StorageError as again:
            if not refused_by_database(again):
                raise
            self._drop(key, again)
        except Exception as again:
            self._drop(key, again)

    def _drop(self, key: WorkflowKey, exc: BaseException) -> None:
        log.error("checkpoint of workflow %s cannot be written (%s); dropping it", key.id, exc)
        held = self._held.pop(key, None)
        if held is not None:
            held.cancel()

    async def _commit_chunk(self, chunk: dict[WorkflowKey, tuple[int, list[Input]]]) -> None:
        now = self.clock()
        chunk = await self._commit_fenced(chunk, now)
        if not chunk:
            return

        async def unit(tx: Transaction) -> list[Applied]:
            return await self.checkpointer.checkpoint(tx, chunk, now)

        started = time.perf_counter()
        applied = await self.store.run(unit)
        if self.metrics is not None:
            self.metrics.observe_append("saga", time.perf_counter() - started)
        self.stats["checkpoint_txns"] += 1
        self.stats["checkpoints"] += len(applied)
        for outcome in applied:
            entry = chunk.get(outcome.key)
            hint = entry[0] if entry else (outcome.record.fence if outcome.record else 0)
            self._after_commit(outcome, fence_hint=hint)
