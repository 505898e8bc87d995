"""Canonical reconciliation across sources (SPEC, Reconciliation).

``rules`` holds the canonical rule as data and the pure decisions; ``sweep`` is the
periodic shell that asks the job source about active workflows and repairs divergence;
``sources`` defines the small adapter interface a job source implements.

Names resolve lazily (PEP 562) so importing the pure ``rules`` does not load the sweep
and its I/O (``tests/test_layering.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.lazy import lazy_exports

if TYPE_CHECKING:
    from sync_server.reconcile.rules import (
        DEFAULT_PRIORITY,
        ReconcileRules,
        Repair,
        apply_report,
        decide,
    )
    from sync_server.reconcile.sources import JobState, SourceAdapter
    from sync_server.reconcile.sweep import Reconciler

__all__ = [
    "DEFAULT_PRIORITY",
    "JobState",
    "ReconcileRules",
    "Reconciler",
    "Repair",
    "SourceAdapter",
    "apply_report",
    "decide",
]

_LAZY = {
    "DEFAULT_PRIORITY": "sync_server.reconcile.rules",
    "ReconcileRules": "sync_server.reconcile.rules",
    "Repair": "sync_server.reconcile.rules",
    "apply_report": "sync_server.reconcile.rules",
    "decide": "sync_server.reconcile.rules",
    "JobState": "sync_server.reconcile.sources",
    "SourceAdapter": "sync_server.reconcile.sources",
    "Reconciler": "sync_server.reconcile.sweep",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
