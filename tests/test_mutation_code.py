"""``MutationResult.code`` (issue 12) within protocol version 1: a new server's results
still read right in an old decoder (the ``conflict:`` text is kept, the field is
ignored), and an old server's results (no code) still read right in the new SDK."""

from __future__ import annotations

import msgspec

from client_sdk.session import Close, SessionState, Settle, SyncSession
from protocol import (
    Conflict,
    ErrorCode,
    MutationResult,
    PushResult,
    Welcome,
    decode_server_message,
    encode,
)
from protocol.messages import GAP
from tests.sync_helpers import submit


class OldMutationResult(msgspec.Struct, frozen=True):
    """``MutationResult`` as protocol 1 defined it before the code."""

    id: int
    status: str
    error: str | None = None


class OldPushResult(msgspec.Struct, frozen=True, tag_field="type", tag="PushResult"):
    results: list[OldMutationResult]


def old_sdk_sees_gap(result: OldMutationResult) -> bool:
    """How an SDK of before the code recognised a gap."""
    return result.error is not None and result.error.startswith("conflict:")


NEW = PushResult(
    results=[
        MutationResult(1, "applied"),
        MutationResult(2, "rejected", "unknown workflow 'x'", ErrorCode.INVALID.value),
        MutationResult(3, "rejected", "conflict: mutation id 3 skips ahead", GAP),
    ]
)


def test_new_server_results_read_by_an_old_decoder() -> None:
    for data, decode in (
        (encode(NEW), msgspec.msgpack.decode),
        (msgspec.json.encode(NEW), msgspec.json.decode),
    ):
        old = decode(data, type=OldPushResult)
        assert [r.id for r in old.results] == [1, 2, 3]
        assert [old_sdk_sees_gap(r) for r in old.results] == [False, False, True]
        assert old.results[1].error == "unknown workflow 'x'"


def test_code_is_omitted_when_unset_so_old_json_is_unchanged() -> None:
    assert msgspec.json.encode(MutationResult(1, "applied")) == (
        b'{"id":1,"status":"applied","error":null}'
    )
    assert msgspec.json.decode(
        b'{"id":3,"status":"rejected","error":"x","code":"gap"}', type=MutationResult
    ) == MutationResult(3, "rejected", "x", GAP)


def test_old_server_results_read_by_the_new_sdk() -> None:
    old = OldPushResult(
        results=[
            OldMutationResult(1, "applied"),
            OldMutationResult(2, "rejected", "bad input"),
            OldMutationResult(3, "rejected", "conflict: gap at 3"),
        ]
    )
    message = decode_server_message(msgspec.msgpack.encode(old))
    assert isinstance(message, PushResult)
    assert [r.code for r in message.results] == [msgspec.UNSET] * 3
    assert [r.gap for r in message.results] == [False, False, True]
    s = SyncSession("c1", pending=[submit(i) for i in (1, 2, 3)])
    s.connection_made()
    s.messages_to_send()
    s.receive_message(Welcome(server_id="s", protocol_version=1, last_mutation_id=0, head=0))
    s.messages_to_send()
    s.commands_to_run()
    s.receive_message(message)
    settle, close = s.commands_to_run()
    assert settle == Settle([(1, True, None), (2, False, "bad input")])
    assert isinstance(close, Close) and isinstance(close.error, Conflict)
    assert s.pending_ids == [3] and s.state is SessionState.IDLE


def test_the_code_decides_over_the_text() -> None:
    """A new server's code is what counts: a gap whatever its text, and a rejection
    whose text happens to start with ``conflict:`` is not a gap."""
    assert MutationResult(3, "rejected", "id skips ahead", GAP).gap
    assert not MutationResult(3, "rejected", "conflict: ended", ErrorCode.CONFLICT.value).gap
    s = SyncSession("c1", pending=[submit(1), submit(2)])
    s.connection_made()
    s.receive_message(Welcome(server_id="s", protocol_version=1, last_mutation_id=0, head=0))
    s.messages_to_send()
    s.commands_to_run()
    s.receive_message(
        PushResult(
            results=[
                MutationResult(1, "rejected", "conflict: ended", ErrorCode.CONFLICT.value),
                MutationResult(2, "rejected", "skips ahead", GAP),
            ]
        )
    )
    settle, close = s.commands_to_run()
    assert settle == Settle([(1, False, "conflict: ended")])
    assert isinstance(close, Close)
    assert s.pending_ids == [2]
