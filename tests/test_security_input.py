"""Security: hostile input — SQL-shaped text, NUL characters, fuzzing, schemathesis.

Split from test_security.py."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from urllib.parse import quote

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    PROTOCOL_VERSION,
    Hello,
    Mutation,
    ProtocolError,
    PullResponse,
    PushRequest,
    PushResponse,
    ReportStateArgs,
    Unauthorized,
    ValidationError,
    WorkflowSnapshot,
    decode_client_message,
    decode_json,
    decode_server_message,
    encode,
    parse_mutation_args,
)
from sync_server.auth import bearer_token, verify_token
from tests import security_helpers
from tests.security_helpers import (
    TABLES,
    auth,
    fingerprint,
    first_close,
    make_app,
    open_ws,
    report_body,
    seed,
    without_bookkeeping,
)
from tests.servers import SECRET, running
from tests.sync_helpers import submit, token

# The shared fixture, bound here for pytest to find (importing it by name trips F811).
server = security_helpers.server
pytestmark = pytest.mark.timeout(60)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
CRAFTED = [
    "'; DROP TABLE events; --",
    '" OR 1=1 --',
    "x'); DELETE FROM workflows; --",
    "1; UPDATE clients SET tenant='globex'",
    "$1 $$ %s %% \\' \\\\",
    "Robert'); DROP TABLE clients;--🙂",
    "a\x00b",  # NUL: PostgreSQL cannot store it; refused everywhere (see the test below)
]


async def test_sql_shaped_input_is_stored_verbatim_or_refused(server):
    await seed(server)
    store = server.app.state.tether.store
    before = await fingerprint(server.database_url)
    headers = auth(token())
    async with httpx.AsyncClient(base_url=server.http_url, headers=headers) as http:
        for crafted in CRAFTED:
            quoted = quote(crafted, safe="")
            # In workflow ids (paths and mutation args): not found or rejected.
            for path in (f"/v1/workflows/{quoted}", f"/v1/dlq/{quoted}/requeue"):
                r = await http.request(
                    "GET" if "dlq" not in path else "POST",
                    path,
                    headers=auth(token(role="admin")) if "dlq" in path else None,
                )
                assert r.status_code in (400, 404), (crafted, path, r.status_code)
            for verb in ("cancel", "retry"):
                r = await http.post(f"/v1/workflows/{quoted}/{verb}")
                assert r.status_code in (400, 404), (crafted, verb)
            # In query parameters: refused.
            for params in ({"cursor": crafted}, {"limit": crafted}):
                assert (await http.get("/v1/pull", params=params)).status_code == 400
            r = await http.get("/v1/workflows", params={"status": crafted})
            assert r.status_code == 400
            r = await http.get(
                "/v1/dlq", params={"status": crafted}, headers=auth(token(role="admin"))
            )
            assert r.status_code == 400
            cancel = {"id": 1, "name": "cancel_workflow", "args": {"workflow_id": crafted}}
            body = {"client_id": "sq", "mutations": [cancel]}
            r = await http.post("/v1/push", json=body)
            assert r.status_code in (200, 400), (crafted, r.status_code, r.text)
    assert without_bookkeeping(await fingerprint(server.database_url)) == without_bookkeeping(
        before
    )
    # In client ids, report details, workflow inputs and token claims: stored verbatim.
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        for i, crafted in enumerate(CRAFTED):
            if "\x00" in crafted:
                continue
            workflow_id = str(uuid.uuid4())
            mutation = {
                "id": 1,
                "name": "submit_workflow",
                "args": {"workflow_id": workflow_id, "name": "noop", "input": {crafted: crafted}},
            }
            tok = token(crafted, crafted)
            r = await http.post(
                "/v1/push", json={"client_id": crafted, "mutations": [mutation]}, headers=auth(tok)
            )
            assert r.status_code == 200, (crafted, r.status_code, r.text)
            assert r.json()["results"][0]["status"] == "applied", (crafted, r.text)
            assert await store.get_client(crafted, crafted) == (crafted, 1)
            record = await store.get_workflow(crafted, workflow_id)
            assert (record.tenant, record.input) == (crafted, {crafted: crafted})
            detail = {"note": crafted, crafted: [crafted]}
            r = await http.post(
                "/v1/reports",
                json={**report_body(workflow_id), "detail": detail},
                headers=auth(token(crafted, f"src{i}", "source")),
            )
            assert r.status_code == 202, (crafted, r.text)
            events = await store.read_workflow_events(crafted, workflow_id)
            assert events[-1].data["detail"] == detail
    after = await fingerprint(server.database_url)
    for table in TABLES:  # every table is still there, and only grew
        assert after[f"count:{table}"] >= before[f"count:{table}"]
    assert after["count:events"] > before["count:events"]
    assert await store.get_client("acme", "seed-acme") == ("seed-acme", 1)


async def test_nul_characters_are_refused_alike_on_both_backends(server):
    """Regression: on PostgreSQL a NUL in an id, claim, input or detail was a 500 (and a
    retryable storage error that would wedge a client's queue); SQLite stored it."""
    wf, _ = await seed(server)
    before = await fingerprint(server.database_url)
    async with httpx.AsyncClient(base_url=server.http_url, headers=auth(token())) as http:
        body = {"client_id": "a\x00b", "mutations": [msgspec.to_builtins(submit(1))]}
        r = await http.post("/v1/push", json=body)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid"
        for path in ("/v1/workflows/a%00b", "/v1/workflows/a%00b/cancel"):
            method = "POST" if path.endswith("cancel") else "GET"
            assert (await http.request(method, path)).status_code == 404
        r = await http.get("/v1/pull", headers=auth(token("a\x00b", "x")))
        assert r.status_code == 401
        r = await http.post(
            "/v1/reports",
            json={**report_body(wf), "detail": {"k": "a\x00b"}},
            headers=auth(token(role="source")),
        )
        assert r.status_code == 422
        assert await fingerprint(server.database_url) == before
        # Inside a mutation: rejected and recorded, never a storage failure.
        mutation = submit(1)
        args = {**mutation.args, "input": {"a\x00b": 1}}
        body = {"client_id": "nul", "mutations": [{"id": 1, "name": mutation.name, "args": args}]}
        result = (await http.post("/v1/push", json=body)).json()["results"][0]
        assert result["status"] == "rejected" and "NUL" in result["error"]
    assert without_bookkeeping(await fingerprint(server.database_url)) == without_bookkeeping(
        before
    )
    ws = await open_ws(server.ws_url, header=f"Bearer {token()}")
    await ws.send(encode(Hello(client_id="a\x00b", protocol_version=PROTOCOL_VERSION)))
    code, received = await first_close(ws)
    assert code == 4400 and "NUL" in received[-1].message


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_tags = st.sampled_from(
    ["Hello", "Push", "Ack", "Welcome", "PushResult", "Events", "Progress", "Error", "x"]
)
_fields = st.sampled_from(
    ["client_id", "protocol_version", "cursor", "last_mutation_id", "mutations", "id", "name",
     "args", "created_at", "server_id", "head", "results", "events", "has_more", "code",
     "message", "retryable", "workflow_id", "step", "fraction", "seq", "type", "data", "at"]
)  # fmt: skip
_messages = st.builds(
    lambda tag, fields: {"type": tag, **fields},
    _tags,
    st.dictionaries(_fields, _values, max_size=6),
)


@FUZZ
@given(st.binary(max_size=300) | _messages.map(msgspec.msgpack.encode))
def test_fuzz_msgpack_decoders_raise_only_protocol_errors(data):
    for decode in (decode_client_message, decode_server_message):
        with contextlib.suppress(ProtocolError):
            decode(data)


_BODY_TYPES = [PushRequest, PushResponse, PullResponse, ReportStateArgs, WorkflowSnapshot]


@FUZZ
@given(
    st.sampled_from(_BODY_TYPES),
    st.binary(max_size=200)
    | st.text(max_size=200)
    | _values.map(msgspec.json.encode)
    | st.dictionaries(_fields, _values, max_size=6).map(msgspec.json.encode),
)
def test_fuzz_json_decoders_raise_only_protocol_errors(body_type, data):
    with contextlib.suppress(ProtocolError):
        decode_json(data, body_type)


@FUZZ
@given(
    st.sampled_from(["submit_workflow", "cancel_workflow", "retry_workflow", "report_state", "x"]),
    st.dictionaries(
        st.sampled_from(["workflow_id", "name", "input", "source", "status", "at", "detail"]),
        _values | st.just(str(uuid.UUID(int=1))),
        max_size=6,
    ),
)
def test_fuzz_mutation_args_raise_only_validation_errors(name, args):
    with contextlib.suppress(ValidationError):
        parse_mutation_args(Mutation(id=1, name=name, args=args))


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_fuzz_tokens_raise_only_unauthorized(raw):
    for header in (raw, f"Bearer {raw}"):
        with contextlib.suppress(Unauthorized):
            verify_token(SECRET, bearer_token(header))


def test_deeply_nested_input_is_a_protocol_error():
    for data in (b"[" * 100_000, b"\x91" * 100_000):
        for decode in (decode_client_message, decode_server_message):
            with pytest.raises(ProtocolError):
                decode(data)
        with pytest.raises(ProtocolError):
            decode_json(data, PushRequest)


def _run_schemathesis(base_url: str, tokens: dict[str, str], examples: int) -> Counter[int]:
    """Drive every operation of the served schema; return the statuses seen."""
    import schemathesis
    from hypothesis import Phase
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    statuses: Counter[int] = Counter()
    failures: list[str] = []

    def runner(strategy, header: dict[str, str]):
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
        )
        @given(strategy)
        def run(case):
            response = case.call_and_validate(
                base_url=base_url, headers=header, checks=checks, timeout=10
            )
            statuses[response.status_code] += 1

        return run

    for result in schema.get_all_operations():
        operation = result.ok()
        role = {"/v1/reports": "source"}.get(operation.path, "client")
        if "/dlq" in operation.path or "/flags" in operation.path:
            role = "admin"
        header = {"Authorization": f"Bearer {tokens[role]}"}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                runner(operation.as_strategy(generation_mode=mode), header)()
            except Unsatisfiable:  # no parameters or body: nothing to make invalid
                assert mode is GenerationMode.NEGATIVE, operation.label
            except Exception as exc:  # collect every operation's failure, then report
                failures.append(f"{operation.label} [{mode.value}]: {exc}")
    assert not failures, "\n\n".join(failures)
    return statuses


async def test_schemathesis_finds_no_5xx_and_the_api_conforms(database_url):
    app = make_app(database_url, push_rate=10_000.0, push_burst=10_000.0)
    async with running(app) as srv:
        await seed(srv)
        tokens = {
            "client": token("acme", "fuzz"),
            "source": token("acme", "fuzz-src", "source"),
            "admin": token("acme", "fuzz-ops", "admin"),
        }
        statuses = await asyncio.to_thread(_run_schemathesis, srv.http_url, tokens, 8)
        assert all(status < 500 for status in statuses), statuses
        assert statuses[200] > 0 and sum(statuses.values()) > 80
        async with httpx.AsyncClient(base_url=srv.http_url) as http:
            document = (await http.get("/openapi.json")).json()
        assert document["openapi"].startswith("3.1")
        paths = {route.path for route in srv.app.routes} - {"/v1/sync"}
        assert paths == set(document["paths"]), "every HTTP route is documented"
