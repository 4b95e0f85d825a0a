"""Watching it, end to end: after cancels on the running system (real Redis, Celery worker
processes, the simulated ComfyUI, SQLite or PostgreSQL), the API's and the workers'
/metrics show them; the Celery task events Flower reads carry the cancel task; the JSON
log lines name the workflow; and no secret appears in any log."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from comfy_cancel import logs, worker
from comfy_cancel.config import child_environment
from comfy_cancel.embedded import processes
from comfy_cancel.embedded.comfyui_sim import TINY_PROMPT, blur_chain
from comfy_cancel.embedded.processes import Child
from testbed.stack import Stack, cancel, running_stack
from tests.apitest import KEY

pytestmark = pytest.mark.acceptance
TERMINAL = {"completed", "failed", "cancelled"}
LONG = blur_chain(40)  # about 6 s at the stack's time_scale 0.2
RUNNER_SECRET = "runner-header-secret-3f9a7c"
CANCEL_TASK = worker.CANCEL_WORKFLOWS_TASK


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, by name and sorted labels."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples}


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def running_and_queued(stack: Stack) -> tuple[str, str]:
    """A workflow running on the sim, and one pending in the sim's queue behind it."""
    running = stack.submit(LONG, name="running")
    assert stack.wait_status(running, {"running"} | TERMINAL)["status"] == "running"
    queued = stack.submit(TINY_PROMPT, name="queued")
    stack.wait_for(lambda: stack.workflow(queued)["queue_number"] is not None,
                   what="the second prompt pending in ComfyUI's queue")
    return running, queued


def test_a_cancel_shows_in_the_counters_and_histograms_of_the_api_and_the_workers(
    stack: Stack,
) -> None:
    api_metrics = f"{stack.api_url}/metrics"
    requested_before = sample(scrape(api_metrics), "comfy_cancel_cancel_requests_total",
                              source="api")
    running, queued = running_and_queued(stack)

    for workflow_id in (queued, running):
        assert cancel(stack, workflow_id).status_code == 200
    for workflow_id in (queued, running):
        wf = stack.wait_status(workflow_id, TERMINAL, timeout=30)
        assert (wf["status"], wf["cancel"]["outcome"]) == ("cancelled", "cancelled")

    api = scrape(api_metrics)
    # The API (in this process: other tests' cancels counted too) recorded both requests.
    assert sample(api, "comfy_cancel_cancel_requests_total", source="api") \
        == requested_before + 2
    assert sample(api, "comfy_cancel_state_up", part="database") == 1
    assert sample(api, "comfy_cancel_state_up", part="redis") == 1
    assert sample(api, "comfy_cancel_open_cancel_requests") == 0
    for queue in worker.ALL_QUEUES:
        assert ("comfy_cancel_queue_messages", (("queue", queue),)) in api
    # The queued one ended in the cancel worker, which also signalled the running one's
    # runner; the runner worker wrote the running one's outcome.
    cancel_worker = scrape(stack.worker_metrics["worker-cancel"])
    runner_worker = scrape(stack.worker_metrics["worker-runner"])
    for samples in (cancel_worker, runner_worker):
        assert sample(samples, "comfy_cancel_cancel_outcomes_total", source="api",
                      outcome="cancelled") == 1
        assert sample(samples, "comfy_cancel_cancel_outcome_seconds_count", source="api",
                      outcome="cancelled") == 1
        assert sample(samples, "comfy_cancel_cancel_outcome_seconds_bucket", source="api",
                      outcome="cancelled", le="+Inf") == 1
        assert sample(samples, "comfy_cancel_cancel_outcome_seconds_sum", source="api",
                      outcome="cancelled") > 0
    assert sample(cancel_worker, "comfy_cancel_cancel_signal_seconds_count", source="api") == 1
    assert sample(runner_worker, "comfy_cancel_cancel_signal_seconds_count", source="api") == 0
    # Beat is not part of this stack: no sweep pass was counted, nothing was escalated.
    assert sample(cancel_worker, "comfy_cancel_cancel_escalations_total", outcome="forced") == 0


