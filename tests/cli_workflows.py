"""Workflows of ``tests/test_cli.py``'s real server (``tests.cli_workflows:workflows``).

``gated`` parks (a dead letter) until the file named by its input's ``unlock`` exists:
the operator then requeues it and it completes.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from sync_server.saga import PermanentError, Step, StepContext, Workflow


async def _gate(ctx: StepContext) -> dict[str, Any]:
    unlock = ctx.input.get("unlock")
    if unlock and not await asyncio.to_thread(os.path.exists, unlock):
        raise PermanentError("locked until the operator unlocks it")
    return {"passed": True}


workflows = [Workflow("gated", [Step("gate", _gate)], on_failure="park")]
