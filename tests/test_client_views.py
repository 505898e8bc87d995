"""Views: the confirmed snapshot with pending mutations and live progress laid over it."""

from __future__ import annotations

import pytest

from client_sdk.views import Overlay, WorkflowRow, build_view
from protocol import Mutation, Progress, StepSnapshot, WorkflowSnapshot

pytestmark = pytest.mark.timeout(30)


def row(status: str = "running", **kw) -> WorkflowRow:
    snapshot = WorkflowSnapshot(
        id="w",
        name="gen",
        status=status,
        version=3,
        progress=0.0,
        steps={"a": StepSnapshot(status="running", attempts=1), "b": StepSnapshot("waiting")},
    )
    return WorkflowRow(id="w", name="gen", snapshot=snapshot, **kw)


def m(mid: int, name: str) -> Mutation:
    return Mutation(id=mid, name=name, args={"workflow_id": "w", "name": "gen"}, created_at=2.0)


def test_unconfirmed_submit_is_pending() -> None:
    v = build_view(None, [m(1, "submit_workflow")])
    assert (v.id, v.name, v.status, v.pending, v.terminal) == ("w", "gen", "pending", True, False)
    v = build_view(WorkflowRow(id="w", name="gen", snapshot=None))  # applied, no snapshot yet
    assert (v.status, v.pending) == ("pending", True)
    assert build_view(None, [m(1, "cancel_workflow")]) is None
    assert build_view(None) is None


def test_overlay_tracks_pending_per_workflow() -> None:
    o = Overlay([m(1, "submit_workflow"), m(2, "cancel_workflow")])
    assert len(o) == 2 and [x.id for x in o.pending_for("w")] == [1, 2]
    assert o.remove([1, 99]) == {"w"}
    assert [x.id for x in o.pending_for("w")] == [2] and o.workflow_ids() == ["w"]
    o.remove([2])
    assert o.pending_for("w") == [] and o.workflow_ids() == []


def test_rejected_submit_is_rolled_back_to_failed_with_reason() -> None:
    r = WorkflowRow(
        id="w", name="gen", snapshot=None, rejected="submit_workflow", rejection="unknown workflow"
    )
    v = build_view(r)
    assert (v.status, v.error, v.pending, v.terminal) == ("failed", "unknown workflow", False, True)


def test_pending_retry_shows_running_and_cancel_keeps_status() -> None:
    assert build_view(row("parked"), [m(1, "retry_workflow")]).status == "running"
    v = build_view(row("running"), [m(1, "cancel_workflow")])
    assert v.status == "running" and v.pending


def test_rejection_reason_shows_unless_the_snapshot_has_an_error() -> None:
    assert build_view(row(rejection="already ended")).error == "already ended"


def test_live_progress_is_laid_over_running_steps_only() -> None:
    live = {
        "a": Progress(workflow_id="w", step="a", fraction=0.5),
        "zz": Progress(workflow_id="w", step="zz", fraction=0.9),
    }
    v = build_view(row(), live=live)
    assert v.steps["a"].progress == 0.5 and v.progress == 0.25
    assert build_view(row("completed"), live=live).progress == 0.0
