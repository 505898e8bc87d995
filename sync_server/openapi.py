"""The OpenAPI 3.1 document of the HTTP API, served at ``GET /openapi.json``.

Request and response bodies are generated from the protocol's msgspec Structs (the wire
truth: ``protocol.http`` holds the HTTP bodies), so the document cannot drift from what
the decoders accept and the routes send; paths, parameters, statuses and security are
written here by hand, one entry per route of ``sync_server.http_api``. The WebSocket
``/v1/sync`` is described in the document's description only (OpenAPI has no
vocabulary for it).

Every error answer is ``{"error": {"code", "message", "retryable"}}`` with the status of
``protocol.ERROR_TABLE``; a ``429`` carries ``Retry-After``.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from protocol import (
    MAX_EVENTS_PAGE,
    PROTOCOL_VERSION,
    ReportStateArgs,
    WorkflowSnapshot,
    WorkflowStatus,
)
from protocol.http import (
    DlqList,
    ErrorBody,
    Health,
    Overview,
    PullResponse,
    PushRequest,
    PushResponse,
    Ready,
    SloList,
    UpgradeRequest,
    WorkflowPage,
)
from sync_server.flags.http import openapi_paths as flag_paths
from sync_server.flags.http import openapi_schemas as flag_schemas

__all__ = ["build_document", "openapi_json"]

_MAX_SEQ = 2**63 - 1
_MAX_LIST = 10_000


_DESCRIPTION = f"""\
Tether's HTTP API: the push/pull fallback of the sync protocol, workflow reads and
commands, source state reports, the dead-letter queue and health.

Authenticate with `Authorization: Bearer <JWT>` (HS256; claims `tenant`, `sub`, `role`
in `client` | `source` | `admin`, `exp`). Data is scoped to the token's tenant: another
tenant's workflow answers 404 exactly like a missing one.

