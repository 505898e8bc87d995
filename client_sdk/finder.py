"""Finding workflows on the server: a typed call of ``GET /v1/workflows``.

The local store (``SyncClient.list_workflows``) holds this client's own workflows; an
operator screen or a backend that wants every workflow of the tenant — by name, status,
definition version or creation time, newest first — pages through the server's listing
with ``SyncClient.find_workflows``. Each page is one request; ``next_cursor`` resumes
after its last row and stays valid while new workflows are submitted.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx
import msgspec

from protocol import TetherError, Unavailable, ValidationError
from protocol.http import WorkflowPage

__all__ = ["WorkflowPage", "find_workflows"]


async def find_workflows(
    http: httpx.AsyncClient,
    *,
    name: str | None = None,
    status: str | Sequence[str] | None = None,
    version: str | None = None,
    created_after: float | str | None = None,
    created_before: float | str | None = None,
    ended_after: float | str | None = None,
    ended_before: float | str | None = None,
    cursor: str | None = None,
    limit: int = 100,
) -> WorkflowPage:
    """One page of the tenant's workflows matching the filters.

    Args:
        http: a client with the server's base URL and the bearer token.
        name: only this definition name.
        status: one status or several.
        version: only this definition version.
        created_after: unix seconds or an ISO 8601 time (inclusive).
        created_before: unix seconds or an ISO 8601 time (exclusive).
        ended_after: only ended workflows (terminal status), ended at or after this.
        ended_before: only ended workflows, ended before this.
        cursor: the previous page's ``next_cursor``.
        limit: most workflows in the page (1..10,000; the server also bounds bytes).

    Returns:
        The page.

    Raises:
        ValidationError: the server refused a filter (HTTP 400).
        Unavailable: the server cannot be reached or failed.
        TetherError: any other refusal (e.g. 401 with a bad token).
    """
    params: list[tuple[str, str]] = [("limit", str(limit))]
    statuses = [status] if isinstance(status, str) else list(status or ())
    params.extend(("status", s) for s in statuses)
    for key, value in (
        ("name", name),
        ("version", version),
        ("created_after", created_after),
        ("created_before", created_before),
        ("ended_after", ended_after),
        ("ended_before", ended_before),
        ("cursor", cursor),
    ):
        if value is not None:
            params.append((key, value if isinstance(value, str) else repr(float(value))))
    try:
        response = await http.get("/v1/workflows", params=tuple(params))
    except httpx.HTTPError as exc:
        raise Unavailable(f"cannot list workflows: {exc}") from exc
    if response.status_code == 400:
        raise ValidationError(f"workflow listing refused: {response.text[:500]}")
    if response.status_code >= 500:
        raise Unavailable(f"workflow listing failed: HTTP {response.status_code}")
    if response.status_code != 200:
        raise TetherError(f"workflow listing refused: HTTP {response.status_code}")
    try:
        return msgspec.json.decode(response.content, type=WorkflowPage)
    except msgspec.DecodeError as exc:
        raise Unavailable(f"workflow listing answered garbage: {exc}") from exc
