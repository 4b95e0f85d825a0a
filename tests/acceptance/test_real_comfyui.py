"""The cancel paths against a real ComfyUI server, not the simulator (opt-in).

Set ``COMFY_CANCEL_TEST_COMFYUI_URL`` to a ComfyUI that runs the no-model nodes
(``EmptyImage``, ``ImageBlur``, ``SaveImage``; a CPU-only server does:
``python main.py --cpu --listen 127.0.0.1 --port 8188``); otherwise these tests are
skipped. The rest of the stack is the acceptance suite's own (real Redis, Celery worker
processes, the API, SQLite), and the account's runner is that server. Each check is the
one the simulator's tests make, through their own helpers; what only the simulator can
show (the calls it received) is replaced by asking the real server (``/queue``,
``/history``).

Real ComfyUI caches node outputs across prompts: a prompt it has run before completes
at once. Every prompt here gets a colour of its own (:func:`fresh`) so that it really
runs. README, "Checked against a real ComfyUI", records the last run.
"""

from __future__ import annotations

import copy
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from comfy_cancel import manager
from comfy_cancel.embedded.comfyui_sim import TINY_PROMPT, blur_chain
from testbed.stack import Stack, running_stack
from tests.acceptance.test_interrupt_and_timeouts import (
    interrupt_one_running_one_pending,
    timeouts_cancel_running_and_queued_spare_finished,
)
from tests.acceptance.test_partial_outputs_and_freed import cancel_pending_then_running
from tests.acceptance.test_subscribe import watch_a_cancel

URL_ENV = "COMFY_CANCEL_TEST_COMFYUI_URL"
COMFYUI_URL = os.environ.get(URL_ENV, "").rstrip("/")

pytestmark = [
    pytest.mark.acceptance,
    pytest.mark.skipif(not COMFYUI_URL, reason=(
        f"no real ComfyUI to test against: set {URL_ENV}=http://127.0.0.1:8188 "
        "(a ComfyUI started with --cpu runs these no-model workflows)")),
]
# A 768x768 ImageBlur at radius 31 takes 0.8 to 2 s on a 2-core CPU (more with the stack
# beside it): each long chain runs for a minute or more, long enough that every cancel
# lands while it runs, and each blur's end is a node boundary where ComfyUI can stop.
LONG_BLURS = 40
# Waits on a real server: a node stops at its end, on a loaded CPU after a few seconds.
WAIT = 120.0


def fresh(prompt: dict[str, Any]) -> dict[str, Any]:
    """``prompt`` with a colour of its own in every EmptyImage: nothing ComfyUI cached."""
    made = copy.deepcopy(prompt)
    for node in made.values():
        if node["class_type"] == "EmptyImage":
            node["inputs"]["color"] = secrets.randbelow(0xFFFFFF)
    return made


@pytest.fixture
def comfyui() -> str:
    """The real server's URL, once it answered ``/system_stats``."""
    try:
        stats = httpx.get(f"{COMFYUI_URL}/system_stats", timeout=10).json()
    except (httpx.HTTPError, ValueError) as exc:
        pytest.fail(f"{URL_ENV}={COMFYUI_URL} does not answer /system_stats: {exc}")
    assert "comfyui_version" in stats["system"], stats
    return COMFYUI_URL


@pytest.fixture
def stack(comfyui: str, redis_db_url: str, tmp_path: Path) -> Iterator[Stack]:
    # A real node stops only at its end: more grace than the simulator's quick steps need,
    # so a cancel is acknowledged by ComfyUI (outcome cancelled), not forced.
    with running_stack(f"sqlite:///{tmp_path / 'stack.db'}", redis_db_url, tmp_path,
                       comfyui_url=comfyui, cancel_grace_seconds=30.0) as s:
        try:
            yield s
        finally:
            _stop_our_prompts(s, comfyui)


def _stop_our_prompts(stack: Stack, url: str) -> None:
    """After a failed check a long prompt of ours may still run or wait on the server: stop
    it (only ours, by id), or it would hold up the next test's."""
    with stack.db.reading() as session:
        rows, _ = manager.list_workflows(session, stack.account_id, per_page=100)
        ids = [w.prompt_id for w in rows if w.prompt_id]
    held = queue_ids(url) & set(ids)
    if held:
        httpx.post(f"{url}/queue", json={"delete": sorted(held)}, timeout=10)
        for prompt_id in held:  # targeted: ComfyUI stops it only if it is the one running
            httpx.post(f"{url}/interrupt", json={"prompt_id": prompt_id}, timeout=10)


def queue_ids(url: str) -> set[str]:
    """Prompt ids the real server holds, running or pending."""
    queue = httpx.get(f"{url}/queue", timeout=10).json()
    return {item[1] for item in queue["queue_running"] + queue["queue_pending"]}


def history(url: str, prompt_id: str) -> dict[str, Any]:
    entry = httpx.get(f"{url}/history/{prompt_id}", timeout=10).json().get(prompt_id)
    assert isinstance(entry, dict), f"no history entry for {prompt_id}"
    return entry


def test_a_cancel_after_the_early_save_keeps_its_image_and_comfyui_lets_go(
    stack: Stack, comfyui: str
) -> None:
    wf, removed = cancel_pending_then_running(
        stack, fresh(blur_chain(LONG_BLURS, early_save=1)), fresh(TINY_PROMPT), timeout=WAIT)

    assert not queue_ids(comfyui) & {wf["prompt_id"], removed["prompt_id"]}
    # What the partial outputs were read from: the interrupted prompt's history entry keeps
    # the early SaveImage's output; the pending one removed never ran, so has none.
    entry = history(comfyui, wf["prompt_id"])
    assert entry["status"]["messages"][-1][0] == "execution_interrupted", entry["status"]
    assert entry["outputs"]["early"] == wf["partial_outputs"]["early"]
    assert httpx.get(f"{comfyui}/history/{removed['prompt_id']}", timeout=10).json() == {}


def test_a_subscriber_sees_the_cancel_step_by_step_then_the_stream_closes(
    stack: Stack,
) -> None:
    watch_a_cancel(stack, fresh(blur_chain(LONG_BLURS)))


def test_a_runner_interrupt_stops_the_running_and_the_pending_one_completes(
    stack: Stack, comfyui: str
) -> None:
    wf, after = interrupt_one_running_one_pending(
        stack, fresh(blur_chain(LONG_BLURS)), fresh(blur_chain(2)), fresh(TINY_PROMPT),
        timeout=WAIT)

    assert history(comfyui, wf["prompt_id"])["status"]["status_str"] == "error"
    done = history(comfyui, after["prompt_id"])
    assert done["status"]["status_str"] == "success"
    assert set(done["outputs"]) == {"save"} and after["outputs"] == done["outputs"]


def test_timeout_seconds_cancels_with_source_deadline(stack: Stack, comfyui: str) -> None:
    running = timeouts_cancel_running_and_queued_spare_finished(
        stack, fresh(blur_chain(LONG_BLURS)), fresh(TINY_PROMPT), fresh(TINY_PROMPT),
        timeout=WAIT)

    assert running["prompt_id"] not in queue_ids(comfyui)
    messages = history(comfyui, running["prompt_id"])["status"]["messages"]
    assert messages[-1][0] == "execution_interrupted"