The primary transport is the WebSocket `GET /v1/sync` (binary msgpack frames, protocol
version {PROTOCOL_VERSION}; close codes 4400 bad message, 4401 unauthorized, 4403
forbidden, 4409 protocol version, 4413 too large, 4429 rate limited, 1013 try again
later). It is not described here.
"""


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_content(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


_ERRORS = {
    400: "Bad request: undecodable body or invalid parameter.",
    401: "Missing, malformed, wrongly signed or expired token.",
    403: "The token's role may not do this.",
    404: "No such object for this tenant.",
    409: "Conflicts with the object's state.",
    413: "Body over the size limit.",
    422: "Well-formed but unacceptable arguments.",
    429: "Rate limited; retry after the `Retry-After` seconds.",
    503: "Unavailable (storage down or draining); retry later.",
}


def _responses(ok: int, body: str, *errors: int) -> dict[str, Any]:
    responses: dict[str, Any] = {
        str(ok): {"description": "Success.", "content": _json_content(body)}
    }
    for status in errors:
        entry: dict[str, Any] = {
            "description": _ERRORS[status],
            "content": _json_content("ErrorBody"),
        }
        if status == 429:
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                }
            }
        responses[str(status)] = entry
    return responses


def _int_query(name: str, low: int, high: int, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "integer", "minimum": low, "maximum": high},
    }


def _text_query(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "string", "minLength": 1, "maxLength": 128},
    }


_WORKFLOW_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "The workflow id (a UUID).",
    "schema": {"type": "string", "minLength": 1},
}

_TENANT_HINT = {
    "name": "tenant",
    "in": "query",
    "required": False,
    "description": (
        "For a global admin: the workflow's tenant (ids are per tenant; needed when "
        "several tenants hold the id). Ignored for a tenant's own token."
    ),
    "schema": {"type": "string", "minLength": 1, "maxLength": 128},
}

_AUTH = (401,)


def _paths() -> dict[str, Any]:
    public: list[dict[str, Any]] = []
    return {
        "/v1/push": {
            "post": {
                "operationId": "push",
                "summary": "Apply a batch of mutations exactly once (role client).",
                "requestBody": {"required": True, "content": _json_content("PushRequest")},
                "responses": _responses(200, "PushResponse", 400, *_AUTH, 403, 413, 422, 429, 503),
            }
        },
        "/v1/pull": {
            "get": {
                "operationId": "pull",
                "summary": "Read the tenant's events after a cursor.",
                "parameters": [
                    _int_query("cursor", 0, _MAX_SEQ, "Read events with seq above this."),
                    _int_query("limit", 1, MAX_EVENTS_PAGE, "Most events in the page."),
                ],
                "responses": _responses(200, "PullResponse", 400, *_AUTH, 503),
            }
        },
        "/v1/workflows": {
            "get": {
                "operationId": "listWorkflows",
                "summary": "List the tenant's workflows, newest first, filtered and paged.",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "required": False,
                        "style": "form",
                        "explode": True,
                        "schema": {
                            "type": "array",
                            "items": {
                                "type": "string",
                                "enum": [status.value for status in WorkflowStatus],
                            },
                        },
                    },
                    _text_query("name", "Only workflows of this definition name."),
                    _text_query("version", "Only workflows of this definition version."),
                    _text_query("created_after", "Created at or after: unix seconds or ISO 8601."),
                    _text_query("created_before", "Created before: unix seconds or ISO 8601."),
                    _text_query("ended_after", "Ended (terminal) at or after this time."),
                    _text_query("ended_before", "Ended (terminal) before this time."),
                    _text_query("cursor", "The next_cursor of the previous page."),
                    _int_query("limit", 1, _MAX_LIST, "Most workflows listed."),
                ],
                "responses": _responses(200, "WorkflowPage", 400, *_AUTH, 503),
            }
        },
        "/v1/workflows/{id}": {
            "get": {
                "operationId": "getWorkflow",
                "summary": "The canonical state of one workflow.",
                "parameters": [_WORKFLOW_ID, _TENANT_HINT],
                "responses": _responses(200, "WorkflowSnapshot", 400, *_AUTH, 404, 503),
            }
        },
        "/v1/workflows/{id}/cancel": {
            "post": {
                "operationId": "cancelWorkflow",
                "summary": "Cancel a workflow, compensating its completed steps (role client).",
                "parameters": [_WORKFLOW_ID, _TENANT_HINT],
                "responses": _responses(202, "WorkflowSnapshot", 400, *_AUTH, 403, 404, 409, 503),
            }
        },
        "/v1/workflows/{id}/retry": {
            "post": {
                "operationId": "retryWorkflow",
                "summary": "Re-run only the failed or parked steps (role client).",
                "parameters": [_WORKFLOW_ID, _TENANT_HINT],
                "responses": _responses(202, "WorkflowSnapshot", 400, *_AUTH, 403, 404, 409, 503),
            }
        },
        "/v1/workflows/{id}/upgrade": {
            "post": {
                "operationId": "upgradeWorkflow",
                "summary": "Move a workflow to another version of its definition (role admin).",
                "parameters": [_WORKFLOW_ID],
                "requestBody": {"required": True, "content": _json_content("UpgradeRequest")},
                "responses": _responses(
                    202, "WorkflowSnapshot", 400, *_AUTH, 403, 404, 409, 413, 422, 503
                ),
            }
        },
        "/v1/reports": {
            "post": {
                "operationId": "report",
                "summary": "A source's state report (role source or admin).",
                "parameters": [_TENANT_HINT],
                "requestBody": {"required": True, "content": _json_content("ReportStateArgs")},
                "responses": _responses(
                    202, "WorkflowSnapshot", 400, *_AUTH, 403, 404, 409, 413, 422, 503
                ),
            }
        },
        "/v1/dlq": {
            "get": {
                "operationId": "listDlq",
                "summary": "Dead letters of the tenant (role admin).",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "string",
                            "enum": ["open", "requeued", "resolved", "all"],
                            "default": "open",
                        },
                    }
                ],
                "responses": _responses(200, "DlqList", 400, *_AUTH, 403, 503),
            }
        },
        "/v1/dlq/{id}/requeue": {
            "post": {
                "operationId": "requeueDlq",
                "summary": "Re-run the dead-lettered work (role admin).",
                "parameters": [
                    {
                        "name": "id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1},
                    }
                ],
                "responses": _responses(202, "WorkflowSnapshot", *_AUTH, 403, 404, 409, 503),
            }
        },
        "/v1/slo": {
            "get": {
                "operationId": "listSlos",
                "summary": "The SLOs with their error budgets (role admin; a tenant admin "
                "sees its own tenant).",
                "parameters": [
                    {
                        "name": name,
                        "in": "query",
                        "required": False,
                        "description": description,
                        "schema": {"type": "string", "maxLength": 128},
                    }
                    for name, description in (
                        ("window", "A duration such as 1h, 24h or 7d (default 24h)."),
                        ("tenant", "One tenant (global admins only; default all)."),
                        ("workflow", "One workflow name (default all)."),
                    )
                ],
                "responses": _responses(200, "SloList", 400, *_AUTH, 403, 503),
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Liveness.",
                "security": public,
                "responses": _responses(200, "Health"),
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Readiness: the store answers and the instance is not draining.",
                "security": public,
                "responses": _responses(200, "Ready", 503),
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics.",
                "security": public,
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/v1/admin/overview": {
            "get": {
                "operationId": "adminOverview",
                "summary": "What the dashboard shows: counts, workflows, DLQ, breakers, "
                "metrics, alerts (role admin).",
                "parameters": [_int_query("limit", 1, 500, "Most workflows listed.")],
                "responses": {
                    "200": {
                        "description": "The overview.",
                        "content": _json_content("Overview"),
                    },
                    **{
                        str(status): {
                            "description": _ERRORS[status],
                            "content": _json_content("ErrorBody"),
                        }
                        for status in (400, *_AUTH, 403, 503)
                    },
                },
            }
        },
        "/dashboard": {
            "get": {
                "operationId": "dashboard",
                "summary": "The operator dashboard (HTML; its data calls carry an admin token).",
                "security": public,
                "parameters": [
                    {
                        "name": "token",
                        "in": "query",
                        "required": False,
                        "description": "An admin token, checked once and kept by the page.",
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    "401": {
                        "description": "The token was refused; the page shows the sign-in form.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                },
            }
        },
        "/dashboard/static/{name}": {
            "get": {
                "operationId": "dashboardStatic",
                "summary": "The dashboard's script and stylesheet.",
                "security": public,
                "parameters": [
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The file.",
                        "content": {
                            "text/javascript": {"schema": {"type": "string"}},
                            "text/css": {"schema": {"type": "string"}},
                        },
                    },
                    "404": {
                        "description": "No such file.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "security": public,
                "responses": {
                    "200": {
                        "description": "The OpenAPI document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }


def build_document() -> dict[str, Any]:
    """Build the OpenAPI 3.1 document (schemas generated from the protocol Structs).

    Returns:
        The document as plain JSON-ready data.
    """
    _, components = msgspec.json.schema_components(
        [
            PushRequest,
            PushResponse,
            PullResponse,
            WorkflowSnapshot,
            WorkflowPage,
            ReportStateArgs,
            UpgradeRequest,
            DlqList,
            SloList,
            Overview,
            ErrorBody,
            Health,
            Ready,
            *flag_schemas(),
        ],
        ref_template="#/components/schemas/{name}",
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tether sync server",
            "version": str(PROTOCOL_VERSION),
            "description": _DESCRIPTION,
        },
        "paths": {**_paths(), **flag_paths(_responses)},
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
        "security": [{"bearer": []}],
    }


_document: bytes | None = None


async def openapi_json(request: Request) -> Response:
    """``GET /openapi.json``: the OpenAPI document (no auth; it holds no data)."""
    global _document
    if _document is None:
        _document = msgspec.json.encode(build_document())
    return Response(_document, media_type="application/json")
