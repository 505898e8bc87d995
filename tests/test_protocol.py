"""protocol/: round trips, limits, and decoding garbage into clear errors only."""

from __future__ import annotations

import contextlib
import uuid

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
from protocol import (
    ERROR_TABLE,
    PROTOCOL_VERSION,
    Ack,
    BadMessage,
    ErrorCode,
    Event,
    Events,
    Hello,
    MessageTooLarge,
    Mutation,
    MutationResult,
    MutationStatus,
    Progress,
    ProtocolError,
    Push,
    PushRequest,
    PushResult,
    TetherError,
    ValidationError,
    Welcome,
    decode_client_message,
    decode_json,
    decode_server_message,
    encode,
    encode_json,
    error_from_code,
    parse_mutation_args,
)
from protocol.errors import RateLimited

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)

mutations = st.builds(
    Mutation,
    id=st.integers(1, 2**40),
    name=st.sampled_from(["submit_workflow", "cancel_workflow", "retry_workflow"]),
    args=json_objects,
    created_at=st.floats(0, 2e9),
)
client_messages = st.one_of(
    st.builds(
        Hello,
        client_id=st.text(min_size=1, max_size=64),
        protocol_version=st.integers(0, 10),
        cursor=st.integers(0, 2**62),
        last_mutation_id=st.integers(0, 2**62),
    ),
    st.builds(Push, mutations=st.lists(mutations, min_size=1, max_size=5)),
    st.builds(Ack, cursor=st.integers(0, 2**62)),
)
events = st.builds(
    Event,
    seq=st.integers(0, 2**62),
    workflow_id=st.text(min_size=1, max_size=64),
    type=st.text(min_size=1, max_size=20),
    data=json_objects,
    at=st.floats(0, 2e9),
)
server_messages = st.one_of(
    st.builds(
        Welcome,
        server_id=st.text(max_size=10),
        protocol_version=st.integers(0, 5),
        last_mutation_id=st.integers(0, 2**40),
        head=st.integers(0, 2**40),
    ),
    st.builds(
        PushResult,
        results=st.lists(
            st.builds(
                MutationResult,
                id=st.integers(1, 2**40),
                status=st.sampled_from(list(MutationStatus)),
                error=st.none() | st.text(max_size=30),
            ),
            max_size=4,
        ),
    ),
    st.builds(Events, events=st.lists(events, max_size=3), cursor=st.integers(0, 2**40)),
    st.builds(
        Progress,
        workflow_id=st.text(max_size=10),
        step=st.text(max_size=10),
        fraction=st.floats(0, 1),
    ),
    st.builds(protocol.Error, code=st.text(max_size=10), message=st.text(max_size=30)),
)


@given(client_messages)
def test_client_messages_round_trip(message):
    assert decode_client_message(encode(message)) == message


@given(server_messages)
def test_server_messages_round_trip(message):
    assert decode_server_message(encode(message)) == message


@given(st.binary(max_size=300))
@settings(max_examples=400)
def test_random_bytes_decode_to_a_message_or_a_protocol_error(data):
    for decode in (decode_client_message, decode_server_message):
        with contextlib.suppress(ProtocolError):
            decode(data)


@given(
    st.one_of(json_values, st.dictionaries(st.sampled_from(["type", "cursor", "x"]), json_values))
)
@settings(max_examples=300)
def test_structured_garbage_is_bad_message(value):
    data = msgspec.msgpack.encode(value)
    with contextlib.suppress(BadMessage):
        decode_client_message(data)
    with contextlib.suppress(BadMessage):
        decode_json(msgspec.json.encode(value), PushRequest)


@given(client_messages, st.integers(1, 40))
def test_truncated_frames_are_bad_messages(message, cut):
    data = encode(message)
    truncated = data[: max(0, len(data) - cut)]
    with pytest.raises(BadMessage):
        decode_client_message(truncated)


def test_tag_is_the_class_name():
    assert msgspec.msgpack.decode(encode(Ack(cursor=3))) == {"type": "Ack", "cursor": 3}
    assert msgspec.json.decode(encode_json(Events(events=[], cursor=0)))["type"] == "Events"


def test_unknown_message_type_is_refused():
    with pytest.raises(BadMessage, match="Invalid value 'Nope'"):
        decode_client_message(msgspec.msgpack.encode({"type": "Nope"}))


