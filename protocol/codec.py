"""Encoders and decoders, built once.

Decoding arbitrary bytes yields a valid message or a ``ProtocolError`` — never any
other exception (the SPEC's promise 7: bad input gets a clear error). Sizes are
checked before parsing so an oversized frame costs nothing to refuse.
"""

from __future__ import annotations

import math
import re
from typing import Any, TypeVar

import msgspec

from protocol.errors import BadMessage, MessageTooLarge, ValidationError
from protocol.http import PushRequest
from protocol.limits import MAX_DETAIL_BYTES, MAX_INPUT_BYTES, check_payload
from protocol.messages import (
    MAX_BATCH,
    MAX_FRAME_BYTES,
    CancelWorkflowArgs,
    ClientMessage,
    Mutation,
    Push,
    ReportStateArgs,
    RetryWorkflowArgs,
    ServerMessage,
    SubmitWorkflowArgs,
)

__all__ = [
    "MUTATION_ARGS",
    "MutationArgs",
    "check_args",
    "check_text",
    "decode_client_message",
    "decode_json",
    "decode_server_message",
    "encode",
    "encode_json",
    "parse_mutation_args",
]

T = TypeVar("T")

MutationArgs = SubmitWorkflowArgs | CancelWorkflowArgs | RetryWorkflowArgs | ReportStateArgs

MUTATION_ARGS: dict[str, type[MutationArgs]] = {
    "submit_workflow": SubmitWorkflowArgs,
    "cancel_workflow": CancelWorkflowArgs,
    "retry_workflow": RetryWorkflowArgs,
    "report_state": ReportStateArgs,
}
"""Mutation name -> the Struct its ``args`` must convert to."""

_msgpack_encoder = msgspec.msgpack.Encoder()
_json_encoder = msgspec.json.Encoder()
_NUL_ESCAPE = re.compile(rb"(?:^|[^\\])(?:\\\\)*\\u0000")
"""``\u0000`` in JSON that is an escape (an even run of backslashes before it), not text."""
_client_decoder = msgspec.msgpack.Decoder(ClientMessage)
_server_decoder = msgspec.msgpack.Decoder(ServerMessage)
_json_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def _finite_hook(text: str) -> float:
    # JSON has no NaN, but ``1e999`` reads as inf: refuse it in untyped payloads too
    # (typed float fields carry their own bounds in protocol.messages).
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {text}")
    return value


_DECODE_FAILURES = (msgspec.DecodeError, RecursionError, ValueError, TypeError, OverflowError)


def encode(message: msgspec.Struct) -> bytes:
    """Encode a message as one msgpack frame."""
    return _msgpack_encoder.encode(message)


def encode_json(value: Any) -> bytes:
    """Encode a Struct (or plain data) as JSON."""
    return _json_encoder.encode(value)


def _check_size(data: bytes | bytearray | memoryview | str, limit: int) -> None:
    if len(data) > limit:
        raise MessageTooLarge(f"message of {len(data)} bytes exceeds the limit of {limit}")


def _decode(decoder: msgspec.msgpack.Decoder[Any], data: bytes, limit: int) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadMessage("expected a binary frame")
    _check_size(data, limit)
    try:
        return decoder.decode(data)
    except _DECODE_FAILURES as exc:
        raise BadMessage(f"undecodable message: {exc}") from exc


def decode_client_message(data: bytes, *, limit: int = MAX_FRAME_BYTES) -> ClientMessage:
    """Decode a client->server frame.

    Raises:
        MessageTooLarge: over ``limit`` bytes, or a Push of more than ``MAX_BATCH``.
        BadMessage: anything that is not a valid client message.
    """
    result: ClientMessage = _decode(_client_decoder, data, limit)
    if isinstance(result, Push):
        _check_batch(result.mutations)
    return result


def decode_server_message(data: bytes, *, limit: int = 16 * MAX_FRAME_BYTES) -> ServerMessage:
    """Decode a server->client frame.

    Raises:
        MessageTooLarge: over ``limit`` bytes.
        BadMessage: anything that is not a valid server message.
    """
    result: ServerMessage = _decode(_server_decoder, data, limit)
    return result


def decode_json(data: bytes | str, type_: type[T], *, limit: int = MAX_FRAME_BYTES) -> T:
    """Decode a JSON body into ``type_``.

    Raises:
        MessageTooLarge: over ``limit`` bytes.
        BadMessage: invalid JSON or not a valid ``type_``.
    """
    _check_size(data, limit)
    decoder = _json_decoders.get(type_)
    if decoder is None:
        decoder = _json_decoders[type_] = msgspec.json.Decoder(type_, float_hook=_finite_hook)
    try:
        result: T = decoder.decode(data)
    except _DECODE_FAILURES as exc:
        raise BadMessage(f"invalid body: {exc}") from exc
    if isinstance(result, PushRequest):
        _check_batch(result.mutations)
    return result


def _check_batch(mutations: list[Mutation]) -> None:
    if len(mutations) > MAX_BATCH:
        raise MessageTooLarge(
            f"a batch of {len(mutations)} mutations exceeds the limit of {MAX_BATCH}"
        )


def check_text(value: Any, what: str) -> None:
    """Refuse a NUL character (U+0000) anywhere in ``value``'s strings and keys.

    PostgreSQL can store NUL neither in ``text`` nor in ``jsonb``, so such input would
    fail deep in a transaction (a retryable storage error that wedges the client's
    queue) on one backend and be stored on the other. It is refused up front instead.

    Raises:
        ValidationError: ``value`` holds a NUL character.
    """
    # One C-level pass: msgspec writes U+0000 (in a string or a key) as \u0000.
    try:
        encoded = _json_encoder.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValidationError(f"{what} is not JSON: {exc}") from exc
    if b"\\u0000" in encoded and _NUL_ESCAPE.search(encoded):
        raise ValidationError(f"{what} contains a NUL character (U+0000)")


def parse_mutation_args(mutation: Mutation) -> MutationArgs:
    """Check a mutation's name and convert its args to their Struct.

    Raises:
        ValidationError: unknown mutation name, args that do not fit it, or text with a
            NUL character.
    """
    args_type = MUTATION_ARGS.get(mutation.name)
    if args_type is None:
        raise ValidationError(f"unknown mutation {mutation.name!r}")
    try:
        args = msgspec.convert(mutation.args, args_type)
    except (msgspec.ValidationError, RecursionError, ValueError, TypeError) as exc:
        raise ValidationError(f"invalid args for {mutation.name}: {exc}") from exc
    check_text(mutation.args, f"args of {mutation.name}")
    check_args(args)
    return args


def check_args(args: MutationArgs) -> None:
    """Hold a mutation's payload to its byte budget and refuse non-finite numbers.

    Raises:
        ValidationError: input over ``MAX_INPUT_BYTES``, detail over
            ``MAX_DETAIL_BYTES``, or a NaN/±inf anywhere in them.
    """
    if isinstance(args, SubmitWorkflowArgs):
        check_payload(args.input, "workflow input", MAX_INPUT_BYTES)
    elif isinstance(args, ReportStateArgs):
        check_payload(args.detail, "report detail", MAX_DETAIL_BYTES)
