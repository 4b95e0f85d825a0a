"""The runner (runner.py) called directly, on a thread of the test instead of a Celery
worker: it drives a workflow on a simulated ComfyUI, fails a prompt ComfyUI rejects,
acknowledges a cancel signal delivered through its signal listener on fakeredis, and leaves
quietly when a newer runner task owns its workflow."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from comfy_cancel import cancel, runner, status
from comfy_cancel.embedded.comfyui_sim import TINY_PROMPT, RunningSim, blur_chain
from comfy_cancel.models import CancelOutcome, WorkflowStatus
from tests.unit.domain import API, GRACE_SECONDS, Domain, wait_until

S = WorkflowStatus
LONG = blur_chain(20)  # about 16 s on a sim at time scale 1: it runs until cancelled
EARLY_SAVE = blur_chain(20, early_save=1)  # the same, with an image saved after 0.8 s


@pytest.fixture
def background() -> Iterator[Callable[..., Future[Any]]]:
    """Run a call on a thread; the test waits for its result."""
    with ThreadPoolExecutor(2, thread_name_prefix="runner") as pool:
        yield pool.submit


def transitions(domain: Domain, workflow_id: str) -> list[str | None]:
    return [to for kind, to, _ in domain.events(workflow_id) if kind == "transition"]


def task_of(domain: Domain, workflow_id: str) -> str:
    return str(domain.row(workflow_id).runner_task_id)


def test_a_run_drives_an_accepted_workflow_to_completed_on_its_comfyui(
    domain: Domain, sim: RunningSim
) -> None:
    # Accepted: no runner chosen yet; the run claims the account's one runner, the sim's.
    workflow_id = domain.workflow(S.ACCEPTED, domain.runner(sim.url))

    assert runner.run(domain.ctx, workflow_id, task_of(domain, workflow_id)) == "completed"

    row = domain.row(workflow_id)
    assert transitions(domain, workflow_id) == [
        "accepted", "uploaded", "queued", "running", "completed"]
    assert row.prompt_id and row.outputs and "3" in row.outputs  # SaveImage's node
    assert row.cancel_outcome is None and row.heartbeat_at is not None
    entry = domain.on_sim(sim).history(row.prompt_id)
    assert entry is not None and entry["status"]["status_str"] == "success"


def test_a_prompt_comfyui_rejects_fails_the_workflow_with_its_node_error(
    domain: Domain, sim: RunningSim
) -> None:
    prompt = copy.deepcopy(TINY_PROMPT)
    del prompt["1"]["inputs"]["width"]  # a required input missing
    workflow_id = domain.workflow(S.QUEUED, domain.runner(sim.url), prompt=prompt)

    assert runner.run(domain.ctx, workflow_id, task_of(domain, workflow_id)) == "failed"

    row = domain.row(workflow_id)
    assert row.exception_type == "prompt_outputs_failed_validation"
    assert row.error_node == "1"  # the node ComfyUI named in node_errors
    assert transitions(domain, workflow_id)[-1] == "failed"
    assert domain.on_sim(sim).queue().pending == []  # nothing was queued


def test_a_run_acknowledges_a_cancel_signal_and_comfyui_stops_its_prompt(
    domain: Domain, make_sim: Callable[..., RunningSim], background: Callable[..., Future[Any]],
    broker: Any,
) -> None:
    sim = make_sim(time_scale=1.0)
    workflow_id = domain.workflow(S.QUEUED, domain.runner(sim.url), prompt=LONG)
    run = background(runner.run, domain.ctx, workflow_id, task_of(domain, workflow_id))
    wait_until(lambda: domain.row(workflow_id).status == S.RUNNING.value)
    domain.request(workflow_id)

    # The cancel worker's side: a CANCEL signal on fakeredis, which the run's listener
    # (subscribed on the same fake server) routes to it.
    assert cancel.handle_many(domain.ctx, [workflow_id], API) == {workflow_id: None}

    assert run.result(timeout=10) == "cancelled"
    row = domain.row(workflow_id)
    assert (row.status, row.cancel_outcome) == (S.CANCELLED.value, CancelOutcome.CANCELLED.value)
    assert (row.cancel_source, row.cancel_actor) == ("api", "alice")  # the request's, kept
    assert row.outputs is None
    entry = domain.on_sim(sim).history(str(row.prompt_id))
    assert entry is not None and entry["status"]["messages"][-1][0] == "execution_interrupted"
    # Past the deadline, the deadline pass finds it acknowledged: nothing to escalate.
    domain.age(workflow_id, cancel_taken_at=GRACE_SECONDS + 1)
    assert cancel.enforce_deadlines(domain.ctx) == {}
    assert broker("cancel") == []


def test_a_run_cancelled_while_its_prompt_is_pending_removes_it_and_leaves(
    domain: Domain, make_sim: Callable[..., RunningSim], background: Callable[..., Future[Any]],
) -> None:
    sim = make_sim(time_scale=1.0)
    client = domain.on_sim(sim)
    blocker = client.submit(LONG, "someone-else").prompt_id
    wait_until(lambda: client.queue().running == [blocker])
    workflow_id = domain.workflow(S.QUEUED, domain.runner(sim.url))
    run = background(runner.run, domain.ctx, workflow_id, task_of(domain, workflow_id))
    wait_until(lambda: domain.row(workflow_id).prompt_id
               and client.queue().pending == [domain.row(workflow_id).prompt_id])
    domain.request(workflow_id)

    assert cancel.handle_many(domain.ctx, [workflow_id], API) == {
        workflow_id: CancelOutcome.CANCELLED}

    assert run.result(timeout=10) == "cancelled"  # told to stop; no status write of its own
    assert transitions(domain, workflow_id)[-2:] == ["queued", "cancelled"]
    assert client.queue().pending == [] and client.queue().running == [blocker]
    # It saw ComfyUI hold the prompt no more: the GPU freed, confirmed; nothing was saved.
    row = domain.row(workflow_id)
    assert row.freed_at is not None and row.cancel_finished_at is not None
    assert row.freed_at >= row.cancel_finished_at and row.partial_outputs is None
    assert domain.events(workflow_id)[-1] == ("gpu_freed", None, None)


def test_a_cancelled_run_keeps_what_comfyui_saved_and_confirms_the_gpu_freed(
    domain: Domain, make_sim: Callable[..., RunningSim], background: Callable[..., Future[Any]],
) -> None:
    sim = make_sim(time_scale=1.0)
    workflow_id = domain.workflow(S.QUEUED, domain.runner(sim.url), prompt=EARLY_SAVE)
    run = background(runner.run, domain.ctx, workflow_id, task_of(domain, workflow_id))
    # The early SaveImage follows blur "2"; progress on blur "3" means it saved its image.
    wait_until(lambda: (domain.row(workflow_id).progress or {}).get("node") == "3",
               timeout=20)
    domain.request(workflow_id)
    requested_at = domain.row(workflow_id).cancel_requested_at

    assert cancel.handle_many(domain.ctx, [workflow_id], API) == {workflow_id: None}

    assert run.result(timeout=20) == "cancelled"
    row = domain.row(workflow_id)
    assert row.cancel_outcome == CancelOutcome.CANCELLED.value
    assert row.outputs is None  # outputs are a completed workflow's
    assert row.partial_outputs == {"early": {"images": [
        {"filename": "out-early_00001_.png", "subfolder": "", "type": "output"}]}}
    entry = domain.on_sim(sim).history(str(row.prompt_id))
    assert entry is not None and entry["outputs"] == row.partial_outputs  # ComfyUI's account
    assert None not in (row.freed_at, row.cancel_finished_at, requested_at)
    assert row.freed_at >= row.cancel_finished_at >= requested_at  # type: ignore[operator]
    assert domain.on_sim(sim).queue().running == []
    assert [e for e in domain.events(workflow_id) if e[0] == "gpu_freed"] == [
        ("gpu_freed", None, None)]


def test_a_cancelled_run_that_cannot_see_comfyui_let_go_leaves_freed_at_null(
    domain: Domain, make_sim: Callable[..., RunningSim], background: Callable[..., Future[Any]],
) -> None:
    domain.ctx.settings.freed_confirm_timeout_seconds = 0.5
    sim = make_sim(time_scale=1.0)
    workflow_id = domain.workflow(S.QUEUED, domain.runner(sim.url), prompt=LONG)
    run = background(runner.run, domain.ctx, workflow_id, task_of(domain, workflow_id))
    wait_until(lambda: domain.row(workflow_id).status == S.RUNNING.value)
    sim.stop()  # ComfyUI is gone: the runner cannot cancel, nor see the prompt let go
    domain.request(workflow_id)
    assert cancel.handle_many(domain.ctx, [workflow_id], API) == {workflow_id: None}
    domain.age(workflow_id, cancel_taken_at=GRACE_SECONDS + 1)
    assert cancel.enforce_deadlines(domain.ctx) == {workflow_id: CancelOutcome.FORCED}

    assert run.result(timeout=20) == "cancelled"  # told to stop by the escalation
    row = domain.row(workflow_id)
    assert row.freed_at is None  # not confirmed
    assert all(kind != "gpu_freed" for kind, _, _ in domain.events(workflow_id))


def test_a_prompt_that_completed_after_its_workflow_was_cancelled_keeps_its_outputs_as_partial(
    domain: Domain, sim: RunningSim
) -> None:
    # The race the cancel won (a forced cancel, say): ComfyUI finished the prompt anyway.
    client = domain.on_sim(sim)
    workflow_id = domain.workflow(S.RUNNING, domain.runner(sim.url))
    prompt_id = client.submit(TINY_PROMPT, "someone").prompt_id
    entry = wait_until(lambda: client.history(prompt_id))
    domain.set(workflow_id, prompt_id=prompt_id)
    with domain.ctx.db.transaction() as session:
        assert status.cancel_if_active(session, workflow_id, API, CancelOutcome.FORCED).changed
    handle = runner.Run(workflow_id, client, 1, prompt_id=prompt_id)

    assert runner._settle(domain.ctx, handle, entry) == "cancelled"  # the completion lost
    runner._confirm_release(domain.ctx, handle, prompt_id)

    row = domain.row(workflow_id)
    assert row.status == S.CANCELLED.value and row.outputs is None
    assert row.partial_outputs == entry["outputs"] and set(entry["outputs"]) == {"3"}
    assert row.freed_at is not None


def test_a_superseded_run_leaves_quietly_and_leaves_the_prompt_to_its_successor(
    domain: Domain, make_sim: Callable[..., RunningSim], background: Callable[..., Future[Any]],
) -> None:
    sim = make_sim(time_scale=1.0)
    workflow_id = domain.workflow(S.QUEUED, domain.runner(sim.url), prompt=LONG)
    first_task = task_of(domain, workflow_id)

    # A task whose id is not the workflow's does nothing at all.
    trail = domain.events(workflow_id)
    assert runner.run(domain.ctx, workflow_id, "a-stale-task") is None
    assert domain.events(workflow_id) == trail and domain.row(workflow_id).prompt_id is None

    run = background(runner.run, domain.ctx, workflow_id, first_task)
    wait_until(lambda: domain.row(workflow_id).status == S.RUNNING.value)
    prompt_id = str(domain.row(workflow_id).prompt_id)
    domain.set(workflow_id, runner_task_id="its-successor")  # what a re-dispatch writes

    assert run.result(timeout=10) is None  # its next heartbeat finds the successor
    row = domain.row(workflow_id)
    assert row.status == S.RUNNING.value and row.cancel_outcome is None
    assert domain.on_sim(sim).queue().running == [prompt_id]  # not touched


def test_a_run_of_a_cancelled_or_unknown_workflow_does_nothing(
    domain: Domain, sim: RunningSim
) -> None:
    workflow_id = domain.workflow(S.CANCELLED, domain.runner(sim.url))
    trail = domain.events(workflow_id)

    assert runner.run(domain.ctx, workflow_id, task_of(domain, workflow_id)) == "cancelled"
    assert runner.run(domain.ctx, "no-such-workflow", "t") is None
    assert domain.events(workflow_id) == trail
    assert domain.on_sim(sim).queue().pending == []
