"""Every message of the wire, as frozen msgspec Structs.

WebSocket frames are msgpack, HTTP bodies are JSON; both carry the same Structs.
Tagged unions use ``tag_field="type"`` and the class name as the tag (SPEC, Wire).

Schema evolution (msgspec docs, schema-evolution): new fields are appended with a
default; a tag is never renamed and a field never changes type; anything else bumps
``PROTOCOL_VERSION``.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from protocol.flags import FlagDef
from protocol.status import MutationStatus, Source, WorkflowStatus
from protocol.tracecontext import TRACEPARENT_LENGTH

__all__ = [
    "CONFLICT_PREFIX",
    "GAP",
    "MAX_BATCH",
    "MAX_EVENTS_PAGE",
    "MAX_FRAME_BYTES",
    "MAX_ID_LENGTH",
    "MAX_NAME_LENGTH",
    "MAX_TEXT_LENGTH",
    "PROTOCOL_VERSION",
    "Ack",
    "CancelWorkflowArgs",
    "ClientMessage",
    "Error",
    "Event",
    "Events",
    "Flags",
    "Hello",
    "JSONObject",
    "Mutation",
    "MutationResult",
    "Progress",
    "Push",
    "PushResult",
    "ReportStateArgs",
    "RetryWorkflowArgs",
    "ServerMessage",
    "StepSnapshot",
    "SubmitWorkflowArgs",
    "Welcome",
    "WorkflowSnapshot",
]

PROTOCOL_VERSION = 1

MAX_FRAME_BYTES = 512 * 1024
"""Largest WebSocket frame or HTTP body accepted (bytes)."""
MAX_BATCH = 500
"""Most mutations in one Push."""
MAX_EVENTS_PAGE = 1000
"""Most events in one Events page."""
MAX_ID_LENGTH = 64
MAX_NAME_LENGTH = 128
MAX_TEXT_LENGTH = 4096

JSONObject = dict[str, Any]
"""A user JSON payload (workflow input, results, event data)."""

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_LENGTH)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT_LENGTH)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
MutationId = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
_MAX_FLOAT = 1.7976931348623157e308
Timestamp = Annotated[float, msgspec.Meta(ge=0, le=_MAX_FLOAT)]
"""Seconds since the epoch; NaN and ±inf are refused at decode (issue 11)."""
Finite = Annotated[float, msgspec.Meta(ge=-_MAX_FLOAT, le=_MAX_FLOAT)]
"""Any finite float: NaN and ±inf are refused at decode."""
MAX_DEADLINE = 10 * 365 * 86400.0
Deadline = Annotated[float, msgspec.Meta(gt=0, le=MAX_DEADLINE)]
"""Seconds a workflow may take from acceptance (finite: NaN and inf are refused)."""
UUIDText = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    ),
]


class _Base(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """Plain (untagged) wire records."""


class Message(msgspec.Struct, frozen=True, tag_field="type", tag=True):
    """Root of the tagged messages; the tag is the class name."""


# ---------------------------------------------------------------- records


class Mutation(_Base, frozen=True):
    """One queued client request. ``id`` increases per client, starting at 1."""

    id: MutationId
    name: Name
    args: JSONObject
    created_at: Timestamp = 0.0
    traceparent: Annotated[str, msgspec.Meta(max_length=TRACEPARENT_LENGTH)] = ""
    """W3C traceparent of the client's span for this request ("" when not traced);
    an invalid one is ignored, never rejected (``protocol.tracecontext``)."""


GAP = "gap"
"""``MutationResult.code`` of a mutation whose id skips ahead of the last applied one:
not applied, nothing after the gap was; the client keeps it pending and reconnects."""

CONFLICT_PREFIX = "conflict:"
"""What a gap's ``error`` text starts with; the only signal of a server that predates
``MutationResult.code``, so it is still sent and still understood."""

Code = Annotated[str, msgspec.Meta(max_length=64)]


class MutationResult(_Base, frozen=True):
    """The server's verdict on one mutation; a duplicate repeats the original error.

    ``code`` (issue 12, protocol version 1, omitted when unset): the machine-readable
    reason — ``"gap"`` (``GAP``) for an id that skips ahead, the ``ErrorCode`` value
    (``"invalid"``, ``"not_found"``, ``"forbidden"``, …) for a fresh rejection; unset on
    ``applied`` and on a ``duplicate`` (which repeats the original ``error`` text only).
    Older clients ignore it; older servers never send it, so ``gap`` also reads the
    ``"conflict:"`` prefix of ``error``.
    """

    id: MutationId
    status: MutationStatus
    error: Text | None = None
    code: Code | msgspec.UnsetType = msgspec.UNSET

    @property
    def gap(self) -> bool:
        """Whether an earlier id is missing (so this one was not applied)."""
        if self.code is not msgspec.UNSET:
            return self.code == GAP
        return self.error is not None and self.error.startswith(CONFLICT_PREFIX)


class Event(_Base, frozen=True):
    """One entry of the server's log; ``seq`` is the global, gapless cursor."""

    seq: Seq
    workflow_id: Id
    type: Name
    data: JSONObject
    at: Timestamp


