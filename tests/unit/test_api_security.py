"""The API under hostile input (issue #8, "Security and bad input"): nesting, numbers out of
range, NUL characters, bodies too large or too slow or sent without a token, lists of huge
workflows. Every refusal is a 4xx with the usual error body, and nothing is stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import event

from comfy_cancel import status
from comfy_cancel.embedded.comfyui_sim import TINY_PROMPT
from comfy_cancel.models import WorkflowStatus
from comfy_cancel.schemas import json_too_deep
from testbed.database import migrate
from tests.apitest import Env, error, files, make_env

S = WorkflowStatus
DEPTH = 64  # the default COMFY_CANCEL_MAX_JSON_DEPTH
UUID = "7d1c3f6e-0000-4000-8000-000000000000"


def nested(levels: int) -> Any:
    value: Any = 1
    for n in range(levels):
        value = [value] if n % 2 else {"x": value}
    return value


def deep_prompt(levels: int) -> dict[str, Any]:
    """A valid prompt whose nesting is 3 + ``levels`` (the prompt, a node, its inputs)."""
    return {"1": {"class_type": "Note", "inputs": {"v": nested(levels)}}}


def nothing_stored(env: Env, broker: Any) -> bool:
    listed = env.client.get("/v1/workflow", headers=env.auth()).json()
    return listed["total"] == 0 and broker("runner") == []


# --- depth ------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [251, 300, 980, 5000])
def test_a_deep_workflow_is_refused_before_anything_is_stored(
    env: Env, broker: Any, levels: int
) -> None:
    prompt = deep_prompt(levels)
    if levels < 900:  # json.dumps itself recurses: build the deepest ones as text
        raw = json.dumps(prompt).encode()
    else:
        value = b"[" * levels + b"]" * levels
        raw = b'{"1": {"class_type": "Note", "inputs": {"v": ' + value + b"}}}"
    as_json = env.client.post(
        "/v1/workflow", headers={**env.auth(), "Content-Type": "application/json"},
        content=b'{"name": "deep", "workflow_json": ' + raw + b"}",
    )
    assert f"the body nests objects and lists deeper than {DEPTH} levels" in error(as_json, 400)
    as_form = env.client.post("/v1/workflow", headers=env.auth(), **files(prompt=raw))
    message = error(as_form, 400)
    assert "the workflow_json file nests" in message and "COMFY_CANCEL_MAX_JSON_DEPTH" in message
    assert nothing_stored(env, broker)


def test_a_workflow_at_the_depth_limit_is_accepted(env: Env, broker: Any) -> None:
    # The JSON body adds one level around the prompt.
    fits = env.client.post("/v1/workflow", headers=env.auth(),
                           json={"name": "ok", "workflow_json": deep_prompt(DEPTH - 4)})
    assert fits.status_code == 200, fits.text
    assert env.client.get(f"/v1/workflow/{fits.json()['id']}", headers=env.auth()).json()[
        "workflow_json"] == deep_prompt(DEPTH - 4)
    over = env.client.post("/v1/workflow", headers=env.auth(),
                           json={"name": "no", "workflow_json": deep_prompt(DEPTH - 3)})
    assert error(over, 400)


def test_deep_json_on_other_routes_is_400(env: Env) -> None:
    body = {"name": "r", "endpoint_url": "http://h:1", "headers": nested(300)}
    response = env.client.post("/v1/runner", headers=env.auth(), json=body)
    assert "the body nests objects and lists deeper than" in error(response, 400)
    assert env.client.get("/v1/runner", headers=env.auth()).json() == []


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_not_json(env: Env, broker: Any, constant: bytes) -> None:
    prompt = b'{"1": {"class_type": "X", "inputs": {"v": ' + constant + b"}}}"
    response = env.client.post("/v1/workflow", headers=env.auth(), **files(prompt=prompt))
    assert "is not a JSON value" in error(response, 400)
    bulk = env.client.post(
        "/v1/admin/workflow/cancel", headers={**env.auth("ops", operator=True),
                                              "Content-Type": "application/json"},
        content=b'{"dry_run": true, "older_than_seconds": ' + constant + b"}",
    )
    assert "older_than_seconds" in error(bulk, 400)
    assert nothing_stored(env, broker)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


@pytest.mark.parametrize("value", [
    {"a": "[[[[[[[[[[[[[[[[[["}, {'k\\"[[[[': [[[]]]}, [[[[[]]]]], {"x": "\\" + "[" * 20},
    ['"[[[[[[[[[[[', {"y": '\\"'}], [{}, [[{}]], {"a": [1, {"b": []}]}], "[[[[[[[", [],
])
def test_the_raw_depth_check_agrees_with_the_parsed_depth(value: Any) -> None:
    raw = json.dumps(value)
    for limit in range(1, 8):
        assert json_too_deep(raw, limit) == (_depth(value) > limit), (raw, limit)
        assert json_too_deep(raw.encode(), limit) == (_depth(value) > limit)


def test_a_stored_row_that_cannot_be_serialised_never_fails_a_read(env: Env) -> None:
    """Rows stored before the depth limit (or outputs a server sent) are shown as null."""
    account_id = env.account_id()
    with env.db.transaction() as session:
        deep = status.create_accepted(session, account_id, name="old", workflow_json={
            "1": {"class_type": "X", "inputs": {"v": nested(400)}}})
        deep.outputs = {"9": nested(400)}
        deep_id = deep.id
    fine = env.workflow()
    headers = env.auth()
    detail = env.client.get(f"/v1/workflow/{deep_id}", headers=headers)
    assert detail.status_code == 200, detail.text
    body = detail.json()
    assert body["workflow_json"] is None and body["outputs"] is None
    assert "workflow_json, outputs stored but cannot be shown" in body["unreadable"]
    listed = env.client.get("/v1/workflow", headers=headers)
    assert listed.status_code == 200, listed.text
    by_id = {w["id"]: w for w in listed.json()["workflows"]}
    assert by_id[deep_id]["outputs"] is None and by_id[deep_id]["unreadable"]
    assert by_id[fine]["unreadable"] is None


# --- numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "field"), [
    ("page=576460752303423489", "page"), ("page=1000001", "page"), ("per_page=101", "per_page"),
    ("per_page=99999999999999999999999", "per_page"), ("page=-1", "page"),
])
def test_paging_out_of_range_is_400(refusals_env: Env, query: str, field: str) -> None:
    env = refusals_env
    response = env.client.get(f"/v1/workflow?{query}", headers=env.auth())
    assert f"invalid query parameter {field}" in error(response, 400)


@pytest.mark.parametrize("seconds", [1.2e308, 1e12, -1])
def test_bulk_cancel_ages_out_of_range_are_400(refusals_env: Env, seconds: float) -> None:
    env = refusals_env
    response = env.client.post("/v1/admin/workflow/cancel", headers=env.auth("ops", operator=True),
                               json={"older_than_seconds": seconds, "dry_run": True})
    assert "older_than_seconds" in error(response, 400)


def test_every_numeric_input_has_bounds_in_the_openapi_document(env: Env) -> None:
    document = env.client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    checked = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                schema = parameter["schema"]
                if schema.get("type") in ("integer", "number"):
                    checked.append(f"{method} {path} {parameter['name']}")
                    assert "minimum" in schema and "maximum" in schema, checked[-1]
            for content in operation.get("requestBody", {}).get("content", {}).values():
                ref = content["schema"].get("$ref", "")
                model = schemas.get(ref.rsplit("/", 1)[-1], content["schema"])
                for name, prop in model.get("properties", {}).items():
                    for option in prop.get("anyOf", [prop]):
                        if option.get("type") in ("integer", "number"):
                            checked.append(f"{method} {path} {name}")
                            assert "minimum" in option and "maximum" in option, checked[-1]
    assert {"get /v1/workflow page", "get /v1/workflow per_page",
            "post /v1/admin/workflow/cancel older_than_seconds"} <= set(checked)


# --- NUL characters and lone surrogates, on SQLite and on PostgreSQL ------------------------


@pytest.fixture
def store_env(tmp_path: Path, broker: Any) -> Iterator[Env]:
    """The API on SQLite; tests/integration/test_api_security_postgres.py runs the tests
    that take this fixture again on PostgreSQL, which fails a statement with a NUL or a
    lone surrogate in its text (the API must refuse them first, with a 400)."""
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(url)
    yield from make_env(url)


NUL = "a\x00b"


def _bad_calls(env: Env) -> list[tuple[str, str, dict[str, Any], str]]:
    """(method, url, body, the field the message names) for every string input."""
    workflow = env.workflow(S.QUEUED)
    runner = env.runner_id()
    wf = {"name": "ok", "workflow_json": TINY_PROMPT}
    runner_body = {"name": "r", "endpoint_url": "http://h:1"}
    return [
        ("POST", "/v1/workflow", {**wf, "name": NUL}, "name"),
        ("POST", "/v1/workflow", {**wf, "tags": ["ok", NUL]}, "tags[1]"),
        ("POST", f"/v1/workflow/{workflow}/cancel", {"reason": NUL}, "reason"),
        ("POST", f"/v1/runner/{runner}/interrupt", {"reason": NUL}, "reason"),
        ("POST", "/v1/runner", {**runner_body, "name": NUL}, "name"),
        ("POST", "/v1/runner", {**runner_body, "tags": [NUL]}, "tags[0]"),
        ("POST", "/v1/runner", {**runner_body, "headers": {"X-Key": NUL}}, "headers.X-Key"),
        ("POST", "/v1/runner", {**runner_body, "endpoint_url": f"http://h{NUL}:1"},
         "endpoint_url"),
        ("PUT", f"/v1/runner/{runner}", {"name": NUL}, "name"),
        ("PUT", f"/v1/runner/{runner}", {"headers": {"A": NUL}}, "headers.A"),
        *[("POST", "/v1/admin/workflow/cancel", {"dry_run": True, field: value}, where)
          for field, value, where in [("account", NUL, "account"), ("runner", NUL, "runner"),
                                      ("tag", NUL, "tag"), ("ids", [UUID, NUL], "ids[1]"),
                                      ("reason", NUL, "reason")]],
    ]


def test_a_nul_character_in_any_string_input_is_400(store_env: Env, broker: Any) -> None:
    env = store_env
    customer, operator = env.auth(), env.auth("ops", operator=True)
    for method, url, body, field in _bad_calls(env):
        headers = operator if "/admin/" in url else customer
        response = env.client.request(method, url, headers=headers, json=body)
        message = error(response, 400)
        assert f"{field}: contains a NUL character" in message, (url, body, message)
    # The multipart form's fields too.
    form = env.client.post("/v1/workflow", headers=customer, **files(name=NUL))
    assert "name: contains a NUL character" in error(form, 400)
    tagged = env.client.post("/v1/workflow", headers=customer, **files(tags=["x", NUL]))
    assert "contains a NUL character" in error(tagged, 400)
    assert broker("runner") == [] and broker("cancel") == []


def test_lone_surrogates_are_400(store_env: Env, broker: Any) -> None:
    env = store_env
    name = env.client.post("/v1/workflow", headers={**env.auth(),
                           "Content-Type": "application/json"},
                           content=b'{"name": "a\\ud800", "workflow_json": {"1": '
                                   b'{"class_type": "X", "inputs": {}}}}')
    assert "the body: contains a lone UTF-16 surrogate" in error(name, 400)
    prompt = b'{"1": {"class_type": "X", "inputs": {"t": "\\udc00 lone"}}}'
    cancel = env.client.post(f"/v1/workflow/{UUID}/cancel", headers={
        **env.auth(), "Content-Type": "application/json"}, content=b'{"reason": "\\udfff"}')
    assert "reason: contains a lone UTF-16 surrogate" in error(cancel, 400)
    in_prompt = env.client.post("/v1/workflow", headers=env.auth(), **files(prompt=prompt))
    assert "lone UTF-16 surrogate" in error(in_prompt, 400)
    pair = b'{"1": {"class_type": "X", "inputs": {"t": "\\ud83d\\ude00"}}}'  # an emoji: fine
    accepted = env.client.post("/v1/workflow", headers=env.auth(), **files(prompt=pair))
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["workflow_json"]["1"]["inputs"]["t"] == "\U0001F600"
    assert len(broker("runner")) == 1


# --- bodies: size, token first, read timeout ------------------------------------------------


@pytest.fixture
def strict_env(tmp_path: Path, broker: Any) -> Iterator[Env]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(url)
    yield from make_env(url, body_read_timeout_seconds=0.5)


def _call(
    env: Env, method: str, path: str, headers: dict[str, str], chunks: list[bytes],
    *, stall: bool = False, http_version: str = "1.1",
) -> tuple[int, dict[str, Any], int]:
    """The app called as a server calls it, the body handed over chunk by chunk:
    (status, JSON body, bytes of the request body the app took). ``stall``: the client
    stops sending after its chunks, never finishing the body."""
    taken = 0
    pending = list(chunks)

    async def receive() -> dict[str, Any]:
        nonlocal taken
        if pending:
            chunk = pending.pop(0)
            taken += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending) or stall}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": http_version,
        "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "state": {},
    }

    async def run() -> None:
        with anyio.fail_after(20):
            await env.app(scope, receive, send)

    anyio.run(run)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), taken


MIB = b"x" * (1024 * 1024)
HUGE = [MIB] * 60


@pytest.mark.parametrize("path", ["/v1/runner", f"/v1/workflow/{UUID}/cancel",
                                  f"/v1/runner/{UUID}/interrupt",
                                  "/v1/admin/workflow/cancel", "/v1/workflow"])
def test_a_huge_body_without_a_valid_token_is_401_unread(refusals_env: Env, path: str) -> None:
    env = refusals_env
    declared = {"Content-Type": "application/json", "Content-Length": str(60 * len(MIB))}
    for headers in (declared, {**declared, "Authorization": "Bearer cfc_unknown"},
                    {"Content-Type": "application/json"}):  # chunked: no length at all
        status, body, taken = _call(env, "POST", path, headers, HUGE)
        assert (status, body["status"], taken) == (401, 401, 0), body


def test_an_operator_route_refuses_a_customer_before_the_body(env: Env) -> None:
    headers = {**env.auth(), "Content-Type": "application/json"}
    status, body, taken = _call(env, "POST", "/v1/admin/workflow/cancel", headers, HUGE)
    assert (status, taken) == (403, 0) and "operator token" in body["message"]


@pytest.mark.parametrize(("path", "setting"), [
    ("/v1/runner", "COMFY_CANCEL_MAX_BODY_BYTES"),
    (f"/v1/workflow/{UUID}/cancel", "COMFY_CANCEL_MAX_BODY_BYTES"),
    (f"/v1/runner/{UUID}/interrupt", "COMFY_CANCEL_MAX_BODY_BYTES"),
    ("/v1/admin/workflow/cancel", "COMFY_CANCEL_MAX_ADMIN_BODY_BYTES"),
    ("/v1/workflow", "COMFY_CANCEL_MAX_WORKFLOW_BYTES"),
])
def test_a_body_over_its_routes_limit_is_413(
    refusals_env: Env, path: str, setting: str
) -> None:
    env = refusals_env
    operator = env.auth("ops", operator=True)["Authorization"]
    headers = {"Authorization": operator, "Content-Type": "application/json"}
    status, body, taken = _call(env, "POST", path, {**headers, "Content-Length":
                                                    str(60 * len(MIB))}, HUGE)
    assert (status, taken) == (413, 0) and setting in body["message"]
    # Without a length (sent in chunks), it is counted as it comes: refused past the
    # limit, not read whole.
    chunked = {**headers, "Transfer-Encoding": "chunked"}
    status, body, taken = _call(env, "POST", path, chunked, HUGE)
    assert status == 413 and setting in body["message"]
    assert taken <= 21 * len(MIB)


def test_an_http2_body_without_a_length_is_counted_too(env: Env) -> None:
    # HTTP/2 frames a body without Content-Length or chunks: the gate cannot take the
    # absence of both for "no body", as it does for HTTP/1.x.
    headers = {**env.auth(), "Content-Type": "application/json"}
    status, body, taken = _call(env, "POST", "/v1/runner", headers, HUGE, http_version="2")
    assert status == 413 and "COMFY_CANCEL_MAX_BODY_BYTES" in body["message"]
    assert taken <= 21 * len(MIB)


def test_the_small_routes_limit_is_64_kib(env: Env) -> None:
    headers = env.auth()
    small = {"name": "r", "endpoint_url": "http://h:1", "tags": ["t"] * 10}
    assert env.client.post("/v1/runner", headers=headers, json=small).status_code == 200
    big = {"name": "r", "endpoint_url": "http://h:1", "headers": {"X": "v" * 70_000}}
    assert "65536 bytes" in error(env.client.post("/v1/runner", headers=headers, json=big), 413)


@pytest.mark.parametrize("path", ["/v1/runner", "/v1/workflow",
                                  f"/v1/workflow/{UUID}/cancel"])
def test_a_body_that_stops_arriving_is_408(strict_env: Env, broker: Any, path: str) -> None:
    env = strict_env
    headers = {**env.auth(), "Content-Type": "application/json", "Content-Length": "5000"}
    status, body, _ = _call(env, "POST", path, headers, [b'{"name": "slow", '], stall=True)
    assert status == 408 and "COMFY_CANCEL_BODY_READ_TIMEOUT_SECONDS" in body["message"]
    assert nothing_stored(env, broker)


def test_a_body_in_many_pieces_within_the_timeout_is_fine(strict_env: Env) -> None:
    raw = json.dumps({"name": "r", "endpoint_url": "http://h:1"}).encode()
    pieces = [raw[i : i + 5] for i in range(0, len(raw), 5)]
    headers = {**strict_env.auth(), "Content-Type": "application/json"}
    status, body, _ = _call(strict_env, "POST", "/v1/runner", headers, pieces)
    assert status == 200, body


# --- lists ----------------------------------------------------------------------------------


def test_the_list_does_not_carry_or_even_load_workflow_json(env: Env) -> None:
    created = env.client.post("/v1/workflow", headers=env.auth(),
                              json={"name": "big", "workflow_json": TINY_PROMPT})
    workflow_id = created.json()["id"]
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        statements.append(statement)

    event.listen(env.db.engine, "before_cursor_execute", record)
    try:
        listed = env.client.get("/v1/workflow", headers=env.auth()).json()
    finally:
        event.remove(env.db.engine, "before_cursor_execute", record)
    [item] = listed["workflows"]
    assert item["id"] == workflow_id and "workflow_json" not in item
    reads = [s for s in statements if "FROM workflows" in s]
    assert reads and not any("workflow_json" in s for s in reads), reads
    detail = env.client.get(f"/v1/workflow/{workflow_id}", headers=env.auth()).json()
    assert detail["workflow_json"] == TINY_PROMPT


def test_the_openapi_document_lists_the_error_codes(env: Env) -> None:
    paths = env.client.get("/openapi.json").json()["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            if path.startswith("/v1"):
                assert {"400", "401", "404", "408", "413", "429", "500"} <= codes, (method, path)
                assert "Retry-After" in operation["responses"]["429"]["headers"]
            if path.startswith("/v1/admin"):
                assert "403" in codes
    assert "415" in paths["/v1/workflow"]["post"]["responses"]
    endpoint = env.client.get("/openapi.json").json()["components"]["schemas"]["RunnerCreate"][
        "properties"]["endpoint_url"]
    assert endpoint["minLength"] == 1
