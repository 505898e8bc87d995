"""``sync-server``: help for every command, one clear line for every error, and the
operator commands against a real server process.

Error cases (each prints exactly one ``sync-server: error: …`` line on stderr and exits
non-zero): a bad database URL (unsupported scheme, unopenable SQLite path), an
unreachable PostgreSQL (a closed port; from the flag and from ``SYNC_DATABASE_URL``), a
missing workflow module or attribute, a missing ``SYNC_AUTH_SECRET``, and a server that
cannot be reached by ``workflows`` / ``dlq``.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from sync_server.cli import main
from tests.servers import SECRET, free_port, server_process
from tests.sync_helpers import token

pytestmark = pytest.mark.timeout(60)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("sync-server: error: "), err
    return lines[0]


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SYNC_AUTH_SECRET", SECRET)
    monkeypatch.delenv("SYNC_DATABASE_URL", raising=False)
    monkeypatch.setenv("COLUMNS", "250")  # rich tables: no wrapped ids
    return SECRET


# ------------------------------------------------------------------ help
@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ([], ["serve", "demo", "token", "workflows", "dlq", "flags"]),
        (["serve"], ["--host", "--port", "--database", "--workflows", "SYNC_DATABASE_URL"]),
        (["demo"], ["--workflows", "--clients", "--seconds", "--seed", "--no-faults", "--quiet"]),
        (["token"], ["--tenant", "--subject", "--role", "--ttl"]),
        (["workflows"], ["list", "show", "--status", "--url", "--token", "SYNC_TOKEN"]),
        (["dlq"], ["list", "requeue", "--status", "--url", "--token", "SYNC_TOKEN"]),
        (["flags"], ["list", "show", "set", "rollout", "history", "--tenant", "--token"]),
    ],
)
def test_help(capsys: pytest.CaptureFixture[str], command: list[str], expected: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sync-server")
    for word in expected:
        assert word in out


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["serve", "--workflows", "demo", "--database", "mysql://db.example/x"], "unsupported"),
        (
            ["serve", "--workflows", "demo", "--database", "sqlite:////nonexistent/dir/sync.db"],
            "cannot open SQLite",
        ),
        (["serve"], "serve needs the workflows to run: --workflows module:attr"),
        (["serve", "--database", "sqlite:///unused.db"], "or --workflows demo"),
        (["serve", "--workflows", "no_such_module_xyz:workflows"], "cannot import workflow module"),
        (["serve", "--workflows", "examples.image_pipeline:nope"], "has no attribute 'nope'"),
        (["serve", "--workflows", "examples.image_pipeline"], "module:attribute"),
        (["workflows", "show"], "needs a workflow ID"),
        (["dlq", "requeue"], "needs a dead-letter ID"),
        (["demo", "--clients", "0"], "--clients must be >= 1"),
    ],
)
def test_usage_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], secret: str, argv: list[str], needle: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert code != 0
    assert needle in one_error_line(err)
    assert out == ""


def test_unreachable_postgresql_from_flag_and_from_environment(
    capsys: pytest.CaptureFixture[str], secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()  # nothing listens there
    code, _, err = run(
        capsys, "serve", "--workflows", "demo", "--database", f"postgresql://127.0.0.1:{port}/test"
    )
    assert code != 0
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}" in one_error_line(err)
    monkeypatch.setenv("SYNC_DATABASE_URL", f"postgresql://127.0.0.1:{port}/fromenv")
    code, _, err = run(capsys, "serve", "--workflows", "demo")
    assert code != 0
    assert f"127.0.0.1:{port}/fromenv" in one_error_line(err)


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--workflows", "demo", "--database", "sqlite:///unused.db"],
        ["token", "--tenant", "t", "--subject", "s"],
        ["workflows", "list"],
        ["dlq", "list"],
    ],
)
def test_missing_auth_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    monkeypatch.delenv("SYNC_AUTH_SECRET", raising=False)
    code, out, err = run(capsys, *argv)
    assert code != 0
    assert "SYNC_AUTH_SECRET" in one_error_line(err)
    assert out == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["workflows", "list"],
        ["workflows", "show", "x"],
        ["dlq", "list"],
        ["dlq", "requeue", "1"],
        ["flags", "list"],
        ["flags", "set", "f", "true"],
    ],
)
def test_unreachable_server(
    capsys: pytest.CaptureFixture[str], secret: str, argv: list[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(capsys, *argv, "--url", url)
    assert code != 0
    assert f"cannot reach the server at {url}" in one_error_line(err)
    assert out == ""


def test_token_prints_a_verifiable_token(capsys: pytest.CaptureFixture[str], secret: str) -> None:
    from sync_server.auth import verify_token

    code, out, _ = run(capsys, "token", "--tenant", "acme", "--subject", "ops", "--role", "admin")
    assert code == 0
    principal = verify_token(SECRET, out.strip())
    assert (principal.tenant, principal.subject, principal.role.value) == ("acme", "ops", "admin")


# ------------------------------------------------------------------ a real server
def _wait(fn: Any, timeout: float = 20.0) -> Any:
    """Poll ``fn`` until it returns something truthy (a condition with a deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s")


def test_operator_commands_against_a_running_server(
    capsys: pytest.CaptureFixture[str], secret: str, tmp_path: Path
) -> None:
    unlock = tmp_path / "unlock"
    with server_process(
        f"sqlite:///{tmp_path / 'sync.db'}", workflows="tests.cli_workflows:workflows"
    ) as (_, port):
        url = f"http://127.0.0.1:{port}"
        passing, gated = str(uuid.uuid4()), str(uuid.uuid4())
        mutations = [
            {"id": 1, "name": "submit_workflow", "args": {"workflow_id": passing, "name": "gated"}},
            {
                "id": 2,
                "name": "submit_workflow",
                "args": {"workflow_id": gated, "name": "gated", "input": {"unlock": str(unlock)}},
            },
        ]
        for m in mutations:
            m["args"].setdefault("input", {})
        client = {"Authorization": f"Bearer {token('acme', 'app')}"}
        pushed = httpx.post(
            f"{url}/v1/push", json={"client_id": "cli-test", "mutations": mutations}, headers=client
        )
        assert pushed.status_code == 200, pushed.text

        def status(workflow_id: str) -> str:
            return str(
                httpx.get(f"{url}/v1/workflows/{workflow_id}", headers=client).json()["status"]
            )

        _wait(lambda: status(passing) == "completed" and status(gated) == "parked")

        code, out, _ = run(capsys, "workflows", "list", "--url", url)
        assert code == 0
        assert "2 workflows" in out and passing in out and gated in out
        code, out, _ = run(capsys, "workflows", "list", "--status", "parked", "--url", url)
        assert code == 0
        assert "1 workflows" in out and gated in out and passing not in out
        code, out, _ = run(capsys, "workflows", "show", gated, "--url", url)
        assert code == 0
        assert "parked" in out and "gate" in out and "locked until the operator" in out

        code, out, _ = run(capsys, "dlq", "list", "--url", url)
        assert code == 0
        assert "1 dead letters" in out and gated in out
        entry = httpx.get(
            f"{url}/v1/dlq", headers={"Authorization": f"Bearer {token('acme', 'op', 'admin')}"}
        ).json()["entries"][0]["id"]

        unlock.touch()
        code, out, _ = run(capsys, "dlq", "requeue", str(entry), "--url", url)
        assert code == 0
        assert f"requeued dead letter {entry}: workflow {gated}" in out
        _wait(lambda: status(gated) == "completed")
        code, out, _ = run(capsys, "dlq", "list", "--url", url)
        assert "0 dead letters" in out

        # Errors from the server are one line too.
        code, _, err = run(capsys, "dlq", "requeue", str(entry), "--url", url)
        assert code != 0
        assert "409" in one_error_line(err) or "404" in one_error_line(err)
        code, _, err = run(capsys, "workflows", "show", str(uuid.uuid4()), "--url", url)
        assert code != 0
        assert "404" in one_error_line(err)


def test_operator_commands_with_a_tenant_admin_token(
    capsys: pytest.CaptureFixture[str],
    secret: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``workflows`` and ``dlq`` take ``--token`` (and ``SYNC_TOKEN``): a tenant admin's
    token sees and acts on its own tenant only; without one, the minted global admin
    token sees every tenant."""
    monkeypatch.delenv("SYNC_TOKEN", raising=False)
    with server_process(
        f"sqlite:///{tmp_path / 'sync.db'}", workflows="tests.cli_workflows:workflows"
    ) as (_, port):
        url = f"http://127.0.0.1:{port}"
        ours, theirs = str(uuid.uuid4()), str(uuid.uuid4())
        for tenant, workflow_id in (("acme", ours), ("globex", theirs)):
            mutation = {
                "id": 1,
                "name": "submit_workflow",
                "args": {
                    "workflow_id": workflow_id,
                    "name": "gated",
                    "input": {"unlock": str(tmp_path / "never")},
                },
            }
            pushed = httpx.post(
                f"{url}/v1/push",
                json={"client_id": f"cli-{tenant}", "mutations": [mutation]},
                headers={"Authorization": f"Bearer {token(tenant, 'app')}"},
            )
            assert pushed.status_code == 200, pushed.text

        def open_letters(tenant: str) -> list[dict[str, Any]]:
            admin = {"Authorization": f"Bearer {token(tenant, 'op', 'admin')}"}
            entries = httpx.get(f"{url}/v1/dlq", headers=admin).json()["entries"]
            return list(entries)

        _wait(lambda: open_letters("acme") and open_letters("globex"))
        theirs_entry = open_letters("globex")[0]["id"]
        acme_admin = token("acme", "op", "admin")

        code, out, _ = run(capsys, "workflows", "list", "--url", url, "--token", acme_admin)
        assert code == 0
        assert "1 workflows" in out and ours in out and theirs not in out
        code, out, _ = run(capsys, "dlq", "list", "--url", url, "--token", acme_admin)
        assert code == 0
        assert "1 dead letters" in out and ours in out and theirs not in out
        # Another tenant's dead letter cannot be requeued, and stays open.
        code, _, err = run(
            capsys, "dlq", "requeue", str(theirs_entry), "--url", url, "--token", acme_admin
        )
        assert code != 0
        assert "404" in one_error_line(err) or "403" in one_error_line(err)
        assert [e["id"] for e in open_letters("globex")] == [theirs_entry]
        code, _, err = run(capsys, "workflows", "show", theirs, "--url", url, "--token", acme_admin)
        assert code != 0
        assert "404" in one_error_line(err) or "403" in one_error_line(err)

        # SYNC_TOKEN applies when --token is not given; --token wins over it.
        monkeypatch.setenv("SYNC_TOKEN", token("globex", "op", "admin"))
        code, out, _ = run(capsys, "dlq", "list", "--url", url)
        assert code == 0
        assert "1 dead letters" in out and theirs in out and ours not in out
        code, out, _ = run(capsys, "workflows", "list", "--url", url, "--token", acme_admin)
        assert code == 0
        assert ours in out and theirs not in out
        # A bad token is refused with one line.
        code, _, err = run(capsys, "workflows", "list", "--url", url, "--token", "not-a-token")
        assert code != 0
        assert "401" in one_error_line(err)

        # No token at all: the global admin token minted from SYNC_AUTH_SECRET sees both.
        monkeypatch.delenv("SYNC_TOKEN")
        code, out, _ = run(capsys, "dlq", "list", "--url", url)
        assert code == 0
        assert "2 dead letters" in out and ours in out and theirs in out


def test_serve_sources_and_job_steps_parse():
    from protocol import UsageError
    from sync_server.cli import load_sources

    sources, steps = load_sources(None, None, default=True)
    assert [s.source for s in sources] == ["job-queue"] and steps == {"generate_image": "render"}
    assert load_sources(None, ["a=b"], default=False) == ([], {"a": "b"})
    with pytest.raises(UsageError, match="WORKFLOW=STEP"):
        load_sources(None, ["nonsense"], default=False)
    with pytest.raises(UsageError, match="cannot load sources"):
        load_sources("no_such_module:x", None, default=False)
    with pytest.raises(UsageError, match="not a list of source adapters"):
        load_sources("examples.image_pipeline:workflows", None, default=False)


def test_serve_cuts_half_open_connections_with_the_header_timeout(capsys):
    """Issue 11 finding 6: ``serve`` runs uvicorn with the header-deadline protocol."""
    from sync_server.cli import build_parser, serve_config
    from sync_server.httpguard import HeaderDeadlineProtocol

    config = serve_config(build_parser().parse_args(["serve"]))
    assert issubclass(config["http"], HeaderDeadlineProtocol)
    assert config["http"].header_timeout == 10.0
    args = build_parser().parse_args(["serve", "--header-timeout", "2.5"])
    assert serve_config(args)["http"].header_timeout == 2.5
    assert main(["serve", "--header-timeout", "0"]) == 2
    assert "--header-timeout must be positive" in capsys.readouterr().err
