"""The HTTP API against a migrated SQLite file and Celery's in-memory broker."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import fakeredis
import pytest
from fastapi import Depends
from sqlalchemy import delete, update

from comfy_cancel import api, encryption, manager, status
from comfy_cancel.db import engine_for
from comfy_cancel.embedded.comfyui_sim import TINY_PROMPT
from comfy_cancel.manager import Principal
from comfy_cancel.models import ApiToken, EventKind, Workflow, WorkflowStatus
from testbed.database import migrate
from tests.apitest import KEY, Env, error, files, make_env

S = WorkflowStatus
PUBLISH_FAILED = (
    "the cancel request is recorded but could not be handed to the cancel queue; "
    "retrying is safe"
)


# --- auth -----------------------------------------------------------------------------------


def test_a_call_without_a_token_is_401(env: Env) -> None:
    response = env.client.get("/v1/workflow")
    assert "Authorization: Bearer" in error(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"
    assert error(env.client.get("/v1/workflow", headers={"Authorization": "Basic eA=="}), 401)


@pytest.mark.parametrize("token", ["cfc_not-a-real-token", "something-else"])
def test_an_unknown_token_is_401(env: Env, token: str) -> None:
    response = env.client.get("/v1/workflow", headers={"Authorization": f"Bearer {token}"})
    assert "unknown or expired" in error(response, 401)


def test_an_expired_token_is_401_and_a_valid_one_is_not(env: Env) -> None:
    expired = env.client.get("/v1/workflow", headers=env.auth(days=-1))
    assert "unknown or expired" in error(expired, 401)
    assert env.client.get("/v1/workflow", headers=env.auth(days=1)).status_code == 200


def test_operator_routes_refuse_customer_tokens(env: Env) -> None:
    @env.app.get("/v1/admin/whoami")
    def whoami(principal: Annotated[Principal, Depends(api.require_operator)]) -> dict[str, Any]:
        return {"operator": principal.is_operator}

    assert "operator token" in error(
        env.client.get("/v1/admin/whoami", headers=env.auth()), 403
    )
    ok = env.client.get("/v1/admin/whoami", headers=env.auth("ops", operator=True))
    assert ok.json() == {"operator": True}


# --- submit ---------------------------------------------------------------------------------


def test_submit_the_products_multipart_form(env: Env, broker: Any) -> None:
    response = env.client.post("/v1/workflow", headers=env.auth(),
                               **files("first", tags="gpu, sdxl"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "accepted"
    assert body["name"] == "first"
    assert body["tags"] == ["gpu", "sdxl"]
    assert body["workflow_json"] == TINY_PROMPT
    assert body["user_id"] == env.account_id()
    assert body["cancel"] is None
    row = env.row(body["id"])
    assert broker("runner") == [(row.runner_task_id, "comfy_cancel.run_workflow", [row.id])]


def test_submit_with_repeated_tag_fields(env: Env) -> None:
    response = env.client.post("/v1/workflow", headers=env.auth(),
                               **files(tags=["a", "b,c"]))
    assert response.json()["tags"] == ["a", "b", "c"]


def test_submit_as_json(env: Env, broker: Any) -> None:
    response = env.client.post(
        "/v1/workflow",
        headers=env.auth(),
        json={"name": "j", "workflow_json": TINY_PROMPT, "tags": ["x"]},
    )
    assert response.status_code == 200, response.text
    assert response.json()["tags"] == ["x"]
    assert len(broker("runner")) == 1


UI_FORMAT = {"nodes": [{"id": 1, "type": "EmptyImage"}], "links": []}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"workflow_json": TINY_PROMPT}, "name: Field required"),
        ({"name": "", "workflow_json": TINY_PROMPT}, "name: String should have at least 1"),
        ({"name": "n" * 201, "workflow_json": TINY_PROMPT}, "name: String should have at most"),
        ({"name": "n"}, "workflow_json: Field required"),
        ({"name": "n", "workflow_json": {}}, "workflow_json: must be a non-empty JSON object"),
        ({"name": "n", "workflow_json": [1]}, "workflow_json: must be a non-empty JSON object"),
        ({"name": "n", "workflow_json": {"1": {"inputs": {}}}}, "node '1' has no 'class_type'"),
        ({"name": "n", "workflow_json": {"1": {"class_type": "X", "inputs": []}}},
         "node '1' has no 'inputs' object"),
        ({"name": "n", "workflow_json": {"1": 5}}, "node '1' is not an object"),
        ({"name": "n", "workflow_json": UI_FORMAT}, "UI-format workflow"),
        ({"name": "n", "workflow_json": TINY_PROMPT, "tags": [f"t{i}" for i in range(11)]},
         "tags: Value should have at most 10 items"),
        ({"name": "n", "workflow_json": TINY_PROMPT, "tags": ["x" * 101]},
         "tags[0]: String should have at most 100"),
    ],
)
def test_submit_refuses_invalid_bodies_naming_the_field(
    refusals_env: Env, broker: Any, body: dict[str, Any], words: str
) -> None:
    env = refusals_env
    response = env.client.post("/v1/workflow", headers=env.auth(), json=body)
    assert words in error(response, 400)
    assert broker("runner") == []


def test_submit_refuses_a_workflow_file_that_is_not_json(env: Env) -> None:
    response = env.client.post("/v1/workflow", headers=env.auth(), **files(prompt=b"{nope"))
    assert "the workflow_json file is not valid JSON" in error(response, 400)


def test_submit_refuses_broken_json_and_other_media_types(env: Env) -> None:
    broken = env.client.post("/v1/workflow", headers={**env.auth(), "Content-Type":
                             "application/json"}, content=b'{"name": ')
    assert "the body is not valid JSON" in error(broken, 400)
    text = env.client.post("/v1/workflow", headers={**env.auth(), "Content-Type": "text/plain"},
                           content=b"hello")
    assert "multipart/form-data" in error(text, 415)


SMALL_LIMIT = 4000


@pytest.fixture
def small_env(tmp_path: Path, broker: Any) -> Iterator[Env]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(url)
    yield from make_env(url, max_workflow_bytes=SMALL_LIMIT)


def _prompt_of(size: int) -> dict[str, Any]:
    prompt = json.loads(json.dumps(TINY_PROMPT))
    prompt["9"] = {"class_type": "Note", "inputs": {"text": ""}}
    prompt["9"]["inputs"]["text"] = "x" * (size - len(json.dumps(prompt)))
    return prompt


def test_submit_refuses_a_workflow_over_the_size_limit_and_stores_nothing(
    small_env: Env, broker: Any
) -> None:
    env, auth = small_env, small_env.auth()
    assert len(json.dumps(_prompt_of(SMALL_LIMIT - 100))) == SMALL_LIMIT - 100
    fits = env.client.post("/v1/workflow", headers=auth, **files(prompt=_prompt_of(3900)))
    assert fits.status_code == 200, fits.text
    accepted = broker("runner")
    assert len(accepted) == 1

    too_big = _prompt_of(SMALL_LIMIT + 1)
    as_form = env.client.post("/v1/workflow", headers=auth, **files(prompt=too_big))
    assert "COMFY_CANCEL_MAX_WORKFLOW_BYTES" in error(as_form, 413)
    huge = {"name": "wf", "workflow_json": _prompt_of(200_000)}
    as_json = env.client.post("/v1/workflow", headers=auth, json=huge)
    assert f"larger than this API accepts ({SMALL_LIMIT} bytes" in error(as_json, 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the size is counted as it comes
        raw = json.dumps(huge).encode()
        for start in range(0, len(raw), 8192):
            yield raw[start : start + 8192]

    chunked = env.client.post(
        "/v1/workflow", headers={**auth, "Content-Type": "application/json"}, content=chunks()
    )
    assert "larger than this API accepts" in error(chunked, 413)
    listed = env.client.get("/v1/workflow", headers=auth).json()
    assert [w["id"] for w in listed["workflows"]] == [fits.json()["id"]]
    assert broker("runner") == []


def test_submit_with_the_broker_down_fails_the_workflow_and_says_so(
    env: Env, broker_down: None
) -> None:
    response = env.client.post("/v1/workflow", headers=env.auth(), **files("lost"))
    message = error(response, 500)
    assert message.endswith("could not be handed to the runner queue; submit again")
    workflow_id = re.search(r"workflow (\S+) could not", message).group(1)  # type: ignore[union-attr]
    row = env.row(workflow_id)
    assert row.status == S.FAILED
    assert row.exception_type == "DispatchError"


# --- get and list ---------------------------------------------------------------------------

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def test_get_shows_the_whole_workflow(env: Env) -> None:
    workflow_id = env.workflow(S.RUNNING)
    body = env.client.get(f"/v1/workflow/{workflow_id}", headers=env.auth()).json()
    assert set(body) == {
        "id", "user_id", "name", "status", "runner_id", "tags", "workflow_json", "prompt_id",
        "queue_number", "outputs", "partial_outputs", "progress", "error_node",
        "exception_type", "exception_message", "created_at", "updated_at", "started_at",
        "completed_at", "timeout_seconds", "deadline_at", "cancel", "unreadable",
    }
    assert body["unreadable"] is None
    assert body["status"] == "running"
    assert body["runner_id"] is not None
    for field in ("created_at", "updated_at", "started_at"):
        assert ISO_Z.match(body[field]), body[field]
    assert body["completed_at"] is None
    assert body["exception_type"] is None


def test_get_shows_why_a_workflow_failed(env: Env) -> None:
    body = env.client.get(f"/v1/workflow/{env.workflow(S.FAILED)}", headers=env.auth()).json()
    assert (body["status"], body["exception_type"], body["exception_message"]) == (
        "failed", "E", "boom"
    )


def test_unknown_malformed_and_foreign_ids_are_the_same_404(env: Env) -> None:
    foreign = env.workflow(S.QUEUED, account="other")
    unknown = "7d1c3f6e-0000-4000-8000-000000000000"
    headers = env.auth()
    messages = {
        wid: error(env.client.get(f"/v1/workflow/{wid}", headers=headers), 404)
        for wid in (foreign, unknown, "not-a-uuid")
    }
    assert {m.replace(wid, "<id>") for wid, m in messages.items()} == {
        "no workflow <id>: check the id (GET /v1/workflow lists yours)"
    }


def test_list_pages_through_the_callers_workflows_only(env: Env) -> None:
    mine = [env.workflow() for _ in range(3)]
    env.workflow(account="other")
    headers = env.auth()
    first = env.client.get("/v1/workflow?per_page=2", headers=headers).json()
    second = env.client.get("/v1/workflow?per_page=2&page=2", headers=headers).json()
    assert (first["total"], second["total"]) == (3, 3)
    assert len(first["workflows"]) == 2 and len(second["workflows"]) == 1
    seen = {w["id"] for w in first["workflows"] + second["workflows"]}
    assert seen == set(mine)
    beyond = env.client.get("/v1/workflow?page=9", headers=headers).json()
    assert beyond == {"workflows": [], "total": 3}


def test_list_filters_by_status(env: Env) -> None:
    queued = env.workflow(S.QUEUED)
    env.workflow(S.RUNNING)
    cancelled = env.workflow(S.CANCELLED)
    headers = env.auth()
    body = env.client.get("/v1/workflow?status=queued", headers=headers).json()
    assert [w["id"] for w in body["workflows"]] == [queued] and body["total"] == 1
    history = env.client.get("/v1/workflow?status=cancelled", headers=headers).json()
    assert [w["id"] for w in history["workflows"]] == [cancelled]


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("per_page=0", "invalid query parameter per_page"),
        ("per_page=101", "invalid query parameter per_page: Input should be less than or equal"),
        ("page=0", "invalid query parameter page"),
        ("page=x", "invalid query parameter page"),
        ("status=paused", "invalid query parameter status: Input should be 'accepted'"),
    ],
)
def test_list_refuses_bad_paging_and_statuses(
    refusals_env: Env, query: str, words: str
) -> None:
    env = refusals_env
    assert words in error(env.client.get(f"/v1/workflow?{query}", headers=env.auth()), 400)


# --- cancel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("start", [S.QUEUED, S.RUNNING])
def test_cancel_of_a_queued_or_running_workflow_is_200_and_published(
    env: Env, broker: Any, start: S
) -> None:
    workflow_id = env.workflow(start)
    response = env.client.post(f"/v1/workflow/{workflow_id}/cancel", headers=env.auth(),
                               json={"reason": "changed my mind"})
    assert response.status_code == 200
    assert response.content == b""
    row = env.row(workflow_id)
    assert row.status == start  # the cancel worker, not the API, writes the status
    assert row.cancel_requested_at is not None and row.cancel_published_at is not None
    assert (row.cancel_source, row.cancel_reason) == ("api", "changed my mind")
    assert row.cancel_actor is not None and row.cancel_actor.startswith("acme#token")
    messages = broker("cancel")
    assert [(name, args) for _, name, args in messages] == [
        ("comfy_cancel.cancel_workflows",
         [[workflow_id], "api", row.cancel_actor, "changed my mind"])
    ]
    assert broker("runner") == []


def test_cancel_without_a_body_is_fine(env: Env, broker: Any) -> None:
    workflow_id = env.workflow(S.QUEUED)
    response = env.client.post(f"/v1/workflow/{workflow_id}/cancel", headers=env.auth())
    assert (response.status_code, response.content) == (200, b"")
    [(_, _, args)] = broker("cancel")
    assert args[0] == [workflow_id] and args[3] is None  # no reason given


@pytest.mark.parametrize("start", [S.ACCEPTED, S.UPLOADED])
def test_cancel_before_it_is_queued_is_400(env: Env, broker: Any, start: S) -> None:
    workflow_id = env.workflow(start)
    response = env.client.post(f"/v1/workflow/{workflow_id}/cancel", headers=env.auth())
    assert error(response, 400) == (
        f"workflow {workflow_id} is {start.value}: it can be cancelled once it is queued"
    )
    assert env.row(workflow_id).cancel_requested_at is None
    assert broker("cancel") == []


@pytest.mark.parametrize("start", [S.COMPLETED, S.FAILED, S.CANCELLED])
def test_cancel_of_a_finished_workflow_is_400_naming_its_status(
    env: Env, broker: Any, start: S
) -> None:
    workflow_id = env.workflow(start)
    response = env.client.post(f"/v1/workflow/{workflow_id}/cancel", headers=env.auth())
    assert f"workflow {workflow_id} is {start.value}" in error(response, 400)
    assert broker("cancel") == []


def test_cancel_of_another_accounts_or_a_malformed_id_is_404(env: Env, broker: Any) -> None:
    foreign = env.workflow(S.RUNNING, account="other")
    headers = env.auth()
    for workflow_id in (foreign, "nope", "7d1c3f6e-0000-4000-8000-000000000000"):
        response = env.client.post(f"/v1/workflow/{workflow_id}/cancel", headers=headers)
        assert error(response, 404).startswith(f"no workflow {workflow_id}:")
    assert env.row(foreign).cancel_requested_at is None
    assert broker("cancel") == []


def test_cancel_needs_a_valid_token(env: Env, broker: Any) -> None:
    workflow_id = env.workflow(S.QUEUED)
    url = f"/v1/workflow/{workflow_id}/cancel"
    assert "Authorization: Bearer" in error(env.client.post(url), 401)
    for headers in ({"Authorization": "Bearer cfc_unknown"}, env.auth(days=-1)):
        response = env.client.post(url, headers=headers, json={"reason": "x"})
        assert "unknown or expired" in error(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
    assert env.row(workflow_id).cancel_requested_at is None
    assert broker("cancel") == []
    assert env.client.post(url, headers=env.auth(days=1)).status_code == 200


def test_a_token_deleted_while_the_gate_remembers_it_cannot_cancel(
    env: Env, broker: Any
) -> None:
    workflow_id = env.workflow(S.QUEUED)
    headers = env.auth()
    assert env.client.get(f"/v1/workflow/{workflow_id}", headers=headers).status_code == 200
    with env.db.transaction() as session:  # the gate has it cached for a few seconds
        session.execute(delete(ApiToken))
    response = env.client.post(f"/v1/workflow/{workflow_id}/cancel", headers=headers)
    assert "unknown or expired" in error(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"
    assert env.row(workflow_id).cancel_requested_at is None
    assert broker("cancel") == []


def test_cancel_with_the_broker_down_is_500_and_the_intent_is_kept(
    env: Env, broker_down: None
) -> None:
    workflow_id = env.workflow(S.RUNNING)
    response = env.client.post(f"/v1/workflow/{workflow_id}/cancel", headers=env.auth())
    assert error(response, 500) == PUBLISH_FAILED
    row = env.row(workflow_id)
    # The re-drive pass publishes it again redrive_after_seconds after that stamp.
    assert row.cancel_requested_at is not None
    assert row.cancel_published_at == row.cancel_requested_at


def test_a_repeated_cancel_is_200_keeps_the_first_request_and_audits_both(
    env: Env, broker: Any
) -> None:
    workflow_id = env.workflow(S.RUNNING)
    headers = env.auth()
    url = f"/v1/workflow/{workflow_id}/cancel"
    assert env.client.post(url, headers=headers, json={"reason": "first"}).status_code == 200
    first = env.row(workflow_id).cancel_requested_at
    assert env.client.post(url, headers=headers, json={"reason": "second"}).status_code == 200
    row = env.row(workflow_id)
    assert (row.cancel_requested_at, row.cancel_reason) == (first, "first")
    with env.db.transaction() as session:
        requests = [e for e in manager.events_of(session, workflow_id)
                    if e.kind == EventKind.CANCEL_REQUESTED]
    assert [e.reason for e in requests] == ["first", "second"]
    assert len(broker("cancel")) == 2


def test_the_cancel_request_shows_in_get(env: Env) -> None:
    workflow_id = env.workflow(S.QUEUED)
    headers = env.auth()
    env.client.post(f"/v1/workflow/{workflow_id}/cancel", headers=headers,
                    json={"reason": "too slow"})
    body = env.client.get(f"/v1/workflow/{workflow_id}", headers=headers).json()
    cancel = body["cancel"]
    assert body["status"] == "queued"
    assert (cancel["source"], cancel["reason"], cancel["outcome"], cancel["finished_at"]) == (
        "api", "too slow", None, None
    )
    assert cancel["freed_at"] is None and body["partial_outputs"] is None
    assert ISO_Z.match(cancel["requested_at"])
    assert 0 <= cancel["age_seconds"] < 60


SAVED = {"early": {"images": [{"filename": "a_00001_.png", "subfolder": "", "type": "output"}]}}


def test_a_cancelled_workflow_shows_its_partial_outputs_and_when_the_gpu_was_freed(
    env: Env,
) -> None:
    workflow_id = env.workflow(S.RUNNING)
    with env.db.transaction() as session:
        assert status.cancel_if_active(session, workflow_id, status.Actor("api", "a"),
                                       partial_outputs=SAVED).changed
        assert status.record_freed(session, [workflow_id]) == [workflow_id]
        assert status.record_freed(session, [workflow_id]) == []  # the first one counts
    headers = env.auth()
    body = env.client.get(f"/v1/workflow/{workflow_id}", headers=headers).json()
    assert (body["status"], body["outputs"], body["partial_outputs"]) == (
        "cancelled", None, SAVED)
    assert ISO_Z.match(body["cancel"]["freed_at"])
    assert body["cancel"]["freed_at"] >= body["cancel"]["finished_at"]
    listed = env.client.get("/v1/workflow", headers=headers).json()["workflows"]
    assert [w["partial_outputs"] for w in listed if w["id"] == workflow_id] == [SAVED]


def test_partial_outputs_and_freed_at_are_only_a_cancelled_workflows(env: Env) -> None:
    # The writers refuse other statuses; the view shows none even if a row carried some.
    completed = env.workflow(S.COMPLETED)
    with env.db.transaction() as session:
        assert not status.record_partial_outputs(session, completed, SAVED)
        assert status.record_freed(session, [completed, "no-such-workflow"]) == []
        session.execute(update(Workflow).where(Workflow.id == completed)
                        .values(partial_outputs=SAVED))
    body = env.client.get(f"/v1/workflow/{completed}", headers=env.auth()).json()
    assert body["status"] == "completed" and body["partial_outputs"] is None


def test_cancel_refuses_an_overlong_reason(env: Env) -> None:
    workflow_id = env.workflow(S.QUEUED)
    response = env.client.post(f"/v1/workflow/{workflow_id}/cancel", headers=env.auth(),
                               json={"reason": "x" * 1001})
    assert "reason: String should have at most 1000" in error(response, 400)
    assert env.row(workflow_id).cancel_requested_at is None


# --- failures -------------------------------------------------------------------------------


def test_an_unreachable_database_is_500_saying_a_retry_is_safe(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'missing-dir' / 'api.db'}"
    for env in make_env(url):
        response = env.client.get("/v1/workflow", headers={"Authorization": "Bearer cfc_x"})
        assert "retrying in a moment is safe" in error(response, 500)


def test_an_unexpected_error_is_a_generic_500_without_details(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("internal secret detail")

    monkeypatch.setattr(manager, "list_workflows", explode)
    response = env.client.get("/v1/workflow", headers=env.auth())
    message = error(response, 500)
    assert "secret" not in message and "RuntimeError" not in message


def test_unknown_routes_and_methods_get_the_error_body(env: Env) -> None:
    assert "no route GET /v2/nothing" in error(env.client.get("/v2/nothing"), 404)
    # Under /v1 the token comes first: a route's existence is no one's business without one.
    assert error(env.client.delete("/v1/workflow"), 401)
    assert "DELETE is not allowed" in error(
        env.client.delete("/v1/workflow", headers=env.auth()), 405
    )
    assert "no route GET /v1/nothing" in error(
        env.client.get("/v1/nothing", headers=env.auth()), 404
    )


def test_openapi_is_served(env: Env) -> None:
    paths = env.client.get("/openapi.json").json()["paths"]
    assert {"/v1/workflow", "/v1/workflow/{workflow_id}/cancel", "/v1/runner/{runner_id}"} <= set(
        paths
    )
    assert "multipart/form-data" in paths["/v1/workflow"]["post"]["requestBody"]["content"]


# --- runners --------------------------------------------------------------------------------


def test_runners_crud_never_echo_header_values(private_env: Env) -> None:
    env = private_env
    headers = env.auth()
    created = env.client.post("/v1/runner", headers=headers, json={
        "name": "gpu-1",
        "endpoint_url": "http://user:hunter2@10.0.0.5:8188/",
        "headers": {"X-Api-Key": "s3cret-value"},
        "tags": ["gpu"],
    })
    assert created.status_code == 200, created.text
    runner = created.json()
    assert "s3cret-value" not in created.text and "hunter2" not in created.text
    assert runner["headers"] == {"X-Api-Key": "***"}
    assert runner["endpoint_url"] == "http://user:***@10.0.0.5:8188"
    assert (runner["status"], runner["tags"]) == ("active", ["gpu"])

    listed = env.client.get("/v1/runner", headers=headers)
    assert [r["id"] for r in listed.json()] == [runner["id"]]
    assert "s3cret-value" not in listed.text

    updated = env.client.put(f"/v1/runner/{runner['id']}", headers=headers,
                             json={"status": "disabled", "tags": ["gpu", "big"]})
    assert updated.status_code == 200, updated.text
    assert (updated.json()["status"], updated.json()["tags"], updated.json()["name"]) == (
        "disabled", ["gpu", "big"], "gpu-1"
    )
    fetched = env.client.get(f"/v1/runner/{runner['id']}", headers=headers)
    assert fetched.json()["headers"] == {"X-Api-Key": "***"}
    with env.db.transaction() as session:
        stored = manager.get_runner(session, runner["id"])
        assert stored is not None and stored.sealed_headers is not None
        assert "s3cret-value" not in stored.sealed_headers  # encrypted at rest
        assert encryption.unseal(stored.sealed_headers, KEY) == {"X-Api-Key": "s3cret-value"}
        assert stored.endpoint_url == "http://user:hunter2@10.0.0.5:8188"

    replaced = env.client.put(f"/v1/runner/{runner['id']}", headers=headers,
                              json={"headers": {"Authorization": "Bearer z"}})
    assert replaced.json()["headers"] == {"Authorization": "***"}


INTERNAL_URLS = [
    "http://127.0.0.1:6379", "http://169.254.169.254/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/", "http://[::1]:8188",
    "http://0.0.0.0:8188", "http://2130706433:6379", "http://0x7f000001", "http://0177.0.0.1",
    "http://[::ffff:127.0.0.1]:6379", "http://[::ffff:a9fe:a9fe]", "http://localhost:8188",
    "http://api.localhost", "http://10.0.0.5:8188", "http://172.16.3.4", "http://192.168.0.1",
    "http://100.64.1.1", "http://[fc00::5]", "http://[fd12::1]", "http://[fe80::1]",
    "http://224.0.0.1", "http://[ff02::1]", "http://[::]", "http://240.0.0.1",
    "http://[64:ff9b::a9fe:a9fe]", "http://[2002:7f00:1::1]",
]


@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_runner_urls_to_internal_addresses_are_400(refusals_env: Env, url: str) -> None:
    env = refusals_env
    message = error(env.client.post("/v1/runner", headers=env.auth(),
                                     json={"name": "r", "endpoint_url": url}), 400)
    assert message.startswith("invalid endpoint_url: ")
    assert "COMFY_CANCEL_RUNNER_ALLOWED_NETWORKS" in message


def test_runner_url_changed_to_an_internal_address_is_400(private_env: Env) -> None:
    env = private_env
    headers = env.auth()
    created = env.client.post("/v1/runner", headers=headers,
                              json={"name": "r", "endpoint_url": "http://10.1.2.3:8188"})
    assert created.status_code == 200, created.text  # the operator allows 10.0.0.0/8
    runner_id = created.json()["id"]
    for url in ("http://127.0.0.1:6379", "http://169.254.169.254", "http://192.168.1.1"):
        response = env.client.put(f"/v1/runner/{runner_id}", headers=headers,
                                  json={"endpoint_url": url})
        assert "COMFY_CANCEL_RUNNER_ALLOWED_NETWORKS" in error(response, 400)
    with env.db.transaction() as session:
        stored = manager.get_runner(session, runner_id)
        assert stored is not None and stored.endpoint_url == "http://10.1.2.3:8188"


def test_runner_url_secrets_are_masked_in_every_answer(private_env: Env) -> None:
    env = private_env
    headers = env.auth()
    url = "https://ops:hunter2@10.0.0.7:8188/comfy?token=t0ps3cret&region=eu"
    created = env.client.post("/v1/runner", headers=headers,
                              json={"name": "r", "endpoint_url": url})
    shown = "https://ops:***@10.0.0.7:8188/comfy?token=***&region=***"
    assert created.json()["endpoint_url"] == shown
    for answer in (env.client.get("/v1/runner", headers=headers),
                   env.client.get(f"/v1/runner/{created.json()['id']}", headers=headers)):
        assert "t0ps3cret" not in answer.text and "hunter2" not in answer.text
        assert shown in answer.text


def test_runner_headers_without_a_secret_key_are_refused(tmp_path: Path, broker: Any) -> None:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(url)
    for env in make_env(url, secret_key=None):
        headers = env.auth()
        refused = env.client.post("/v1/runner", headers=headers, json={
            "name": "r", "endpoint_url": "http://h:1", "headers": {"Authorization": "Bearer x"}})
        assert "COMFY_CANCEL_SECRET_KEY" in error(refused, 400)
        plain = env.client.post("/v1/runner", headers=headers,
                                json={"name": "r", "endpoint_url": "http://h:1"})
        assert plain.status_code == 200, plain.text
        put = env.client.put(f"/v1/runner/{plain.json()['id']}", headers=headers,
                             json={"headers": {"Authorization": "Bearer x"}})
        assert "COMFY_CANCEL_SECRET_KEY" in error(put, 400)
        with env.db.transaction() as session:
            assert [r.sealed_headers for r in manager.list_runners(session, env.account_id())] \
                == [None]


def test_runners_list_with_a_wrong_key(tmp_path: Path, broker: Any) -> None:
    """Listing needs no key (names are kept in clear): a wrong key breaks no read."""
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(url)
    for env in make_env(url, secret_key=KEY):
        created = env.client.post("/v1/runner", headers=env.auth(), json={
            "name": "r", "endpoint_url": "http://h:1", "headers": {"X-Key": "v"}})
        assert created.status_code == 200, created.text
    for env in make_env(url, secret_key=encryption.new_key()):
        listed = env.client.get("/v1/runner", headers=env.auth())
        assert listed.status_code == 200 and listed.json()[0]["headers"] == {"X-Key": "***"}


def test_runners_of_another_account_are_404(env: Env) -> None:
    other = env.runner_id(account="other")
    headers = env.auth()
    for call in (env.client.get, lambda url, **kw: env.client.put(url, json={"name": "x"}, **kw)):
        assert error(call(f"/v1/runner/{other}", headers=headers), 404).startswith(
            f"no runner {other}:"
        )
    assert env.client.get("/v1/runner", headers=headers).json() == []


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"name": "r", "endpoint_url": "ftp://x"}, "endpoint_url: 'ftp://x' is not an http(s) URL"),
        ({"name": "r", "endpoint_url": "http://"}, "endpoint_url"),
        ({"name": "r", "endpoint_url": "http://h:99999"}, "endpoint_url"),
        ({"name": "r", "endpoint_url": "http://h", "tags": list("abcdefghijk")}, "tags"),
        ({"name": "r", "endpoint_url": "http://h", "status": "paused"}, "status"),
        ({"name": "r", "endpoint_url": "http://h", "headers": {"X": "a\r\nEvil: 1"}},
         "contains a line break"),
        ({"name": "r", "endpoint_url": "http://h", "headers": {"bad name": "v"}},
         "not a valid HTTP header name"),
        ({"endpoint_url": "http://h"}, "name: Field required"),
    ],
)
def test_runner_create_refuses_invalid_fields(
    refusals_env: Env, body: dict[str, Any], words: str
) -> None:
    env = refusals_env
    assert words in error(env.client.post("/v1/runner", headers=env.auth(), json=body), 400)


def test_runner_update_refuses_nulls(env: Env) -> None:
    headers = env.auth()
    runner_id = env.client.post("/v1/runner", headers=headers, json={
        "name": "r", "endpoint_url": "http://h:1"}).json()["id"]
    response = env.client.put(f"/v1/runner/{runner_id}", headers=headers, json={"name": None})
    assert "name cannot be null" in error(response, 400)


# --- health ---------------------------------------------------------------------------------


def test_healthz_needs_no_token(env: Env) -> None:
    assert env.client.get("/healthz").json() == {"status": "ok"}


def test_readyz_is_503_when_redis_is_unreachable(env: Env) -> None:
    response = env.client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == 503 and "redis unreachable" in body["message"]
    assert body["database"] == "ok" and body["redis"].startswith("unreachable")


def test_readyz_is_200_when_both_answer(env: Env) -> None:
    env.app.state.redis = fakeredis.FakeRedis()
    response = env.client.get("/readyz")
    assert (response.status_code, response.json()) == (200, {"database": "ok", "redis": "ok"})


def test_readyz_is_503_when_the_database_is_unreachable(tmp_path: Path) -> None:
    for env in make_env(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}"):
        env.app.state.redis = fakeredis.FakeRedis()
        response = env.client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["database"].startswith("unreachable")


# --- the module-level app -------------------------------------------------------------------


def test_the_module_level_app_is_built_on_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from comfy_cancel.config import get_settings

    url = f"sqlite:///{tmp_path / 'lazy.db'}"
    monkeypatch.setenv("COMFY_CANCEL_DATABASE_URL", url)
    monkeypatch.setattr(api, "_app", None)
    get_settings.cache_clear()
    try:
        app = api.app
        assert app is api.app
        assert app.state.settings.database_url == url
    finally:
        get_settings.cache_clear()
        engine_for.cache_clear()
