"""Canonical reconciliation across sources (SPEC, Reconciliation).

``rules`` holds the canonical rule as data and the pure decisions; ``sweep`` is the
periodic shell that asks the job source about active workflows and repairs divergence;
``sources`` defines the small adapter interface a job source implements.
"""

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
