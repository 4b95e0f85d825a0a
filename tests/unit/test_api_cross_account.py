"""Every route of the OpenAPI document, walked with another account's ids: 404 with the
words of an unknown id (an id never tells whether it exists), 401 without a token, 403 for
a customer's token on an operator route. A new route fails here until it has a body below."""

from __future__ import annotations

from typing import Any

from comfy_cancel.embedded.comfyui_sim import TINY_PROMPT
from comfy_cancel.models import WorkflowStatus
from tests.apitest import Env, error

S = WorkflowStatus
UNKNOWN = "7d1c3f6e-0000-4000-8000-000000000000"

# A valid body for every operation that takes one.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/workflow"): {"name": "wf", "workflow_json": TINY_PROMPT},
    ("post", "/v1/workflow/{workflow_id}/cancel"): {"reason": "mine now"},
    ("post", "/v1/runner"): {"name": "r", "endpoint_url": "http://127.0.0.1:1"},
    ("put", "/v1/runner/{runner_id}"): {"name": "taken over"},
    ("post", "/v1/runner/{runner_id}/interrupt"): {"reason": "mine now"},
    ("post", "/v1/admin/workflow/cancel"): {"dry_run": True},
}


def _operations(env: Env) -> list[tuple[str, str, dict[str, Any]]]:
    document = env.client.get("/openapi.json").json()
    found = [(method, path, op) for path, ops in document["paths"].items()
             for method, op in ops.items() if path.startswith("/v1")]
    assert len(found) >= 9
    for method, path, op in found:
        if "requestBody" in op:
            assert (method, path) in BODIES, f"add a body for {method.upper()} {path}"
    return found


def _call(env: Env, method: str, url: str, path: str, headers: dict[str, str]) -> Any:
    body = BODIES.get((method, path))
    return env.client.request(method.upper(), url, headers=headers, json=body)


def test_every_route_hides_another_accounts_objects(env: Env, broker: Any) -> None:
    theirs = {"workflow_id": env.workflow(S.QUEUED, account="globex"),
              "runner_id": env.runner_id(account="globex")}
    mine = env.auth("acme")
    walked = 0
    for method, path, _ in _operations(env):
        if path.startswith("/v1/admin"):
            continue  # operators act on every account by design
        params = [name for name in theirs if "{" + name + "}" in path]
        if not params:
            continue
        foreign = path.format(**{name: theirs[name] for name in params})
        unknown = path.format(**dict.fromkeys(params, UNKNOWN))
        refused = error(_call(env, method, foreign, path, mine), 404)
        missing = error(_call(env, method, unknown, path, mine), 404)
        for name in params:
            refused = refused.replace(theirs[name], "<id>")
        assert refused == missing.replace(UNKNOWN, "<id>"), (method, path)
        walked += 1
    assert walked >= 4  # get, cancel; get, put runner
    # Nothing of theirs moved, and their objects are in none of my lists.
    assert env.row(theirs["workflow_id"]).cancel_requested_at is None
    assert broker("cancel") == []
    assert env.client.get("/v1/workflow", headers=mine).json()["total"] == 0
    assert env.client.get("/v1/runner", headers=mine).json() == []
    their_token = env.auth("globex")
    runner = env.client.get(f"/v1/runner/{theirs['runner_id']}", headers=their_token).json()
    assert runner["name"] == "r"


def test_every_route_needs_a_token_and_operator_routes_an_operators(env: Env) -> None:
    ids = {"workflow_id": env.workflow(S.QUEUED), "runner_id": env.runner_id()}
    customer = env.auth()
    for method, path, op in _operations(env):
        url = path.format(**{k: v for k, v in ids.items() if "{" + k + "}" in path})
        for headers in ({}, {"Authorization": "Bearer cfc_unknown"}):
            response = _call(env, method, url, path, headers)
            assert error(response, 401), (method, path)
            assert response.headers["www-authenticate"] == "Bearer"
        assert op.get("security"), f"{method} {path} does not document its token"
        if path.startswith("/v1/admin"):
            assert "operator token" in error(_call(env, method, url, path, customer), 403)
