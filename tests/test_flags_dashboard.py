"""The dashboard's flags card in a real headless browser: a switch per boolean flag,
changes need the admin role and land in the audit trail."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from sync_server import create_app
from tests.conftest import scaled
from tests.servers import SECRET, running
from tests.sync_helpers import NOOP, token
from tests.test_dashboard import ARTIFACTS, CHROMIUM, FLAGS, _browser_or_skip

pytestmark = pytest.mark.timeout(90)


async def test_flag_switch_in_the_dashboard(tmp_path: Path) -> None:
    async_api = _browser_or_skip()
    ARTIFACTS.mkdir(exist_ok=True)
    app = create_app(f"sqlite:///{tmp_path / 'sync.db'}", workflows=[NOOP], auth_secret=SECRET)
    ops = token("*", "ops", "admin")
    acme = token("acme", "alice", "admin")
    headers = {"Authorization": f"Bearer {ops}"}
    async with running(app) as srv, httpx.AsyncClient(base_url=srv.http_url) as http:
        for name, value in [("tether.accept.noop", True), ("tether.route.noop", 25)]:
            r = await http.put(f"/v1/flags/{name}", json={"value": value}, headers=headers)
            assert r.status_code == 200
        async with async_api.async_playwright() as pw:
            context = await pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS
            )
            try:
                page = context.pages[0] if context.pages else await context.new_page()
                page.set_default_timeout(scaled(20) * 1000)
                await page.goto(f"{srv.http_url}/dashboard?token={ops}")
                switch = page.locator('tr[data-flag="tether.accept.noop"] input.flag-switch')
                await switch.wait_for()
                assert await switch.is_checked()
                route = page.locator('tr[data-flag="tether.route.noop"]')
                assert "25" in await route.inner_text()
                await switch.click()  # the kill switch, from the dashboard
                await page.wait_for_function(
                    "document.getElementById('flags-message').textContent.includes('now false')"
                )
                await page.screenshot(path=str(ARTIFACTS / "dashboard-flags.png"), full_page=True)
                # A tenant admin sees the global flag but cannot flip it.
                await page.goto(f"{srv.http_url}/dashboard?token={acme}")
                switch = page.locator('tr[data-flag="tether.accept.noop"] input.flag-switch')
                await switch.wait_for()
                assert await switch.is_disabled()
            finally:
                await context.close()
        history = (await http.get("/v1/flags/tether.accept.noop/history", headers=headers)).json()
        last = history["history"][-1]
        assert last["by"] == "*/ops" and last["before"]["default"] is True
        assert last["after"]["default"] is False