class StepSnapshot(_Base, frozen=True):
    """The state of one step as clients see it."""

    status: str
    attempts: int = 0
    progress: Finite = 0.0
    result: Any = None
    error: str | None = None


class WorkflowSnapshot(_Base, frozen=True):
    """The canonical state of one workflow; every event's ``data["workflow"]`` holds one.

    ``version`` is the ``wf_seq`` of the event that carried it, so a reader can keep the
    newest snapshot whatever order it learns them in.

    ``partial`` (events only, issue 11): results are carried only where the event
    changed them — the step the event names, the workflow's output on a
    ``workflow.status`` event. Every other ``result`` is None here and means "as
    before": a reader merges it over its previous snapshot, so an event never grows
    with the whole workflow. Snapshots read over HTTP are never partial.
    ``result_of`` (partial snapshots only): the workflow's output *is* that step's
    result, which the reader already holds — so a single-leaf workflow's output is not
    written to the log a second time.
    ``workflow_version`` is the version of the definition the workflow runs (issue 18:
    rolling deploys).
    """

    id: str
    name: str
    status: str
    steps: dict[str, StepSnapshot] = {}
    progress: Finite = 0.0
    result: Any = None
    error: str | None = None
    updated_at: Finite = 0.0
    version: int = 0
    partial: bool = False
    result_of: str = ""
    workflow_version: str = ""


# ---------------------------------------------------------- mutation args


class SubmitWorkflowArgs(_Base, frozen=True):
    """Args of ``submit_workflow``."""

    workflow_id: UUIDText
    name: Name
    input: JSONObject = {}
    deadline: Deadline | None = None


class CancelWorkflowArgs(_Base, frozen=True):
    """Args of ``cancel_workflow``."""

    workflow_id: UUIDText


class RetryWorkflowArgs(_Base, frozen=True):
    """Args of ``retry_workflow``."""

    workflow_id: UUIDText


class ReportStateArgs(_Base, frozen=True):
    """Args of ``report_state`` (and the body of ``POST /v1/reports``)."""

    workflow_id: UUIDText
    source: Source
    status: WorkflowStatus
    at: Timestamp
    detail: JSONObject = {}


# ------------------------------------------------------- client -> server


class Hello(Message, frozen=True):
    """First message of a session: who the client is and where it stands."""

    client_id: Id
    protocol_version: int
    cursor: Seq = 0
    last_mutation_id: Annotated[int, msgspec.Meta(ge=0)] = 0
    flags: bool = False
    """The client understands ``Flags`` messages (older clients never get one)."""


class Push(Message, frozen=True):
    """A batch of mutations, in id order."""

    mutations: Annotated[list[Mutation], msgspec.Meta(min_length=1)]


class Ack(Message, frozen=True):
    """The client durably applied every event up to ``cursor``."""

    cursor: Seq


ClientMessage = Hello | Push | Ack

# ------------------------------------------------------- server -> client


class Welcome(Message, frozen=True):
    """Answer to Hello: the server's identity and the client's standing."""

    server_id: str
    protocol_version: int
    last_mutation_id: int
    head: int
    horizon: int = 0
    """The tenant's retention horizon: the highest pruned ``seq`` of its events. A
    client whose cursor is below it resets from current snapshots (SPEC promise 8)."""
    max_frame_bytes: int = 0
    """Largest frame the server accepts (0: not declared, an older server); the SDK
    cuts its Push batches to fit it."""


class PushResult(Message, frozen=True):
    """Answer to Push, one result per mutation in the same order."""

    results: list[MutationResult]


class Events(Message, frozen=True):
    """A page of events after the client's cursor (or a live batch)."""

    events: list[Event]
    cursor: int
    has_more: bool = False


class Progress(Message, frozen=True):
    """Ephemeral live progress of a running step; the durable state comes as Events."""

    workflow_id: str
    step: str
    fraction: Finite
    message: Text | None = None
    at: Finite = 0.0


class Error(Message, frozen=True):
    """Something went wrong; ``retryable`` tells whether to try again later."""

    code: str
    message: str
    retryable: bool = False


class Flags(Message, frozen=True):
    """The tenant's whole flag set (its own flags over the global ones), sent right
    after Welcome and again after every change; ``revision`` rises with each change, so
    a client keeps the highest it has seen."""

    flags: list[FlagDef]
    revision: int = 0


ServerMessage = Welcome | PushResult | Events | Progress | Error | Flags
