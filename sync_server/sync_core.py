"""The I/O half of a sync session, shared by both shells (WebSocket and HTTP).

``ServerSession`` (pure) decides what to do; its commands — ``LoadClient``,
``ApplyPush``, ``ReadEvents`` — are carried out here, against the instance's services.
The WebSocket shell (``sync_server.ws``) runs every command of a session through a
``SessionCore``; the HTTP fallback (``sync_server.http_api``) is the same core called
once per request: ``POST /v1/push`` is one ``ApplyPush``, ``GET /v1/pull`` one
``ReadEvents``. So each rule of the sync path exists once:

* a push: the client id is storable text (no NUL), the push rate limit, then the
  applier's tenant, owner and exactly-once rules (``MutationApplier.push``);
* a page: at most ``limit`` events and ``page_bytes`` encoded bytes, the first event
  always (``paging.read_page``), sized as the shell sends them (msgpack or JSON);
* the tenant: every read is scoped by the token (``Principal.scope``);
* a client id belongs to the subject that first pushed with it (``load_client``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protocol import Event, Flags, Forbidden, MutationResult
from protocol.codec import check_text
from sync_server.auth import Principal
from sync_server.paging import msgpack_bytes, read_page
from sync_server.session import ApplyPush, LoadClient, ReadEvents
from sync_server.store.rows import client_owned_message

if TYPE_CHECKING:
    from sync_server.services import Services

__all__ = ["ClientState", "SessionCore"]


@dataclass(frozen=True, slots=True)
class ClientState:
    """The answer to ``LoadClient``: what the Welcome says, and the flags after it."""

    last_mutation_id: int
    head: int
    horizon: int
    flags: Flags


class SessionCore:
    """Carries out one principal's sync commands.

    Args:
        services: the instance (``Services``).
        principal: the authenticated caller; reads are scoped to ``principal.scope``.
        size: an event's encoded size on this shell's wire (the page's byte budget).
    """

    __slots__ = ("principal", "services", "size")

    def __init__(
        self,
        services: Services,
        principal: Principal,
        *,
        size: Callable[[Event], int] = msgpack_bytes,
    ) -> None:
        self.services = services
        self.principal = principal
        self.size = size

    async def load_client(self, command: LoadClient) -> ClientState:
        """The client's last applied id (0 for a new id), the head and horizon, and the
        tenant's flags; a read only.

        SPEC promise 6: a client id belongs to the (tenant, subject) that first used it
        — its first push binds it (``Transaction.lock_client``), so only a push's event
        can reveal it, and that push has bound it already.

        Raises:
            Forbidden: the client id belongs to another subject of the tenant.
        """
        store = self.services.store
        tenant = self.principal.tenant
        found = await store.get_client(tenant, command.client_id)
        last = 0
        if found is not None:
            owner, last = found
            if owner is not None and owner != self.principal.subject:
                raise Forbidden(client_owned_message(command.client_id))
        head = await store.head(tenant=tenant)
        flags = self.services.flags
        book = await flags.book(tenant)
        horizon = await self.horizon()
        return ClientState(last, head, horizon, flags.message(book))

    async def push(self, command: ApplyPush) -> list[MutationResult]:
        """Apply a batch exactly once: one result per mutation, in order.

        Raises:
            ValidationError: the client id holds a NUL character.
            RateLimited: the caller pushes faster than its rate.
            Forbidden: the client id belongs to another subject, or not a client token.
            StorageError: the database failed; nothing was applied.
        """
        check_text(command.client_id, "client_id")
        self.services.check_rate(self.principal.rate_key)
        return await self.services.applier.push(
            self.principal, command.client_id, command.mutations
        )

    async def read(self, command: ReadEvents) -> tuple[list[Event], bool]:
        """A page of the caller's events after ``command.after``, cut by count and bytes;
        and whether more follow."""
        return await read_page(
            self.services.store,
            command.after,
            command.limit,
            self.services.config.page_bytes,
            tenant=self.principal.scope,
            size=self.size,
        )

    async def horizon(self) -> int:
        """The caller's retention horizon (0 for a global admin: every tenant's log)."""
        scope = self.principal.scope
        return await self.services.store.horizon(scope) if scope is not None else 0
