"""The schema steps of each PostgreSQL migration (``migrations`` applies them)."""

from __future__ import annotations

from sync_server.store.schema_sqlite import MIGRATION_7_INDEXES, Migration, migration_8

__all__ = ["POSTGRES_MIGRATIONS"]

POSTGRES_MIGRATIONS: list[Migration] = [
    (
        1,
        (
            """CREATE TABLE events (
                seq bigint PRIMARY KEY,
                tenant text NOT NULL,
                workflow_id text NOT NULL,
                wf_seq bigint NOT NULL,
                type text NOT NULL,
                data text NOT NULL,
                at double precision NOT NULL,
                UNIQUE (workflow_id, wf_seq)
            )""",
            "CREATE INDEX events_tenant_seq ON events (tenant, seq)",
            # The position lock (LESSONS: ordering in PostgreSQL): one row, updated as the
            # last statement before COMMIT; its row lock serialises position assignment.
            """CREATE TABLE event_head (
                id smallint PRIMARY KEY CHECK (id = 1),
                seq bigint NOT NULL
            ) WITH (fillfactor = 10)""",
            "INSERT INTO event_head (id, seq) VALUES (1, 0)",
            """CREATE TABLE workflows (
                id text PRIMARY KEY,
                tenant text NOT NULL,
                name text NOT NULL,
                status text NOT NULL,
                input text NOT NULL,
                state text NOT NULL,
                progress double precision NOT NULL DEFAULT 0,
                result text,
                error text,
                version bigint NOT NULL DEFAULT 0,
                created_at double precision NOT NULL,
                updated_at double precision NOT NULL,
                created_by text,
                due_at double precision,
                lease_owner text,
                lease_until double precision,
                fence bigint NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX workflows_due ON workflows (due_at) WHERE due_at IS NOT NULL",
            "CREATE INDEX workflows_tenant_status ON workflows (tenant, status)",
            """CREATE TABLE clients (
                client_id text PRIMARY KEY,
                tenant text NOT NULL,
                last_mutation_id bigint NOT NULL DEFAULT 0,
                updated_at double precision NOT NULL
            )""",
            """CREATE TABLE mutation_results (
                client_id text NOT NULL,
                mutation_id bigint NOT NULL,
                status text NOT NULL,
                error text,
                at double precision NOT NULL,
                PRIMARY KEY (client_id, mutation_id)
            )""",
            """CREATE TABLE outbox (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                destination text NOT NULL,
                payload text NOT NULL,
                event_seq bigint,
                status text NOT NULL DEFAULT 'pending',
                retry_count integer NOT NULL DEFAULT 0,
                max_retries integer NOT NULL DEFAULT 8,
                next_retry_at double precision NOT NULL,
                published_at double precision,
                last_error text,
                created_at double precision NOT NULL
            )""",
            "CREATE INDEX outbox_due ON outbox (next_retry_at) WHERE status = 'pending'",
            """CREATE TABLE dlq (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                tenant text NOT NULL,
                workflow_id text NOT NULL,
                step text,
                reason text NOT NULL,
                attempts integer NOT NULL,
                last_error text,
                created_at double precision NOT NULL,
                status text NOT NULL DEFAULT 'open',
                resolved_at double precision
            )""",
            "CREATE INDEX dlq_status ON dlq (status, id)",
            """CREATE TABLE breakers (
                name text PRIMARY KEY,
                state text NOT NULL,
                failures integer NOT NULL DEFAULT 0,
                opened_at double precision,
                updated_at double precision NOT NULL,
                probe_owner text,
                probe_until double precision
            )""",
        ),
    ),
    (
        2,
        (
            "ALTER TABLE workflows DROP CONSTRAINT workflows_pkey, ADD PRIMARY KEY (id, tenant)",
            "ALTER TABLE events DROP CONSTRAINT events_workflow_id_wf_seq_key, "
            "ADD CONSTRAINT events_workflow UNIQUE (workflow_id, tenant, wf_seq)",
            "ALTER TABLE clients ADD COLUMN subject text, DROP CONSTRAINT clients_pkey, "
            "ADD PRIMARY KEY (client_id, tenant)",
            "ALTER TABLE mutation_results ADD COLUMN tenant text",
            "UPDATE mutation_results AS m SET tenant = c.tenant FROM clients AS c "
            "WHERE c.client_id = m.client_id",
            "DELETE FROM mutation_results WHERE tenant IS NULL",
            "ALTER TABLE mutation_results ALTER COLUMN tenant SET NOT NULL, "
            "DROP CONSTRAINT mutation_results_pkey, "
            "ADD PRIMARY KEY (client_id, tenant, mutation_id)",
        ),
    ),
    (
        4,
        (
            """CREATE TABLE flags (
                scope text NOT NULL,
                name text NOT NULL,
                definition text NOT NULL,
                version bigint NOT NULL,
                updated_at double precision NOT NULL,
                updated_by text NOT NULL,
                PRIMARY KEY (scope, name)
            )""",
        ),
    ),
    (
        7,
        (
            # Plain CREATE INDEX (not CONCURRENTLY): migrations run in one transaction;
            # on a large live table build them ahead by hand.
            *MIGRATION_7_INDEXES,
            """CREATE TABLE retention_marks (
                name text PRIMARY KEY,
                at double precision NOT NULL,
                id text NOT NULL
            )""",
            """CREATE TABLE tenant_horizons (
                tenant text PRIMARY KEY,
                seq bigint NOT NULL
            )""",
        ),
    ),
]


POSTGRES_MIGRATIONS.append((8, migration_8("text", "double precision", "bigint")))
