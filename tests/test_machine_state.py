"""The typed saga state and its JSON codec: the ``workflows.state`` column stays readable
by the previous (dict-based) version and vice versa (rolling upgrade over one database)."""

from __future__ import annotations

import copy

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import StepStatus, WorkflowStatus
from sync_server.saga import RetryPolicy, Step, Workflow
from sync_server.saga.machine import SagaMachine
from sync_server.saga.sagastate import (
    Compensation,
    CompPhase,
    FailRepair,
    Job,
    ReconcileRepair,
    Requests,
    StepState,
    WorkflowState,
    decode_state,
    encode_state,
    pending_repairs,
)

pytestmark = pytest.mark.timeout(120)

# A state exactly as the dict-based engine wrote it (every key it knows, in its shapes).
OLD_FORMAT = {
    "steps": {
        "reserve": {
            "status": "compensated",
            "attempts": 1,
            "progress": 1.0,
            "result": {"id": 7},
            "error": None,
            "job": {"source": "job-queue", "adapter": "emp-job-queue"},
            "comp_attempts": 2,
            "comp_running": False,
        },
        "charge": {
            "status": "failed",
            "attempts": 1,
            "progress": 1.0,
            "result": "ok",
            "error": "refund failed",
            "comp_attempts": 3,
            "comp_running": False,
            "comp_due_at": 12.5,
            "comp_failed": True,
        },
        "undo": {
            "status": "compensating",
            "attempts": 2,
            "progress": 1.0,
            "result": None,
            "error": "interrupted",
            "comp_attempts": 1,
            "comp_running": False,
            "comp_resume": True,
        },
        "ship": {
            "status": "retrying",
            "attempts": 2,
            "progress": 0.25,
            "result": None,
            "error": "flaky",
            "due_at": 40.0,
            "retry_delay": 2.5,
            "resume": True,
            "interrupts": 2,
            "deferred": "limit:gpu",
            "slot": "gpu",
        },
        "notify": {
            "status": "waiting",
            "attempts": 0,
            "progress": 0.0,
            "result": None,
            "error": None,
            "deferred": "mail-breaker",
            "due_at": 30.0,
        },
    },
    "halt": "compensate",
    "deadline_at": 1234.5,
    "cancel": True,
    "requests": {
        "cancel": True,
        "retry": True,
        "reconcile": [{"step": "ship", "result": None}, {"step": "ship", "result": [1]}],
        "resubmit": ["ship"],
        "fail": [{"step": "ship", "error": "SIGTERM"}],
    },
    "dlq": [3, 9],
    "trace": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "reports": {"job-queue": {"status": "failed", "at": 5.0, "detail": {"step": "ship"}}},
}


def sorted_json(value: object) -> bytes:
    return msgspec.json.encode(value, order="sorted")


def test_old_format_decodes_to_typed_state_and_reencodes_to_equal_json():
    original = copy.deepcopy(OLD_FORMAT)
    state = decode_state(original)
    assert original == OLD_FORMAT  # decoding never changes its input
    steps = state.steps
    assert list(steps) == ["reserve", "charge", "undo", "ship", "notify"]
    assert steps["charge"].status is StepStatus.FAILED
    assert steps["charge"].comp == Compensation(3, CompPhase.EXHAUSTED, 12.5)
    assert steps["undo"].comp == Compensation(1, CompPhase.IDLE, None, resume=True)
    assert steps["reserve"].comp == Compensation(2, CompPhase.IDLE)
    assert steps["reserve"].job == Job("job-queue", "emp-job-queue")
    assert steps["ship"] == StepState(
        StepStatus.RETRYING,
        2,
        0.25,
        None,
        "flaky",
        due_at=40.0,
        retry_delay=2.5,
        resume=True,
        interrupts=2,
        deferred="limit:gpu",
        slot="gpu",
    )
    assert state.requests == Requests(
        cancel=True,
        retry=True,
        reconcile=(ReconcileRepair("ship", None), ReconcileRepair("ship", [1])),
        resubmit=("ship",),
        fail=(FailRepair("ship", "SIGTERM"),),
    )
    assert (state.halt, state.deadline_at, state.cancel, state.dlq) == (
        "compensate",
        1234.5,
        True,
        (3, 9),
    )
    assert state.trace.startswith("00-0af7")
    encoded = encode_state(state)
    assert encoded == OLD_FORMAT
    assert sorted_json(encoded) == sorted_json(OLD_FORMAT)
    assert pending_repairs(encoded) == ["ship"] * 4


