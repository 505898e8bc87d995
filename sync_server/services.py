"""What the shells (``ws``, ``http_api``, ``dashboard``, ``flags.http``) need of the
running instance, as a ``typing.Protocol``.

The shells read the instance from ``app.state.tether`` and use only what is listed
here; ``sync_server.app.Tether`` satisfies it. So a shell never imports the app module
(which imports the shells to mount their routes), and a test can serve a shell over any
object with these members.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from protocol import Flags
    from sync_server.commands import WorkflowCommands
    from sync_server.config import ServerConfig
    from sync_server.domain import MutationApplier
    from sync_server.flags.service import FlagService
    from sync_server.hub import Hub
    from sync_server.metrics import Metrics
    from sync_server.monitor import AlertLog, MonitorRunner
    from sync_server.store.base import Store

__all__ = ["Connection", "Services"]


class Connection(Protocol):
    """A live client connection as the instance tracks it (``ws.WsConnection``)."""

    tenant: str

    def close(self, code: int, reason: str) -> None:
        """Ask the connection to close (1012 when the instance drains)."""

    def on_flags(self, flags: Flags) -> None:
        """The tenant's flag set changed."""


class Services(Protocol):
    """The instance's services, as the shells see them (``app.Tether`` is one)."""

    @property
    def config(self) -> ServerConfig:
        """The instance's settings."""

    @property
    def store(self) -> Store:
        """The event store."""

    @property
    def hub(self) -> Hub:
        """Live fan-out of committed events."""

    @property
    def applier(self) -> MutationApplier:
        """Applies pushed mutations exactly once."""

    @property
    def commands(self) -> WorkflowCommands:
        """Workflow commands that arrive over HTTP (cancel, retry, upgrade, …)."""

    @property
    def flags(self) -> FlagService:
        """Feature flags."""

    @property
    def metrics(self) -> Metrics:
        """Prometheus metrics."""

    @property
    def alerts(self) -> AlertLog:
        """Raised alerts (the dashboard shows the recent ones)."""

    @property
    def monitor(self) -> MonitorRunner | None:
        """SLO monitor (None before start)."""

    @property
    def draining(self) -> bool:
        """True once the instance stops taking new work."""

    @property
    def connections(self) -> int:
        """Live connections on this instance."""

    def connection_opened(self, connection: Connection) -> None:
        """A connection is up (counted, gets flag broadcasts, closed on drain)."""

    def connection_closed(self, connection: Connection) -> None:
        """A connection is gone."""

    def check_rate(self, key: str) -> None:
        """Take one push token for ``key``; raises ``RateLimited``."""

    def metrics_slow_consumer(self) -> None:
        """Count a connection cut off because it could not keep up."""