def test_the_api_in_several_processes_shows_the_sum_of_their_counts(
    redis_db_url: str, tmp_path: Path
) -> None:
    """``comfy-cancel api`` with two processes: whichever answers /metrics shows them all."""
    with running_stack(f"sqlite:///{tmp_path / 'stack.db'}", redis_db_url, tmp_path,
                       separate_api=True, api_workers=2) as stack:
        # One running, the others pending behind it: all cancellable.
        running = stack.submit(blur_chain(200), name="running")  # about 30 s
        stack.wait_status(running, {"running"} | TERMINAL)
        workflows = [*(stack.submit(TINY_PROMPT, name=f"wf{i}") for i in range(8)), running]
        for workflow_id in workflows:
            stack.wait_status(workflow_id, {"queued", "running"})
        for workflow_id in workflows:
            # A connection each, so that both processes take some of them.
            response = httpx.post(f"{stack.api_url}/v1/workflow/{workflow_id}/cancel",
                                  headers={"Authorization": f"Bearer {stack.token}"}, timeout=30)
            assert response.status_code == 200, response.text
        samples = [scrape(f"{stack.api_url}/metrics") for _ in range(6)]
    for shown in samples:
        assert sample(shown, "comfy_cancel_cancel_requests_total", source="api") == 9
        # The multiprocess collector's exposition: no single process's own gauges.
        assert not any(name == "process_cpu_seconds_total" for name, _ in shown)


@contextmanager
def task_events(stack: Stack) -> Iterator[list[dict[str, Any]]]:
    """The Celery task events on the stack's broker while the block runs: what Flower (or
    `celery events`) receives."""
    app = worker.create_app(stack.settings)
    seen: list[dict[str, Any]] = []
    ready = threading.Event()
    connection = app.connection_for_read()
    receiver = app.events.Receiver(connection, handlers={"*": seen.append})
    # Called once its queue is bound to the event exchange: from then on nothing is missed.
    receiver.on_consume_ready = lambda *_args, **_kwargs: ready.set()
    thread = threading.Thread(target=receiver.capture, kwargs={"wakeup": False}, daemon=True)
    thread.start()
    try:
        assert ready.wait(30), "the event receiver did not start"
        yield seen
    finally:
        receiver.should_stop = True  # seen within its next second
        thread.join(10)
        connection.release()


def test_the_cancel_task_reaches_a_task_event_receiver_as_flower_sees_it(stack: Stack) -> None:
    running = stack.submit(LONG, name="watched")
    stack.wait_status(running, {"running"} | TERMINAL)
    with task_events(stack) as seen:
        assert cancel(stack, running).status_code == 200
        stack.wait_status(running, TERMINAL)

        def cancel_task() -> dict[str, Any] | None:
            return next((e for e in list(seen) if e["type"] == "task-received"
                         and e.get("name") == CANCEL_TASK
                         and running in str(e.get("args"))), None)

        stack.wait_for(lambda: cancel_task() is not None, what="the cancel task's events")
        received = cancel_task()
        assert received is not None
        task_id = received["uuid"]
        stack.wait_for(lambda: any(e["type"] == "task-succeeded" and e["uuid"] == task_id
                                   for e in list(seen)), what="the cancel task's success")
    kinds = [e["type"] for e in seen if e.get("uuid") == task_id]
    # The worker's received, started and succeeded, in that order; no task-sent from the
    # API (one more publish per cancel, and Flower needs none).
    assert kinds == ["task-received", "task-started", "task-succeeded"], kinds


