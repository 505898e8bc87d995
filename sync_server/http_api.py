"""HTTP routes: the push/pull fallback, workflow reads and commands, reports, DLQ, health.

Every route authenticates with a bearer token and scopes reads to the token's tenant;
another tenant's workflow answers 404, exactly like a missing one. Errors are JSON
``{"error": {"code", "message", "retryable"}}`` with the status of ``ERROR_TABLE``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from protocol import (
    MAX_EVENTS_PAGE,
    BadMessage,
    MessageTooLarge,
    NotFound,
    PullResponse,
    PushRequest,
    PushResponse,
    RateLimited,
    ReportStateArgs,
    Role,
    StorageError,
    TetherError,
    Unavailable,
    UpgradeRequest,
    WorkflowStatus,
    decode_json,
    encode_json,
)
from protocol.codec import check_args, check_text
from protocol.http import DeadLetter, DlqList, ErrorBody, ErrorDetail, Health, Ready, WorkflowPage
from protocol.messages import MAX_NAME_LENGTH
from sync_server import listing
from sync_server.auth import Principal, bearer_token, verify_token
from sync_server.openapi import openapi_json
from sync_server.paging import json_bytes
from sync_server.session import ApplyPush, ReadEvents
from sync_server.snapshots import snapshot
from sync_server.sync_core import SessionCore

if TYPE_CHECKING:
    from sync_server.services import Services

__all__ = ["error_response", "routes"]


def error_response(exc: TetherError) -> Response:
    """The JSON answer for an error."""
    body = ErrorBody(ErrorDetail(code=exc.code, message=exc.message, retryable=exc.retryable))
    headers = {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = f"{max(1, round(exc.retry_after))}"
    return Response(
        encode_json(body),
        status_code=exc.http_status,
        media_type="application/json",
        headers=headers,
    )


def _json(value: msgspec.Struct, status: int = 200) -> Response:
    return Response(encode_json(value), status_code=status, media_type="application/json")


def _tether(request: Request) -> Services:
    tether: Services = request.app.state.tether
    return tether


def _principal(request: Request, *roles: Role) -> Principal:
    tether = _tether(request)
    principal = verify_token(
        tether.config.auth_secret, bearer_token(request.headers.get("authorization"))
    )
    if roles:
        principal.require(*roles)
    return principal


async def _body(request: Request) -> bytes:
    limit = _tether(request).config.max_frame_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise MessageTooLarge(f"body of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise MessageTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _workflow_id(request: Request) -> str:
    """The ``{id}`` of the path; one no store can hold (a NUL) is simply not found."""
    workflow_id: str = request.path_params["id"]
    if "\x00" in workflow_id:
        raise NotFound("no such workflow")
    return workflow_id


def _tenant_hint(request: Request) -> str | None:
    """``?tenant=``: which tenant's workflow a global admin means (others' is ignored)."""
    tenant = request.query_params.get("tenant")
    if tenant is not None and (not tenant or len(tenant) > 128 or "\x00" in tenant):
        raise BadMessage("query parameter tenant must be 1..128 characters without NUL")
    return tenant


MAX_ROW_ID = 2**63 - 1
"""Database row ids (dead letters) are positive 64-bit integers."""


def _row_id(request: Request, what: str) -> int:
    """The ``{id}`` of the path as a row id; anything else names nothing (404).

    Raises:
        NotFound: not a decimal integer within 1..2**63-1.
    """
    raw: str = request.path_params["id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or not 1 <= int(raw) <= MAX_ROW_ID:
        raise NotFound(f"no {what} {raw[:40]!r}")
    return int(raw)


_DLQ_STATUSES = frozenset({"open", "requeued", "resolved", "all"})


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    # int() would also take "1_000", " 7" and 4,300-digit strings; a plain decimal only.
    digits = raw[1:] if raw.startswith("-") else raw
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 20:
        raise BadMessage(f"query parameter {name} must be an integer within {low}..{high}")
    value = int(raw)
    if not low <= value <= high:
        raise BadMessage(f"query parameter {name} must be within {low}..{high}")
    return value


def _core(request: Request, principal: Principal) -> SessionCore:
    """The sync session core the WebSocket shell runs too, sizing pages as JSON."""
    return SessionCore(_tether(request), principal, size=json_bytes)


async def push(request: Request) -> Response:
    """``POST /v1/push``: body ``{client_id, mutations}`` → ``{results}``: one
    ``ApplyPush`` of the session core."""
    principal = _principal(request, Role.CLIENT)
    body = decode_json(await _body(request), PushRequest)
    results = await _core(request, principal).push(ApplyPush(body.client_id, body.mutations))
    return _json(PushResponse(results=results))


async def pull(request: Request) -> Response:
    """``GET /v1/pull?cursor=&limit=`` → ``{events, cursor, has_more}``: one
    ``ReadEvents`` of the session core (cut by count and bytes)."""
    principal = _principal(request)
    cursor = _int_param(request, "cursor", 0, 0, 2**63 - 1)
    limit = _int_param(request, "limit", 500, 1, MAX_EVENTS_PAGE)
    core = _core(request, principal)
    page, more = await core.read(ReadEvents(after=cursor, limit=limit))
    horizon = await core.horizon()
    return _json(
        PullResponse(
            events=page,
            cursor=page[-1].seq if page else cursor,
            has_more=more,
            horizon=horizon,
        )
    )


async def get_workflow(request: Request) -> Response:
    """``GET /v1/workflows/{id}`` → the workflow's snapshot."""
    principal = _principal(request)
    tether = _tether(request)
    workflow_id = _workflow_id(request)
    tenant = await tether.commands.tenant_of(principal, workflow_id, _tenant_hint(request))
    record = await tether.store.get_workflow(tenant, workflow_id)
    if record is None or not principal.sees(record.tenant):
        raise NotFound(f"no workflow {request.path_params['id']}")
    return _json(snapshot(record))