def test_keys_of_a_newer_version_survive_a_checkpoint_by_this_one():
    newer = copy.deepcopy(OLD_FORMAT)
    newer["future"] = {"x": 1}
    newer["steps"]["ship"]["future_step_key"] = [1, 2]
    assert encode_state(decode_state(newer)) == newer


def test_a_client_visible_step_is_written_with_all_five_keys():
    state = WorkflowState({"a": StepState(StepStatus.WAITING)})
    assert encode_state(state) == {
        "steps": {
            "a": {
                "status": "waiting",
                "attempts": 0,
                "progress": 0.0,
                "result": None,
                "error": None,
            }
        }
    }
    assert decode_state(None) == WorkflowState({}) == decode_state({})
    assert decode_state({"trace": "t"}) == WorkflowState({}, trace="t")  # no steps yet


# ------------------------------------------------------------------ round trips

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
_times = st.floats(0, 1e9, allow_nan=False)
_names = st.text("abcdef", min_size=1, max_size=4)


@st.composite
def old_steps(draw: st.DrawFn) -> dict[str, object]:
    """A step as the dict-based engine wrote it: the five client keys, the bookkeeping
    keys only when set, the ``comp_*`` keys once its compensation started."""
    step: dict[str, object] = {
        "status": draw(st.sampled_from([s.value for s in StepStatus])),
        "attempts": draw(st.integers(0, 9)),
        "progress": draw(st.floats(0, 1)),
        "result": draw(_json),
        "error": draw(st.none() | st.text(max_size=8)),
    }
    optional = {
        "due_at": _times,
        "retry_delay": st.floats(0, 100),
        "resume": st.just(True),
        "interrupts": st.integers(1, 4),
        "deferred": st.sampled_from(["svc", "limit:gpu"]),
        "job": st.builds(
            lambda s, a: {"source": s, "adapter": a}, st.text(max_size=3), st.text(max_size=3)
        ),
        "slot": st.just("gpu"),
    }
    for key, values in optional.items():
        if draw(st.booleans()):
            step[key] = draw(values)
    if draw(st.booleans()):
        running = draw(st.booleans())
        step["comp_attempts"] = draw(st.integers(0, 5))
        step["comp_running"] = running
        if draw(st.booleans()):
            step["comp_due_at"] = draw(_times)
        if not running and draw(st.booleans()):
            step["comp_resume"] = True
        if not running and draw(st.booleans()):
            step["comp_failed"] = True
    return step


@st.composite
def old_states(draw: st.DrawFn) -> dict[str, object]:
    state: dict[str, object] = {
        "steps": draw(st.dictionaries(_names, old_steps(), max_size=4)),
    }
    if draw(st.booleans()):
        state["halt"] = draw(st.sampled_from(["compensate", "park"]))
    if draw(st.booleans()):
        state["deadline_at"] = draw(_times)
    if draw(st.booleans()):
        state["cancel"] = True
    if draw(st.booleans()):
        requests: dict[str, object] = {}
        if draw(st.booleans()):
            requests["cancel"] = True
        if draw(st.booleans()):
            requests["retry"] = True
        if draw(st.booleans()):
            requests["reconcile"] = draw(
                st.lists(
                    st.builds(lambda s, r: {"step": s, "result": r}, _names, _json),
                    min_size=1,
                    max_size=2,
                )
            )
        if draw(st.booleans()):
            requests["resubmit"] = draw(st.lists(_names, min_size=1, max_size=2))
        if draw(st.booleans()):
            requests["fail"] = draw(
                st.lists(
                    st.builds(lambda s, e: {"step": s, "error": e}, _names, st.text()),
                    min_size=1,
                    max_size=2,
                )
            )
        state["requests"] = requests
    if draw(st.booleans()):
        state["dlq"] = draw(st.lists(st.integers(1, 10**6), min_size=1, max_size=3))
    if draw(st.booleans()):
        state["trace"] = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    if draw(st.booleans()):
        state["reports"] = draw(st.dictionaries(st.sampled_from(["job-queue", "ui"]), _json))
    return state


