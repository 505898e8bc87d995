"""The operator dashboard: ``GET /dashboard`` and the JSON it polls.

``/dashboard`` is a small server-rendered page (``static/dashboard.css`` and
``static/dashboard.js``, no framework, no CDN). A browser cannot set an
``Authorization`` header on a page load, so the admin token arrives once — typed into
the page's form, or as ``/dashboard?token=…`` (checked by the server; the script then
strips it from the address bar) — and lives in the tab's ``sessionStorage``. Every data
call sends it as a bearer token, so there is no cookie and hence no cross-site request
forgery: the requeue button is ``POST /v1/dlq/{id}/requeue`` with that header.

``GET /v1/admin/overview`` (admin token; a tenant admin sees its tenant, a global admin
``*`` every tenant) answers the page's poll: workflow counts by status, the live and
recent workflows with their steps, open dead letters, breakers, the workflows each
definition version still has in flight (rolling deploys), this instance's key
metrics and latest alerts.

Tenant admins see only their tenant (SPEC promise 6, issue 11): the log head is their
tenant's, alerts are those whose ``details["tenant"]`` is theirs (instance-wide alerts —
DLQ growth, delays, breakers, the outbox — carry no tenant and go to the global admin
only), breakers show their state without failure counts, and the instance-wide metrics
(clients, attempts, lags, alert totals) are left out.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from protocol import BadMessage, Role, TetherError, encode_json
from protocol.http import (
    AlertItem,
    BreakerItem,
    DeadLetter,
    Overview,
    SloItem,
    VersionCount,
)
from sync_server.auth import bearer_token, verify_token
from sync_server.monitor import SLO_WINDOW
from sync_server.slo import ALL, scope_values
from sync_server.snapshots import snapshot

if TYPE_CHECKING:
    from sync_server.metrics import Metrics
    from sync_server.services import Services

__all__ = ["overview", "routes"]

STATIC = Path(__file__).with_name("static")
ACTIVE_STATUSES = ["running", "compensating", "parked"]
COUNT_LIMIT = 10_000
"""Counts by status cover at most this many of the newest workflows (bounded work)."""

_HEADERS = {
    # The token may be in the URL once: never send it on as a Referer, never cache it.
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
}


def _tether(request: Request) -> Services:
    tether: Services = request.app.state.tether
    return tether


async def overview(request: Request) -> Response:
    """``GET /v1/admin/overview?limit=50`` (admin): everything the dashboard shows."""
    tether = _tether(request)
    principal = verify_token(
        tether.config.auth_secret, bearer_token(request.headers.get("authorization"))
    )
    principal.require(Role.ADMIN)
    scope = principal.scope
    raw = request.query_params.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= 500:
        raise BadMessage("query parameter limit must be an integer within 1..500")
    limit = int(raw)
    store = tether.store
    # Counts read one column of the newest rows; only ``limit`` rows are read whole.
    counts = await store.status_counts(tenant=scope, limit=COUNT_LIMIT)
    active = await store.list_workflows(tenant=scope, statuses=ACTIVE_STATUSES, limit=limit)
    shown = {record.id: record for record in active}
    for record in await store.list_workflows(tenant=scope, limit=limit):
        if len(shown) >= limit:
            break
        shown.setdefault(record.id, record)
    in_flight = await store.version_counts(tenant=scope)
    dlq = await store.list_dlq(tenant=scope, status="open", limit=200)
    breakers = await store.list_breakers()
    monitor = tether.monitor
    alerts = [
        AlertItem(kind=a.kind, message=a.message, at=a.at)
        for a in reversed(getattr(tether.alerts, "recent", ()))
        if scope is None or a.details.get("tenant") == scope
    ][:20]
    slos = scope_values(
        monitor.slos if monitor is not None else [],
        monitor.slo_window if monitor is not None else SLO_WINDOW,
        scope or ALL,
    )
    metrics: dict[str, float] = {"dlq_depth": len(dlq), "alerts": len(alerts)}
    if scope is None:  # a global admin also sees the instance's counters and breakers'
        metrics = _instance_metrics(tether.metrics, len(dlq))
    body = Overview(
        server_id=tether.config.server_id,
        head=await store.head(tenant=scope),
        counts=counts,
        total=sum(counts.values()),
        workflows=[snapshot(record) for record in shown.values()],
        dlq=msgspec.convert(dlq, list[DeadLetter], from_attributes=True),
        slos=[msgspec.convert(v.as_json(), SloItem) for v in slos],
        alerts=alerts,
        versions=[
            VersionCount(workflow=name, version=version, status=status, count=count)
            for name, version, status, count in in_flight
        ],
        breakers=[
            BreakerItem(name=b.name, state=b.state)
            if scope is not None
            else BreakerItem(name=b.name, state=b.state, failures=b.failures, opened_at=b.opened_at)
            for b in breakers
        ],
        metrics=metrics,
    )
    return Response(encode_json(body), media_type="application/json")


def _instance_metrics(metrics: Metrics, dlq_depth: int) -> dict[str, float]:
    """The instance's counters in a global admin's overview."""
    return {
        "connected_clients": metrics.value("tether_connected_clients"),
        "workflows_started": metrics.total("tether_workflows_started_total"),
        "workflows_finished": metrics.total("tether_workflows_finished_total"),
        "step_attempts": metrics.total("tether_step_attempts_total"),
        "step_retries": metrics.total("tether_step_retries_total"),
        "events_delivered": metrics.value("tether_events_delivered_total"),
        "dlq_depth": dlq_depth,
        "outbox_pending": metrics.value("tether_outbox_pending"),
        "outbox_lag_seconds": metrics.value("tether_outbox_lag_seconds"),
        "saga_lag_seconds": metrics.value("tether_saga_lag_seconds"),
        "alerts": metrics.total("tether_alerts_total"),
    }


def _page(error: str | None = None) -> str:
    notice = f'<p class="error" id="login-error">{html.escape(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Tether dashboard</title>
<link rel="stylesheet" href="/dashboard/static/dashboard.css">
</head>
<body>
<header>
  <h1>Tether</h1>
  <span id="server" class="muted"></span>
  <span id="live" class="pill">offline</span>
  <button id="logout" hidden>Sign out</button>
</header>
<main>
<section id="login" class="card">
  <h2>Sign in</h2>
  <p>Paste an admin token
     (<code>sync-server token --tenant '*' --subject you --role admin</code>).</p>
  {notice}
  <form id="login-form">
    <input id="token" name="token" type="password" autocomplete="off"
           placeholder="admin token" required>
    <button type="submit">Open dashboard</button>
  </form>
</section>
<div id="app" hidden>
  <section id="metrics" class="cards"></section>
  <section class="card">
    <h2>Workflows</h2>
    <table id="workflows"><thead><tr>
      <th>workflow</th><th>status</th><th>progress</th><th>steps</th>
    </tr></thead><tbody></tbody></table>
  </section>
  <div class="row">
    <section class="card grow">
      <h2>Dead-letter queue</h2>
      <p id="dlq-message" class="muted"></p>
      <table id="dlq"><thead><tr>
        <th>#</th><th>workflow</th><th>step</th><th>reason</th><th>attempts</th>
        <th>last error</th><th></th>
      </tr></thead><tbody></tbody></table>
    </section>
    <section class="card">
      <h2>Breakers</h2>
      <table id="breakers"><thead><tr>
        <th>breaker</th><th>state</th><th>failures</th>
      </tr></thead><tbody></tbody></table>
      <h2>SLOs</h2>
      <table id="slos"><thead><tr>
        <th>objective</th><th>target</th><th>now</th><th>budget left</th>
      </tr></thead><tbody></tbody></table>
      <h2>Versions in flight</h2>
      <table id="versions"><thead><tr>
        <th>workflow</th><th>version</th><th>status</th><th>count</th>
      </tr></thead><tbody></tbody></table>
      <h2>Alerts</h2>
      <ul id="alerts"></ul>
    </section>
  </div>
  <section class="card">
    <h2>Flags</h2>
    <p id="flags-message" class="muted"></p>
    <table id="flags"><thead><tr>
      <th>flag</th><th>scope</th><th>value</th><th>rules</th><th>version</th><th>changed by</th>
    </tr></thead><tbody></tbody></table>
  </section>
</div>
</main>
<script src="/dashboard/static/dashboard.js"></script>
<script src="/dashboard/static/flags.js"></script>
</body>
</html>
"""


async def dashboard(request: Request) -> Response:
    """``GET /dashboard[?token=…]``: the page; a bad ``token`` answers 401 with the form."""
    token = request.query_params.get("token")
    if token is not None:
        try:
            principal = verify_token(_tether(request).config.auth_secret, token)
            principal.require(Role.ADMIN)
        except TetherError as exc:
            return Response(
                _page(f"That token was refused: {exc.message}"),
                status_code=401,
                media_type="text/html",
                headers=_HEADERS,
            )
    return Response(_page(), media_type="text/html", headers=_HEADERS)


_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css"}


async def static(request: Request) -> Response:
    """``GET /dashboard/static/{name}``: the page's script and stylesheet."""
    name = request.path_params["name"]
    path = STATIC / name
    if name not in {"dashboard.js", "dashboard.css", "flags.js"} or not path.is_file():
        return Response("not found", status_code=404, media_type="text/plain")
    return Response(
        path.read_bytes(),
        media_type=_STATIC_TYPES[path.suffix],
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


routes: list[Any] = [
    Route("/dashboard", dashboard, methods=["GET"]),
    Route("/dashboard/static/{name}", static, methods=["GET"]),
    Route("/v1/admin/overview", overview, methods=["GET"]),
]