def test_flower_lists_the_cancel_task(stack: Stack) -> None:
    """Flower itself, started as the README says (``celery -A comfy_cancel.worker flower``
    on the stack's broker), lists the cancel task and its success."""
    port = processes.free_port()
    env = child_environment(stack.settings) | {"FLOWER_UNAUTHENTICATED_API": "true"}
    flower = Child("flower", [sys.executable, "-m", "celery", "-A", "comfy_cancel.worker",
                              "flower", f"--port={port}", "--address=127.0.0.1"],
                   stack.log_dir / "flower.log", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        flower.start().wait_ready(lambda: processes.http_ok(f"{url}/healthcheck"), 60,
                                  tail_lines=20)
        running = stack.submit(LONG, name="flowered")
        stack.wait_status(running, {"running"} | TERMINAL)
        assert cancel(stack, running).status_code == 200
        assert stack.wait_status(running, TERMINAL)["status"] == "cancelled"

        def listed() -> list[dict[str, Any]]:
            tasks = httpx.get(f"{url}/api/tasks", params={"taskname": CANCEL_TASK},
                              timeout=10).json()
            return [t for t in tasks.values()
                    if running in str(t.get("args")) and t.get("state") == "SUCCESS"]

        stack.wait_for(lambda: bool(listed()), what="Flower to list the cancel task")
        (task,) = listed()
        assert task["name"] == CANCEL_TASK and task["worker"]
    finally:
        flower.stop()


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a log (Celery's start-up banner is printed, not logged)."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def test_json_logs_name_the_cancel_and_carry_no_secret(
    redis_db_url: str, tmp_path: Path
) -> None:
    with running_stack(f"sqlite:///{tmp_path / 'stack.db'}", redis_db_url, tmp_path,
                       separate_api=True, api_log_level="INFO", log_format="json",
                       secret_key=KEY) as stack:
        with stack.client() as client:
            # A runner with a secret header, the only one its workflow can go to.
            added = client.post("/v1/runner", json={
                "name": "guarded", "endpoint_url": stack.sim.url, "tags": ["guarded"],
                "headers": {"X-Api-Key": RUNNER_SECRET}})
            assert added.status_code == 200, added.text
            assert client.put(f"/v1/runner/{stack.runner_id}",
                              json={"status": "disabled"}).status_code == 200
            workflow_id = stack.submit(LONG, name="guarded", tags=["guarded"])
            assert stack.wait_status(workflow_id, {"running"} | TERMINAL)["status"] == "running"
            assert stack.workflow(workflow_id)["runner_id"] == added.json()["id"]
            assert cancel(stack, workflow_id).status_code == 200
            wf = stack.wait_status(workflow_id, TERMINAL)
            assert (wf["status"], wf["cancel"]["outcome"]) == ("cancelled", "cancelled")
            # The operator's token too, on a call of its own.
            with stack.client(stack.operator_token) as ops:
                assert ops.post("/v1/admin/workflow/cancel", json={
                    "ids": [workflow_id], "dry_run": True}).status_code == 200
        time.sleep(1)  # the runner's last lines after its acknowledgement
        logs_dir = stack.log_dir
        names = ("api.log", "worker-cancel.log", "worker-runner.log")
        texts = {name: (logs_dir / name).read_text(errors="replace") for name in names}

    for name, text in texts.items():
        for secret in (stack.token, stack.operator_token, RUNNER_SECRET, KEY, "Bearer"):
            assert secret not in text, f"{secret[:12]}... in {name}"
    by_log = {name: json_lines(logs_dir / name) for name in names}
    assert all(by_log.values()), {name: len(lines) for name, lines in by_log.items()}
    # The cancel worker's line for this cancel, and the runner's when ComfyUI stopped it.
    (worker_line,) = [line for line in by_log["worker-cancel.log"]
                      if line.get("workflow_id") == workflow_id]
    assert (worker_line["cancel_source"], worker_line["outcome"]) == ("api", "signalled")
    runner_lines = [line for line in by_log["worker-runner.log"]
                    if line.get("workflow_id") == workflow_id]
    assert any({k: line.get(k) for k in logs.FIELDS} == {
        "workflow_id": workflow_id, "cancel_source": "api", "outcome": "cancelled"}
        for line in runner_lines), runner_lines
    # The API's access line of the cancel.
    assert any(f"/v1/workflow/{workflow_id}/cancel" in line["message"]
               for line in by_log["api.log"])