def test_server_message_is_not_a_client_message():
    frame = encode(Welcome(server_id="s", protocol_version=1, last_mutation_id=0, head=0))
    with pytest.raises(BadMessage):
        decode_client_message(frame)


def test_text_frames_are_refused():
    with pytest.raises(BadMessage, match="binary"):
        decode_client_message("hello")  # type: ignore[arg-type]


def test_oversized_frame_is_refused_before_parsing():
    frame = encode(Ack(cursor=1)) + b"\x00" * 2000
    with pytest.raises(MessageTooLarge) as info:
        decode_client_message(frame, limit=1000)
    assert info.value.close_code == 4413
    assert info.value.http_status == 413


def test_limits_are_enforced():
    too_many = [Mutation(id=i, name="cancel_workflow", args={}) for i in range(1, 502)]
    with pytest.raises(MessageTooLarge, match="batch of 501"):
        decode_client_message(encode(Push(mutations=too_many)))
    with pytest.raises(MessageTooLarge, match="batch of 501"):
        decode_json(encode_json(PushRequest(client_id="c", mutations=too_many)), PushRequest)
    with pytest.raises(BadMessage):
        decode_client_message(encode(Hello(client_id="x" * 65, protocol_version=1)))
    with pytest.raises(BadMessage):
        decode_client_message(encode(Push(mutations=[])))
    with pytest.raises(BadMessage):
        decode_client_message(msgspec.msgpack.encode({"type": "Ack", "cursor": -1}))


def test_parse_mutation_args():
    wf = str(uuid.uuid4())
    args = parse_mutation_args(
        Mutation(id=1, name="submit_workflow", args={"workflow_id": wf, "name": "n", "input": {}})
    )
    assert args.workflow_id == wf
    with pytest.raises(ValidationError, match="unknown mutation"):
        parse_mutation_args(Mutation(id=1, name="drop_tables", args={}))
    with pytest.raises(ValidationError, match="invalid args"):
        parse_mutation_args(Mutation(id=1, name="cancel_workflow", args={"workflow_id": "x"}))
    with pytest.raises(ValidationError):
        parse_mutation_args(
            Mutation(
                id=1,
                name="report_state",
                args={"workflow_id": wf, "source": "nobody", "status": "running", "at": 1},
            )
        )


def test_every_code_has_a_table_row_and_a_class():
    for code in ErrorCode:
        info = ERROR_TABLE[code]
        assert 1000 <= info.close_code < 5000
        err = error_from_code(code, "m")
        assert isinstance(err, TetherError)
        assert err.code is code or code is ErrorCode.INTERNAL
    assert type(error_from_code("made-up", "m")) is TetherError
    assert RateLimited("x", retry_after=2.5).retry_after == 2.5
    assert RateLimited().retryable


def test_spec_close_codes():
    assert ERROR_TABLE[ErrorCode.BAD_MESSAGE].close_code == 4400
    assert ERROR_TABLE[ErrorCode.UNAUTHORIZED].close_code == 4401
    assert ERROR_TABLE[ErrorCode.FORBIDDEN].close_code == 4403
    assert ERROR_TABLE[ErrorCode.PROTOCOL_VERSION].close_code == 4409
    assert ERROR_TABLE[ErrorCode.TOO_LARGE].close_code == 4413
    assert ERROR_TABLE[ErrorCode.RATE_LIMITED].close_code == 4429
    assert ERROR_TABLE[ErrorCode.UNAVAILABLE].close_code == 1013


def test_protocol_version_is_an_int():
    assert isinstance(PROTOCOL_VERSION, int) and PROTOCOL_VERSION >= 1


def test_statuses_match_spec():
    assert [s.value for s in protocol.WorkflowStatus] == [
        "pending",
        "running",
        "compensating",
        "parked",
        "completed",
        "compensated",
        "failed",
        "cancelled",
    ]
    assert [s.value for s in protocol.StepStatus] == [
        "waiting",
        "running",
        "retrying",
        "succeeded",
        "failed",
        "compensating",
        "compensated",
        "skipped",
    ]
    assert protocol.WorkflowStatus.COMPLETED.terminal
    assert not protocol.WorkflowStatus.PARKED.terminal
