"""The store's narrow interface and its dialects (issue 12, "a narrow store").

A backend implements a handful of primitives; every domain operation is written once
above them, over shared SQL that the backend's ``Dialect`` renders.
"""

from __future__ import annotations

import re

import pytest

from sync_server.store import Store, Transaction, limit_sql, statements
from sync_server.store.dialect import POSTGRES, SQLITE
from sync_server.store.postgres import PostgresStore
from sync_server.store.sqlite import SqliteStore

PRIMITIVES = {"_fetch_all", "_fetch_one", "_exec", "_exec_many"}


def test_a_transaction_is_abstract_only_in_its_query_primitives():
    assert Transaction.__abstractmethods__ == PRIMITIVES


def test_a_store_is_abstract_only_in_what_a_backend_does_its_own_way():
    assert Store.__abstractmethods__ == PRIMITIVES | {
        "open",
        "close",
        "run",
        "_one_shot",
        "read_events",
        "head",
        "renew_leases",
        "release_leases",
    }


@pytest.mark.parametrize("backend", [SqliteStore, PostgresStore])
def test_backends_override_no_shared_domain_operation(backend):
    """Tenancy, claim order, fencing, listings, outbox, retention: one implementation."""
    shared = {
        "lock_client",
        "claim_due_workflows",
        "update_fenced",
        "mutation_results",
        "record_mutations",
        "list_workflows",
        "status_counts",
        "claim_outbox",
        "prune_events",
        "prune_rows",
    }
    for name in shared:
        for cls in (backend, backend.__mro__[1]):
            assert name not in vars(cls), f"{cls.__name__} overrides {name}"
    transaction = {"lock_client", "update_fenced", "record_mutations", "claim_due_workflows"}
    from sync_server.store.pg_transaction import PostgresTransaction
    from sync_server.store.sqlite_transaction import SqliteTransaction

    for cls in (PostgresTransaction, SqliteTransaction):
        assert not transaction & set(vars(cls)), cls.__name__


def test_postgres_runs_shared_sql_exactly_as_written():
    for sql in statements.POSTGRES_HOT.values():
        assert POSTGRES.sql(sql) is sql


def test_sqlite_renders_parameters_lists_and_row_locks():
    shared = (
        "SELECT x FROM t WHERE a = $1 AND b = ANY($2) AND c = ANY($3::text[]) "
        "AND d < $12 FOR UPDATE OF w SKIP LOCKED"
    )
    assert SQLITE.sql(shared) == (
        "SELECT x FROM t WHERE a = ?1 AND b IN (SELECT value FROM json_each(?2)) "
        "AND c IN (SELECT value FROM json_each(?3)) AND d < ?12"
    )
    assert SQLITE.sql("SELECT 1 FROM t WHERE k = $1 FOR UPDATE") == ("SELECT 1 FROM t WHERE k = ?1")
    assert SQLITE.sql("SELECT 1 FROM m WHERE k = $1 FOR UPDATE SKIP LOCKED") == (
        "SELECT 1 FROM m WHERE k = ?1"
    )


def test_no_postgresql_spelling_reaches_sqlite():
    """What SQLite runs holds no ``$n``, cast, array or row lock (the hand-off was once
    derived from PostgreSQL's text by chained string replaces)."""
    texts = [
        limit_sql.handoff(SQLITE),
        *statements.SQLITE_HOT.values(),
        *statements.SQLITE_OWN.values(),
    ]
    for text in texts:
        assert not re.search(r"\$\d|::|unnest|FOR UPDATE|SKIP LOCKED|ANY\(", text), text
    assert limit_sql.handoff(POSTGRES).startswith(limit_sql.PG_HANDOFF)


def test_both_dialects_name_the_same_own_statements():
    assert set(statements.POSTGRES_OWN) == set(statements.SQLITE_OWN)
