"""``examples.job_service``: the flaky job service stops cleanly with requests stalled in
it, and a request cancelled by its caller is still cancelled."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx
import pytest

from examples.job_service import JobServiceThread, Stopping, create_job_service
from tests.conftest import scaled, wait_for

pytestmark = pytest.mark.timeout(60)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"stall_first": 1, "stall": 30}, 503),  # a stalled job
        ({"drop_first": 1, "stall": 30}, 504),  # a job the queue never heard of
        ({"lose_first": 1, "stall": 30}, 200),  # a completion held back
        ({"duration": 30}, 503),  # a long job still running (the demo's traceback)
    ],
)
def test_stop_with_requests_stalled_is_clean(body: dict[str, float], status: int) -> None:
    """Stopping never needs uvicorn's graceful-shutdown timeout: the stalled request
    answers at once, nothing is cancelled and no traceback is logged."""
    records = Records()
    uvicorn_log = logging.getLogger("uvicorn.error")
    service = JobServiceThread().start()
    uvicorn_log.addHandler(records)  # after start: uvicorn configures its loggers then
    answers: list[httpx.Response | Exception] = []

    def call() -> None:
        try:
            answers.append(
                httpx.post(
                    f"{service.url}/work",
                    headers={"Idempotency-Key": "k"},
                    json=body,
                    timeout=scaled(40),
                )
            )
        except httpx.HTTPError as exc:
            answers.append(exc)

    caller = threading.Thread(target=call)
    try:
        caller.start()
        books = service.books
        deadline = time.monotonic() + scaled(10)
        while not (books.stalls or books.dropped or books.lost or books.progress):
            assert time.monotonic() < deadline, "the request never stalled"
            time.sleep(0.01)
        started = time.monotonic()
        service.stop()
        stopped_in = time.monotonic() - started
        caller.join(scaled(10))
    finally:
        uvicorn_log.removeHandler(records)
        service.stop()
    assert not service._thread.is_alive()
    # uvicorn's graceful-shutdown timeout is 1 s: it was never reached.
    assert stopped_in < 0.9, stopped_in
    assert [a.status_code for a in answers if isinstance(a, httpx.Response)] == [status], answers
    errors = [r.getMessage() for r in records.records if r.levelno >= logging.ERROR]
    assert errors == [], errors


async def test_a_cancelled_request_is_still_cancelled() -> None:
    """The stall wakes on stop, but a cancellation from outside propagates."""
    stopping = Stopping()
    app = create_job_service(stopping=stopping)
    stopping.bind(asyncio.get_running_loop())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://job") as http:
        request = asyncio.create_task(
            http.post("/work", headers={"Idempotency-Key": "k"}, json={"stall_first": 1})
        )
        await wait_for(lambda: app.state.books.stalls["k"] == 1, 5)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        assert app.state.books.active["k"] == 0
        assert app.state.books.failures["k"] == 0 and "k" not in app.state.books.results
        # And after a stop, a new stall answers at once.
        stopping.set()
        answer = await asyncio.wait_for(
            http.post("/work", headers={"Idempotency-Key": "k"}, json={"stall_first": 2}),
            scaled(5),
        )
        assert answer.status_code == 503
