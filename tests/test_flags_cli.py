"""``sync-server flags``: every action end to end against a real server process."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest

from sync_server.cli import main
from tests.servers import SECRET, server_process
from tests.sync_helpers import token

pytestmark = pytest.mark.timeout(90)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNC_AUTH_SECRET", SECRET)
    monkeypatch.delenv("SYNC_TOKEN", raising=False)
    monkeypatch.setenv("COLUMNS", "250")


def test_flags_commands_end_to_end(capsys, env, tmp_path: Path) -> None:
    with server_process(
        f"sqlite:///{tmp_path / 'sync.db'}", workflows="tests.sync_helpers:NOOP"
    ) as (_, port):
        url = f"http://127.0.0.1:{port}"
        code, out, err = run(capsys, "flags", "set", "color", '"blue"', "--url", url)
        assert code == 0, err
        assert "color in scope *: version 1" in out and '"blue"' in out
        code, out, _ = run(capsys, "flags", "rollout", "tether.route.noop", "25", "--url", url)
        assert code == 0 and "default 25.0" in out
        code, out, _ = run(
            capsys, "flags", "rollout", "new-ui", "10", "--tenant", "acme", "--url", url
        )
        assert code == 0 and "in scope acme" in out
        code, out, _ = run(capsys, "flags", "list", "--url", url)
        assert code == 0 and "2 flags" in out and "color" in out and "tether.route.noop" in out
        code, out, _ = run(capsys, "flags", "list", "--tenant", "acme", "--json", "--url", url)
        listed = json.loads(out)["flags"]
        assert {(f["scope"], f["name"]) for f in listed} == {
            ("acme", "new-ui"),
            ("*", "color"),
            ("*", "tether.route.noop"),
        }
        code, out, _ = run(
            capsys, "flags", "show", "new-ui", "--tenant", "acme", "--json", "--url", url
        )
        shown = json.loads(out)
        assert shown["default"] is False and shown["rules"] == [{"value": True, "percentage": 10.0}]
        # The kill switch, then its effect on a push
        code, out, _ = run(capsys, "flags", "set", "tether.accept.noop", "false", "--url", url)
        assert code == 0
        push = httpx.post(
            f"{url}/v1/push",
            json={
                "client_id": "c",
                "mutations": [
                    {
                        "id": 1,
                        "name": "submit_workflow",
                        "args": {"workflow_id": str(uuid.uuid4()), "name": "noop", "input": {}},
                    }
                ],
            },
            headers={"Authorization": f"Bearer {token('acme', 'app')}"},
        )
        [result] = push.json()["results"]
        assert result["status"] == "rejected" and result["error"].startswith("disabled")
        code, out, _ = run(capsys, "flags", "set", "color", '"red"', "--url", url)
        code, out, _ = run(capsys, "flags", "history", "color", "--url", url)
        assert code == 0 and "sync-server-cli" in out and '"blue"' in out and '"red"' in out
        code, out, _ = run(capsys, "flags", "history", "color", "--json", "--url", url)
        history = json.loads(out)["history"]
        assert [h["version"] for h in history] == [1, 2]
        assert history[1]["before"]["default"] == "blue" and history[1]["after"]["default"] == "red"
        # --token: a tenant admin is held to its tenant
        acme = token("acme", "alice", "admin")
        code, out, _ = run(capsys, "flags", "set", "theme", '"dark"', "--token", acme, "--url", url)
        assert code == 0 and "in scope acme" in out
        code, _, err = run(
            capsys, "flags", "list", "--tenant", "globex", "--token", acme, "--url", url
        )
        assert code == 2 and "403" in err and "own tenant" in err
        # Bad input: one error line, nothing changed
        code, _, err = run(capsys, "flags", "set", "color", "blue", "--url", url)
        assert code == 2 and "must be JSON" in err
        code, _, err = run(capsys, "flags", "rollout", "color", "abc", "--url", url)
        assert code == 2 and "PERCENT" in err
        code, _, err = run(capsys, "flags", "rollout", "color", "150", "--url", url)
        assert code == 2 and "422" in err
        code, _, err = run(capsys, "flags", "show", "--url", url)
        assert code == 2 and "needs a flag NAME" in err
        code, out, _ = run(capsys, "flags", "show", "color", "--json", "--url", url)
        assert json.loads(out)["version"] == 2
