"""``sync-server slo`` and ``GET /v1/slo`` against a real server process: the JSON shape
of SPEC, tenant isolation, and clear errors that change nothing."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest

from sync_server.cli import main
from tests.servers import SECRET, server_process
from tests.sync_helpers import token
from tests.test_cli import _wait, one_error_line, run

pytestmark = pytest.mark.timeout(90)

NAMES = [
    "completion_24h",
    "mttr",
    "client_failure_share",
    "p95_completion",
    "retry_efficiency",
    "overhead",
]


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SYNC_AUTH_SECRET", SECRET)
    monkeypatch.delenv("SYNC_TOKEN", raising=False)
    monkeypatch.setenv("COLUMNS", "250")
    return SECRET


def _push(url: str, tenant: str, client_id: str, inputs: list[dict]) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in inputs]
    mutations = [
        {
            "id": i + 1,
            "name": "submit_workflow",
            "args": {"workflow_id": wid, "name": "gated", "input": data},
        }
        for i, (wid, data) in enumerate(zip(ids, inputs, strict=True))
    ]
    headers = {"Authorization": f"Bearer {token(tenant, client_id)}"}
    pushed = httpx.post(
        f"{url}/v1/push", json={"client_id": client_id, "mutations": mutations}, headers=headers
    )
    assert pushed.status_code == 200, pushed.text

    def ended() -> bool:
        views = [httpx.get(f"{url}/v1/workflows/{w}", headers=headers).json() for w in ids]
        return all(v["status"] in ("completed", "parked") for v in views)

    _wait(ended)
    return ids


def test_slo_command_and_route(capsys, secret: str, tmp_path: Path) -> None:
    locked = str(tmp_path / "never-created")
    with server_process(
        f"sqlite:///{tmp_path / 'sync.db'}", workflows="tests.cli_workflows:workflows"
    ) as (_, port):
        url = f"http://127.0.0.1:{port}"
        # acme's client: two complete, one parks (a failure it sees); beta's: one completes.
        _push(url, "acme", "app-a", [{}, {}, {"unlock": locked}])
        _push(url, "beta", "app-b", [{}])

        code, out, _ = run(capsys, "slo", "--json", "--url", url)
        assert code == 0
        slos = json.loads(out)
        assert [s["name"] for s in slos] == NAMES
        for s in slos:
            assert list(s) == ["name", "objective", "value", "budget_left", "window"]  # SPEC
            assert s["window"] == "24h"
        by_name = {s["name"]: s for s in slos}
        assert by_name["client_failure_share"]["value"] == 0.5  # app-a of two clients
        assert by_name["completion_24h"]["value"] == 1.0  # 3 of 3 decided (1 parked, young)
        admin = {"Authorization": f"Bearer {token('*', 'ops', 'admin')}"}
        answer = httpx.get(f"{url}/v1/slo", headers=admin).json()["slos"]
        assert [(s["tenant"], s["workflow"]) for s in answer] == [("*", "*")] * len(NAMES)
        assert {s["name"]: s["samples"] for s in answer}["completion_24h"] == 3
        assert by_name["client_failure_share"]["budget_left"] == pytest.approx(1 - 0.5 / 0.05)
        assert by_name["retry_efficiency"]["value"] == 0.0

        # A tenant admin sees its own tenant only, whatever it asks for.
        beta_admin = token("beta", "ops", "admin")
        code, out, _ = run(
            capsys, "slo", "--json", "--tenant", "acme", "--url", url, "--token", beta_admin
        )
        assert code == 0
        beta = {s["name"]: s for s in json.loads(out)}
        assert beta["client_failure_share"]["value"] == 0.0  # acme's is 0.5
        beta_headers = {"Authorization": f"Bearer {beta_admin}"}
        answer = httpx.get(f"{url}/v1/slo?tenant=acme", headers=beta_headers).json()["slos"]
        assert {s["tenant"] for s in answer} == {"beta"}
        assert {s["name"]: s["samples"] for s in answer}["completion_24h"] == 1

        # Per workflow name, and a window of one hour; the table for humans.
        code, out, _ = run(capsys, "slo", "--workflow", "gated", "--window", "1h", "--url", url)
        assert code == 0
        assert "SLOs over 1h" in out and "completion_24h" in out and "budget left" in out
        code, out, _ = run(capsys, "slo", "--json", "--workflow", "nothing", "--url", url)
        assert all(s["value"] is None and s["budget_left"] == 1.0 for s in json.loads(out))

        # Errors: one line; a client token is refused by the server.
        code, _, err = run(capsys, "slo", "--window", "soon", "--url", url)
        assert code != 0 and "--window" in one_error_line(err)
        client = token("acme", "app-a")
        code, _, err = run(capsys, "slo", "--url", url, "--token", client)
        assert code != 0 and "403" in one_error_line(err)
        bad = httpx.get(
            f"{url}/v1/slo?window=-5m",
            headers={"Authorization": f"Bearer {token('acme', 'o', 'admin')}"},
        )
        assert bad.status_code == 400
        assert httpx.get(f"{url}/v1/slo").status_code == 401

        # The gauges on /metrics carry the same figures (the monitor's first reading).
        metrics = httpx.get(f"{url}/metrics").text
        assert 'tether_slo_objective{slo="completion_24h"} 0.999' in metrics


def test_slo_help(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["slo", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for word in ("--window", "--json", "--url", "--token", "--tenant", "--workflow"):
        assert word in out