@settings(max_examples=300, deadline=None)
@given(old_states())
def test_any_old_format_state_round_trips_to_equal_json(state):
    original = copy.deepcopy(state)
    typed = decode_state(state)
    assert sorted_json(encode_state(typed)) == sorted_json(original)
    # and the typed state survives its own JSON (the JSON column) unchanged
    assert decode_state(msgspec.json.decode(msgspec.json.encode(encode_state(typed)))) == typed


# ------------------------------------------------------------------ the machine's JSON


async def act(ctx):
    return None


def test_a_failed_compensation_is_explicit_and_its_wire_status_unchanged():
    wf = Workflow(
        "w",
        [
            Step("a", act, compensate=act, compensate_retry=RetryPolicy(max_attempts=1)),
            Step("b", act, depends_on=["a"], retry=RetryPolicy(max_attempts=1)),
        ],
    )
    m = SagaMachine(wf, "w1", WorkflowStatus.PENDING, {})
    m.receive_submit(0)
    m.advance(0)
    m.receive_step_succeeded("a", 1, None, 1)
    m.advance(1)
    m.receive_step_failed("b", 1, "x", 2)
    m.advance(2)
    m.receive_compensation_failed("a", 1, "refund failed", 3)
    m.advance(3)
    assert m.status == WorkflowStatus.FAILED
    assert m.steps["a"].status is StepStatus.FAILED and m.steps["a"].comp.exhausted
    wire = m.encoded_state()
    assert wire["steps"]["a"] == {
        "status": "failed",
        "attempts": 1,
        "progress": 1.0,
        "result": None,
        "error": "refund failed",
        "comp_attempts": 1,
        "comp_running": False,
        "comp_failed": True,
    }
    # A machine of either version built from that JSON retries exactly that compensation.
    again = SagaMachine(wf, "w1", m.status.value, msgspec.json.decode(msgspec.json.encode(wire)))
    assert again.receive_retry(4) == ["a"]
    assert again.steps["a"].comp == Compensation()


def test_a_checkpoint_reencodes_only_the_steps_it_changed():
    wf = Workflow("w", [Step("a", act), Step("b", act, depends_on=["a"])])
    m = SagaMachine(wf, "w1", WorkflowStatus.PENDING, {})
    m.receive_submit(0)
    m.advance(0)
    wire = encode_state(m.state)
    m2 = SagaMachine(wf, "w1", m.status.value, wire)
    m2.receive_step_succeeded("a", 1, "A", 1)
    out = m2.encoded_state()
    assert out == encode_state(m2.state)
    assert out["steps"]["b"] is wire["steps"]["b"]  # unchanged: its JSON reused
    assert out["steps"]["a"] is not wire["steps"]["a"]
    assert wire["steps"]["a"]["status"] == "running"  # the source JSON is never changed


def test_intake_keeps_request_keys_it_does_not_know() -> None:
    """A newer version's recorded request (rolling upgrade) survives this version's
    intake recording a cancel or a repair next to it (the dict engine kept it too)."""
    from types import SimpleNamespace

    from sync_server.saga import intake

    record = SimpleNamespace(
        state={"steps": {}, "requests": {"pause": {"until": 5}, "retry": True}, "x": 1}
    )
    intake._record_request(record, cancel=True)  # type: ignore[arg-type]
    assert record.state["requests"] == {"pause": {"until": 5}, "retry": True, "cancel": True}
    assert record.state["x"] == 1
    assert decode_state(record.state).requests == Requests(cancel=True, retry=True)
