"""What a mutation costs in a Push, and the stand-in for one that never fits.

A Push is cut by count and by bytes (the server's declared frame limit); a single
mutation over the budget is sent as a small stand-in without its args, which the
server records as ``rejected`` — the session settles it with its own reason, so the
queue never wedges (SPEC promise 7, issue 11).
"""

from __future__ import annotations

import msgspec

from protocol import Mutation

__all__ = ["MIN_PUSH_BYTES", "mutation_bytes", "oversized"]

MIN_PUSH_BYTES = 4 * 1024
"""The push budget never shrinks below this after refusals (a stand-in always fits)."""

_json = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()


def mutation_bytes(mutation: Mutation) -> int:
    """What ``mutation`` costs in a Push, in the larger of the two wire encodings."""
    return max(len(_json.encode(mutation)), len(_msgpack.encode(mutation)))


def oversized(mutation: Mutation, size: int, budget: int) -> tuple[Mutation, str]:
    """A mutation the server's frame limit can never carry: the stand-in to send
    (without its args, so the server records its id as rejected and the queue moves on)
    and the reason the client settles it with."""
    reason = (
        f"too large: {mutation.name} of {size} bytes does not fit the server's push "
        f"budget of {budget} bytes; it was never applied"
    )
    stand_in = Mutation(
        id=mutation.id,
        name=mutation.name,
        args={"oversized_bytes": size},
        created_at=mutation.created_at,
    )
    return stand_in, reason
