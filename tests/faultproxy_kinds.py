"""The fault proxy's vocabulary: directions, WebSocket rule actions, fault state, frames.

``tests/faultproxy.py`` describes the theory of operation. This module holds the plain
data the proxy and its pipes share: ``Direction``, ``WsAction``, ``WsRule`` (one
message-level rule), ``_Faults`` (the per-direction fault state every pipe reads at
every chunk) and the WebSocket frame parser.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum


class Direction(StrEnum):
    """Which way traffic flows: ``up`` is client → server, ``down`` server → client."""

    UP = "up"
    DOWN = "down"
    BOTH = "both"

    def covers(self, pipe: Direction) -> bool:
        """Whether a fault set for ``self`` applies to the ``pipe`` direction."""
        return self is Direction.BOTH or self is pipe


class WsAction(StrEnum):
    """What a ``WsRule`` does to a whole WebSocket data message."""

    DROP = "drop"
    DUPLICATE = "duplicate"
    REORDER = "reorder"


@dataclass
class WsRule:
    """A message-level fault.

    Attributes:
        action: drop, duplicate or reorder.
        direction: which pipe(s) it watches.
        probability: chance (seeded RNG) that it fires on a matching message.
        count: fire at most this many times (None: unlimited).
        match: optional predicate on the unmasked payload of the whole message.
        fired: how many times it fired.
    """

    action: WsAction
    direction: Direction = Direction.BOTH
    probability: float = 1.0
    count: int | None = None
    match: Callable[[bytes], bool] | None = None
    fired: int = 0

    @property
    def exhausted(self) -> bool:
        """True once it fired ``count`` times."""
        return self.count is not None and self.fired >= self.count


@dataclass
class _Faults:
    """The fault settings of one direction."""

    latency: float = 0.0
    jitter: float = 0.0
    bandwidth: float | None = None  # bytes per second per link
    partitioned: bool = False
    stalled: bool = False
    flowing: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.flowing.set()


@dataclass
class _Frame:
    """One parsed RFC 6455 frame (the raw bytes are forwarded unchanged)."""

    fin: bool
    opcode: int
    raw: bytes
    payload_offset: int
    mask: bytes | None

    @property
    def control(self) -> bool:
        return self.opcode >= 0x8

    def payload(self) -> bytes:
        data = self.raw[self.payload_offset :]
        if self.mask is None or not data:
            return data
        key = (self.mask * (len(data) // 4 + 1))[: len(data)]
        return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(len(data), "big")


def _parse_frame(buffer: bytearray) -> _Frame | None:
    """Take one complete frame off the front of ``buffer`` (RFC 6455 §5.2), or None."""
    if len(buffer) < 2:
        return None
    first, second = buffer[0], buffer[1]
    length = second & 0x7F
    offset = 2
    if length == 126:
        if len(buffer) < 4:
            return None
        (length,) = struct.unpack_from("!H", buffer, 2)
        offset = 4
    elif length == 127:
        if len(buffer) < 10:
            return None
        (length,) = struct.unpack_from("!Q", buffer, 2)
        offset = 10
    mask = None
    if second & 0x80:
        if len(buffer) < offset + 4:
            return None
        mask = bytes(buffer[offset : offset + 4])
        offset += 4
    end = offset + length
    if len(buffer) < end:
        return None
    raw = bytes(buffer[:end])
    del buffer[:end]
    return _Frame(bool(first & 0x80), first & 0x0F, raw, offset, mask)
