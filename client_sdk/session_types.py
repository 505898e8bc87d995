"""What the client's ``SyncSession`` is (its states) and what it asks its shell to do
(its commands): the vocabulary between the pure session and ``SyncConnection``.

The session never does I/O; after each input the shell drains ``commands_to_run()``
and carries out each of these, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from protocol import Event, Flags, Progress, TetherError

__all__ = [
    "ApplyEvents",
    "ApplyFlags",
    "Close",
    "Command",
    "FetchSnapshots",
    "SessionState",
    "Settle",
    "ShowProgress",
    "Stop",
]


class SessionState(StrEnum):
    """Where the session stands."""

    IDLE = "idle"
    HANDSHAKE = "handshake"
    CATCHING_UP = "catching_up"
    LIVE = "live"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ApplyEvents:
    """Durably apply ``events`` and set the cursor to ``cursor``; then call
    ``events_applied(cursor)``."""

    events: list[Event]
    cursor: int


@dataclass(frozen=True, slots=True)
class Settle:
    """Durably record verdicts: ``(id, applied, error)`` per settled mutation."""

    results: list[tuple[int, bool, str | None]]


@dataclass(frozen=True, slots=True)
class FetchSnapshots:
    """Fetch the current snapshots of every workflow (progressive sync); with ``reset``,
    the cursor fell behind the server's retention ``horizon``: the fetch must succeed
    before any later page is applied (else the shell calls ``reset_failed``)."""

    reset: bool = False
    horizon: int = 0


@dataclass(frozen=True, slots=True)
class ShowProgress:
    """Ephemeral live progress of a running step."""

    progress: Progress


@dataclass(frozen=True, slots=True)
class ApplyFlags:
    """The tenant's current flag set (issue 15): use it at once, keep it durably."""

    flags: Flags


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection (protocol violation or stall); reconnect with backoff."""

    error: TetherError


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop syncing for good and surface ``error`` to the application."""

    error: TetherError


Command = ApplyEvents | Settle | FetchSnapshots | ShowProgress | Close | Stop | ApplyFlags
