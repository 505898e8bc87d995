"""``python -m bench.worker module:function JSON``: one measurement in a fresh process.

The function is awaited (if it is a coroutine function) with the JSON params as keyword
arguments, under uvloop when it is installed; its return value is printed as
``@result <json>`` on the last line of stdout.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import sys
from typing import Any

from bench.procs import raise_fd_limit


def install_uvloop() -> bool:
    """Use uvloop's event loop policy when uvloop is installed (an optional speed-up)."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def main(argv: list[str]) -> int:
    """Entry point."""
    if len(argv) != 2:
        print("usage: python -m bench.worker module:function JSON", file=sys.stderr)
        return 2
    target, params_text = argv
    module_name, _, attr = target.partition(":")
    fn: Any = getattr(importlib.import_module(module_name), attr)
    params = json.loads(params_text)
    raise_fd_limit()
    if inspect.iscoroutinefunction(fn):
        install_uvloop()
        result = asyncio.run(fn(**params))
    else:
        result = fn(**params)
    sys.stdout.write("@result " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
