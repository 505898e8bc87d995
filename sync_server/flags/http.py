"""HTTP admin routes of feature flags (``sync-server flags`` talks to these).

``?tenant=T`` picks the scope; without it a global admin acts on the flags of every
tenant (scope ``*``) and a tenant admin on its own tenant's. A tenant admin asking for
another tenant gets 403; bad input gets 400/422 and changes nothing.

* ``GET  /v1/flags`` → ``{"flags": [...]}``
* ``GET  /v1/flags/{name}`` → the flag
* ``PUT  /v1/flags/{name}`` body ``{"value": V, "rules": [...]?}`` → ``{"before", "after"}``
* ``POST /v1/flags/{name}/rollout`` body ``{"percentage": P}`` → ``{"before", "after"}``
* ``GET  /v1/flags/{name}/history`` → ``{"history": [...]}`` (audit trail, oldest first)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from protocol import BadMessage, NotFound, Role, encode_json
from protocol.flags import MAX_FLAG_BYTES, MAX_FLAG_NAME, FlagDef, FlagRule
from sync_server.auth import Principal, bearer_token, verify_token
from sync_server.flags.service import FlagChange

if TYPE_CHECKING:
    from sync_server.flags.service import FlagService
    from sync_server.services import Services

__all__ = ["openapi_paths", "openapi_schemas", "routes"]


class SetBody(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``PUT /v1/flags/{name}``."""

    value: Any
    rules: list[FlagRule] | None = None


