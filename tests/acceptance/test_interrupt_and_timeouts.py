"""The product's other ways to stop work, end to end: ``POST /v1/runner/{id}/interrupt``
and a workflow's own ``timeout_seconds``, through the API, real Redis, real Celery worker
processes and the simulated ComfyUI server, with and without ComfyUI's jobs API (without
it, the runner falls back to the targeted ``/interrupt`` of older ComfyUI)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from comfy_cancel import manager
from comfy_cancel.embedded.comfyui_sim import TINY_PROMPT, blur_chain
from testbed.stack import Stack, running_stack, sim_calls

pytestmark = pytest.mark.acceptance
TERMINAL = {"completed", "failed", "cancelled"}
LONG = blur_chain(200)  # about 30 s at the stack's time_scale 0.2: stopped long before
UNKNOWN = "7d1c3f6e-0000-4000-8000-000000000000"


@pytest.fixture(params=[
    pytest.param(("sqlite", True), id="sqlite"),
    pytest.param(("postgres", True), id="postgres", marks=pytest.mark.postgres),
    pytest.param(("postgres", False), id="postgres-no-jobs-api", marks=pytest.mark.postgres),
])
def any_comfyui(request: pytest.FixtureRequest, redis_db_url: str, tmp_path: Path
                ) -> Iterator[Stack]:
    """The stack on SQLite and on PostgreSQL, and against a ComfyUI without the jobs API."""
    database, jobs_api = request.param
    url = (f"sqlite:///{tmp_path / 'stack.db'}" if database == "sqlite"
           else str(request.getfixturevalue("pg_database_url")))
    with running_stack(url, redis_db_url, tmp_path, jobs_api=jobs_api) as s:
        yield s


def submit(stack: Stack, prompt: dict[str, Any], name: str, **fields: Any) -> str:
    with stack.client() as c:
        response = c.post("/v1/workflow", json={"name": name, "workflow_json": prompt, **fields})
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def interrupt(stack: Stack, runner_id: str, token: str | None = None,
              **body: Any) -> httpx.Response:
    with stack.client(token) as c:
        return c.post(f"/v1/runner/{runner_id}/interrupt", json=body or None)


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def pending_in_comfyui(stack: Stack, workflow_id: str) -> bool:
    wf = stack.workflow(workflow_id)
    return wf["status"] == "queued" and wf["queue_number"] is not None


def cancelled_from(stack: Stack, workflow_id: str) -> str | None:
    """The status a cancelled workflow left, from its audit trail."""
    with stack.db.transaction() as session:
        return next((e.from_status for e in manager.events_of(session, workflow_id)
                     if e.to_status == "cancelled"), None)


def assert_only_targeted_calls(stack: Stack, stopped: str, untouched: str) -> None:
    """ComfyUI was asked to stop ``stopped``'s prompt, never ``untouched``'s, and never
    with a bare interrupt; the older ComfyUI got the targeted /interrupt."""
    calls = sim_calls(stack)
    kinds = {c["kind"] for c in calls if c["prompt_id"] == stopped}
    assert kinds, calls
    assert not [c for c in calls if c["prompt_id"] == untouched]
    assert all(c["prompt_id"] for c in calls)
    if not stack.sim.sim.jobs_api:
        assert "interrupt" in kinds and "jobs_cancel" not in kinds


def test_interrupt_stops_what_runs_leaves_the_queued_and_the_runner_serves_on(
    any_comfyui: Stack,
) -> None:
    stack = any_comfyui
    wf, after = interrupt_one_running_one_pending(stack, LONG, blur_chain(4), TINY_PROMPT)
    assert_only_targeted_calls(stack, wf["prompt_id"], after["prompt_id"])


def interrupt_one_running_one_pending(
    stack: Stack, long: dict[str, Any], short: dict[str, Any], tiny: dict[str, Any],
    timeout: float = 60,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``long`` runs, ``short`` waits behind it in ComfyUI's queue; the runner interrupt
    stops the first only, the second completes, and the runner serves on (``tiny`` runs
    after). Returns the interrupted workflow and the one that waited, as they ended. (Also
    run against a real ComfyUI: tests/acceptance/test_real_comfyui.py.)"""
    running = submit(stack, long, "running")
    assert stack.wait_status(running, {"running"} | TERMINAL, timeout)["status"] == "running"
    queued = submit(stack, short, "queued behind it")
    stack.wait_for(lambda: pending_in_comfyui(stack, queued), timeout,
                   what="the second prompt pending in ComfyUI's queue")

    response = interrupt(stack, stack.runner_id, reason="GPU needed")

    assert (response.status_code, response.content) == (200, b"")
    wf = stack.wait_status(running, TERMINAL, timeout)
    assert wf["status"] == "cancelled"
    cancel = wf["cancel"]
    assert (cancel["source"], cancel["outcome"], cancel["reason"]) == (
        "runner_interrupt", "cancelled", "GPU needed")
    assert cancel["actor"].startswith("acme#token")
    # The queued one was left alone: it runs next on the same ComfyUI and completes.
    after = stack.wait_status(queued, TERMINAL, timeout)
    assert (after["status"], after["cancel"]) == ("completed", None)
    # The runner stays in service, and interrupting it with nothing running is a no-op.
    assert interrupt(stack, stack.runner_id).status_code == 200
    fresh = submit(stack, tiny, "after the interrupt")
    assert stack.wait_status(fresh, TERMINAL, timeout)["status"] == "completed"
    assert stack.workflow(fresh)["cancel"] is None
    return wf, after