async def list_workflows(request: Request) -> Response:
    """``GET /v1/workflows?name=&status=&version=&created_after=&created_before=
    &ended_after=&ended_before=&cursor=&limit=`` → ``{"workflows": [snapshots],
    "next_cursor"}``, newest first, of the caller's tenant (see ``sync_server.listing``)."""
    principal = _principal(request)
    query = request.query_params
    statuses = query.getlist("status") or None
    if statuses:
        for status in statuses:
            if status not in WorkflowStatus.__members__.values():
                raise BadMessage(f"unknown status {status!r}")
    filters: dict[str, Any] = {}
    for key in ("name", "version"):
        value = query.get(key)
        if value is not None:
            if not value or len(value) > MAX_NAME_LENGTH or "\x00" in value:
                raise BadMessage(f"query parameter {key} must be 1..{MAX_NAME_LENGTH} characters")
            filters[key] = value
    for key in ("created_after", "created_before", "ended_after", "ended_before"):
        value = query.get(key)
        if value is not None:
            filters[key] = listing.parse_time(value, key)
    cursor = query.get("cursor")
    if cursor:
        filters["before"] = listing.decode_cursor(cursor)
    limit = _int_param(request, "limit", 1000, 1, 10_000)
    records = await _tether(request).store.list_workflows(
        tenant=principal.scope, statuses=statuses, limit=limit + 1, **filters
    )
    page = listing.fit_page(
        [snapshot(record) for record in records],
        [(record.created_at, record.id) for record in records],
        limit,
    )
    return _json(WorkflowPage(workflows=page["workflows"], next_cursor=page["next_cursor"]))


async def upgrade_workflow(request: Request) -> Response:
    """``POST /v1/workflows/{id}/upgrade`` (admin), body ``{"version": V}``: move the
    workflow to version V of its definition (rolling deploys)."""
    principal = _principal(request, Role.ADMIN)
    body = decode_json(await _body(request), UpgradeRequest)
    record = await _tether(request).commands.upgrade(
        principal, _workflow_id(request), body.version, _tenant_hint(request)
    )
    return _json(snapshot(record), 202)


async def cancel_workflow(request: Request) -> Response:
    """``POST /v1/workflows/{id}/cancel``."""
    principal = _principal(request, Role.CLIENT, Role.ADMIN)
    record = await _tether(request).commands.cancel(
        principal, _workflow_id(request), _tenant_hint(request)
    )
    return _json(snapshot(record), 202)


async def retry_workflow(request: Request) -> Response:
    """``POST /v1/workflows/{id}/retry``: re-run only the failed or parked steps."""
    principal = _principal(request, Role.CLIENT, Role.ADMIN)
    record = await _tether(request).commands.retry(
        principal, _workflow_id(request), _tenant_hint(request)
    )
    return _json(snapshot(record), 202)


async def report(request: Request) -> Response:
    """``POST /v1/reports``: a source's state report (role ``source`` or ``admin``)."""
    principal = _principal(request, Role.SOURCE, Role.ADMIN)
    args = decode_json(await _body(request), ReportStateArgs)
    check_text(args.detail, "detail")
    check_args(args)  # the detail's byte cap, and no NaN/±inf (issue 11)
    record = await _tether(request).commands.report(principal, args, _tenant_hint(request))
    return _json(snapshot(record), 202)


async def list_dlq(request: Request) -> Response:
    """``GET /v1/dlq?status=open`` (admin)."""
    principal = _principal(request, Role.ADMIN)
    status = request.query_params.get("status", "open")
    if status not in _DLQ_STATUSES:
        raise BadMessage(f"status must be one of {', '.join(sorted(_DLQ_STATUSES))}")
    entries = await _tether(request).store.list_dlq(
        tenant=principal.scope,
        status=None if status == "all" else status,
    )
    return _json(DlqList(entries=msgspec.convert(entries, list[DeadLetter], from_attributes=True)))


async def requeue_dlq(request: Request) -> Response:
    """``POST /v1/dlq/{id}/requeue`` (admin): re-run the dead-lettered work."""
    principal = _principal(request, Role.ADMIN)
    entry_id = _row_id(request, "dead letter")
    record = await _tether(request).commands.requeue(principal, entry_id)
    return _json(snapshot(record), 202)


async def healthz(request: Request) -> Response:
    """Liveness: the process answers."""
    return _json(Health(status="ok"))


async def readyz(request: Request) -> Response:
    """Readiness: the store answers and the instance is not draining."""
    tether = _tether(request)
    if tether.draining:
        return error_response(Unavailable("draining"))
    try:
        await tether.store.head()
    except StorageError as exc:
        return error_response(Unavailable(f"storage unavailable: {exc.message}"))
    # No log position here: /readyz is unauthenticated and must not reveal activity.
    return _json(Ready(status="ready", server_id=tether.config.server_id))


routes = [
    Route("/v1/push", push, methods=["POST"]),
    Route("/v1/pull", pull, methods=["GET"]),
    Route("/v1/workflows", list_workflows, methods=["GET"]),
    Route("/v1/workflows/{id}", get_workflow, methods=["GET"]),
    Route("/v1/workflows/{id}/cancel", cancel_workflow, methods=["POST"]),
    Route("/v1/workflows/{id}/retry", retry_workflow, methods=["POST"]),
    Route("/v1/workflows/{id}/upgrade", upgrade_workflow, methods=["POST"]),
    Route("/v1/reports", report, methods=["POST"]),
    Route("/v1/dlq", list_dlq, methods=["GET"]),
    Route("/v1/dlq/{id}/requeue", requeue_dlq, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
]
