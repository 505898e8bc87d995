"""Feature flags on the server: the per-instance cache, propagation and changes.

Theory of operation
-------------------
Flags live in the ``flags`` table, per *scope*: a tenant, or ``*`` for every tenant. A
tenant sees its own flags over the global ones (same name: the tenant's wins).

Every change is one transaction: the flag's row is read (locked), the new definition is
written with ``version + 1``, and an audit event ``flag.changed`` is appended to the
event log — who (the admin token's tenant and subject), when, the scope, before and
after. The event's log tenant is ``tether.flags``, which no client subscribes to, so
the audit trail never reaches application clients; its ``workflow_id`` is
``flag:<scope>:<name>`` and its ``wf_seq`` the flag's version, so ``history`` is one
indexed read of the log.

Propagation rides the log: ``FlagService`` subscribes to the hub as the subscriber of
tenant ``tether.flags``, and the hub hands it every committed audit event, in order and
without gaps, whichever instance wrote it (PostgreSQL: LISTEN/NOTIFY plus a re-read of
the log after a lost link). The event's ``after`` updates the cached scope at once —
only if its version is newer, so a load racing with a change can never roll the cache
back — and the compiled sets of the tenants concerned are dropped; every connected
flag-aware client of those tenants gets the new set (a ``Flags`` message, compiled once
per tenant connected here; other tenants' sets are compiled when next used). A kill
switch therefore stops new submits on every instance as fast as an event reaches it
(milliseconds), and a reconnecting client gets the current set right after
``Welcome``, before anything it pushes is answered.

Sizes are bounded: ``MAX_FLAGS`` per scope, ``MAX_FLAG_BYTES`` per definition,
``MAX_RULES`` per flag (``protocol.flags``), ``MAX_CACHED_TENANTS`` compiled sets per
instance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter

from protocol import Event, Flags, Forbidden, NotFound, Progress, Role, ValidationError
from protocol.flags import MAX_FLAGS, FlagBook, FlagDef, FlagRule, check_flag
from sync_server.auth import GLOBAL_TENANT, RESERVED_TENANTS, Principal
from sync_server.flags.store import (
    FlagRecord,
    count_scope,
    lock_scope,
    read_flag,
    read_scope,
    write_flag,
)
from sync_server.service import cancel_and_wait
from sync_server.store.base import NewEvent, Store, Transaction

__all__ = [
    "FLAG_CHANGED",
    "FLAG_LOG_TENANT",
    "GLOBAL_SCOPE",
    "MAX_HISTORY",
    "FlagChange",
    "FlagService",
]

log = logging.getLogger("tether.flags")

FLAG_LOG_TENANT = "tether.flags"
"""The log tenant of flag audit events (reserved: ``auth`` refuses tokens of it)."""
FLAG_CHANGED = "flag.changed"
assert FLAG_LOG_TENANT in RESERVED_TENANTS
GLOBAL_SCOPE = GLOBAL_TENANT
"""The scope of flags that apply to every tenant."""
MAX_HISTORY = 200
"""Most audit entries ``history`` returns (the newest)."""
MAX_CACHED_TENANTS = 10_000
"""Tenants whose flags one instance keeps compiled; the oldest is dropped beyond it
(and reloaded on its next use or change)."""

_def_decoder = msgspec.json.Decoder(FlagDef)
_to_builtins = msgspec.to_builtins


@dataclass(frozen=True, slots=True)
class FlagChange:
    """What a change did (the audit event's content)."""

    scope: str
    before: FlagDef | None
    after: FlagDef
    by: str
    at: float


class FlagService:
    """The flags of one instance: cache, propagation to clients, and audited changes.

    Args:
        store: the event store.
        clock: wall clock (injectable).
        registry: where to count refused submits (``tether_submits_disabled_total``).
    """

    tenant = FLAG_LOG_TENANT  # the hub delivers this log tenant's events to us

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self._scopes: dict[str, dict[str, FlagDef]] = {}
        self._loading: dict[str, tuple[list[FlagDef], asyncio.Event]] = {}
        self._books: dict[str, FlagBook] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.listeners: list[Callable[[set[str] | None], None]] = []
        """Called after a change with the tenants whose set changed (None: every tenant);
        the app then sends ``current(tenant)`` to their connections."""
        self.disabled = Counter(
            "tether_submits_disabled_total",
            "Submits refused because tether.accept.W is false (kill switch)",
            ["workflow"],
            registry=registry,
        )

    # ------------------------------------------------------------------ cache
    async def book(self, tenant: str) -> FlagBook:
        """The tenant's compiled flag set (loaded from the store on first use).

        Raises:
            StorageError: the database failed.
        """
        found = self._books.get(tenant)
        if found is not None:
            return found
        for scope in (GLOBAL_SCOPE, tenant):
            while scope not in self._scopes:  # (a failed load by another task: retry here)
                await self._load(scope)
        return self._build(tenant)

    def message(self, book: FlagBook) -> Flags:
        """The ``Flags`` message of a compiled set."""
        return Flags(flags=list(book.definitions.values()), revision=book.revision)

    def current(self, tenant: str) -> Flags | None:
        """The tenant's current set, compiled on demand from the cached scopes; None if
        they are not cached — then they are loaded in the background and the listeners
        are told about ``tenant`` once they are in."""
        book = self._books.get(tenant)
        if book is None:
            if GLOBAL_SCOPE not in self._scopes or (
                tenant != GLOBAL_SCOPE and tenant not in self._scopes
            ):
                self._refresh_later(tenant)
                return None
            book = self._build(tenant)
        return self.message(book)

    async def _load(self, scope: str) -> None:
        loading = self._loading.get(scope)
        if loading is not None:  # another task is loading it: wait for that one
            await loading[1].wait()
            return
        heard: list[FlagDef] = []
        done = asyncio.Event()
        self._loading[scope] = (heard, done)
        try:
            records = await self.store.run(lambda tx: read_scope(tx, scope))
            flags = {record.flag.name: record.flag for record in records}
            for after in heard:  # changes committed while we were reading
                _apply(flags, after)
            self._scopes[scope] = flags
        finally:
            del self._loading[scope]
            done.set()
        if heard:  # clients connected meanwhile may have been sent the older set
            if scope == GLOBAL_SCOPE:
                self._books.clear()
                self._notify(None)
            else:
                self._books.pop(scope, None)
                self._notify({scope})

    def _build(self, tenant: str) -> FlagBook:
        merged = dict(self._scopes.get(GLOBAL_SCOPE, {}))
        own = self._scopes.get(tenant, {}) if tenant != GLOBAL_SCOPE else {}
        merged.update(own)
        revision = sum(f.version for f in self._scopes.get(GLOBAL_SCOPE, {}).values()) + sum(
            f.version for f in own.values()
        )
        book = self._books[tenant] = FlagBook(merged.values(), revision)
        while len(self._books) > MAX_CACHED_TENANTS:
            oldest = next(iter(self._books))
            del self._books[oldest]
            if oldest != GLOBAL_SCOPE:
                self._scopes.pop(oldest, None)
        return book

    async def stop(self) -> None:
        """Cancel reloads in progress; idempotent.

        Raises:
            asyncio.CancelledError: the caller itself is being cancelled.
        """
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            await cancel_and_wait(task)  # re-raises if we are the ones being cancelled

    def _refresh_later(self, tenant: str) -> None:
        if tenant in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._refresh(tenant))
        self._tasks[tenant] = task
        task.add_done_callback(lambda _: self._tasks.pop(tenant, None))

    async def _refresh(self, tenant: str) -> None:
        # The flags of a tenant with clients here are not cached (never loaded, or
        # dropped): load them — a change that led here is committed, so the read has
        # it — and tell the listeners, who then find them cached.
        try:
            await self.book(tenant)
        except Exception as exc:  # the next change or connection loads them again
            log.warning("could not load the flags of tenant %r: %s", tenant, exc)
            return
        self._notify({tenant})

    def _notify(self, tenants: set[str] | None) -> None:
        for listener in self.listeners:
            try:
                listener(tenants)
            except Exception:
                log.exception("a flag listener failed")

    # ------------------------------------------------------ hub subscriber
    def on_events(self, events: list[Event]) -> None:
        """Audit events from the log (any instance): update the cache, tell clients."""
        touched: set[str] = set()
        for event in events:
            if event.type != FLAG_CHANGED:
                continue
            try:
                scope = str(event.data["scope"])
                after = msgspec.convert(event.data["after"], FlagDef)
            except (KeyError, msgspec.ValidationError):
                log.warning("ignoring a malformed flag event %s", event.seq)
                continue
            if scope in self._loading:
                self._loading[scope][0].append(after)
            if scope in self._scopes:
                _apply(self._scopes[scope], after)
            touched.add(scope)  # (a scope not cached here is loaded when a client needs it)
        if not touched:
            return
        if GLOBAL_SCOPE in touched:
            # Every tenant's set changed: recompile lazily, for connected tenants first.
            self._books.clear()
            self._notify(None)
            return
        for scope in touched:
            self._books.pop(scope, None)
        self._notify(touched)

    def on_progress(self, progress: Progress) -> None:
        """Not used (the flag log has no workflows)."""

    # -------------------------------------------------------------- kill switch
    def refuse(self, workflow: str) -> ValidationError:
        """Count a refused submit and build its error (reason ``disabled``)."""
        self.disabled.labels(workflow).inc()
        return ValidationError(
            f"disabled: new submits of workflow {workflow!r} are switched off "
            f"(tether.accept.{workflow} is false)"
        )

    # ----------------------------------------------------------------- admin
    def scope_for(self, principal: Principal, tenant: str | None) -> str:
        """The scope an admin request acts on (``--tenant``; default every tenant, or the
        tenant admin's own tenant).

        Raises:
            Forbidden: not an admin, or another tenant's flags.
        """
        principal.require(Role.ADMIN)
        if principal.scope is not None:  # a tenant admin is held to its own tenant
            if tenant not in (None, principal.scope):
                raise Forbidden("a tenant admin manages only its own tenant's flags")
            return principal.scope
        return tenant if tenant else GLOBAL_SCOPE

    async def list_flags(self, principal: Principal, tenant: str | None) -> list[dict[str, Any]]:
        """The flags of a scope; for a tenant also the global ones it sees (read-only
        for a tenant admin), marked by ``scope``."""
        scope = self.scope_for(principal, tenant)
        records = await self.store.run(lambda tx: read_scope(tx, scope))
        rows = [_row(record) for record in records]
        if scope != GLOBAL_SCOPE:
            own = {record.flag.name for record in records}
            globals_ = await self.store.run(lambda tx: read_scope(tx, GLOBAL_SCOPE))
            rows += [_row(r) | {"overridden": True} for r in globals_ if r.flag.name in own]
            rows += [_row(r) for r in globals_ if r.flag.name not in own]
        return rows

    async def show(self, principal: Principal, tenant: str | None, name: str) -> dict[str, Any]:
        """One flag of a scope.

        Raises:
            NotFound: no such flag in the scope.
        """
        scope = self.scope_for(principal, tenant)
        record = await self.store.run(lambda tx: read_flag(tx, scope, name))
        if record is None:
            raise NotFound(f"no flag {name!r} in scope {scope!r}")
        return _row(record)

    async def history(
        self, principal: Principal, tenant: str | None, name: str
    ) -> list[dict[str, Any]]:
        """The audit trail of one flag (newest last, at most ``MAX_HISTORY``)."""
        scope = self.scope_for(principal, tenant)
        events = await self.store.read_workflow_events(FLAG_LOG_TENANT, _audit_id(scope, name))
        return [
            {"seq": e.seq, "version": e.wf_seq, **e.data}
            for e in events[-MAX_HISTORY:]
            if e.tenant == FLAG_LOG_TENANT
        ]

    async def put(
        self,
        principal: Principal,
        tenant: str | None,
        name: str,
        change: Callable[[FlagDef | None], FlagDef],
    ) -> FlagChange:
        """Change one flag in one transaction with its audit event.

        Args:
            principal: the admin making the change (recorded as ``by``).
            tenant: the scope (see ``scope_for``).
            name: the flag.
            change: builds the new definition from the current one (None if new).

        Returns:
            What changed.

        Raises:
            Forbidden: not allowed. ValidationError: a bad definition, or the scope is
            full; nothing is changed.
        """
        scope = self.scope_for(principal, tenant)
        by = f"{principal.tenant}/{principal.subject}"

        async def unit(tx: Transaction) -> FlagChange:
            now = self.clock()
            await lock_scope(tx, scope)
            current = await read_flag(tx, scope, name)
            before = current.flag if current is not None else None
            if before is None and await count_scope(tx, scope) >= MAX_FLAGS:
                raise ValidationError(f"scope {scope!r} already holds {MAX_FLAGS} flags")
            proposed = change(before)
            after = _validated(
                FlagDef(
                    name=name,
                    default=proposed.default,
                    rules=proposed.rules,
                    version=(before.version if before else 0) + 1,
                )
            )
            await write_flag(tx, FlagRecord(scope, after, now, by))
            data = {
                "scope": scope,
                "name": name,
                "by": by,
                "at": now,
                "before": _to_builtins(before) if before is not None else None,
                "after": _to_builtins(after),
            }
            tx.pending_events.append(
                NewEvent(
                    FLAG_LOG_TENANT, _audit_id(scope, name), after.version, FLAG_CHANGED, data, now
                )
            )
            return FlagChange(scope, before, after, by, now)

        return await self.store.run(unit)

    async def set_value(
        self,
        principal: Principal,
        tenant: str | None,
        name: str,
        value: Any,
        rules: list[FlagRule] | None = None,
    ) -> FlagChange:
        """``flags set NAME VALUE``: the value for everyone (``rules`` replace the
        flag's rules; by default it has none)."""
        return await self.put(
            principal, tenant, name, lambda _: FlagDef(name=name, default=value, rules=rules or [])
        )

    async def rollout(
        self, principal: Principal, tenant: str | None, name: str, percentage: float
    ) -> FlagChange:
        """``flags rollout NAME PERCENT``.

        ``tether.route.W`` (a number) is set to the percentage; any other flag becomes
        a boolean rollout: ``true`` for that share of targeting keys, ``false`` for the
        rest; its other targeting rules are kept in front of the percentage rule.

        Raises:
            ValidationError: the percentage is not within 0..100, or the flag holds a
                value that is neither boolean nor a percentage.
        """
        if not isinstance(percentage, int | float) or not 0 <= percentage <= 100:
            raise ValidationError(f"percentage must be a number from 0 to 100, got {percentage!r}")

        def change(before: FlagDef | None) -> FlagDef:
            if name.startswith("tether.route."):
                return FlagDef(name=name, default=percentage)
            if before is not None and not isinstance(before.default, bool):
                raise ValidationError(
                    f"flag {name!r} has a {type(before.default).__name__} value; "
                    "a rollout needs a boolean flag"
                )
            kept = [rule for rule in (before.rules if before else []) if rule.percentage is None]
            rule = FlagRule(value=True, percentage=float(percentage))
            return FlagDef(name=name, default=False, rules=[*kept, rule])

        return await self.put(principal, tenant, name, change)


def _apply(flags: dict[str, FlagDef], after: FlagDef) -> None:
    current = flags.get(after.name)
    if current is None or after.version > current.version:
        flags[after.name] = after


def _validated(flag: FlagDef) -> FlagDef:
    try:
        flag = msgspec.convert(_to_builtins(flag), FlagDef)
        return check_flag(flag)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ValidationError(f"invalid flag: {exc}") from exc


def _audit_id(scope: str, name: str) -> str:
    return f"flag:{scope}:{name}"


def _row(record: FlagRecord) -> dict[str, Any]:
    return {
        "scope": record.scope,
        "name": record.flag.name,
        "default": record.flag.default,
        "rules": _to_builtins(record.flag.rules),
        "version": record.flag.version,
        "updated_at": record.updated_at,
        "updated_by": record.updated_by,
    }
