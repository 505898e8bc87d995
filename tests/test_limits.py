"""Byte budgets and payload checks (``protocol.limits``; issue 11), without sockets.

The decoders refuse non-finite numbers, the SDK refuses before queueing what the
server could never accept, the session cuts its pushes to the declared frame limit,
and partial event snapshots merge back into whole ones.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from client_sdk import SyncClient
from client_sdk.localstore import merge_partial
from client_sdk.session import SyncSession, mutation_bytes
from protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    BadMessage,
    Event,
    Events,
    Mutation,
    Push,
    PushRequest,
    ReportStateArgs,
    ValidationError,
    Welcome,
    decode_client_message,
    decode_json,
    decode_server_message,
    encode,
    parse_mutation_args,
)
from protocol import events as event_types
from protocol.limits import (
    DEFAULT_PUSH_BYTES,
    MAX_DETAIL_BYTES,
    MAX_INPUT_BYTES,
    PUSH_OVERHEAD_BYTES,
    check_finite,
    check_payload,
    payload_bytes,
)
from sync_server.session import ServerSession
from sync_server.snapshots import event_snapshot_data, snapshot_data
from sync_server.store.base import WorkflowRecord

pytestmark = pytest.mark.timeout(60)


def submit(mid: int, size: int = 0) -> Mutation:
    args = {"workflow_id": str(uuid.UUID(int=mid)), "name": "noop", "input": {"b": "x" * size}}
    return Mutation(id=mid, name="submit_workflow", args=args, created_at=1.0)


# ------------------------------------------------------------ non-finite


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_decoders_refuse_non_finite_numbers_in_typed_fields(bad: float) -> None:
    frame = msgspec.msgpack.encode(
        {"type": "Push", "mutations": [{**msgspec.to_builtins(submit(1)), "created_at": bad}]}
    )
    with pytest.raises(BadMessage):
        decode_client_message(frame)
    event = {"seq": 1, "workflow_id": "w", "type": "t", "data": {}, "at": bad}
    frame = msgspec.msgpack.encode({"type": "Events", "events": [event], "cursor": 1})
    with pytest.raises(BadMessage):
        decode_server_message(frame)
    progress = {"type": "Progress", "workflow_id": "w", "step": "s", "fraction": bad}
    with pytest.raises(BadMessage):
        decode_server_message(msgspec.msgpack.encode(progress))


def test_json_bodies_refuse_non_finite_numbers_anywhere() -> None:
    wf = str(uuid.uuid4())
    head = b'{"workflow_id":"%s","source":"job-queue","status":"running",' % wf.encode()
    for body in (head + b'"at":1e999}', head + b'"at":1,"detail":{"a":[1,-1e400]}}'):
        with pytest.raises(BadMessage):
            decode_json(body, ReportStateArgs)
    push = b'{"client_id":"c","mutations":[{"id":1,"name":"submit_workflow","args":{"x":1e999}}]}'
    with pytest.raises(BadMessage):
        decode_json(push, PushRequest)
    assert decode_json(head + b'"at":1.5,"detail":{"a":2.5e10}}', ReportStateArgs).at == 1.5


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_mutation_args_with_non_finite_numbers_are_invalid(bad: float) -> None:
    wf = str(uuid.uuid4())
    mutations = [
        Mutation(1, "submit_workflow", {"workflow_id": wf, "name": "n", "input": {"v": [bad]}}),
        Mutation(
            2,
            "report_state",
            {"workflow_id": wf, "source": "mini-app", "status": "running", "at": bad},
        ),
        Mutation(
            3,
            "report_state",
            {
                "workflow_id": wf,
                "source": "mini-app",
                "status": "running",
                "at": 1.0,
                "detail": {"k": {"v": bad}},
            },
        ),
    ]
    for mutation in mutations:
        # Over msgpack the frame itself decodes (args are free-form) ...
        (decoded,) = decode_client_message(encode(Push(mutations=[mutation]))).mutations
        # ... and the mutation is refused alone, so the rest of its batch applies.
        with pytest.raises(ValidationError):
            parse_mutation_args(decoded)


def test_check_finite_and_payload_sizes() -> None:
    check_finite({"a": [1.0, {"b": 2}], "s": "inf"}, "x")
    for bad in (math.inf, [math.nan], {"a": {"b": -math.inf}}):
        with pytest.raises(ValidationError, match="non-finite"):
            check_finite(bad, "x")
    assert payload_bytes({"a": "xy"}) == len(b'{"a":"xy"}')
    assert check_payload({"a": "x" * 10}, "x", 100) == 18
    with pytest.raises(ValidationError, match="over the limit of 15 bytes"):
        check_payload({"a": "x" * 10}, "input", 15)


def test_payload_caps_in_mutation_args() -> None:
    wf = str(uuid.uuid4())
    fits = "x" * (MAX_INPUT_BYTES - 20)
    parse_mutation_args(Mutation(1, "submit_workflow", {"workflow_id": wf, "name": "n",
                                                        "input": {"b": fits}}))  # fmt: skip
    with pytest.raises(ValidationError, match="workflow input is"):
        parse_mutation_args(
            Mutation(
                1,
                "submit_workflow",
                {"workflow_id": wf, "name": "n", "input": {"b": "x" * MAX_INPUT_BYTES}},
            )
        )
    args = {"workflow_id": wf, "source": "mini-app", "status": "running", "at": 1.0}
    with pytest.raises(ValidationError, match="report detail"):
        parse_mutation_args(
            Mutation(2, "report_state", {**args, "detail": {"d": "y" * MAX_DETAIL_BYTES}})
        )


# ------------------------------------------------------------ the SDK refuses


async def test_submit_refuses_what_the_server_could_never_accept(tmp_path: Path) -> None:
    """Finding 13: ``workflow_id=""`` silently ran under a fresh random id; and inputs
    the server must refuse (too large, NaN/inf, NUL) were queued, to be refused later."""
    async with SyncClient(
        "ws://127.0.0.1:9", token="t", path=tmp_path / "c.db", connect=False
    ) as c:
        bad_calls: list[tuple[dict[str, Any], dict[str, Any], str]] = [
            ({"n": 1}, {"workflow_id": ""}, "workflow_id"),
            ({"n": 1}, {"workflow_id": "not-a-uuid"}, "workflow_id"),
            ({"b": "x" * MAX_INPUT_BYTES}, {}, "over the limit"),
            ({"v": math.nan}, {}, "non-finite"),
            ({"v": [1, math.inf]}, {}, "non-finite"),
            ({"v": "a\x00b"}, {}, "NUL"),
        ]
        for data, options, message in bad_calls:
            with pytest.raises(ValidationError, match=message):
                await c.submit_workflow("noop", data, **options)
        assert c.pending_count == 0 and c.store.mutations() == []
        wf = str(uuid.uuid4())
        handle = await c.submit_workflow(
            "noop", {"b": "x" * (MAX_INPUT_BYTES - 20)}, workflow_id=wf
        )
        assert handle.id == wf and c.pending_count == 1


# ------------------------------------------------------------ push batches


def _welcomed(session: SyncSession, max_frame_bytes: int) -> None:
    session.connection_made()
    session.messages_to_send()
    session.receive_message(
        Welcome(
            server_id="s",
            protocol_version=PROTOCOL_VERSION,
            last_mutation_id=0,
            head=0,
            max_frame_bytes=max_frame_bytes,
        )
    )


def test_push_batches_fit_the_declared_frame_limit() -> None:
    session = SyncSession("c", pending=[submit(i, 60_000) for i in range(1, 11)])
    _welcomed(session, MAX_FRAME_BYTES)
    assert session.max_batch_bytes == MAX_FRAME_BYTES - PUSH_OVERHEAD_BYTES
    sent: list[int] = []
    while session.pending_count:
        (push,) = session.messages_to_send()
        assert isinstance(push, Push)
        assert len(encode(push)) <= MAX_FRAME_BYTES
        assert len(msgspec.json.encode(PushRequest("c", push.mutations))) <= MAX_FRAME_BYTES
        sent.append(len(push.mutations))
        session.receive_message(_applied(push))
        session.commands_to_run()
    assert sum(sent) == 10 and max(sent) == 8  # 8 x 60 KB fit 511 KiB


def _applied(push: Push) -> Any:
    from protocol import MutationResult, PushResult

    return PushResult(results=[MutationResult(m.id, "applied") for m in push.mutations])


def test_an_old_server_gets_the_conservative_default_budget() -> None:
    session = SyncSession("c", pending=[submit(i, 60_000) for i in range(1, 6)])
    _welcomed(session, 0)  # a Welcome without the field
    assert session.max_batch_bytes == DEFAULT_PUSH_BYTES - PUSH_OVERHEAD_BYTES
    (push,) = session.messages_to_send()
    assert len(push.mutations) == 4 and len(encode(push)) <= DEFAULT_PUSH_BYTES


def test_a_mutation_over_the_budget_goes_as_a_stand_in_and_settles_rejected() -> None:
    session = SyncSession("c", pending=[submit(1, 50_000), submit(2)])
    _welcomed(session, 32 * 1024)
    (push,) = session.messages_to_send()
    (stand_in,) = push.mutations
    assert stand_in.id == 1 and "input" not in stand_in.args and len(encode(push)) < 1024
    from protocol import MutationResult, PushResult

    session.receive_message(PushResult([MutationResult(1, "rejected", "invalid args")]))
    settle = next(c for c in session.commands_to_run() if hasattr(c, "results"))
    ((mid, applied, error),) = settle.results
    assert mid == 1 and not applied and error is not None and "too large" in error
    (push,) = session.messages_to_send()
    assert [m.id for m in push.mutations] == [2] and push.mutations[0].args["input"] == {"b": ""}
    assert mutation_bytes(submit(1, 100)) >= len(encode(submit(1, 100)))


def test_welcome_declares_the_servers_frame_limit() -> None:
    from protocol import Hello

    session = ServerSession(server_id="s", max_frame_bytes=123_456)
    session.receive_message(Hello(client_id="c", protocol_version=PROTOCOL_VERSION))
    session.receive_client_state(0, 0)
    (welcome,) = session.messages_to_send()
    assert isinstance(welcome, Welcome) and welcome.max_frame_bytes == 123_456
    # An older client ignores the appended field; an older server's Welcome lacks it.
    old = msgspec.msgpack.encode(
        {"type": "Welcome", "server_id": "s", "protocol_version": 1, "last_mutation_id": 0,
         "head": 0}
    )  # fmt: skip
    decoded = decode_server_message(old)
    assert isinstance(decoded, Welcome) and decoded.max_frame_bytes == 0


# ------------------------------------------------------------ partial snapshots


def _record() -> WorkflowRecord:
    return WorkflowRecord(
        id="w",
        tenant="t",
        name="two",
        status="running",
        state={
            "steps": {
                "a": {"status": "succeeded", "attempts": 1, "progress": 1.0, "result": "A" * 100},
                "b": {"status": "running", "attempts": 1, "progress": 0.0, "result": None},
            }
        },
        version=3,
    )


def test_event_snapshots_carry_only_the_results_the_event_changed() -> None:
    record = _record()
    step_event = event_snapshot_data(record, event_types.STEP_CHANGED, "a")
    assert step_event["partial"] and step_event["steps"]["a"]["result"] == "A" * 100
    other = event_snapshot_data(record, event_types.WORKFLOW_REPORTED)
    assert other["steps"]["a"]["result"] is None and other["result"] is None
    record.status, record.result = "completed", {"a": "A" * 100}
    done = event_snapshot_data(record, event_types.WORKFLOW_CHANGED)
    assert done["result"] == {"a": "A" * 100} and done["steps"]["a"]["result"] is None
    # Merged in order, the partial snapshots give back the whole one.
    merged = merge_partial(None, step_event)
    merged = merge_partial(merged, {**other, "version": 4})
    merged = merge_partial(merged, {**done, "version": 5})
    assert merged == {**snapshot_data(record), "version": 5}
    assert merge_partial(None, other)["partial"] is False


def test_events_page_frames_fit_the_receivers_limit() -> None:
    big = Event(seq=1, workflow_id="w", type="t", data={"d": "x" * 200_000}, at=1.0)
    frame = encode(Events(events=[big], cursor=1))
    assert len(frame) < 16 * MAX_FRAME_BYTES
    assert decode_server_message(frame) == Events(events=[big], cursor=1)


def test_a_push_refused_as_too_large_halves_the_budget_for_good() -> None:
    """A proxy in between allows less than the server declares: 4413 for a batch that
    fitted the declared limit halves the budget, and the next Welcome does not raise it."""
    session = SyncSession("c", pending=[submit(i, 60_000) for i in range(1, 11)])
    _welcomed(session, MAX_FRAME_BYTES)
    (push,) = session.messages_to_send()
    assert len(push.mutations) == 8
    session.receive_close(4413, "too large")
    _welcomed(session, MAX_FRAME_BYTES)
    assert session.max_batch_bytes == (MAX_FRAME_BYTES - PUSH_OVERHEAD_BYTES) // 2
    (push,) = session.messages_to_send()
    assert len(push.mutations) == 4


def test_a_single_leaf_output_refers_to_its_step_instead_of_repeating_it() -> None:
    record = _record()
    step_event = event_snapshot_data(record, event_types.STEP_CHANGED, "a")
    record.status, record.result = "completed", "A" * 100
    done = event_snapshot_data(record, event_types.WORKFLOW_CHANGED)
    assert done["result"] is None and done["result_of"] == "a"
    assert len(msgspec.json.encode(done)) < 400  # the output is not written again
    merged = merge_partial(merge_partial(None, step_event), {**done, "version": 5})
    assert merged == {**snapshot_data(record), "version": 5}
    assert merged["result"] == "A" * 100 and merged["result_of"] == ""
