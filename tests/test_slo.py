"""The SLO computation (pure, over hand-made rows) and its store-reading shell (both
backends): every value checked against a count made by hand."""

from __future__ import annotations

import math

import pytest

from sync_server.monitor import AlertMachine
from sync_server.slo import (
    ALL,
    OBJECTIVES,
    SloRow,
    SloValue,
    burning,
    compute_slos,
    format_window,
    parse_window,
    row_from_event,
)
from sync_server.slo_reader import read_window, window_start
from sync_server.store import Transaction, WorkflowRecord, open_store

pytestmark = pytest.mark.timeout(60)


def sub(wid, at, client, tenant="a", name="w"):
    return SloRow(tenant, wid, "workflow.submitted", at, name=name, client_id=client)


def step(wid, at, status, attempt, name="s1", tenant="a"):
    return SloRow(tenant, wid, "step.status", at, status=status, step=name, attempt=attempt)


def wf(wid, at, status, tenant="a"):
    return SloRow(tenant, wid, "workflow.status", at, status=status)


def scenario() -> list[SloRow]:
    rows = [
        sub("wf0", -100, "c0"),  # before the window: not in the population
        step("wf0", 5, "succeeded", 1),
        wf("wf0", 6, "failed"),
        # wf1: 4 s, 2 s of work
        sub("wf1", 0, "c1"),
        step("wf1", 1, "running", 1),
        step("wf1", 3, "succeeded", 1),
        wf("wf1", 4, "completed"),
        # wf2: one retry; 8 s, 3 s of work, recovered in 5 s
        sub("wf2", 10, "c2"),
        step("wf2", 11, "running", 1),
        step("wf2", 12, "retrying", 1),
        step("wf2", 14, "running", 2),
        step("wf2", 17, "succeeded", 2),
        wf("wf2", 18, "completed"),
        # wf3: five attempts, then compensated (client c2 saw a failure)
        sub("wf3", 20, "c2"),
    ]
    for attempt in range(1, 6):
        rows += [step("wf3", 20 + attempt, "running", attempt)]
        rows += [step("wf3", 20.5 + attempt, "retrying" if attempt < 5 else "failed", attempt)]
    rows += [
        wf("wf3", 40, "compensated"),
        # wf4: another tenant and workflow, cancelled (counts for nothing but its client)
        sub("wf4", 30, "c3", tenant="b", name="v"),
        wf("wf4", 31, "cancelled", tenant="b"),
        # wf5: parked (client c4 saw a failure; not decided before 24 h)
        sub("wf5", 40, "c4"),
        step("wf5", 41, "running", 1),
        step("wf5", 42, "failed", 1),
        wf("wf5", 43, "parked"),
    ]
    return rows


def values(result: list[SloValue], tenant=ALL, workflow=ALL) -> dict[str, SloValue]:
    return {v.name: v for v in result if v.tenant == tenant and v.workflow == workflow}


def test_every_objective_against_a_count_by_hand():
    result = compute_slos(scenario(), now=100.0, window=100.0)
    overall = values(result)
    assert list(overall) == list(OBJECTIVES)
    assert overall["completion_24h"].value == pytest.approx(2 / 3)  # wf1, wf2 of wf1-3
    assert overall["completion_24h"].samples == 3
    assert overall["mttr"].value == pytest.approx(5.0) and overall["mttr"].samples == 1
    assert overall["client_failure_share"].value == pytest.approx(2 / 4)  # c2, c4 of c1-4
    assert overall["p95_completion"].value == pytest.approx(8.0)
    assert overall["retry_efficiency"].value == pytest.approx(1 / 4)  # wf3's s1 of 4 steps
    assert overall["overhead"].value == pytest.approx((2 + 5) / (4 + 8))
    # Budgets: "at least" objectives spend (1 - v) / (1 - o), "at most" ones v / o.
    assert overall["completion_24h"].budget_left == pytest.approx(1 - (1 / 3) / 0.001)
    assert overall["mttr"].budget_left == pytest.approx(1 - 5 / 30)
    assert overall["overhead"].budget_left == pytest.approx(1 - (7 / 12) / 0.2)
    # Scopes: per tenant, per workflow name, per tenant and name.
    tenant_b = values(result, "b")
    assert tenant_b["client_failure_share"].value == 0.0
    assert tenant_b["completion_24h"].value is None  # only a cancel: nothing decided
    assert tenant_b["completion_24h"].budget_left == 1.0
    assert values(result, "a", "w")["client_failure_share"].value == pytest.approx(2 / 3)
    assert values(result, ALL, "v")["client_failure_share"].samples == 1
    assert values(result, "a", "w")["overhead"].window == 100.0


def test_unfinished_past_a_day_counts_as_a_miss_and_parallel_work_counts_once():
    day = 86_400.0
    rows = [
        sub("old", 0, "c1"),
        sub("par", 10, "c2"),
        step("par", 11, "running", 1, name="x"),
        step("par", 11, "running", 1, name="y"),
        step("par", 15, "succeeded", 1, name="x"),
        step("par", 16, "succeeded", 1, name="y"),
        wf("par", 20, "completed"),
    ]
    result = values(compute_slos(rows, now=day + 5, window=day + 5))
    assert result["completion_24h"].value == pytest.approx(1 / 2)  # "old" is overdue
    assert result["overhead"].value == pytest.approx((10 - 5) / 10)  # union 11..16
    assert result["retry_efficiency"].value == 0.0 and result["retry_efficiency"].samples == 2