class RolloutBody(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /v1/flags/{name}/rollout``."""

    percentage: float


class FlagView(msgspec.Struct, frozen=True):
    """One stored flag (``GET /v1/flags``, ``GET /v1/flags/{name}``)."""

    scope: str
    name: str
    default: Any
    rules: list[FlagRule]
    version: int
    updated_at: float
    updated_by: str
    overridden: bool = False


class FlagList(msgspec.Struct, frozen=True):
    """Answer of ``GET /v1/flags``."""

    flags: list[FlagView]


class FlagChangeView(msgspec.Struct, frozen=True):
    """Answer of a change: the scope, who, when, and the definitions before and after."""

    scope: str
    by: str
    at: float
    before: FlagDef | None
    after: FlagDef


class FlagAudit(msgspec.Struct, frozen=True):
    """One ``flag.changed`` audit event."""

    seq: int
    version: int
    scope: str
    name: str
    by: str
    at: float
    before: FlagDef | None
    after: FlagDef


class FlagHistory(msgspec.Struct, frozen=True):
    """Answer of ``GET /v1/flags/{name}/history`` (oldest first)."""

    history: list[FlagAudit]


def openapi_schemas() -> list[type[msgspec.Struct]]:
    """The bodies of the flag routes, for ``sync_server.openapi``."""
    return [SetBody, RolloutBody, FlagList, FlagView, FlagChangeView, FlagHistory]


def openapi_paths(responses: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """The flag routes' entries of the OpenAPI document (``responses(ok, body, *errors)``
    builds a responses object as ``sync_server.openapi`` does)."""
    tenant = {
        "name": "tenant",
        "in": "query",
        "required": False,
        "description": "The tenant whose flags (default: every tenant's, or a tenant admin's own).",
        "schema": {"type": "string", "minLength": 1, "maxLength": 128},
    }
    name = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_FLAG_NAME},
    }

    def body(schema: str) -> dict[str, Any]:
        ref = {"$ref": f"#/components/schemas/{schema}"}
        return {"required": True, "content": {"application/json": {"schema": ref}}}

    return {
        "/v1/flags": {
            "get": {
                "operationId": "listFlags",
                "summary": "Flags of a scope (role admin).",
                "parameters": [tenant],
                "responses": responses(200, "FlagList", 400, 401, 403, 503),
            }
        },
        "/v1/flags/{name}": {
            "get": {
                "operationId": "showFlag",
                "summary": "One flag (role admin).",
                "parameters": [name, tenant],
                "responses": responses(200, "FlagView", 400, 401, 403, 404, 503),
            },
            "put": {
                "operationId": "setFlag",
                "summary": "Set a flag's value (and rules) for its scope; audited (role admin).",
                "parameters": [name, tenant],
                "requestBody": body("SetBody"),
                "responses": responses(200, "FlagChangeView", 400, 401, 403, 404, 422, 503),
            },
        },
        "/v1/flags/{name}/rollout": {
            "post": {
                "operationId": "rolloutFlag",
                "summary": "Roll a flag out to a percentage of targeting keys; audited "
                "(role admin).",
                "parameters": [name, tenant],
                "requestBody": body("RolloutBody"),
                "responses": responses(200, "FlagChangeView", 400, 401, 403, 404, 422, 503),
            }
        },
        "/v1/flags/{name}/history": {
            "get": {
                "operationId": "flagHistory",
                "summary": "The audit trail of a flag (role admin).",
                "parameters": [name, tenant],
                "responses": responses(200, "FlagHistory", 400, 401, 403, 404, 503),
            }
        },
    }


def _service(request: Request) -> tuple[FlagService, Principal]:
    tether: Services = request.app.state.tether
    principal = verify_token(
        tether.config.auth_secret, bearer_token(request.headers.get("authorization"))
    )
    principal.require(Role.ADMIN)
    return tether.flags, principal


def _tenant(request: Request) -> str | None:
    tenant = request.query_params.get("tenant")
    if tenant is not None and (not tenant or "\x00" in tenant or len(tenant) > 128):
        raise BadMessage("query parameter tenant must be 1..128 characters without NUL")
    return tenant


def _name(request: Request) -> str:
    name: str = request.path_params["name"]
    if not name or len(name) > MAX_FLAG_NAME or "\x00" in name or name != name.strip():
        raise NotFound(f"no flag {name[:MAX_FLAG_NAME]!r}")
    return name


async def _decode(request: Request, kind: type[msgspec.Struct]) -> Any:
    body = await request.body()
    if len(body) > 2 * MAX_FLAG_BYTES:
        raise BadMessage(f"body exceeds {2 * MAX_FLAG_BYTES} bytes")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.DecodeError as exc:
        raise BadMessage(f"invalid body: {exc}") from exc


def _json(value: Any) -> Response:
    return Response(encode_json(value), media_type="application/json")


def _change(change: FlagChange) -> Response:
    return _json(
        {
            "scope": change.scope,
            "by": change.by,
            "at": change.at,
            "before": msgspec.to_builtins(change.before),
            "after": msgspec.to_builtins(change.after),
        }
    )


async def list_flags(request: Request) -> Response:
    """``GET /v1/flags?tenant=``."""
    flags, principal = _service(request)
    return _json({"flags": await flags.list_flags(principal, _tenant(request))})


async def show_flag(request: Request) -> Response:
    """``GET /v1/flags/{name}?tenant=``."""
    flags, principal = _service(request)
    return _json(await flags.show(principal, _tenant(request), _name(request)))


async def flag_history(request: Request) -> Response:
    """``GET /v1/flags/{name}/history?tenant=``."""
    flags, principal = _service(request)
    return _json({"history": await flags.history(principal, _tenant(request), _name(request))})


async def set_flag(request: Request) -> Response:
    """``PUT /v1/flags/{name}?tenant=`` body ``{"value", "rules"?}``."""
    flags, principal = _service(request)
    tenant, name = _tenant(request), _name(request)
    scope = flags.scope_for(principal, tenant)  # refuse before reading the body
    body: SetBody = await _decode(request, SetBody)
    return _change(await flags.set_value(principal, scope, name, body.value, body.rules))


async def rollout_flag(request: Request) -> Response:
    """``POST /v1/flags/{name}/rollout?tenant=`` body ``{"percentage"}``."""
    flags, principal = _service(request)
    tenant, name = _tenant(request), _name(request)
    scope = flags.scope_for(principal, tenant)
    body: RolloutBody = await _decode(request, RolloutBody)
    return _change(await flags.rollout(principal, scope, name, body.percentage))


routes = [
    Route("/v1/flags", list_flags, methods=["GET"]),
    Route("/v1/flags/{name}", show_flag, methods=["GET"]),
    Route("/v1/flags/{name}", set_flag, methods=["PUT"]),
    Route("/v1/flags/{name}/rollout", rollout_flag, methods=["POST"]),
    Route("/v1/flags/{name}/history", flag_history, methods=["GET"]),
]
