"""The bench suite never rots: ``python -m bench --quick`` produces every figure.

It asserts that each BENCH.md figure has a row in the JSON report and that no figure
failed with an error; it never asserts a time (the machine is shared and small).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PG_DSN, need_pg

FIGURES = [
    "B1",
    "B1g",
    "B2",
    "B3",
    "B3x",
    "B4",
    "B5",
    "B5l",
    "B5q",
    "B6",
    "B7",
    "B8",
    "B9",
    "B10",
    "B11",
    "B12",
]
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.postgres
@pytest.mark.timeout(700)
def test_quick_run_produces_every_figure(tmp_path: Path) -> None:
    need_pg()
    report_path = tmp_path / "quick.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(report_path)],
        cwd=ROOT,
        env={**os.environ, "TETHER_PG_DSN": PG_DSN},
        capture_output=True,
        text=True,
        timeout=680,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    rows = report["rows"]
    produced = {row["figure"] for row in rows}
    assert produced >= set(FIGURES), f"missing figures: {set(FIGURES) - produced}"
    errors = [f"{row['figure']}: {row['status']}" for row in rows if row["status"] != "ok"]
    errors = [e for e in errors if "not available" not in e]
    assert not errors, "\n".join(errors)
    for row in rows:
        if row["status"] == "ok":
            assert row["tether"] is not None, row
    machine = report["machine"]
    for fact in ("cpu_count", "cpu_model", "python", "sqlite", "postgresql", "date"):
        assert machine.get(fact), f"machine fact {fact} missing"
    assert "| figure |" in result.stdout


def test_markdown_table_formats_rows() -> None:
    from bench.cli import markdown_table
    from bench.core import Row, Stat

    rows = [
        Row(
            "B2",
            "ingest",
            tether=Stat.of([10_500, 11_000, 9_800], "mut/s"),
            raw=Stat.of([40_000], "rows/s"),
            raw_label="sqlite3",
            ratio=0.26,
            target="≥ 0.25x raw",
            passed=True,
        ),
        Row.unavailable("B5", "no saga runner"),
    ]
    table = markdown_table(rows)
    assert "10,500 mut/s [9,800..11,000]" in table
    assert "0.26x" in table
    assert "not available: no saga runner" in table


def test_percentile() -> None:
    from bench.core import percentile

    assert percentile([1.0], 99) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)


async def test_missing_component_gives_a_not_available_row(monkeypatch, tmp_path: Path) -> None:
    import bench.client
    import bench.saga
    from bench.core import Context, run_figure

    monkeypatch.setattr(bench.client, "_sdk_missing", lambda: "client_sdk not there")
    monkeypatch.setattr(bench.saga, "_runner_missing", lambda: "no saga runner")
    ctx = Context(quick=True, repeats=1, pg_dsn=PG_DSN, workdir=tmp_path)
    for name, reason in (("B1", "client_sdk not there"), ("B5", "no saga runner")):
        rows, _ = await run_figure(ctx, name)
        assert [row.status for row in rows] == [f"not available: {reason}"]
    await ctx.aclose()
