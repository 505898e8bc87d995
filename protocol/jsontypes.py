"""The one alias for user JSON payloads (STYLE, Typing: ``Any`` only behind an alias). No I/O."""

from __future__ import annotations

from typing import Any, TypeAlias

__all__ = ["JSON"]

JSON: TypeAlias = Any
"""A user JSON payload: workflow input, step results, event data, report detail."""
