"""B12 — the cost of tracing: B6's workflow with OpenTelemetry on vs off, same run.

Children: the job service, and two Tether instances (SQLite, sagas on) — one plain, one
configured by ``OTEL_EXPORTER_OTLP_ENDPOINT`` to export to a loopback OTLP/HTTP receiver
(``bench.otlp``) in this process, which decodes every span it gets. Each repeat runs
B6's SDK worker against both, alternately (off, then on; the SDK worker of the traced
run has the same ``OTEL_*`` environment, so its submit spans are exported too). The
figure: extra time of the traced run over the untraced one, p50, for a 1 s job (and,
as information, extra milliseconds for a 50 ms job). A run whose receiver decoded no
``tether.step`` span is an error, not a figure.
"""

from __future__ import annotations

from typing import Any

from bench.core import Context, Row, Stat, figure, percentile, ratio, verdict
from bench.otlp import OtlpReceiver
from bench.procs import child, run_worker

__all__: list[str] = []


@figure("B12")
async def b12(ctx: Context) -> list[Row]:
    """B6 with tracing on (exporting to a loopback receiver) vs off."""
    plans = [(1.0, ctx.size(3, 1)), (0.05, ctx.size(20, 5))]
    runs: dict[float, dict[str, list[list[float]]]] = {d: {"on": [], "off": []} for d, _ in plans}
    with OtlpReceiver() as receiver:
        otel = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_SERVICE_NAME": "bench-b12",
        }
        plain_db = f"sqlite:///{ctx.path('b12-off.db')}"
        traced_db = f"sqlite:///{ctx.path('b12-on.db')}"
        async with (
            child("jobs", [], logdir=ctx.workdir) as jobs,
            child("tether", ["--database", plain_db, "--run-sagas"], logdir=ctx.workdir) as off,
            child(
                "tether", ["--database", traced_db, "--run-sagas"], logdir=ctx.workdir, env=otel
            ) as on,
        ):
            job_url = f"{jobs.http_url}/work"
            for i in range(ctx.repeats):
                for duration, count in plans:
                    for mode, server, env in (("off", off, None), ("on", on, otel)):
                        ctx.say(f"B12 tracing {mode}: {duration:g} s job x {count}, {i + 1}")
                        params: dict[str, Any] = {
                            "job_url": job_url,
                            "duration": duration,
                            "count": count,
                            "url": server.ws_url,
                            "path": str(ctx.path(f"b12-{mode}-client.db")),
                        }
                        runs[duration][mode].append(
                            await run_worker(
                                "bench.resilience:sdk_calls", params, logdir=ctx.workdir, env=env
                            )
                        )
        spans = len(receiver.named("tether.step"))
        if not spans:
            raise RuntimeError("tracing was on but the receiver decoded no tether.step span")
    on_1s = Stat.of([percentile(r, 50) for r in runs[1.0]["on"]], "s")
    off_1s = Stat.of([percentile(r, 50) for r in runs[1.0]["off"]], "s")
    extra = Stat.of(
        [
            (percentile(a, 50) / percentile(b, 50) - 1) * 100
            for a, b in zip(runs[1.0]["on"], runs[1.0]["off"], strict=True)
        ],
        "%",
    )
    extra_ms = Stat.of(
        [
            (percentile(a, 50) - percentile(b, 50)) * 1000
            for a, b in zip(runs[0.05]["on"], runs[0.05]["off"], strict=True)
        ],
        "ms",
    )
    off_short = Stat.of([percentile(r, 50) * 1000 for r in runs[0.05]["off"]], "ms")
    on_short = Stat.of([percentile(r, 50) * 1000 for r in runs[0.05]["on"]], "ms")
    return [
        Row(
            "B12",
            "1 s job via SDK + server, tracing on: extra over tracing off",
            tether=extra,
            raw=off_1s,
            raw_label="the same workflow, tracing off (p50)",
            ratio=ratio(on_1s, off_1s),
            target="≤ 3 %",
            passed=verdict(ctx, extra.median <= 3),
            details={"on_p50_s": on_1s.to_json(), "spans_received": spans},
        ),
        Row(
            "B12",
            "50 ms job, tracing on: extra p50 over tracing off",
            tether=extra_ms,
            raw=off_short,
            raw_label="the same workflow, tracing off (p50)",
            ratio=ratio(on_short, off_short),
            target="",
            passed=None,
            details={"on_p50_ms": on_short.to_json()},
        ),
    ]
