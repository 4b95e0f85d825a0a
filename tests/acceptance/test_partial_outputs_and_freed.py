"""After a cancel, end to end: what ComfyUI saved before it stopped is kept as the
workflow's partial outputs, and the GPU freed is confirmed (``cancel.freed_at``), for a
running prompt and for one pending in ComfyUI's queue; on a simulated ComfyUI with the
jobs API and on one without it (the targeted-interrupt path of older ComfyUI), on SQLite
and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from comfy_cancel.embedded.comfyui_sim import TINY_PROMPT, blur_chain
from testbed.stack import Stack, cancel, running_stack, sim_calls

pytestmark = pytest.mark.acceptance
TERMINAL = {"completed", "failed", "cancelled"}
# About 10 s at the stack's time scale 0.2, with an image saved after the first blur: long
# enough that on a loaded machine both cancels land while it still runs.
EARLY_SAVE = blur_chain(60, early_save=1)


@pytest.fixture(params=[True, False], ids=["jobs-api", "no-jobs-api"])
def stack(
    request: pytest.FixtureRequest, database_url: str, redis_db_url: str, tmp_path: Path
) -> Iterator[Stack]:
    with running_stack(database_url, redis_db_url, tmp_path, jobs_api=request.param) as s:
        yield s


def at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def freed(stack: Stack, workflow_id: str) -> dict[str, Any]:
    """The workflow once its GPU freed is recorded (it follows `cancelled` closely)."""
    seen: dict[str, Any] = {}

    def recorded() -> bool:
        seen.update(stack.workflow(workflow_id))
        return bool(seen["cancel"] and seen["cancel"]["freed_at"])

    stack.wait_for(recorded, what=f"freed_at of {workflow_id} (last {seen})")
    return seen


def test_a_cancel_keeps_what_comfyui_saved_and_confirms_the_gpu_freed(stack: Stack) -> None:
    wf, removed = cancel_pending_then_running(stack, EARLY_SAVE, TINY_PROMPT)

    # ComfyUI holds neither: its queue is empty; and it was never asked to stop anything else.
    queue = httpx.get(f"{stack.sim.url}/queue", timeout=10).json()
    assert queue == {"queue_running": [], "queue_pending": []}
    asked = {call["prompt_id"] for call in sim_calls(stack)}
    assert None not in asked and asked <= {wf["prompt_id"], removed["prompt_id"]}


def past_the_early_save(stack: Stack, workflow_id: str) -> bool:
    """A ``blur_chain(..., early_save=1)`` workflow has saved its early image (or ended)."""
    wf = stack.workflow(workflow_id)
    node = (wf["progress"] or {}).get("node")
    # Blur "2" feeds the early SaveImage, which ComfyUI runs right after it: progress
    # on a later blur means the image is saved.
    return wf["status"] in TERMINAL or (str(node).isdigit() and int(str(node)) >= 3)


def cancel_pending_then_running(
    stack: Stack, early_save: dict[str, Any], tiny: dict[str, Any], timeout: float = 30
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``early_save`` (a ``blur_chain(..., early_save=1)``) runs past its early SaveImage,
    ``tiny`` waits behind it in ComfyUI's queue; both are cancelled, the pending one first.
    Returns the running one and the removed one, each once its GPU freed is recorded.
    (Also run against a real ComfyUI: tests/acceptance/test_real_comfyui.py.)"""
    running = stack.submit(early_save, name="early-save")
    stack.wait_for(lambda: past_the_early_save(stack, running), timeout,
                   what="the early SaveImage to have saved its image")
    assert stack.workflow(running)["status"] == "running"
    pending = stack.submit(tiny, name="pending")
    stack.wait_for(lambda: stack.workflow(pending)["queue_number"] is not None, timeout,
                   what="the second prompt pending in ComfyUI's queue")

    # The pending one first: removed from ComfyUI's queue, nothing saved, GPU never held.
    assert cancel(stack, pending).status_code == 200
    assert stack.wait_status(pending, TERMINAL, timeout)["status"] == "cancelled"
    removed = freed(stack, pending)
    assert removed["partial_outputs"] is None and removed["outputs"] is None
    assert at(removed["cancel"]["freed_at"]) >= at(removed["cancel"]["requested_at"])

    # Then the running one: interrupted after its early image was saved.
    assert cancel(stack, running).status_code == 200
    wf = stack.wait_status(running, TERMINAL, timeout)
    assert (wf["status"], wf["cancel"]["outcome"]) == ("cancelled", "cancelled")
    wf = freed(stack, running)
    assert at(wf["cancel"]["freed_at"]) >= at(wf["cancel"]["requested_at"])
    assert at(wf["cancel"]["freed_at"]) >= at(wf["cancel"]["finished_at"])
    assert wf["outputs"] is None  # outputs are a completed workflow's
    assert set(wf["partial_outputs"]) == {"early"}  # the final SaveImage never ran
    [image] = wf["partial_outputs"]["early"]["images"]
    assert image["type"] == "output" and image["filename"].startswith("out-early_")
    return wf, removed
