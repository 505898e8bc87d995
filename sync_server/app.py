"""``create_app``: the Starlette application of one Tether instance.

The ``Tether`` object holds what one instance owns — config, store, hub, mutation
applier, saga runner, connections, metrics — and lives on ``app.state.tether``. Its
lifespan opens the store (migrating it), starts the hub and the saga runner, and on
shutdown drains: it stops accepting connections, tells connected clients to reconnect
elsewhere (close 1012), stops the runner (releasing its leases) and closes the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from prometheus_client import Counter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from protocol import Flags, RateLimited, ReportStateArgs, TetherError, UsageError
from sync_server import tracing
from sync_server.commands import WorkflowCommands
from sync_server.config import ServerConfig
from sync_server.dashboard import routes as dashboard_routes
from sync_server.domain import MutationApplier
from sync_server.flags.http import routes as flag_routes
from sync_server.flags.service import FlagService
from sync_server.http_api import error_response, routes
from sync_server.hub import Hub
from sync_server.metrics import MeteredApplier, MeteredHub, Metrics
from sync_server.monitor import DELAY_THRESHOLD, AlertLog, MonitorRunner
from sync_server.ratelimit import TokenBuckets
from sync_server.reconcile import (
    DEFAULT_PRIORITY,
    Reconciler,
    ReconcileRules,
    Repair,
    SourceAdapter,
    apply_report,
)
from sync_server.retention import Pruner, policy_from_config
from sync_server.saga.alerts import AlertSink
from sync_server.saga.definitions import Limit
from sync_server.saga.outbox import OutboxRelay
from sync_server.saga.runner import SagaRunner, check_limits
from sync_server.services import Connection, Services
from sync_server.slo_reader import routes as slo_routes
from sync_server.store import Transaction, WorkflowRecord, open_store
from sync_server.ws import sync_endpoint

__all__ = ["Tether", "create_app"]

log = logging.getLogger("tether.app")


class Tether:
    """The parts of one running instance."""

    def __init__(
        self,
        config: ServerConfig,
        workflows: Iterable[Any],
        *,
        sources: Iterable[SourceAdapter] = (),
        job_steps: Mapping[str, str] | None = None,
        limits: Mapping[str, Limit] | None = None,
    ) -> None:
        self.config = config
        self.definitions = list(workflows)
        """Every definition given, older versions of a name included (rolling deploys)."""
        self.workflows = {workflow.name: workflow for workflow in self.definitions}
        """The current (last given) definition of each name: new submits take it."""
        self.limits = dict(limits or {})
        check_limits(self.definitions, self.limits)
        self.store = open_store(config.database_url)
        self.metrics = Metrics()
        self.hub: Hub = MeteredHub(self.store, metrics=self.metrics, origin=config.server_id)
        self.repairs = Counter(
            "tether_reconciliation_repairs_total",
            "Reconciliation repairs by kind",
            ["kind"],
            registry=self.metrics.registry,
        )
        self.rules = ReconcileRules(
            priority=config.source_priority or DEFAULT_PRIORITY,
            job_steps=dict(job_steps or {}),
            interval=config.reconcile_interval,
            grace=config.reconcile_grace,
            horizon=config.reconcile_horizon,
        )
        self.sources = list(sources)
        self.pruned = Counter(
            "tether_pruned_rows_total",
            "Rows deleted by retention, by kind",
            ["kind"],
            registry=self.metrics.registry,
        )
        self.pruner = Pruner(
            self.store,
            policy_from_config(config),
            interval=config.retention_interval,
            on_pruned=lambda kind, n: self.pruned.labels(kind).inc(n),
            reclaim_every=10 * config.retention_interval,
        )
        self.reconciler: Reconciler | None = None
        self.applier: MutationApplier = MeteredApplier(
            self.store, self.workflows, metrics=self.metrics, on_report=self._on_report
        )
        self.flags = FlagService(self.store, registry=self.metrics.registry)
        self.flags.listeners.append(self._broadcast_flags)
        self.applier.flags = self.flags
        self.commands = WorkflowCommands(self.applier, self.definitions)
        self.push_buckets = TokenBuckets(config.push_rate, config.push_burst)
        self.alerts = AlertLog(AlertSink(config.alert_webhook), self.metrics)
        self.monitor: MonitorRunner | None = None
        self.monitor_interval = 5.0
        """Seconds between readings of the DLQ, breakers and backlogs (gauges, alerts)."""
        self.delay_threshold = DELAY_THRESHOLD
        """Backlog age (s) that raises ``processing_delayed``."""
        self.runner_options: dict[str, Any] = {}
        """Extra ``SagaRunner`` arguments (the demo shortens breaker timeouts)."""
        self.runner: SagaRunner | None = None
        self.outbox: OutboxRelay | None = None
        self.draining = False
        self._connections: set[Connection] = set()

    @property
    def connections(self) -> int:
        """WebSocket connections open on this instance."""
        return len(self._connections)

    def connection_opened(self, connection: Connection) -> None:
        self._connections.add(connection)
        self.metrics.connected_clients.set(len(self._connections))

    def connection_closed(self, connection: Connection) -> None:
        self._connections.discard(connection)
        self.metrics.connected_clients.set(len(self._connections))

    def _on_report(
        self, tx: Transaction, record: WorkflowRecord, args: ReportStateArgs, now: float
    ) -> None:
        repair = apply_report(tx, record, args, now, self.rules, on_repair=self._repaired)
        if repair.kind == "unappliable":
            self.alerts.alert(
                "reconciliation_failed",
                f"workflow {record.id}: {repair.reason}",
                {"tenant": record.tenant, "workflow_id": record.id, "source": repair.source},
            )

    def _repaired(self, repair: Repair, workflow_id: str) -> None:
        self.repairs.labels(repair.kind).inc()

    def _broadcast_flags(self, tenants: set[str] | None) -> None:
        # One pass over this instance's connections per change (issue 15); a tenant's
        # set is compiled once, and only for tenants connected here.
        messages: dict[str, Flags | None] = {}
        for connection in list(self._connections):
            tenant = connection.tenant
            if tenants is not None and tenant not in tenants:
                continue
            if tenant not in messages:
                messages[tenant] = self.flags.current(tenant)
            message = messages[tenant]
            if message is not None:
                connection.on_flags(message)

    def metrics_slow_consumer(self) -> None:
        self.metrics.slow_consumers.inc()

    def check_rate(self, key: str) -> None:
        """Take one push token for ``key``.

        Raises:
            RateLimited: the client pushes faster than ``push_rate``; carries retry_after.
        """
        wait = self.push_buckets.take(key, time.monotonic())
        if wait > 0:
            self.metrics.rate_limited.inc()
            raise RateLimited(
                f"push rate limit exceeded; retry after {wait:.2f} s", retry_after=wait
            )

    async def start(self) -> None:
        tracing.configure_from_env()
        for source in self.sources:
            # Adapters raise their alerts (e.g. job_stuck) through the instance's log,
            # so they are counted (tether_alerts_total) and shown on the dashboard.
            bind = getattr(source, "bind_alerts", None)
            if bind is not None:
                bind(self.alerts)
        await self.store.open()
        await self.hub.start()
        self.hub.subscribe(self.flags)  # audit events of the flag log, from any instance
        if self.workflows and self.config.run_sagas:
            self.runner = SagaRunner(
                self.store,
                self.definitions,
                instance_id=self.config.server_id,
                limits=self.limits,
                lease_seconds=self.config.lease_seconds,
                on_progress=self.hub.publish_progress,
                alerts=self.alerts,
                completion_webhook=self.config.completion_webhook,
                metrics=self.metrics,
                **self.runner_options,
            )
            await self.runner.start()
            self.applier.runner = self.runner
        self.monitor = MonitorRunner(
            self.store,
            self.metrics,
            self.alerts,
            hub=self.hub,
            interval=self.monitor_interval,
            delay_threshold=self.delay_threshold,
        )
        await self.monitor.start()
        await self.pruner.start()
        if self.config.run_sagas:
            self.outbox = OutboxRelay(self.store, alerts=self.alerts)
            await self.outbox.start()
            self.reconciler = Reconciler(
                self.store,
                self.rules,
                self.sources,
                alerts=self.alerts,
                on_repair=self._repaired,
            )
            await self.reconciler.start()

    async def stop(self) -> None:
        self.draining = True
        for connection in list(self._connections):
            connection.close(1012, "server restarting; reconnect")
        if self.reconciler is not None:
            await self.reconciler.stop()
        await self.pruner.stop()
        if self.monitor is not None:
            await self.monitor.stop()
        if self.runner is not None:
            await self.runner.stop()
        # Only once no step can use them: a step whose adapter closed under it would
        # fail its attempt instead of being stopped for another instance to resume.
        for source in self.sources:
            close = getattr(source, "aclose", None)
            if close is not None:
                await close()
        if self.outbox is not None:
            await self.outbox.stop()
        self.hub.unsubscribe(self.flags)
        await self.flags.stop()
        await self.hub.stop()
        await self.alerts.aclose()
        await self.store.close()
        if tracing.enabled():
            await asyncio.to_thread(tracing.flush)


def create_app(
    database_url: str | None = None,
    *,
    workflows: Iterable[Any] = (),
    auth_secret: str | None = None,
    config: ServerConfig | None = None,
    sources: Iterable[SourceAdapter] = (),
    job_steps: Mapping[str, str] | None = None,
    limits: Mapping[str, Limit] | None = None,
    **settings: Any,
) -> Starlette:
    """Build the ASGI app of one instance.

    Args:
        database_url: ``sqlite:///path`` (default ``SYNC_DATABASE_URL`` or
            ``sqlite:///./sync.db``) or ``postgresql://…``.
        workflows: the ``Workflow`` definitions this server runs. Several versions of
            one name may be given: the last is the one new submits take, the others
            keep running the workflows that started with them (rolling deploys).
        auth_secret: HS256 token secret (default ``SYNC_AUTH_SECRET``).
        config: a full ``ServerConfig`` (then the other settings must be omitted).
        sources: job sources the reconciliation sweep asks (``SourceAdapter``).
        job_steps: workflow name -> the step whose job runs at those sources.
        limits: named limits (``Limit``) the steps refer to (``Step(limit=...)``),
            shared by every instance of the database.
        **settings: any other ``ServerConfig`` field.

    Returns:
        A Starlette app; serve it with uvicorn (``--ws websockets-sansio``).

    Raises:
        UsageError: no auth secret, or an unsupported database URL.
        DefinitionError: a step names a limit that ``limits`` does not configure.
    """
    import os

    if config is None:
        url = database_url or os.environ.get("SYNC_DATABASE_URL") or "sqlite:///./sync.db"
        config = ServerConfig(database_url=url, auth_secret=auth_secret or "", **settings)
    elif database_url or auth_secret or settings:
        raise UsageError("pass either config= or individual settings, not both")
    tether = Tether(config, workflows, sources=sources, job_steps=job_steps, limits=limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await tether.start()
        try:
            yield
        finally:
            await tether.stop()

    async def metrics(request: Request) -> Response:
        return Response(tether.metrics.render(), media_type="text/plain; version=0.0.4")

    async def tether_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TetherError)
        if exc.http_status >= 500:
            log.warning("%s %s failed: %s", request.method, request.url.path, exc)
        return error_response(exc)

    app = Starlette(
        routes=[
            WebSocketRoute("/v1/sync", sync_endpoint),
            *routes,
            *flag_routes,
            *dashboard_routes,
            *slo_routes,
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={TetherError: tether_error},
    )
    shells: Services = tether  # the shells see only the services Protocol (mypy checks it)
    app.state.tether = shells
    return app
