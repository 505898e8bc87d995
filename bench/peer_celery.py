"""A second peer: Celery on the machine's Redis, the same 3 no-op steps with retries.

Celery is the common way to run a pipeline of steps in Python, so it is B5's second
peer: a ``chain`` of three tasks (each retried up to 3 times on error, acknowledged
late so that a worker lost mid-task gives it to another), broker and result backend on
Redis (``TETHER_BENCH_REDIS``, default ``redis://127.0.0.1:6379/13``; every run uses
its own queue name). Its guarantees are weaker than a durable workflow engine's: Redis
here keeps data in memory (no append-only file), and a chain's progress is not
checkpointed per step — so it is a speed reference, not a like-for-like durable peer.

The worker runs in its own process (``celery worker``), in two pool styles; the best is
reported, named: ``prefork`` with one process per core, and ``threads`` with 16 threads.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import uuid
from typing import Any

from bench.core import percentile

__all__ = ["MODES", "available", "celery_latency", "celery_throughput"]

MODES = ("prefork", "threads")
REDIS = os.environ.get("TETHER_BENCH_REDIS", "redis://127.0.0.1:6379/13")
QUEUE_ENV = "TETHER_BENCH_CELERY_QUEUE"


def available() -> str | None:
    """None if Celery can be imported and Redis answers, else the reason it cannot run."""
    try:
        import celery  # noqa: F401
        import redis
    except ImportError as exc:
        return f"Celery is not installed (pip install -e '.[bench]'): {exc}"
    try:
        redis.Redis.from_url(REDIS, socket_connect_timeout=2).ping()
    except Exception as exc:  # any failure to reach Redis means: cannot run here
        return f"Redis is not reachable at {REDIS}: {exc}"
    return None


_TASKS: list[Any] = []


def _app() -> Any:
    from celery import Celery

    queue = os.environ.get(QUEUE_ENV, "tether-bench")
    app = Celery("tether_bench", broker=REDIS, backend=REDIS)
    app.conf.update(
        task_default_queue=queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=4,
        result_expires=600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )

    def noop(self: Any, previous: Any = None) -> dict[str, Any]:
        return {}

    options = {"bind": True, "autoretry_for": (Exception,), "max_retries": 3}
    one = app.task(name="bench.one", **options)(noop)
    two = app.task(name="bench.two", **options)(noop)
    three = app.task(name="bench.three", **options)(noop)
    _TASKS[:] = [one, two, three]
    return app


# Celery is in the ``bench`` extra only: without it this module still imports (the suite
# runs with ``.[test]``) and ``available()`` says why the peer cannot run.
app = _app() if importlib.util.find_spec("celery") is not None else None
"""The Celery app (``celery -A bench.peer_celery worker``); None without Celery."""


class _Worker:
    """A ``celery worker`` process on a fresh queue, in one pool style."""

    def __init__(self, mode: str) -> None:
        self.queue = f"tether-bench-{uuid.uuid4().hex[:8]}"
        os.environ[QUEUE_ENV] = self.queue
        pool = ["--pool=prefork", f"--concurrency={os.cpu_count() or 2}"]
        if mode == "threads":
            pool = ["--pool=threads", "--concurrency=16"]
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "bench.peer_celery", "worker"),
                *("-Q", self.queue, "--loglevel=WARNING", "--without-gossip"),
                *("--without-mingle", "--without-heartbeat", *pool),
            ],
            env={**os.environ, QUEUE_ENV: self.queue},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        global app
        app = _app()  # bound to this queue

    def chain(self) -> Any:
        from celery import chain

        one, two, three = _TASKS
        return chain(one.s(), two.s(), three.s()).apply_async(queue=self.queue)

    @staticmethod
    def wait(results: list[Any], timeout: float, interval: float = 0.005) -> None:
        """Wait until every chain has its result, polling the backend with MGET.

        ``AsyncResult.get`` waits on Redis pub/sub, which lost a result in a run of
        500 chains here (the call hung until its timeout); polling cannot lose one.

        Raises:
            RuntimeError: a chain failed.
            TimeoutError: not all done within ``timeout`` seconds.
        """
        ids = {r.id for r in results}
        for task_id, meta in app.backend.get_many(ids, timeout=timeout, interval=interval):
            if meta["status"] != "SUCCESS":
                raise RuntimeError(f"chain {task_id} ended {meta['status']}: {meta['result']}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def celery_throughput(count: int, mode: str = "prefork") -> dict[str, Any]:
    """Worker: ``count`` chains at once; wait for every result; chains/s."""
    worker = _Worker(mode)
    try:
        worker.wait([worker.chain() for _ in range(10)], 60)  # warm-up (and worker start)
        start = time.perf_counter()
        worker.wait([worker.chain() for _ in range(count)], 300)
        elapsed = time.perf_counter() - start
    finally:
        worker.close()
    return {"rate": count / elapsed, "seconds": elapsed, "mode": mode}


def celery_latency(count: int, mode: str = "prefork") -> dict[str, Any]:
    """Worker: ``count`` chains one at a time; p50/p99 of apply → result (ms)."""
    worker = _Worker(mode)
    latencies = []
    try:
        for i in range(count + 10):  # 10 warm-up runs
            start = time.perf_counter()
            worker.wait([worker.chain()], 60, interval=0.0005)
            if i >= 10:
                latencies.append((time.perf_counter() - start) * 1000)
    finally:
        worker.close()
    return {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99), "mode": mode}
