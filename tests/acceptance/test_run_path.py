"""Workflows submitted over HTTP run on the simulated ComfyUI through real Redis and
real Celery worker processes, and end completed or failed with ComfyUI's fields."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from comfy_cancel import manager, tasks
from comfy_cancel.embedded.comfyui_sim import TINY_PROMPT, blur_chain
from comfy_cancel.worker import RUNNER_QUEUE
from testbed.stack import Stack, running_stack, sim_requests, start_worker, wait_workers_ready

TERMINAL = {"completed", "failed", "cancelled"}

pytestmark = pytest.mark.acceptance

BLUR_PROMPT = {
    "1": {"class_type": "EmptyImage",
          "inputs": {"width": 256, "height": 256, "batch_size": 1, "color": 0}},
    "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 9,
                                                 "sigma": 1.0}},
    "3": {"class_type": "ImageScale",
          "inputs": {"image": ["2", 0], "upscale_method": "nearest-exact",
                     "width": 128, "height": 128, "crop": "disabled"}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "ok"}},
}


def test_workflows_complete_with_outputs_and_a_full_audit_trail(stack: Stack) -> None:
    ids = [stack.submit(BLUR_PROMPT, name=f"blur-{n}") for n in range(4)]
    ids.append(stack.submit(TINY_PROMPT, name="tiny"))
    for workflow_id in ids:
        wf = stack.wait_status(workflow_id, {"completed", "failed", "cancelled"})
        assert wf["status"] == "completed", wf
        assert wf["runner_id"] == stack.runner_id
        assert wf["prompt_id"] and wf["queue_number"] is not None
        assert wf["started_at"] and wf["completed_at"]
        images = [img for out in wf["outputs"].values() for img in out.get("images", [])]
        assert images and images[0]["type"] == "output"
        assert wf["exception_type"] is None
        with stack.db.transaction() as session:
            trail = [(e.from_status, e.to_status) for e in manager.events_of(session, workflow_id)
                     if e.kind == "transition"]
        assert trail == [(None, "accepted"), ("accepted", "uploaded"), ("uploaded", "queued"),
                         ("queued", "running"), ("running", "completed")]


def test_a_broken_workflow_fails_with_comfyuis_error_fields(stack: Stack) -> None:
    broken = {**TINY_PROMPT, "3": {"class_type": "SaveImage",
                                   "inputs": {"images": ["2", 0], "filename_prefix": "fail-me"}}}
    workflow_id = stack.submit(broken, name="broken")
    wf = stack.wait_status(workflow_id, {"completed", "failed", "cancelled"})
    assert wf["status"] == "failed"
    assert wf["error_node"] == "3"
    assert wf["exception_type"] == "RuntimeError"
    assert wf["exception_message"]


def test_a_prompt_comfyui_rejects_fails_with_its_validation_error(stack: Stack) -> None:
    invalid = {**BLUR_PROMPT, "2": {"class_type": "ImageBlur",
                                    "inputs": {"image": ["1", 0], "blur_radius": 99,
                                               "sigma": 1.0}}}
    workflow_id = stack.submit(invalid, name="invalid")
    wf = stack.wait_status(workflow_id, {"completed", "failed", "cancelled"})
    assert wf["status"] == "failed"
    assert wf["exception_type"] == "prompt_outputs_failed_validation"
    assert wf["error_node"] == "4" or wf["error_node"] == "2"


def test_a_workflow_no_runner_can_serve_fails_with_a_clear_reason(stack: Stack) -> None:
    with stack.db.transaction() as session:
        runner = manager.get_runner(session, stack.runner_id)
        assert runner is not None
        manager.update_runner(session, runner, {"tags": ["gpu-a100"]})
    workflow_id = stack.submit(TINY_PROMPT, name="needs-h100", tags=["gpu-h100"])
    wf = stack.wait_status(workflow_id, {"completed", "failed", "cancelled"})
    assert wf["status"] == "failed"
    assert wf["exception_type"] == "NoRunnerAvailable"
    assert "gpu-h100" in wf["exception_message"]
    tagged = stack.submit(TINY_PROMPT, name="needs-a100", tags=["gpu-a100"])
    assert stack.wait_status(tagged, {"completed", "failed"})["status"] == "completed"


@pytest.mark.postgres
def test_a_redelivered_runner_task_adopts_its_prompt_instead_of_resubmitting(
    pg_database_url: str, redis_db_url: str, tmp_path: Path
) -> None:
    with running_stack(pg_database_url, redis_db_url, tmp_path) as stack:
        workflow_id = stack.submit(blur_chain(20), name="survivor")
        stack.wait_status(workflow_id, {"running"} | TERMINAL)
        runner_proc = stack.workers[1]
        runner_proc.send_signal(signal.SIGKILL)  # the worker dies mid-run
        runner_proc.wait(10)
        replacement = start_worker(stack.settings, [RUNNER_QUEUE], tmp_path / "worker-r2.log")
        stack.workers.append(replacement)
        wait_workers_ready(stack.settings, [replacement])
        # What Redis does after the visibility timeout: deliver the same task again.
        with stack.db.transaction() as session:
            row = manager.get_workflow(session, workflow_id)
            assert row is not None and row.runner_task_id is not None
            task_id = row.runner_task_id
        tasks.run_workflow.apply_async(args=[workflow_id], task_id=task_id)
        wf = stack.wait_status(workflow_id, TERMINAL, timeout=30)
        assert wf["status"] == "completed" and wf["outputs"]
        submits = [r for r in sim_requests(stack)
                   if r["method"] == "POST" and r["path"].endswith("/prompt")]
        assert len(submits) == 1  # adopted, not submitted twice
