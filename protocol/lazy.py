"""Lazy package exports (PEP 562), as websockets does: the packages' ``__init__``s name
their public API without importing it, so importing one pure module (say
``sync_server.saga.machine``) does not drag in the app and its I/O libraries first
(``tests/test_layering.py``). No I/O; imports happen on first access only."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, table: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module ``__getattr__`` and ``__dir__`` for ``package``.

    Args:
        package: the package's ``__name__``.
        table: exported name -> the module that defines it.

    Returns:
        ``(__getattr__, __dir__)``; the first caches each name in the package on use.
    """

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(importlib.import_module(package), name, value)  # later look-ups skip this
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(table))

    return __getattr__, __dir__
