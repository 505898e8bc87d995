"""Child process of ``test_client_crash``: submits workflows until it is SIGKILLed.

Usage: ``python tests/client_crash_child.py URL TOKEN PATH MODE`` with MODE ``submit``
(print ``RET <id> <pending> <cursor>`` after every returned submit, forever) or
``flush`` (flush, print ``FLUSHED <cursor>``, exit).
"""

from __future__ import annotations

import asyncio
import sys

from client_sdk import SyncClient
from client_sdk.backoff import Backoff, CircuitBreaker


async def main(url: str, token: str, path: str, mode: str) -> None:
    client = SyncClient(
        url,
        token=token,
        path=path,
        backoff=Backoff(base=0.02, cap=0.2),
        breaker=CircuitBreaker(failure_threshold=1000, reset_timeout=0.2),
    )
    async with client:
        print(f"STARTED {client.cursor} {client.pending_count}", flush=True)
        if mode == "flush":
            await client.flush(timeout=60)
            print(f"FLUSHED {client.cursor}", flush=True)
            return
        i = 0
        while True:
            handle = await client.submit_workflow("noop", {"i": i})
            print(f"RET {handle.id} {client.pending_count} {client.cursor}", flush=True)
            i += 1
            if i % 4 == 0:
                await asyncio.sleep(0.002)  # let pushes and pages interleave with submits


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
