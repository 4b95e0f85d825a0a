"""Each branch of a cancel, end to end: the API, real Redis, real Celery worker
processes, the simulated ComfyUI server, and SQLite or PostgreSQL."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from comfy_cancel import manager, tasks
from comfy_cancel.embedded.comfyui_sim import TINY_PROMPT, blur_chain
from comfy_cancel.models import WorkflowStatus
from testbed.stack import Stack, cancel, running_stack, sim_calls, sim_requests
from tests.helpers import seed_workflow

pytestmark = pytest.mark.acceptance
S = WorkflowStatus
TERMINAL = {"completed", "failed", "cancelled"}
LONG = blur_chain(40)  # about 6 s at the stack's time_scale 0.2


def outcome_events(stack: Stack, workflow_id: str) -> list[tuple[str | None, str | None]]:
    with stack.db.transaction() as session:
        return [(e.kind, e.outcome) for e in manager.events_of(session, workflow_id)
                if e.outcome is not None]


def test_cancel_of_a_running_workflow_interrupts_its_prompt_and_ends_cancelled(
    stack: Stack,
) -> None:
    workflow_id = stack.submit(LONG, name="long")
    running = stack.wait_status(workflow_id, {"running"} | TERMINAL)
    assert running["status"] == "running"
    response = cancel(stack, workflow_id, reason="customer changed their mind")
    assert response.status_code == 200 and response.content == b""
    wf = stack.wait_status(workflow_id, TERMINAL, timeout=20)
    assert wf["status"] == "cancelled"
    assert wf["cancel"]["outcome"] == "cancelled"
    assert wf["cancel"]["source"] == "api"
    assert wf["cancel"]["reason"] == "customer changed their mind"
    assert wf["outputs"] is None  # partial outputs are not attached
    targeted = [c for c in sim_calls(stack) if c["prompt_id"] == wf["prompt_id"]]
    assert targeted and targeted[0]["effective"]
    assert all(c["prompt_id"] for c in sim_calls(stack))  # never a bare interrupt
    assert ("transition", "cancelled") in outcome_events(stack, workflow_id)


def test_cancel_of_a_pending_prompt_removes_only_that_prompt(stack: Stack) -> None:
    # Long enough (about 10 s) that on a loaded machine the second prompt is still pending
    # behind it when its cancel arrives; a short one let the second run and complete.
    first = stack.submit(blur_chain(60), name="first")
    stack.wait_status(first, {"running"} | TERMINAL)
    second = stack.submit(TINY_PROMPT, name="second")

    def second_pending() -> bool:
        wf = stack.workflow(second)
        return wf["status"] == "queued" and wf["queue_number"] is not None

    stack.wait_for(second_pending, what="the second prompt pending in ComfyUI's queue")
    assert cancel(stack, second).status_code == 200
    wf = stack.wait_status(second, TERMINAL)
    assert wf["status"] == "cancelled" and wf["cancel"]["outcome"] == "cancelled"
    # The first workflow, running on the same ComfyUI server, is untouched and completes.
    assert stack.wait_status(first, TERMINAL, timeout=60)["status"] == "completed"
    first_prompt = stack.workflow(first)["prompt_id"]
    assert all(c["prompt_id"] != first_prompt for c in sim_calls(stack))
    assert any(c["prompt_id"] == wf["prompt_id"] for c in sim_calls(stack))


def test_cancelling_the_running_one_of_two_on_a_runner_leaves_the_other(stack: Stack) -> None:
    drop = stack.submit(LONG, name="drop")
    stack.wait_status(drop, {"running"} | TERMINAL)
    keep = stack.submit(blur_chain(4), name="keep")  # pending behind it on the same server
    stack.wait_for(lambda: stack.workflow(keep)["queue_number"] is not None,
                   what="the second prompt to be pending")
    assert cancel(stack, drop).status_code == 200
    assert stack.wait_status(drop, TERMINAL, timeout=20)["status"] == "cancelled"
    assert stack.wait_status(keep, TERMINAL, timeout=20)["status"] == "completed"
    keep_prompt = stack.workflow(keep)["prompt_id"]
    assert all(c["prompt_id"] != keep_prompt for c in sim_calls(stack))


def test_cancel_of_a_queued_workflow_whose_runner_task_has_not_started(stack: Stack) -> None:
    # The runner task was never delivered: queued in the database, nothing in ComfyUI.
    workflow_id = seed_workflow(stack.db, stack.account_id, stack.runner_id, S.QUEUED)
    assert cancel(stack, workflow_id).status_code == 200
    wf = stack.wait_status(workflow_id, TERMINAL)
    assert wf["status"] == "cancelled" and wf["cancel"]["outcome"] == "cancelled"
    # A revoke lost (no runner listening) changes nothing: the late runner task re-checks
    # the database and submits nothing.
    with stack.db.transaction() as session:
        row = manager.get_workflow(session, workflow_id)
        assert row is not None and row.runner_task_id
        task_id = row.runner_task_id
    tasks.run_workflow.apply_async(args=[workflow_id], task_id=task_id + "-late")
    probe = stack.submit(TINY_PROMPT, name="probe")  # runs after the late task on one queue
    assert stack.wait_status(probe, TERMINAL)["status"] == "completed"
    prompts = [r for r in sim_requests(stack) if r["path"].endswith("/prompt")
               and r["method"] == "POST"]
    assert len(prompts) == 1  # only the probe's
    assert stack.workflow(workflow_id)["status"] == "cancelled"


def test_a_repeat_cancel_is_idempotent_and_terminal_or_foreign_ones_are_refused(
    stack: Stack,
) -> None:
    workflow_id = stack.submit(LONG, name="long")
    stack.wait_status(workflow_id, {"running"} | TERMINAL)
    # Hold the cancel worker still so the first request is surely in flight when the repeat
    # comes: the whole cancel now takes about 0.1 s, less than two calls on a busy machine.
    cancel_worker = stack.workers[0]
    cancel_worker.send_signal(signal.SIGSTOP)
    try:
        first, again = cancel(stack, workflow_id), cancel(stack, workflow_id)
    finally:
        cancel_worker.send_signal(signal.SIGCONT)
    assert (first.status_code, again.status_code) == (200, 200), again.text
    wf = stack.wait_status(workflow_id, TERMINAL, timeout=20)
    assert wf["status"] == "cancelled"
    late = cancel(stack, workflow_id)
    assert late.status_code == 400 and "cancelled" in late.json()["message"]
    with stack.db.transaction() as session:
        other = manager.get_or_create_account(session, "globex")
        other_token = manager.create_token(session, other)
    foreign = cancel(stack, workflow_id, token=other_token)
    unknown = cancel(stack, "00000000-0000-4000-8000-000000000000", token=other_token)
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json()["message"].replace(workflow_id, "X") == unknown.json()[
        "message"].replace("00000000-0000-4000-8000-000000000000", "X")
    assert cancel(stack, workflow_id, token="cfc_not-a-token").status_code == 401
    completed = stack.submit(TINY_PROMPT, name="done")
    stack.wait_status(completed, TERMINAL)
    refused = cancel(stack, completed)
    assert refused.status_code == 400 and "completed" in refused.json()["message"]


def _kill_runner_worker(stack: Stack) -> None:
    runner_proc = stack.workers[1]
    runner_proc.send_signal(signal.SIGKILL)
    runner_proc.wait(10)


@pytest.mark.postgres
def test_a_runner_that_does_not_acknowledge_is_escalated_and_forced(
    pg_database_url: str, redis_db_url: str, tmp_path: Path
) -> None:
    with running_stack(pg_database_url, redis_db_url, tmp_path,
                       cancel_grace_seconds=1.5) as stack:
        workflow_id = stack.submit(LONG, name="orphan")
        stack.wait_status(workflow_id, {"running"} | TERMINAL)
        _kill_runner_worker(stack)
        assert cancel(stack, workflow_id).status_code == 200
        wf = stack.wait_status(workflow_id, TERMINAL, timeout=20)
        assert wf["status"] == "cancelled"
        assert wf["cancel"]["outcome"] == "forced"
        # The escalation asks ComfyUI directly, so the GPU is freed without the runner.
        stack.wait_for(
            lambda: any(c["prompt_id"] == wf["prompt_id"] for c in sim_calls(stack)),
            what="the escalation's cancel call on ComfyUI",
        )
        # ... and watches ComfyUI let go of it: the GPU freed, confirmed without the runner.
        stack.wait_for(lambda: stack.workflow(workflow_id)["cancel"]["freed_at"] is not None,
                       what="freed_at recorded by the cancel worker")


@pytest.mark.postgres
def test_a_runner_whose_heartbeat_is_gone_ends_runner_lost(
    pg_database_url: str, redis_db_url: str, tmp_path: Path
) -> None:
    with running_stack(pg_database_url, redis_db_url, tmp_path,
                       heartbeat_timeout_seconds=1.0) as stack:
        workflow_id = stack.submit(LONG, name="lost")
        stack.wait_status(workflow_id, {"running"} | TERMINAL)
        _kill_runner_worker(stack)

        def heartbeat_stale() -> bool:
            with stack.db.transaction() as session:
                row = manager.get_workflow(session, workflow_id)
                assert row is not None and row.heartbeat_at is not None
                from comfy_cancel.models import utcnow
                return (utcnow() - row.heartbeat_at).total_seconds() > 1.2

        stack.wait_for(heartbeat_stale, what="the heartbeat to go stale")
        assert cancel(stack, workflow_id).status_code == 200
        wf = stack.wait_status(workflow_id, TERMINAL, timeout=20)
        assert wf["status"] == "cancelled" and wf["cancel"]["outcome"] == "runner_lost"


@pytest.mark.postgres
def test_an_unreachable_comfyui_server_is_retried_then_forced(
    pg_database_url: str, redis_db_url: str, tmp_path: Path
) -> None:
    with running_stack(pg_database_url, redis_db_url, tmp_path,
                       cancel_grace_seconds=2.0) as stack:
        workflow_id = stack.submit(LONG, name="unreachable")
        stack.wait_status(workflow_id, {"running"} | TERMINAL)
        stack.sim.stop()
        assert cancel(stack, workflow_id).status_code == 200
        wf = stack.wait_status(workflow_id, TERMINAL, timeout=30)
        assert wf["status"] == "cancelled" and wf["cancel"]["outcome"] == "forced"
        assert wf["cancel"]["freed_at"] is None  # nobody could see ComfyUI let go


@pytest.mark.postgres
def test_the_targeted_interrupt_fallback_on_a_server_without_the_jobs_api(
    pg_database_url: str, redis_db_url: str, tmp_path: Path
) -> None:
    with running_stack(pg_database_url, redis_db_url, tmp_path, jobs_api=False) as stack:
        workflow_id = stack.submit(LONG, name="old-comfyui")
        stack.wait_status(workflow_id, {"running"} | TERMINAL)
        assert cancel(stack, workflow_id).status_code == 200
        wf = stack.wait_status(workflow_id, TERMINAL, timeout=20)
        assert wf["status"] == "cancelled" and wf["cancel"]["outcome"] == "cancelled"
        kinds = {c["kind"] for c in sim_calls(stack) if c["prompt_id"] == wf["prompt_id"]}
        assert "interrupt" in kinds and "jobs_cancel" not in kinds


@pytest.mark.postgres
def test_a_running_cancel_does_not_hold_a_worker_slot_for_the_grace_period(
    pg_database_url: str, redis_db_url: str, tmp_path: Path
) -> None:
    # One cancel-worker thread and a long grace period: a queued workflow's cancel sent
    # after a running one's must not wait for that grace period to end.
    with running_stack(pg_database_url, redis_db_url, tmp_path, cancel_grace_seconds=30.0,
                       cancel_concurrency=1) as stack:
        running = stack.submit(LONG, name="running")
        stack.wait_status(running, {"running"} | TERMINAL)
        _kill_runner_worker(stack)  # nobody will acknowledge: only escalation ends it
        queued = seed_workflow(stack.db, stack.account_id, stack.runner_id, S.QUEUED)
        assert cancel(stack, running).status_code == 200
        assert cancel(stack, queued).status_code == 200
        assert stack.wait_status(queued, TERMINAL, timeout=10)["status"] == "cancelled"
        assert stack.workflow(running)["status"] == "running"  # still inside its grace
