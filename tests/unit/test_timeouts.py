"""A workflow's own ``timeout_seconds``: taken on submit (JSON and the multipart form),
shown with its deadline, refused when it is not whole seconds from 1 to 7 days; and the
pass that cancels what is past its deadline (sweeps.cancel_timed_out), called directly on
SQLite, fakeredis and kombu's memory transport. (The whole path, through the cancel worker
to the runner and ComfyUI, is in tests/acceptance/test_interrupt_and_timeouts.py.)"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from comfy_cancel import cancel, status, sweeps
from comfy_cancel.embedded.comfyui_sim import TINY_PROMPT
from comfy_cancel.models import CancelOutcome, Workflow, WorkflowStatus, utcnow
from comfy_cancel.schemas import MAX_TIMEOUT_SECONDS, WorkflowSummary
from comfy_cancel.signals import SignalKind
from tests.apitest import Env, error, files
from tests.unit.domain import Domain

S = WorkflowStatus
BAD_TIMEOUT = (f"invalid timeout_seconds: must be a whole number of seconds from 1 to "
               f"{MAX_TIMEOUT_SECONDS} (7 days), or left out for no timeout")


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- the API --------------------------------------------------------------------------------


def test_submit_with_a_timeout_shows_it_and_its_deadline(env: Env, broker: Any) -> None:
    headers = env.auth()
    response = env.client.post("/v1/workflow", headers=headers, json={
        "name": "j", "workflow_json": TINY_PROMPT, "timeout_seconds": 90})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["timeout_seconds"] == 90
    assert _parse(body["deadline_at"]) == _parse(body["created_at"]) + timedelta(seconds=90)
    assert body["deadline_at"].endswith("Z")
    row = env.row(body["id"])
    assert (row.timeout_seconds, row.deadline_at) == (90, _parse(body["deadline_at"]))
    shown = env.client.get(f"/v1/workflow/{body['id']}", headers=headers).json()
    assert (shown["timeout_seconds"], shown["deadline_at"]) == (90, body["deadline_at"])
    [listed] = env.client.get("/v1/workflow", headers=headers).json()["workflows"]
    assert (listed["timeout_seconds"], listed["deadline_at"]) == (90, body["deadline_at"])
    assert len(broker("runner")) == 1


def test_submit_with_a_timeout_in_the_products_form(env: Env) -> None:
    form = files("f")
    form["data"]["timeout_seconds"] = "30"
    response = env.client.post("/v1/workflow", headers=env.auth(), **form)
    assert response.status_code == 200, response.text
    assert response.json()["timeout_seconds"] == 30
    assert env.row(response.json()["id"]).deadline_at is not None


def test_without_a_timeout_there_is_no_deadline(env: Env) -> None:
    response = env.client.post("/v1/workflow", headers=env.auth(), json={
        "name": "j", "workflow_json": TINY_PROMPT})
    body = response.json()
    assert (body["timeout_seconds"], body["deadline_at"]) == (None, None)
    assert env.row(body["id"]).deadline_at is None


@pytest.mark.parametrize(
    "timeout", [0, -5, MAX_TIMEOUT_SECONDS + 1, 1.5, 10.0, True, "abc", "", "1e3", [60], {}],
)
def test_submit_refuses_a_timeout_that_is_not_whole_seconds_in_range(
    refusals_env: Env, timeout: Any
) -> None:
    env = refusals_env
    body = {"name": "bad-timeout", "workflow_json": TINY_PROMPT, "timeout_seconds": timeout}
    response = env.client.post("/v1/workflow", headers=env.auth(), json=body)
    assert error(response, 400) == BAD_TIMEOUT
    with env.db.transaction() as session:
        stored = session.execute(select(func.count()).select_from(Workflow)
                                 .where(Workflow.name == "bad-timeout")).scalar_one()
    assert stored == 0


@pytest.mark.parametrize("timeout", ["0", "-1", "ten", "604801", "2.5"])
def test_the_form_refuses_a_bad_timeout_too(refusals_env: Env, timeout: str) -> None:
    env = refusals_env
    form = files("bad-form-timeout")
    form["data"]["timeout_seconds"] = timeout
    response = env.client.post("/v1/workflow", headers=env.auth(), **form)
    assert error(response, 400) == BAD_TIMEOUT


def test_the_longest_timeout_is_accepted(env: Env) -> None:
    response = env.client.post("/v1/workflow", headers=env.auth(), json={
        "name": "week", "workflow_json": TINY_PROMPT, "timeout_seconds": MAX_TIMEOUT_SECONDS})
    assert response.json()["timeout_seconds"] == MAX_TIMEOUT_SECONDS


def test_the_openapi_document_gives_the_bounds(env: Env) -> None:
    document = env.client.get("/openapi.json").json()
    content = document["paths"]["/v1/workflow"]["post"]["requestBody"]["content"]
    form = content["multipart/form-data"]["schema"]["properties"]["timeout_seconds"]
    assert (form["minimum"], form["maximum"]) == (1, MAX_TIMEOUT_SECONDS)
    [json_form, _null] = content["application/json"]["schema"]["properties"][
        "timeout_seconds"]["anyOf"]
    assert (json_form["minimum"], json_form["maximum"]) == (1, MAX_TIMEOUT_SECONDS)


# --- the timeout pass -----------------------------------------------------------------------


def _with_timeout(domain: Domain, to: S, *, seconds_ago: float, runner_id: str | None = None
                  ) -> str:
    """A workflow at ``to`` whose deadline passed ``seconds_ago`` (negative: still ahead)."""
    workflow_id = domain.workflow(to, runner_id)
    domain.set(workflow_id, timeout_seconds=60,
               deadline_at=utcnow() - timedelta(seconds=seconds_ago))
    return workflow_id


def test_the_pass_requests_the_cancel_of_what_is_past_its_deadline_and_nothing_else(
    domain: Domain, broker: Any
) -> None:
    runner_id = domain.runner()
    queued = _with_timeout(domain, S.QUEUED, seconds_ago=1, runner_id=runner_id)
    running = _with_timeout(domain, S.RUNNING, seconds_ago=5, runner_id=runner_id)
    ahead = _with_timeout(domain, S.RUNNING, seconds_ago=-60, runner_id=runner_id)
    accepted = _with_timeout(domain, S.ACCEPTED, seconds_ago=1, runner_id=runner_id)
    asked = _with_timeout(domain, S.RUNNING, seconds_ago=1, runner_id=runner_id)
    domain.request(asked)  # the customer cancelled first: that request stands
    no_timeout = domain.workflow(S.RUNNING, runner_id)

    requested = sweeps.cancel_timed_out(domain.ctx)

    assert sorted(requested) == sorted([running, queued])
    for workflow_id in (queued, running):
        row = domain.row(workflow_id)
        assert (row.cancel_source, row.cancel_actor) == ("deadline", "deadline")
        assert row.cancel_reason == "its timeout_seconds ran out"
        assert row.cancel_published_at is not None
    for workflow_id in (ahead, accepted, no_timeout):
        assert domain.row(workflow_id).cancel_requested_at is None
    assert domain.row(asked).cancel_source == "api"
    [(_, task, args)] = broker("cancel")  # the customers' cancel queue
    assert task == "comfy_cancel.cancel_workflows"
    assert sorted(args[0]) == sorted([running, queued])
    assert args[1:] == ["deadline", "deadline", "its timeout_seconds ran out"]
    assert sweeps.cancel_timed_out(domain.ctx) == []  # requested once
    assert broker("cancel") == []

    # The cancel worker then does what it does with any request, the outcome as usual.
    outcomes = cancel.handle_many(domain.ctx, args[0], status.Actor(*args[1:]))
    assert outcomes == {queued: CancelOutcome.CANCELLED, running: None}
    assert domain.row(queued).status == S.CANCELLED
    assert domain.row(queued).cancel_outcome == CancelOutcome.CANCELLED
    assert domain.signal(running) is SignalKind.CANCEL


def test_an_accepted_workflow_past_its_deadline_is_cancelled_once_it_is_queued(
    domain: Domain, broker: Any
) -> None:
    runner_id = domain.runner()
    workflow_id = _with_timeout(domain, S.ACCEPTED, seconds_ago=1, runner_id=runner_id)
    assert sweeps.cancel_timed_out(domain.ctx) == []
    with domain.ctx.db.transaction() as session:
        assert status.mark_uploaded(session, workflow_id, runner_id).changed
    with domain.ctx.db.transaction() as session:
        assert status.mark_queued(session, workflow_id).changed
    assert sweeps.cancel_timed_out(domain.ctx) == [workflow_id]
    assert len(broker("cancel")) == 1


@pytest.mark.parametrize("end", [S.COMPLETED, S.FAILED])
def test_a_workflow_that_ended_leaves_the_pass_and_still_shows_its_deadline(
    domain: Domain, broker: Any, end: S
) -> None:
    workflow_id = _with_timeout(domain, S.RUNNING, seconds_ago=-60)
    with domain.ctx.db.transaction() as session:
        if end is S.COMPLETED:
            assert status.complete_if_running(session, workflow_id, {}).changed
        else:
            assert status.fail(session, workflow_id, exception_type="E",
                               exception_message="boom").changed
    row = domain.row(workflow_id)
    assert row.deadline_at is None  # out of the open-deadline index
    domain.set(workflow_id, created_at=utcnow() - timedelta(seconds=120))  # long past it
    assert sweeps.cancel_timed_out(domain.ctx) == []
    assert domain.row(workflow_id).cancel_requested_at is None
    assert broker("cancel") == []
    view = WorkflowSummary.of(domain.row(workflow_id))
    assert view.timeout_seconds == 60
    assert view.deadline_at == domain.row(workflow_id).created_at + timedelta(seconds=60)


def test_the_pass_works_through_more_than_one_batch(domain: Domain, broker: Any) -> None:
    domain.ctx.settings.sweep_batch_size = 2
    runner_id = domain.runner()
    due = [_with_timeout(domain, S.QUEUED, seconds_ago=10 - i, runner_id=runner_id)
           for i in range(5)]
    assert sorted(sweeps.cancel_timed_out(domain.ctx)) == sorted(due)
    # The earliest deadlines first, a batch at a time.
    assert [set(args[0]) for _, _, args in broker("cancel")] == [
        set(due[:2]), set(due[2:4]), set(due[4:])]


def test_the_full_sweep_runs_the_pass_and_its_dry_run_writes_nothing(
    domain: Domain, broker: Any
) -> None:
    workflow_id = _with_timeout(domain, S.RUNNING, seconds_ago=1)
    assert sweeps.sweep(domain.ctx, dry_run=True).timed_out == [workflow_id]
    assert domain.row(workflow_id).cancel_requested_at is None
    assert broker("cancel") == []
    report = sweeps.sweep(domain.ctx)
    assert report.timed_out == [workflow_id] and report.counts()["timed_out"] == 1
    assert domain.row(workflow_id).cancel_source == "deadline"



def test_the_operator_page_sees_a_timeout_nobody_acted_on_since_its_deadline(
    domain: Domain, broker: Any
) -> None:
    workflow_id = _with_timeout(domain, S.RUNNING, seconds_ago=30)
    assert sweeps.stuck_now(domain.ctx).timed_out == [workflow_id]  # read only
    row = domain.row(workflow_id)
    assert row.cancel_requested_at is None and broker("cancel") == []
    assert sweeps.stuck_since("timed_out", row) == row.deadline_at