def test_empty_window_reports_untouched_budgets():
    result = compute_slos([], now=10.0, window=5.0)
    assert len(result) == len(OBJECTIVES)
    assert all(v.value is None and v.budget_left == 1.0 and v.samples == 0 for v in result)
    assert result[0].as_json() == {
        "name": "completion_24h",
        "objective": 0.999,
        "value": None,
        "budget_left": 1.0,
        "window": "5s",
        "tenant": "*",
        "workflow": "*",
        "samples": 0,
    }


def test_burning_needs_an_overspent_budget_on_enough_samples():
    fast = SloValue("mttr", 30.0, 45.0, -0.5, 3600.0, samples=12)
    assert burning(fast)
    assert not burning(SloValue("mttr", 30.0, 45.0, -0.5, 3600.0, samples=3))
    assert not burning(SloValue("mttr", 30.0, 20.0, 0.33, 3600.0, samples=50))
    assert not burning(SloValue("mttr", 30.0, None, 1.0, 3600.0))


def test_slo_burn_alert_fires_once_and_rearms():
    machine = AlertMachine()
    fast = SloValue("mttr", 30.0, 45.0, -0.5, 3600.0, tenant="a", samples=12)
    calm = SloValue("mttr", 30.0, 10.0, 0.66, 3600.0, tenant="a", samples=12)
    machine.receive_slos([fast], 1.0)
    machine.receive_slos([fast], 2.0)
    [alert] = machine.alerts_to_send()
    assert alert.kind == "slo_burn" and alert.details["name"] == "mttr"
    assert alert.details["tenant"] == "a" and alert.details["burn_rate"] == 1.5
    assert "tenant a" in alert.message and "1h" in alert.message
    machine.receive_slos([calm], 3.0)
    machine.receive_slos([fast], 4.0)
    assert [a.kind for a in machine.alerts_to_send()] == ["slo_burn"]
    # A scope gone from the window (no samples) re-arms too, and is forgotten.
    machine.receive_slos([], 5.0)
    assert not machine._burning
    machine.receive_slos([fast], 6.0)
    assert [a.kind for a in machine.alerts_to_send()] == ["slo_burn"]


def test_windows_parse_and_format():
    assert parse_window("24h") == 86_400.0 and parse_window("15m") == 900.0
    assert parse_window("90s") == 90.0 and parse_window("7d") == 7 * 86_400.0
    assert parse_window("3600") == 3600.0
    for bad in ("", "0s", "-1h", "abc", "1w", "100d", "nan", "inf"):
        with pytest.raises(ValueError):
            parse_window(bad)
    assert format_window(86_400.0) == "24h" and format_window(3600.0) == "1h"
    assert format_window(7 * 86_400.0) == "7d" and format_window(36 * 3600.0) == "36h"
    assert format_window(900.0) == "15m" and format_window(90.0) == "90s"
    assert format_window(1.5) == "1.5s"


def test_row_from_event_reads_only_what_it_needs():
    row = row_from_event(
        "a",
        "w1",
        "step.status",
        {"workflow": {"name": "gen"}, "status": "retrying", "step": "r", "attempt": 2},
        5.0,
    )
    assert row == SloRow("a", "w1", "step.status", 5.0, "gen", "retrying", "r", 2, "")
    odd = row_from_event("a", "w1", "x", ["not", "a", "dict"], 1.0)
    assert odd.name == "" and odd.attempt == 0


# ------------------------------------------------------------- the store shell


async def _append(store, record: WorkflowRecord, events: list[tuple[str, dict, float]]):
    async def unit(tx: Transaction) -> None:
        if record.version == 0:
            await tx.insert_workflows([record])
        for type_, data, at in events:
            tx.append(record, type_, dict(data), at)
        await tx.update_workflows([record])

    await store.run(unit)


async def test_reader_finds_the_window_by_position_and_reads_only_it(database_url):
    store = open_store(database_url)
    await store.open()
    try:
        # 60 workflows, one a minute; events time-ordered like a real log.
        for i in range(60):
            record = WorkflowRecord(
                id=f"wf-{i}",
                tenant="a" if i % 2 else "b",
                name="w",
                status="running",
                input={},
                created_at=i * 60.0,
                updated_at=i * 60.0,
            )
            at = i * 60.0
            await _append(
                store,
                record,
                [
                    ("workflow.submitted", {"client_id": f"c{i}"}, at),
                    ("workflow.status", {"status": "completed"}, at + 30),
                ],
            )
        head = await store.head()
        assert head == 120
        since = 40 * 60.0
        start = await window_start(store, since)
        first_after = (await store.read_events(start, 1))[0]
        assert first_after.at >= since
        if start:
            at_start = await store.read_events(start - 1, 1)
            assert at_start[0].at < since
        assert start == 80  # 40 workflows of 2 events lie before the window
        rows = await read_window(store, since)  # starts SKEW (300 s) early
        assert min(r.at for r in rows) >= since - 300
        assert len(rows) == 40 + 10  # 20 workflows in the window, 5 before in the skew
        tenant_rows = await read_window(store, since, tenant="a")
        assert {r.tenant for r in tenant_rows} == {"a"}
        now = 60 * 60.0
        overall = values(compute_slos(rows, now, now - since))
        assert overall["completion_24h"].samples == 20
        assert overall["completion_24h"].value == 1.0
        assert math.isclose(overall["p95_completion"].value, 30.0)
        bounded = await read_window(store, 0.0, max_rows=7)
        assert len(bounded) == 7
    finally:
        await store.close()
