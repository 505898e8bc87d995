"""A mini-app backend embedding the Tether SDK (SPEC: the first user).

Routes:

* ``POST /start-generation`` — body ``{"prompt": ...}``; queues a ``generate_image``
  workflow in the SDK's durable queue and answers ``202`` at once with the optimistic
  view, even while the sync server is down (the SDK pushes it when it comes back);
* ``GET /generations/{id}`` — the local view (confirmed state + pending overlay);
* ``WS /generations/{id}/live`` — relays every view change (status, step progress) to
  the browser as JSON, until the workflow ends.

Run it (a sync server on :8700, a client token in ``TETHER_TOKEN``)::

    TETHER_TOKEN=$(sync-server token --tenant demo --subject mini-app) \\
        uvicorn examples.mini_app_backend:app --port 8000
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from client_sdk import SyncClient, ValidationError, WorkflowView

__all__ = ["create_mini_app", "view_json"]


def view_json(view: WorkflowView) -> dict[str, Any]:
    """A view as JSON-ready data for the browser."""
    return dataclasses.asdict(view)


def create_mini_app(
    sync_url: str,
    *,
    token: str,
    path: str,
    workflow: str = "generate_image",
    **client_options: Any,
) -> Starlette:
    """Build the backend.

    Args:
        sync_url: the sync server (``ws://host:port``).
        token: a client token of the app's tenant.
        path: the SDK's SQLite file.
        workflow: the workflow each generation starts.
        **client_options: more ``SyncClient`` options.

    Returns:
        The Starlette app; the SDK starts and stops with its lifespan.
    """
    client = SyncClient(sync_url, token=token, path=path, **client_options)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with client:
            yield

    async def start_generation(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "body must be JSON"}, status_code=400)
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            return JSONResponse({"error": "prompt is required"}, status_code=400)
        try:
            handle = await client.submit_workflow(
                workflow, {"prompt": prompt}, workflow_id=body.get("id")
            )
        except ValidationError as exc:
            return JSONResponse({"error": exc.message}, status_code=400)
        view = client.get_workflow(handle.id)
        assert view is not None
        return JSONResponse(view_json(view), status_code=202)

    async def get_generation(request: Request) -> JSONResponse:
        view = client.get_workflow(request.path_params["id"])
        if view is None:
            return JSONResponse({"error": "no such generation"}, status_code=404)
        return JSONResponse(view_json(view))

    async def live(websocket: WebSocket) -> None:
        workflow_id = websocket.path_params["id"]
        await websocket.accept()
        if client.get_workflow(workflow_id) is None:
            await websocket.close(4404, "no such generation")
            return
        try:
            async for view in client.watch(workflow_id):
                await websocket.send_json(view_json(view))
        except WebSocketDisconnect:
            return
        await websocket.close(1000, "finished")

    app = Starlette(
        routes=[
            Route("/start-generation", start_generation, methods=["POST"]),
            Route("/generations/{id}", get_generation, methods=["GET"]),
            WebSocketRoute("/generations/{id}/live", live),
        ],
        lifespan=lifespan,
    )
    app.state.sync_client = client
    return app


def _from_env() -> Starlette | None:
    token = os.environ.get("TETHER_TOKEN")
    if not token:
        return None
    return create_mini_app(
        os.environ.get("TETHER_SYNC_URL", "ws://127.0.0.1:8700"),
        token=token,
        path=os.environ.get("TETHER_CLIENT_DB", "mini_app.db"),
    )


app = _from_env()
"""The app for ``uvicorn examples.mini_app_backend:app`` (needs ``TETHER_TOKEN``)."""
