"""Flags in the SDK: the last known set, local evaluation, and the route of a submit.

Theory of operation
-------------------
The server sends the tenant's whole flag set (``Flags``) right after ``Welcome`` and
after every change. ``ClientFlags.receive`` compiles it at once (so the next
``client.flag`` or ``submit_workflow`` sees it) and the client writes it to its SQLite
file; on the next start the file's set is loaded before anything else, so a client that
is offline evaluates with the last set it knew.

Routing (issue 15, SPEC's built-in flags): ``submit_workflow(W)`` goes through Tether
unless a direct path is registered for ``W`` *and* ``tether.route.W`` puts the
targeting key (the token's subject, or ``key=``) outside the rollout. The decision is
made once, when the application submits: a submit already queued in the file stays
queued and is delivered through Tether whatever the route says later — switching back
to the direct path never drops or re-routes it.

Counts per workflow and path are kept in a ``prometheus_client`` registry of this
client (``tether_client_submits_total{workflow, path}``, ``path`` = ``tether`` or
``direct``; ``tether_client_direct_errors_total{workflow}``;
``tether_client_direct_seconds{workflow}``) and as a plain dict.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import jwt
from prometheus_client import CollectorRegistry, Counter, Histogram

from client_sdk.views import WorkflowHandle, WorkflowView
from protocol import Flags, ValidationError
from protocol.flags import FlagBook

if TYPE_CHECKING:
    from client_sdk.client import SyncClient

__all__ = ["ClientFlags", "DirectCall", "DirectHandle", "token_claims"]

log = logging.getLogger("client_sdk")

DirectCall = Callable[[dict[str, Any]], Awaitable[Any]]
"""A workflow's direct path: called with the submit's input, returns its result."""


def token_claims(token: str) -> tuple[str | None, str | None]:
    """(tenant, subject) of a JWT, read without verifying it (the server verifies; the
    SDK only needs them as evaluation context). (None, None) if unreadable."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None, None
    tenant, subject = claims.get("tenant"), claims.get("sub")
    return (
        tenant if isinstance(tenant, str) else None,
        subject if isinstance(subject, str) else None,
    )


class ClientFlags:
    """The client's flags: compiled set, direct paths, and path counters.

    Args:
        token: the client's token (tenant and subject are the evaluation context).
    """

    def __init__(self, token: str) -> None:
        self.tenant, self.subject = token_claims(token)
        self.book = FlagBook()
        self.received = 0
        """How many ``Flags`` messages arrived in this run (tests, diagnostics)."""
        self.listeners: list[Callable[[], None]] = []
        """Called after a new set from the server is in use (the OpenFeature provider)."""
        self._direct: dict[str, DirectCall] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self._submits = Counter(
            "tether_client_submits",
            "Submits by workflow and path (tether or direct)",
            ["workflow", "path"],
            registry=self.registry,
        )
        self._direct_errors = Counter(
            "tether_client_direct_errors",
            "Direct-path calls that raised",
            ["workflow"],
            registry=self.registry,
        )
        self.direct_seconds = Histogram(
            "tether_client_direct_seconds",
            "Duration of direct-path calls (compare with the Tether path's completion time)",
            ["workflow"],
            registry=self.registry,
        )
        self.counts: dict[tuple[str, str], int] = {}
        """(workflow, path) -> submits in this run."""

    def load(self, flags: Flags | None) -> None:
        """Use the set stored in the file (at start, before any connection)."""
        if flags is not None:
            self.book = FlagBook(flags.flags, flags.revision)

    def receive(self, flags: Flags) -> None:
        """A new set from the server: used from now on."""
        self.book = FlagBook(flags.flags, flags.revision)
        self.received += 1
        for listener in list(self.listeners):
            try:
                listener()
            except Exception:  # a broken listener must not stop syncing
                log.exception("flag listener failed")

    def value(self, name: str, default: Any, key: str | None = None, **context: Any) -> Any:
        """Evaluate ``name`` for ``key`` (default: the token's subject)."""
        return self.book.evaluate(
            name,
            default,
            tenant=self.tenant,
            key=key if key is not None else self.subject,
            workflow=context.get("workflow"),
        )

    def register_direct(self, name: str, call: DirectCall) -> None:
        """Register ``call`` as the direct path of workflow ``name``.

        Raises:
            ValidationError: ``call`` is not callable.
        """
        if not callable(call):
            raise ValidationError(f"the direct path of {name!r} must be an async callable")
        self._direct[name] = call

    def direct_path(self, workflow: str, key: str | None = None) -> DirectCall | None:
        """The direct call to make instead of queuing, or None to go through Tether."""
        call = self._direct.get(workflow)
        if call is None:
            return None
        through = self.book.routes_through_tether(
            workflow, tenant=self.tenant, key=key if key is not None else self.subject
        )
        return None if through else call

    def count(self, workflow: str, path: str) -> None:
        """Count one submit of ``workflow`` on ``path``."""
        self._submits.labels(workflow, path).inc()
        self.counts[(workflow, path)] = self.counts.get((workflow, path), 0) + 1

    def direct_failed(self, workflow: str) -> None:
        """Count a direct call that raised."""
        self._direct_errors.labels(workflow).inc()


class DirectHandle(WorkflowHandle):
    """What ``submit_workflow`` returns when the submit took the direct path: the
    direct call already returned, so the view is terminal at once (``completed``, with
    the call's return value as ``result``); nothing was queued or sent to the server.

    Args:
        client: the client.
        workflow_id: the id the submit would have had (given or generated).
        name: the workflow name.
        result: what the direct call returned.
    """

    __slots__ = ("_view", "path")

    def __init__(self, client: SyncClient, workflow_id: str, name: str, result: Any) -> None:
        super().__init__(client, workflow_id)
        self.path = "direct"
        self._view = WorkflowView(
            id=workflow_id,
            name=name,
            status="completed",
            progress=1.0,
            result=result,
            updated_at=time.time(),
        )

    def __repr__(self) -> str:
        return f"DirectHandle({self.id!r})"

    def view(self) -> WorkflowView:
        """The terminal view of the direct call."""
        return self._view

    async def _once(self) -> AsyncIterator[WorkflowView]:
        yield self._view

    def watch(self) -> AsyncIterator[WorkflowView]:
        """Yields the terminal view once."""
        return self._once()

    async def wait(self, timeout: float | None = None) -> WorkflowView:
        """The terminal view (at once)."""
        return self._view
