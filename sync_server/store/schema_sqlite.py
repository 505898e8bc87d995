"""The schema steps of each migration, per backend (``migrations`` applies them).

Evolve by appending a migration; never edit an applied one. A SQLite step may be a
function of the connection (SQLite cannot change a primary key in place: ``_rebuild``
copies the table). Migration 8 is written once for both backends (``migration_8``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

__all__ = [
    "MIGRATION_7_INDEXES",
    "SQLITE_MIGRATIONS",
    "Migration",
    "SqliteMigration",
    "migration_8",
]

Migration = tuple[int, tuple[str, ...]]
SqliteStep = str | Callable[[sqlite3.Connection], None]
SqliteMigration = tuple[int, tuple[SqliteStep, ...]]


def _rebuild(
    table: str, key: str | None, *, without_rowid: bool = False
) -> Callable[[sqlite3.Connection], None]:
    """A step that rebuilds ``table`` with ``PRIMARY KEY (key)`` and no other table
    constraint, keeping every current column (added by any migration) and every explicit
    index; the old table's UNIQUE constraints are dropped (re-add them as indexes).
    With ``key=None`` the table keeps its ``INTEGER PRIMARY KEY`` column (the rowid)."""

    def step(conn: sqlite3.Connection) -> None:
        columns = conn.execute(f"PRAGMA table_info({table})").fetchall()
        indexes = [
            row[0]
            for row in conn.execute(
                "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? "
                "AND sql IS NOT NULL",
                (table,),
            )
        ]
        keys = {part.strip() for part in (key or "").split(",")}
        defs = []
        for _cid, name, type_, notnull, default, pk in columns:
            # No rebuilt table has AUTOINCREMENT; an INTEGER PRIMARY KEY stays the rowid.
            if key is None and pk:
                defs.append(f"{name} INTEGER PRIMARY KEY")
                continue
            text = f"{name} {type_}"
            # SQLite lets a rowid table's non-integer PRIMARY KEY hold NULL: forbid it.
            if notnull or (key is not None and name in keys):
                text += " NOT NULL"
            if default is not None:
                text += f" DEFAULT {default}"
            defs.append(text)
        if key is not None:
            defs.append(f"PRIMARY KEY ({key})")
        names = ", ".join(row[1] for row in columns)
        suffix = " WITHOUT ROWID" if without_rowid else ""
        conn.execute(f"CREATE TABLE {table}_rebuilt ({', '.join(defs)}){suffix}")
        conn.execute(f"INSERT INTO {table}_rebuilt ({names}) SELECT {names} FROM {table}")
        conn.execute(f"DROP TABLE {table}")
        conn.execute(f"ALTER TABLE {table}_rebuilt RENAME TO {table}")
        for sql in indexes:
            conn.execute(sql)

    return step


# Migration 7, flat cost with age (SPEC promise 8): every hot statement finds its rows by
# an index whatever the table size. Tenant leads every composite index. Retention walks
# finished workflows in the order they ended (workflows_ended). The same on both backends.
MIGRATION_7_INDEXES = (
    "CREATE INDEX workflows_tenant_created ON workflows (tenant, created_at, id)",
    "CREATE INDEX workflows_tenant_status_created ON workflows (tenant, status, created_at, id)",
    "DROP INDEX workflows_tenant_status",
    "CREATE INDEX workflows_created ON workflows (created_at, id)",
    "CREATE INDEX workflows_status_created ON workflows (status, created_at, id)",
    "CREATE INDEX workflows_ended ON workflows (updated_at, id) "
    "WHERE status IN ('completed', 'compensated', 'failed', 'cancelled')",
    "CREATE INDEX mutation_results_at ON mutation_results (at)",
    "CREATE INDEX outbox_published ON outbox (published_at) WHERE status = 'published'",
    "CREATE INDEX dlq_resolved ON dlq (resolved_at) WHERE status <> 'open'",
    "CREATE INDEX dlq_tenant_status ON dlq (tenant, status, id)",
)


SQLITE_MIGRATIONS: list[SqliteMigration] = [
    (
        1,
        (
            # INTEGER PRIMARY KEY makes seq the rowid: the B-tree key, no extra index.
            """CREATE TABLE events (
                seq INTEGER PRIMARY KEY,
                tenant TEXT NOT NULL,
                workflow_id TEXT NOT NULL,
                wf_seq INTEGER NOT NULL,
                type TEXT NOT NULL,
                data TEXT NOT NULL,
                at REAL NOT NULL,
                UNIQUE (workflow_id, wf_seq)
            )""",
            "CREATE INDEX events_tenant_seq ON events (tenant, seq)",
            """CREATE TABLE workflows (
                id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL,
                name TEXT NOT NULL,
                status TEXT NOT NULL,
                input TEXT NOT NULL,
                state TEXT NOT NULL,
                progress REAL NOT NULL DEFAULT 0,
                result TEXT,
                error TEXT,
                version INTEGER NOT NULL DEFAULT 0,
                created_at REAL NOT NULL,
                updated_at REAL NOT NULL,
                created_by TEXT,
                due_at REAL,
                lease_owner TEXT,
                lease_until REAL,
                fence INTEGER NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX workflows_due ON workflows (due_at) WHERE due_at IS NOT NULL",
            "CREATE INDEX workflows_tenant_status ON workflows (tenant, status)",
            """CREATE TABLE clients (
                client_id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL,
                last_mutation_id INTEGER NOT NULL DEFAULT 0,
                updated_at REAL NOT NULL
            )""",
            """CREATE TABLE mutation_results (
                client_id TEXT NOT NULL,
                mutation_id INTEGER NOT NULL,
                status TEXT NOT NULL,
                error TEXT,
                at REAL NOT NULL,
                PRIMARY KEY (client_id, mutation_id)
            ) WITHOUT ROWID""",
            """CREATE TABLE outbox (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                destination TEXT NOT NULL,
                payload TEXT NOT NULL,
                event_seq INTEGER,
                status TEXT NOT NULL DEFAULT 'pending',
                retry_count INTEGER NOT NULL DEFAULT 0,
                max_retries INTEGER NOT NULL DEFAULT 8,
                next_retry_at REAL NOT NULL,
                published_at REAL,
                last_error TEXT,
                created_at REAL NOT NULL
            )""",
            "CREATE INDEX outbox_due ON outbox (next_retry_at) WHERE status = 'pending'",
            """CREATE TABLE dlq (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                tenant TEXT NOT NULL,
                workflow_id TEXT NOT NULL,
                step TEXT,
                reason TEXT NOT NULL,
                attempts INTEGER NOT NULL,
                last_error TEXT,
                created_at REAL NOT NULL,
                status TEXT NOT NULL DEFAULT 'open',
                resolved_at REAL
            )""",
            "CREATE INDEX dlq_status ON dlq (status, id)",
            """CREATE TABLE breakers (
                name TEXT PRIMARY KEY,
                state TEXT NOT NULL,
                failures INTEGER NOT NULL DEFAULT 0,
                opened_at REAL,
                updated_at REAL NOT NULL,
                probe_owner TEXT,
                probe_until REAL
            )""",
        ),
    ),
    (
        2,
        (
            # events: seq stays the rowid (INTEGER PRIMARY KEY); wf_seq is unique per
            # (workflow_id, tenant) instead of per workflow_id.
            _rebuild("events", None),
            "CREATE UNIQUE INDEX events_workflow ON events (workflow_id, tenant, wf_seq)",
            _rebuild("workflows", "id, tenant"),
            "ALTER TABLE clients ADD COLUMN subject TEXT",
            _rebuild("clients", "client_id, tenant"),
            "ALTER TABLE mutation_results ADD COLUMN tenant TEXT NOT NULL DEFAULT ''",
            "UPDATE mutation_results SET tenant = coalesce((SELECT c.tenant FROM clients c "
            "WHERE c.client_id = mutation_results.client_id), '')",
            _rebuild("mutation_results", "client_id, tenant, mutation_id", without_rowid=True),
        ),
    ),
    (
        4,
        (
            # Feature flags (issue 15): scope is a tenant, or '*' for every tenant.
            # definition is the FlagDef as JSON; version numbers its changes, and each
            # change's audit event in the log (tenant 'tether.flags') carries it.
            """CREATE TABLE flags (
                scope TEXT NOT NULL,
                name TEXT NOT NULL,
                definition TEXT NOT NULL,
                version INTEGER NOT NULL,
                updated_at REAL NOT NULL,
                updated_by TEXT NOT NULL,
                PRIMARY KEY (scope, name)
            )""",
        ),
    ),
    (
        7,
        (
            *MIGRATION_7_INDEXES,
            # How far the event pruner got through the ended workflows (updated_at, id).
            """CREATE TABLE retention_marks (
                name TEXT PRIMARY KEY,
                at REAL NOT NULL,
                id TEXT NOT NULL
            )""",
            # Per tenant, the highest seq ever pruned: a cursor below it missed events.
            """CREATE TABLE tenant_horizons (
                tenant TEXT PRIMARY KEY,
                seq INTEGER NOT NULL
            )""",
        ),
    ),
]


