"""Heavy report traffic for the heavy chaos variant (issue 11).

A thread that pushes ``report_state`` mutations with a 15 KB ``detail`` (just under the
16 KiB cap) over ``POST /v1/push`` through the load balancer, as one more mini-app
client of a tenant: ``per_batch`` reports every 0.25 s (4: ≈ 200 KB/s). Reports of
the ``mini-app`` source never change a workflow (it is the weakest source: a divergent
one is corrected), so the workflows' outcomes are the scenario's own; what the reports
add is megabytes of events that every client of the tenant — the SDK clients and the
slow readers — must receive. A batch that gets no answer (an instance down) is resent
as it was: ids stay gapless and the server's dedupe applies it once.
"""

from __future__ import annotations

import threading
import time

import httpx
import msgspec

from protocol import Mutation

DETAIL = 15_000


class Firehose:
    """Pushes large reports on ``workflow_id`` until ``stop()``."""

    def __init__(
        self, http_url: str, token: str, client_id: str, workflow_id: str, per_batch: int = 4
    ) -> None:
        self.per_batch = per_batch
        self.http_url = http_url
        self.token = token
        self.client_id = client_id
        self.workflow_id = workflow_id
        self.sent = 0
        self.applied = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="firehose", daemon=True)

    def start(self) -> Firehose:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        next_id = 1
        batch: list[Mutation] = []
        with httpx.Client(base_url=self.http_url, headers=headers, timeout=10) as http:
            while not self._stop.wait(0.25):
                if not batch:
                    batch = [self._report(next_id + k) for k in range(self.per_batch)]
                body = {
                    "client_id": self.client_id,
                    "mutations": [msgspec.to_builtins(m) for m in batch],
                }
                try:
                    response = http.post("/v1/push", json=body)
                except httpx.HTTPError:
                    continue  # resend the same batch
                if response.status_code != 200:
                    continue
                results = response.json()["results"]
                self.applied += sum(1 for r in results if r["status"] == "applied")
                self.sent += len(batch)
                next_id = batch[-1].id + 1
                batch = []

    def _report(self, mid: int) -> Mutation:
        args = {
            "workflow_id": self.workflow_id,
            "source": "mini-app",
            "status": "running",
            "at": time.time(),
            "detail": {"log": "f" * DETAIL, "n": mid},
        }
        return Mutation(id=mid, name="report_state", args=args, created_at=time.time())
