"""``POST /v1/runner/{id}/interrupt`` against a migrated SQLite file and Celery's in-memory
broker: what it records and publishes, and what it refuses. (The whole path, to the runner
and ComfyUI, is in tests/acceptance/test_interrupt_and_timeouts.py.)"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import update

from comfy_cancel import manager
from comfy_cancel.models import EventKind, Runner, WorkflowStatus
from tests.apitest import Env, error
from tests.helpers import seed_workflow

S = WorkflowStatus
UNKNOWN = "7d1c3f6e-0000-4000-8000-000000000000"


def _on_runner(env: Env, runner_id: str, *statuses: S, account: str = "acme") -> list[str]:
    return [seed_workflow(env.db, env.account_id(account), runner_id, to) for to in statuses]


def interrupt(env: Env, runner_id: str, headers: dict[str, str], **body: Any) -> Any:
    return env.client.post(f"/v1/runner/{runner_id}/interrupt", headers=headers,
                           json=body or None)


def test_interrupt_requests_the_cancel_of_what_runs_and_leaves_the_rest(
    env: Env, broker: Any
) -> None:
    runner_id = env.runner_id()
    running_a, running_b, queued, accepted, done = _on_runner(
        env, runner_id, S.RUNNING, S.RUNNING, S.QUEUED, S.ACCEPTED, S.COMPLETED)
    elsewhere = env.workflow(S.RUNNING)  # the same account, another runner

    response = interrupt(env, runner_id, env.auth(), reason="GPU needed")

    assert (response.status_code, response.content) == (200, b"")
    for workflow_id in (running_a, running_b):
        row = env.row(workflow_id)
        assert row.status == S.RUNNING  # the cancel worker writes the status, as for a cancel
        assert (row.cancel_source, row.cancel_reason) == ("runner_interrupt", "GPU needed")
        assert row.cancel_actor is not None and row.cancel_actor.startswith("acme#token")
        assert row.cancel_published_at is not None
    for workflow_id in (queued, accepted, done, elsewhere):
        assert env.row(workflow_id).cancel_requested_at is None
    [(_, task, args)] = broker("cancel")  # the customers' queue, one message
    actor = env.row(running_a).cancel_actor
    assert task == "comfy_cancel.cancel_workflows"
    assert sorted(args[0]) == sorted([running_a, running_b])
    assert args[1:] == ["runner_interrupt", actor, "GPU needed"]
    with env.db.transaction() as session:
        kinds = [(e.kind, e.source) for e in manager.events_of(session, running_a)]
    assert (EventKind.CANCEL_REQUESTED.value, "runner_interrupt") in kinds


def test_interrupt_with_nothing_running_is_200_and_changes_nothing(
    env: Env, broker: Any
) -> None:
    runner_id = env.runner_id()
    [queued] = _on_runner(env, runner_id, S.QUEUED)
    for _ in range(2):
        response = interrupt(env, runner_id, env.auth())
        assert (response.status_code, response.content) == (200, b"")
    assert env.row(queued).cancel_requested_at is None
    assert broker("cancel") == []


def test_a_repeated_interrupt_is_200_and_keeps_the_first_request(env: Env, broker: Any) -> None:
    runner_id = env.runner_id()
    [running] = _on_runner(env, runner_id, S.RUNNING)
    headers = env.auth()
    assert interrupt(env, runner_id, headers, reason="first").status_code == 200
    first = env.row(running).cancel_requested_at
    assert interrupt(env, runner_id, headers, reason="second").status_code == 200
    row = env.row(running)
    assert (row.cancel_requested_at, row.cancel_reason) == (first, "first")
    assert len(broker("cancel")) == 2


def test_a_disabled_runner_can_still_be_interrupted(env: Env, broker: Any) -> None:
    runner_id = env.runner_id()
    [running] = _on_runner(env, runner_id, S.RUNNING)
    with env.db.transaction() as session:
        session.execute(update(Runner).where(Runner.id == runner_id).values(status="disabled"))
    assert interrupt(env, runner_id, env.auth()).status_code == 200
    assert env.row(running).cancel_source == "runner_interrupt"
    assert len(broker("cancel")) == 1


def test_interrupt_of_another_accounts_unknown_or_malformed_runner_is_404(
    env: Env, broker: Any
) -> None:
    theirs = env.runner_id(account="globex")
    [their_running] = _on_runner(env, theirs, S.RUNNING, account="globex")
    headers = env.auth()
    messages = {runner_id: error(interrupt(env, runner_id, headers), 404)
                for runner_id in (theirs, UNKNOWN, "nope")}
    assert messages[theirs].replace(theirs, "X") == messages[UNKNOWN].replace(UNKNOWN, "X")
    assert messages["nope"].startswith("no runner nope:")
    assert env.row(their_running).cancel_requested_at is None
    assert broker("cancel") == []


def test_interrupt_needs_a_valid_token(env: Env, broker: Any) -> None:
    runner_id = env.runner_id()
    [running] = _on_runner(env, runner_id, S.RUNNING)
    for headers in ({}, {"Authorization": "Bearer cfc_unknown"}, env.auth(days=-1)):
        response = interrupt(env, runner_id, headers)
        assert error(response, 401) and response.headers["www-authenticate"] == "Bearer"
    assert env.row(running).cancel_requested_at is None
    assert broker("cancel") == []


def test_interrupt_refuses_an_overlong_reason(env: Env, broker: Any) -> None:
    runner_id = env.runner_id()
    [running] = _on_runner(env, runner_id, S.RUNNING)
    response = interrupt(env, runner_id, env.auth(), reason="x" * 1001)
    assert "reason: String should have at most 1000" in error(response, 400)
    assert env.row(running).cancel_requested_at is None


@pytest.mark.usefixtures("broker_down")
def test_interrupt_with_the_broker_down_is_500_and_the_requests_are_kept(env: Env) -> None:
    runner_id = env.runner_id()
    [running] = _on_runner(env, runner_id, S.RUNNING)
    response = interrupt(env, runner_id, env.auth())
    assert error(response, 500) == (
        "the interrupt is recorded but could not be handed to the cancel queue; "
        "retrying is safe"
    )
    row = env.row(running)  # the re-drive pass hands it on
    assert row.cancel_source == "runner_interrupt" and row.cancel_published_at is not None