# Migration 8 (issue 18): workflow versions, limits per downstream, listing indexes.
# ``workflow_version`` is the definition version a workflow started with; the claim
# filters by (name, version) pairs through ``workflows_claim_version``. Listing pages on
# (created_at, id) under the tenant (the leading column). ``limit_*`` tables hold the
# shared state of named limits: a lock row per limit, concurrency slots (valid only while
# the holder's lease and fence are), starts of the last second, and the waiters.
def migration_8(text: str, real: str, integer: str) -> tuple[str, ...]:
    """Migration 8's statements with the backend's names of the text, real and integer
    column types."""
    return (
        f"ALTER TABLE workflows ADD COLUMN workflow_version {text} NOT NULL DEFAULT ''",
        "CREATE INDEX workflows_claim_version ON workflows (name, workflow_version, due_at) "
        "WHERE due_at IS NOT NULL",
        "CREATE INDEX workflows_active_version ON workflows (name, workflow_version) "
        "WHERE status IN ('running', 'compensating', 'parked')",
        # (tenant, created_at, id) and (tenant, status, created_at, id): migration 7.
        "CREATE INDEX workflows_tenant_name_created ON workflows (tenant, name, created_at, id)",
        "CREATE INDEX workflows_tenant_version_created "
        "ON workflows (tenant, workflow_version, created_at, id)",
        # "ended between": the last change of a workflow in a terminal status.
        "CREATE INDEX workflows_tenant_ended ON workflows (tenant, updated_at) "
        "WHERE status IN ('completed', 'compensated', 'failed', 'cancelled')",
        f"CREATE TABLE limits (name {text} PRIMARY KEY, updated_at {real} NOT NULL)",
        f"""CREATE TABLE limit_slots (
            name {text} NOT NULL,
            tenant {text} NOT NULL,
            workflow_id {text} NOT NULL,
            step {text} NOT NULL,
            owner {text} NOT NULL,
            fence {integer} NOT NULL,
            acquired_at {real} NOT NULL,
            PRIMARY KEY (name, tenant, workflow_id, step)
        )""",
        "CREATE INDEX limit_slots_workflow ON limit_slots (tenant, workflow_id)",
        f"CREATE TABLE limit_starts (name {text} NOT NULL, tenant {text} NOT NULL, "
        f"at {real} NOT NULL)",
        "CREATE INDEX limit_starts_name_at ON limit_starts (name, at)",
        f"""CREATE TABLE limit_waiters (
            name {text} NOT NULL,
            tenant {text} NOT NULL,
            workflow_id {text} NOT NULL,
            step {text} NOT NULL,
            created_at {real} NOT NULL,
            seen_at {real} NOT NULL,
            PRIMARY KEY (name, tenant, workflow_id, step)
        )""",
        "CREATE INDEX limit_waiters_order ON limit_waiters (name, tenant, created_at, workflow_id)",
        "CREATE INDEX limit_waiters_workflow ON limit_waiters (tenant, workflow_id)",
    )


SQLITE_MIGRATIONS.append((8, migration_8("TEXT", "REAL", "INTEGER")))
