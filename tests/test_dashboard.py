"""The dashboard in a real headless browser: Debian's chromium driven by Playwright.

The test loads ``/dashboard?token=…`` (the token then leaves the address bar), sees a
workflow's progress move, clicks *Requeue* on a parked workflow's dead letter and sees
that workflow complete — all without reloading the page. It saves
``test-artifacts/dashboard.png`` (before the click) and ``dashboard-after.png``.

No browser is downloaded: the test uses ``/usr/bin/chromium`` (``apt-get install
chromium``). Without it the test skips locally but fails under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from sync_server import create_app
from sync_server.auth import GLOBAL_TENANT, issue_token
from sync_server.saga import PermanentError, RetryPolicy, Step, StepContext, Workflow
from tests.conftest import scaled, wait_for
from tests.servers import SECRET, running
from tests.sync_helpers import token

pytestmark = pytest.mark.timeout(90)

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

UNLOCKED: set[str] = set()
RELEASE: dict[str, asyncio.Event] = {}


async def _reserve(ctx: StepContext) -> dict[str, Any]:
    return {"credits": 2}


async def _render(ctx: StepContext) -> dict[str, Any]:
    """Reports progress in steps and holds at 60 % until the test releases it."""
    release = RELEASE.setdefault(ctx.workflow_id, asyncio.Event())
    for tenth in range(1, 7):
        await ctx.progress(tenth / 10, "rendering")
        await asyncio.sleep(0.15)
    await release.wait()
    await ctx.progress(1.0, "rendered")
    return {"image": "cat.png"}


async def _flaky(ctx: StepContext) -> dict[str, Any]:
    if ctx.attempt == 1:
        raise RuntimeError("render service hiccup")
    return {"image": "dog.png"}


async def _gate(ctx: StepContext) -> dict[str, Any]:
    if ctx.workflow_id not in UNLOCKED:
        raise PermanentError("render refused: content filter needs a human")
    return {"image": "approved.png"}


FAST = RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0, jitter=False)
WORKFLOWS = [
    Workflow(
        "generate_image",
        [
            Step("reserve_credits", _reserve),
            Step("render", _render, depends_on=["reserve_credits"]),
        ],
    ),
    Workflow(
        "generate_image_retry",
        [
            Step("reserve_credits", _reserve),
            Step(
                "render",
                _flaky,
                depends_on=["reserve_credits"],
                retry=FAST,
                breaker="render-service",
            ),
        ],
    ),
    Workflow(
        "generate_image_hq",
        [Step("reserve_credits", _reserve), Step("render", _gate, depends_on=["reserve_credits"])],
        on_failure="park",
    ),
]


def _browser_or_skip() -> Any:
    """The Playwright module, or skip (fail under CI) when it or chromium is missing."""
    missing = None
    try:
        from playwright import async_api
    except ImportError:
        missing = "the playwright package is not installed (pip install playwright)"
    if missing is None and not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"browser test cannot run in CI: {missing}")
        pytest.skip(missing)
    return async_api


async def _push(http: httpx.AsyncClient, items: list[tuple[str, str]]) -> None:
    mutations = [
        {
            "id": n,
            "name": "submit_workflow",
            "args": {"workflow_id": wid, "name": name, "input": {"prompt": f"picture {n}"}},
        }
        for n, (wid, name) in enumerate(items, start=1)
    ]
    response = await http.post(
        "/v1/push",
        json={"client_id": "dash-test", "mutations": mutations},
        headers={"Authorization": f"Bearer {token('acme', 'mini-app')}"},
    )
    assert response.status_code == 200, response.text


async def test_dashboard_progress_and_requeue(tmp_path: Path) -> None:
    async_api = _browser_or_skip()
    ARTIFACTS.mkdir(exist_ok=True)
    app = create_app(f"sqlite:///{tmp_path / 'sync.db'}", workflows=WORKFLOWS, auth_secret=SECRET)
    app.state.tether.monitor_interval = 0.2
    app.state.tether.runner_options = {"poll_interval": 0.1, "progress_interval": 0.1}
    admin = issue_token(SECRET, tenant=GLOBAL_TENANT, subject="ops", role="admin")
    slow, retried, parked = (str(uuid.uuid4()) for _ in range(3))
    async with running(app) as srv, httpx.AsyncClient(base_url=srv.http_url) as http:
        await _push(
            http,
            [
                (retried, "generate_image_retry"),
                (parked, "generate_image_hq"),
                (slow, "generate_image"),
            ],
        )
        async with async_api.async_playwright() as pw:
            context = await pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"),
                executable_path=CHROMIUM,
                headless=True,
                args=FLAGS,
                viewport={"width": 1280, "height": 860},
            )
            try:
                page = context.pages[0] if context.pages else await context.new_page()
                page.set_default_timeout(scaled(20) * 1000)
                await page.goto(f"{srv.http_url}/dashboard?token={admin}")
                # The token leaves the address bar (and never reaches a Referer).
                await page.wait_for_function("!location.search.includes('token')")
                assert "token=" not in page.url

                # A workflow's progress moves while we watch.
                slow_row = page.locator(f'tr[data-workflow="{slow}"]')
                await slow_row.wait_for()
                bar = slow_row.locator('td:nth-child(3) [role="progressbar"]')
                await page.wait_for_function(
                    """(id) => {
                        const bar = document.querySelector(
                            `tr[data-workflow="${id}"] td:nth-child(3) [role=progressbar]`);
                        const v = bar ? Number(bar.getAttribute('aria-valuenow')) : 0;
                        return v >= 60 && v < 100;
                    }""",
                    arg=slow,
                )
                assert await slow_row.get_attribute("data-status") == "running"
                assert int(await bar.get_attribute("aria-valuenow") or 0) >= 60

                # The parked workflow's dead letter has a requeue button.
                entry_row = page.locator(f'#dlq tr[data-workflow="{parked}"]')
                await entry_row.wait_for()
                await page.locator(f'tr[data-workflow="{parked}"][data-status="parked"]').wait_for()
                await page.locator('#breakers tr[data-breaker="render-service"]').wait_for()
                await page.locator('#slos tr[data-slo="completion_24h"]').wait_for()
                assert "≥ 99.90 %" in await page.locator("#slos").inner_text()
                await page.locator(
                    f'tr[data-workflow="{retried}"][data-status="completed"]'
                ).wait_for()
                await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

                # The operator fixes the cause and requeues: it completes, live.
                UNLOCKED.add(parked)
                await entry_row.locator("button.requeue").click()
                await page.locator(
                    f'#workflows tr[data-workflow="{parked}"][data-status="completed"]'
                ).wait_for()
                await entry_row.wait_for(state="detached")
                assert "Requeued dead letter" in (await page.locator("#dlq-message").inner_text())

                RELEASE.setdefault(slow, asyncio.Event()).set()
                await page.locator(
                    f'#workflows tr[data-workflow="{slow}"][data-status="completed"]'
                ).wait_for()
                await page.screenshot(path=str(ARTIFACTS / "dashboard-after.png"), full_page=True)
            finally:
                await context.close()
        record = await app.state.tether.store.get_workflow("acme", parked)
        assert record is not None and record.status == "completed"


async def test_dashboard_refuses_a_bad_token_and_overview_needs_admin(tmp_path: Path) -> None:
    app = create_app(f"sqlite:///{tmp_path / 'sync.db'}", workflows=WORKFLOWS, auth_secret=SECRET)
    async with running(app) as srv, httpx.AsyncClient(base_url=srv.http_url) as http:
        page = await http.get("/dashboard")
        assert page.status_code == 200
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert 'id="login-form"' in page.text
        refused = await http.get("/dashboard", params={"token": "not-a-token"})
        assert refused.status_code == 401
        assert "That token was refused" in refused.text
        client_token = token("acme", "app")
        refused = await http.get("/dashboard", params={"token": client_token})
        assert refused.status_code == 401
        assert (await http.get("/v1/admin/overview")).status_code == 401
        forbidden = await http.get(
            "/v1/admin/overview", headers={"Authorization": f"Bearer {client_token}"}
        )
        assert forbidden.status_code == 403
        for name in ("dashboard.js", "dashboard.css"):
            assert (await http.get(f"/dashboard/static/{name}")).status_code == 200
        assert (await http.get("/dashboard/static/..%2Fapp.py")).status_code == 404
        # A tenant admin sees its tenant only.
        await _push(http, [(str(uuid.uuid4()), "generate_image_retry")])
        other = issue_token(SECRET, tenant="other", subject="ops", role="admin")
        mine = issue_token(SECRET, tenant="acme", subject="ops", role="admin")

        async def seen(bearer: str) -> int:
            answer = await http.get(
                "/v1/admin/overview", headers={"Authorization": f"Bearer {bearer}"}
            )
            assert answer.status_code == 200
            return int(answer.json()["total"])

        await wait_for(lambda: seen(mine), 10)
        assert await seen(other) == 0
        # The SLO panel's data: objective, value and budget left of every SLO, per scope.
        answer = await http.get("/v1/admin/overview", headers={"Authorization": f"Bearer {other}"})
        slos = answer.json()["slos"]
        assert [s["name"] for s in slos][:2] == ["completion_24h", "mttr"] and len(slos) == 6
        assert all(s["tenant"] == "other" and s["budget_left"] == 1.0 for s in slos)


async def _leak(ctx: StepContext) -> dict[str, Any]:
    raise PermanentError(f"render refused prompt {ctx.input['prompt']!r}")


async def test_tenant_admin_overview_shows_only_its_tenant(tmp_path: Path) -> None:
    """Issue 11 finding 4: a tenant admin's overview listed every tenant's alerts (with
    step error text quoting the other tenant's input), the instance-wide log head and
    DLQ growth counts. Now it holds its own tenant's figures only."""
    leaky = Workflow("leaky", [Step("render", _leak)], on_failure="park")
    app = create_app(
        f"sqlite:///{tmp_path / 'sync.db'}",
        workflows=[leaky],
        auth_secret=SECRET,
    )
    app.state.tether.monitor_interval = 0.05
    async with running(app) as srv, httpx.AsyncClient(base_url=srv.http_url) as http:
        for tenant, prompt in (("globex", "globex-own-prompt"), ("acme", "acme-secret-prompt")):
            body = {
                "client_id": f"{tenant}-app",
                "mutations": [
                    {
                        "id": 1,
                        "name": "submit_workflow",
                        "args": {
                            "workflow_id": str(uuid.uuid4()),
                            "name": "leaky",
                            "input": {"prompt": prompt},
                        },
                    }
                ],
            }
            r = await http.post("/v1/push", json=body, headers=_auth(token(tenant, "app")))
            assert r.status_code == 200, r.text

        async def overview(bearer: str) -> dict[str, Any]:
            answer = await http.get("/v1/admin/overview", headers=_auth(bearer))
            assert answer.status_code == 200, answer.text
            body: dict[str, Any] = answer.json()
            return body

        root = issue_token(SECRET, tenant=GLOBAL_TENANT, subject="ops", role="admin")
        globex = issue_token(SECRET, tenant="globex", subject="ops", role="admin")

        async def both_alerted() -> bool:
            kinds = [a["kind"] for a in (await overview(root))["alerts"]]
            return kinds.count("step_failed") == 2 and "dlq_growing" in kinds

        await wait_for(both_alerted, 20, 0.05)
        everything = await overview(root)
        mine = await overview(globex)
        text = str(mine)
        assert "acme-secret-prompt" not in text and "globex-own-prompt" in text
        assert [a["kind"] for a in mine["alerts"]] == ["step_failed"]
        assert [e["tenant"] for e in mine["dlq"]] == ["globex"]
        # The log head is globex's own; the instance's is larger (acme's events too).
        assert 0 < mine["head"] < everything["head"]
        assert mine["metrics"] == {"dlq_depth": 1, "alerts": 1}
        assert "connected_clients" in everything["metrics"]
        assert all(set(b) == {"name", "state"} for b in mine["breakers"])


def _auth(bearer: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {bearer}"}
