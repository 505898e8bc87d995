"""Downstream adapters: one module per downstream a step calls (SPEC, Downstream adapters).

Each gives steps a call that submits with the step's idempotency key and waits for the
result, and is a ``SourceAdapter`` for the reconciliation sweep. ``keyed`` holds the
pattern shared by downstreams that are *not* idempotent (look the job up by key, then
attach to it, take its result, or submit it); ``emp_job_queue`` is emp-job-queue's
adapter and ``job_service`` the example job service's.

Modules are imported on use (``sync_server.adapters.emp_job_queue``), so importing this
package stays cheap.
"""

__all__: list[str] = []
