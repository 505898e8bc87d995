"""A test double of emp-job-queue (stakeordie/emp-job-queue, the 2025-10 API), quirks included.

It is a real HTTP + WebSocket server (Starlette on uvicorn, loopback, port 0, its own
thread and event loop) written from the behaviour observed running the real queue
(issue 14), so Tether's adapter is tested against what the queue really does:

* ``WS /ws/client/{clientId}[?token=]``: ``submit_job`` (flat JSON) — ``message_id``
  becomes the job id (else a UUID the client learns only from the first event); no
  acknowledgement. ``max_retries`` is the total number of attempts, ``0`` (or absent)
  means 3. ``cancel_job {job_id}``; ``subscribe_progress`` answers ``subscribed`` and
  does nothing else. A bad token: accepted, then closed with 1008.
* ``POST /api/jobs``: submits with an id of the queue's choosing (201 ``{job_id}``).
* ``GET /api/jobs/{id}``: ``{success, job: {...}}`` or 404 — statuses ``pending``,
  ``assigned``, ``in_progress``, ``completed``, ``failed``, never the result nor the error.
* ``GET /api/attestations?workflow_id=W``: the completion records of the jobs submitted
  with that ``workflow_id`` (result or error, per job id).
* Events go only to the connection that submitted the job (the last submit wins), at
  most once, never replayed: ``update_job_progress``, success as two ``complete_job``
  of different shapes, a final failure as a failed ``complete_job`` then ``job_failed``;
  internal retries send nothing.
* Not idempotent: a submit of an existing id overwrites the job and runs it again —
  while it still runs, twice at once.
* Dead workers: ``kill_workers(n)`` makes the next ``n`` jobs that start hang
  ``in_progress`` forever (SIGKILL); ``term_workers(n)`` fails them permanently (SIGTERM).
* ``cancel_job`` of a job that has not completed writes ``failed`` with "Job cancelled
  by user" and sends the failure events like a real failure.
* ``restart_api()`` drops every connection and subscription (an API restart);
  ``drop_connections()`` cuts the client sockets; ``drop_events(n)`` loses the next
  ``n`` events; ``lose_submits(n)`` loses the next ``n`` submits.

The books a test checks: ``starts[job_id]`` (how many times each job id started running;
"no job id ever runs twice" is ``max(starts.values()) == 1``), ``submits``, ``cancels``.

The worker "service" is deterministic: it reports progress over ``payload.duration``
seconds and returns ``{"service", "echo": payload.prompt, "step": current_step,
"job_id"}``; ``payload.fail`` makes it fail (``payload.fail_runs``: only the first runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

CANCELLED = "Job cancelled by user"


def _now_iso() -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        + f".{int(time.time() * 1000) % 1000:03d}Z"
    )


@dataclass(eq=False)
class _Conn:
    ws: WebSocket
    client_id: str
    open: bool = True
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Books:
    """What the queue saw; read from tests (written only on the queue's loop)."""

    starts: Counter[str] = field(default_factory=Counter)
    submits: Counter[str] = field(default_factory=Counter)
    cancels: Counter[str] = field(default_factory=Counter)
    completions: Counter[str] = field(default_factory=Counter)
    events_sent: int = 0
    events_lost: int = 0
    connections: int = 0
    closed_1008: int = 0
    restarts: int = 0
    dead: list[str] = field(default_factory=list)


class EmpQueueDouble:
    """The queue's state and behaviour (lives on the server's event loop).

    Args:
        token: the API token (None: no auth).
        step_time: seconds between a job's status changes (pending -> assigned -> running).
    """

    def __init__(self, token: str | None = None, step_time: float = 0.02) -> None:
        self.token = token
        self.step_time = step_time
        self.jobs: dict[str, dict[str, Any]] = {}
        self.owner: dict[str, _Conn] = {}
        self.runs: dict[str, list[asyncio.Task[None]]] = defaultdict(list)
        self.attestations: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        self.conns: set[_Conn] = set()
        self.books = Books()
        self.kill_next = 0
        self.term_next = 0
        self.lose_next = 0
        self.ignore_submits = 0
        self.down_until = 0.0

    # ------------------------------------------------------------------ jobs
    def submit(self, message: dict[str, Any], conn: _Conn | None) -> str:
        job_id = str(message.get("message_id") or uuid.uuid4())
        retries = int(message.get("max_retries") or 0) or 3
        self.books.submits[job_id] += 1
        job = self.jobs.setdefault(job_id, {})
        job.clear()  # an existing id is overwritten in place: not idempotent
        job.update(
            {
                "id": job_id,
                "service_required": message.get("service_required"),
                "priority": message.get("priority", 50),
                "payload": message.get("payload") or {},
                "requirements": message.get("requirements"),
                "status": "pending",
                "retry_count": 0,
                "max_retries": retries,
                "worker_id": None,
                "created_at": _now_iso(),
                "assigned_at": None,
                "started_at": None,
                "completed_at": None,
                "failed_at": None,
                "workflow_id": message.get("workflow_id"),
                "workflow_priority": message.get("workflow_priority"),
                "workflow_datetime": message.get("workflow_datetime"),
                "current_step": message.get("current_step"),
                "total_steps": message.get("total_steps"),
                "customer_id": message.get("customer_id"),
            }
        )
        if conn is not None:
            self.owner[job_id] = conn
        else:
            self.owner.pop(job_id, None)
        task = asyncio.get_running_loop().create_task(self._run(job_id))
        self.runs[job_id].append(task)
        return job_id

    async def _run(self, job_id: str) -> None:
        job = self.jobs[job_id]
        while True:
            await asyncio.sleep(self.step_time)
            job["status"] = "assigned"
            job["worker_id"] = f"worker-{uuid.uuid4().hex[:6]}"
            job["assigned_at"] = _now_iso()
            await asyncio.sleep(self.step_time)
            job["status"] = "in_progress"
            job["started_at"] = _now_iso()
            self.books.starts[job_id] += 1
            if self.kill_next > 0:
                self.kill_next -= 1
                self.books.dead.append(job_id)
                await asyncio.Event().wait()  # SIGKILL: in_progress forever
            payload = job["payload"]
            duration = float(payload.get("duration", 0.1))
            ticks = max(1, int(duration / 0.05))
            for i in range(ticks):
                await asyncio.sleep(duration / ticks)
                await self.send(
                    job_id,
                    {
                        "type": "update_job_progress",
                        "job_id": job_id,
                        "progress": int(100 * (i + 1) / ticks),
                    },
                )
            if self.term_next > 0:
                self.term_next -= 1
                await self._fail(job_id, "Worker terminated (SIGTERM)")
                return
            runs = int(payload.get("fail_runs", 1 << 30))
            if payload.get("fail") and self.books.starts[job_id] <= runs:
                if job["retry_count"] + 1 < job["max_retries"]:
                    job["retry_count"] += 1  # a silent internal retry
                    job["status"] = "pending"
                    continue
                await self._fail(job_id, str(payload.get("error", "worker error")))
                return
            data = {
                "service": job["service_required"],
                "echo": payload.get("prompt"),
                "step": job["current_step"],
                "job_id": job_id,
            }
            job["status"] = "completed"
            job["completed_at"] = _now_iso()
            self.books.completions[job_id] += 1
            if job["workflow_id"]:
                self.attestations[job["workflow_id"]][job_id] = {
                    "job_id": job_id,
                    "workflow_id": job["workflow_id"],
                    "status": "completed",
                    "result": {"success": True, "data": data},
                    "completed_at": job["completed_at"],
                }
            stamp = int(time.time() * 1000)
            await self.send(
                job_id,
                {
                    "type": "complete_job",
                    "job_id": job_id,
                    "worker_id": job["worker_id"],
                    "timestamp": stamp,
                    "result": {"status": "success", "data": data},
                },
            )
            await self.send(
                job_id,
                {
                    "type": "complete_job",
                    "job_id": job_id,
                    "timestamp": stamp,
                    "result": {"success": True, "data": data},
                },
            )
            return

    async def _fail(self, job_id: str, error: str) -> None:
        job = self.jobs[job_id]
        job["status"] = "failed"
        job["failed_at"] = _now_iso()
        if job["workflow_id"]:
            self.attestations[job["workflow_id"]][job_id] = {
                "job_id": job_id,
                "workflow_id": job["workflow_id"],
                "status": "failed",
                "error": error,
                "failed_at": job["failed_at"],
            }
        await self.send(
            job_id,
            {
                "type": "complete_job",
                "job_id": job_id,
                "result": {"status": "failed", "error": error},
            },
        )
        await self.send(job_id, {"type": "job_failed", "job_id": job_id, "error": error})

    async def cancel(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        self.books.cancels[job_id] += 1
        if job is None or job["status"] in ("completed", "failed"):
            return  # a completed job cannot be cancelled
        for task in self.runs.pop(job_id, []):
            task.cancel()
        await self._fail(job_id, CANCELLED)

    async def send(self, job_id: str, message: dict[str, Any]) -> None:
        conn = self.owner.get(job_id)
        if conn is None or not conn.open:
            self.books.events_lost += 1
            return
        if self.lose_next > 0:
            self.lose_next -= 1
            self.books.events_lost += 1
            return
        try:
            async with conn.lock:
                await conn.ws.send_text(json.dumps(message))
            self.books.events_sent += 1
        except Exception:
            conn.open = False
            self.books.events_lost += 1

    # ------------------------------------------------------------------ faults
    async def drop_connections(self) -> None:
        for conn in list(self.conns):
            conn.open = False
            with contextlib.suppress(Exception):
                await conn.ws.close(1001)
        self.conns.clear()

    async def restart_api(self, down_for: float) -> None:
        self.books.restarts += 1
        self.down_until = time.monotonic() + down_for
        await self.drop_connections()
        self.owner.clear()  # every subscription is gone

    @property
    def down(self) -> bool:
        return time.monotonic() < self.down_until


def create_app(queue: EmpQueueDouble) -> Starlette:
    """The double's Starlette app."""

    def authorised(request: Request) -> bool:
        if queue.token is None:
            return True
        header = request.headers.get("authorization", "")
        return header == f"Bearer {queue.token}" or request.query_params.get("token") == queue.token

    async def ws_client(websocket: WebSocket) -> None:
        await websocket.accept()
        if queue.down:
            await websocket.close(1013)
            return
        if queue.token is not None and websocket.query_params.get("token") != queue.token:
            queue.books.closed_1008 += 1
            await websocket.close(1008, "Invalid token")
            return
        conn = _Conn(websocket, websocket.path_params["client_id"])
        queue.conns.add(conn)
        queue.books.connections += 1
        try:
            while True:
                text = await websocket.receive_text()
                try:
                    message = json.loads(text)
                except ValueError:
                    continue
                kind = message.get("type")
                if kind == "submit_job" and queue.ignore_submits > 0:
                    queue.ignore_submits -= 1  # lost on the way: no ack tells the client
                elif kind == "submit_job":
                    queue.submit(message, conn)
                elif kind == "cancel_job":
                    await queue.cancel(str(message.get("job_id")))
                elif kind == "subscribe_progress":
                    async with conn.lock:
                        await websocket.send_text(
                            json.dumps({"type": "subscribed", "job_id": message.get("job_id")})
                        )
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            conn.open = False
            queue.conns.discard(conn)

    async def get_job(request: Request) -> JSONResponse:
        if queue.down:
            return JSONResponse({"error": "restarting"}, status_code=503)
        if not authorised(request):
            return JSONResponse({"success": False, "error": "Unauthorized"}, status_code=401)
        job = queue.jobs.get(request.path_params["job_id"])
        if job is None:
            return JSONResponse({"success": False, "error": "Job not found"}, status_code=404)
        return JSONResponse({"success": True, "job": dict(job)})

    async def post_job(request: Request) -> JSONResponse:
        if queue.down:
            return JSONResponse({"error": "restarting"}, status_code=503)
        if not authorised(request):
            return JSONResponse({"success": False, "error": "Unauthorized"}, status_code=401)
        body = await request.json()
        job_id = queue.submit({**body, "message_id": None}, None)  # its own id, always
        return JSONResponse({"success": True, "job_id": job_id}, status_code=201)

    async def attestations(request: Request) -> JSONResponse:
        if queue.down:
            return JSONResponse({"error": "restarting"}, status_code=503)
        if not authorised(request):
            return JSONResponse({"success": False, "error": "Unauthorized"}, status_code=401)
        workflow = request.query_params.get("workflow_id", "")
        records = list(queue.attestations.get(workflow, {}).values())
        return JSONResponse({"success": True, "workflow_id": workflow, "attestations": records})

    return Starlette(
        routes=[
            WebSocketRoute("/ws/client/{client_id}", ws_client),
            Route("/api/jobs", post_job, methods=["POST"]),
            Route("/api/jobs/{job_id}", get_job, methods=["GET"]),
            Route("/api/attestations", attestations, methods=["GET"]),
        ]
    )


class EmpQueueServer:
    """The double on uvicorn in a background thread; thread-safe fault knobs."""

    def __init__(self, token: str | None = None, step_time: float = 0.02) -> None:
        self.queue = EmpQueueDouble(token, step_time)
        config = uvicorn.Config(
            create_app(self.queue),
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="off",
            ws="websockets-sansio",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True, name="emp-queue")
        self.port = 0

    def _serve(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            await self.server.serve()

        asyncio.run(main())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def books(self) -> Books:
        return self.queue.books

    def start(self) -> EmpQueueServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("emp queue double did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=5)

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` (sync or a coroutine function) on the queue's loop."""
        assert self._loop is not None

        async def run() -> Any:
            out = fn(*args)
            return await out if asyncio.iscoroutine(out) else out

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    # Fault knobs (callable from any thread).
    def kill_workers(self, n: int = 1) -> None:
        self.call(setattr, self.queue, "kill_next", self.queue.kill_next + n)

    def term_workers(self, n: int = 1) -> None:
        self.call(setattr, self.queue, "term_next", self.queue.term_next + n)

    def drop_events(self, n: int = 1) -> None:
        self.call(setattr, self.queue, "lose_next", self.queue.lose_next + n)

    def lose_submits(self, n: int = 1) -> None:
        self.call(setattr, self.queue, "ignore_submits", self.queue.ignore_submits + n)

    def drop_connections(self) -> None:
        self.call(self.queue.drop_connections)

    def restart_api(self, down_for: float = 0.5) -> None:
        self.call(self.queue.restart_api, down_for)

    def job(self, job_id: str) -> dict[str, Any] | None:
        job = self.call(self.queue.jobs.get, job_id)
        return dict(job) if job is not None else None


@contextlib.contextmanager
def running_emp_queue(
    token: str | None = None, step_time: float = 0.02
) -> Iterator[EmpQueueServer]:
    """``with running_emp_queue() as q: ... q.url ... q.books.starts``."""
    server = EmpQueueServer(token, step_time).start()
    try:
        yield server
    finally:
        server.stop()