def test_refusals_are_the_usual_error_bodies(stack: Stack) -> None:
    """Another account's, an unknown or a malformed runner: 404; no token: 401; a bad
    timeout: 400. Nothing is stopped or stored. (The conftest's stack: SQLite and
    PostgreSQL; refusals do not reach ComfyUI.)"""
    running = submit(stack, LONG, "theirs to keep")
    stack.wait_status(running, {"running"} | TERMINAL)
    with stack.db.transaction() as session:
        other = manager.create_token(session, manager.get_or_create_account(session, "globex"))
    refusals = [interrupt(stack, stack.runner_id, token=other),
                interrupt(stack, UNKNOWN, token=other),
                interrupt(stack, "not-an-id")]
    for response in refusals:
        assert response.status_code == 404
        assert set(response.json()) == {"status", "message"}
    foreign, unknown, _ = (r.json()["message"] for r in refusals)
    assert foreign.replace(stack.runner_id, "X") == unknown.replace(UNKNOWN, "X")
    with httpx.Client(base_url=stack.api_url) as anonymous:
        missing = anonymous.post(f"/v1/runner/{stack.runner_id}/interrupt")
    bad = interrupt(stack, stack.runner_id, token="cfc_not-a-token")
    for response in (missing, bad):
        assert response.status_code == 401 and response.json()["status"] == 401
    with stack.client() as c:
        for timeout in (0, 604801, 2.5, "soon"):
            response = c.post("/v1/workflow", json={
                "name": "bad", "workflow_json": TINY_PROMPT, "timeout_seconds": timeout})
            assert response.status_code == 400, response.text
            body = response.json()
            assert set(body) == {"status", "message"} and body["status"] == 400
            assert body["message"].startswith("invalid timeout_seconds: must be a whole number")
        assert c.get("/v1/workflow").json()["total"] == 1  # the running one only
    assert stack.workflow(running)["cancel"] is None  # nothing of it was asked to stop
    assert interrupt(stack, stack.runner_id).status_code == 200  # its owner can
    assert stack.wait_status(running, TERMINAL, timeout=30)["status"] == "cancelled"


def test_timeouts_cancel_a_running_and_a_queued_workflow_and_spare_one_that_finished(
    any_comfyui: Stack,
) -> None:
    stack = any_comfyui
    running = timeouts_cancel_running_and_queued_spare_finished(
        stack, LONG, TINY_PROMPT, TINY_PROMPT)
    assert_only_targeted_calls(stack, running["prompt_id"], "no other prompt")


def timeouts_cancel_running_and_queued_spare_finished(
    stack: Stack, long: dict[str, Any], tiny: dict[str, Any], another_tiny: dict[str, Any],
    timeout: float = 60,
) -> dict[str, Any]:
    """``long`` (running for far longer than 8 s) is cancelled at its 8 s deadline, ``tiny``
    at its 2 s one while pending behind it, ``another_tiny`` completes within its 600 s.
    Returns the running one as it ended. (Also run against a real ComfyUI.)"""
    # Deadlines are seconds away: the long one is running at its deadline, and the short
    # one is pending behind it at its own.
    running = submit(stack, long, "running past its deadline", timeout_seconds=8)
    assert stack.wait_status(running, {"running"} | TERMINAL, timeout)["status"] == "running"
    queued = submit(stack, tiny, "queued past its deadline", timeout_seconds=2)

    first = stack.wait_status(queued, TERMINAL, timeout)
    second = stack.wait_status(running, TERMINAL, timeout)

    for wf, left in ((first, "queued"), (second, "running")):
        assert wf["status"] == "cancelled", wf
        assert (wf["cancel"]["source"], wf["cancel"]["outcome"]) == ("deadline", "cancelled")
        assert wf["cancel"]["actor"] == "deadline"
        assert cancelled_from(stack, wf["id"]) == left
    assert second["timeout_seconds"] == 8 and second["deadline_at"].endswith("Z")
    # Its deadline had passed when the request was made.
    assert _when(second["cancel"]["requested_at"]) >= _when(second["deadline_at"])

    done = submit(stack, another_tiny, "done in time", timeout_seconds=600)
    wf = stack.wait_status(done, TERMINAL, timeout)
    assert (wf["status"], wf["cancel"], wf["timeout_seconds"]) == ("completed", None, 600)
    assert wf["deadline_at"] is not None
    return second

