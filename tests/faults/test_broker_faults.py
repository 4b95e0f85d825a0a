"""Broker faults against real processes: a real redis-server with its AOF on, real Celery
worker processes, the API, the simulated ComfyUI and SQLite.

CI's short run: ``pytest -m "faults and not slow"``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from comfy_cancel import worker
from comfy_cancel.broker import DEAD_LETTER_KEY
from comfy_cancel.embedded import redis_server
from comfy_cancel.embedded.comfyui_sim import blur_chain
from testbed.stack import Stack, cancel, running_stack, start_worker, wait_workers_ready

pytestmark = [pytest.mark.faults, pytest.mark.redis]
TERMINAL = {"completed", "failed", "cancelled"}
LANDED = {"cancelled", "too_late", "already_cancelled", "forced", "runner_lost"}
LONG = blur_chain(40)  # about 6 s at time scale 0.2


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[redis_server.RedisServer]:
    server = redis_server.start_redis(data_dir=tmp_path / "redis", appendonly=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def stack(aof_redis: redis_server.RedisServer, tmp_path: Path) -> Iterator[Stack]:
    with running_stack(f"sqlite:///{tmp_path / 'stack.db'}", aof_redis.url, tmp_path) as s:
        yield s


def restart_redis(
    server: redis_server.RedisServer, down_seconds: float
) -> redis_server.RedisServer:
    """SHUTDOWN NOSAVE, ``down_seconds`` of nothing, then the same port and AOF again."""
    client = redis.Redis.from_url(server.url)
    with contextlib.suppress(redis.ConnectionError):  # the server hangs up as it goes
        client.shutdown(nosave=True)
    server.process.wait(10)
    time.sleep(down_seconds)
    return redis_server.start_redis(port=server.port, data_dir=server.data_dir, appendonly=True)


def landed(stack: Stack, workflow_id: str) -> bool:
    wf = stack.workflow(workflow_id)
    return wf["status"] in TERMINAL and (wf.get("cancel") or {}).get("outcome") in LANDED


def wait_landed(stack: Stack, ids: list[str], timeout: float) -> float:
    began = time.monotonic()
    stack.wait_for(lambda: all(landed(stack, w) for w in ids), timeout,
                   f"cancels of {ids} to land")
    return time.monotonic() - began


def ping(stack: Stack) -> list[object]:
    """The workers' answers; this process's pooled broker connections may be stale after a
    restart (a first publish on one fails), which is not what the test is about."""
    for _attempt in range(3):
        try:
            return list(worker.app.control.ping(timeout=1))
        except redis.ConnectionError:
            continue
    raise AssertionError("no ping got through")


def all_logs(stack: Stack) -> str:
    return "\n".join(p.read_text(errors="replace") for p in stack.log_dir.glob("worker-*.log"))


def test_workers_ride_out_a_redis_restart_under_load(
    stack: Stack, aof_redis: redis_server.RedisServer
) -> None:
    ids = [stack.submit(LONG, name=f"w{i}") for i in range(8)]
    for workflow_id in ids:
        stack.wait_status(workflow_id, {"queued", "running"})
    before = ids[:4]  # one running, the rest queued
    for workflow_id in before:
        assert cancel(stack, workflow_id).status_code == 200
    time.sleep(0.3)  # some cancels taken, their deadlines running
    server = restart_redis(aof_redis, down_seconds=3)
    try:
        wait_landed(stack, before, timeout=10)  # from Redis being back
        after = ids[4:]
        for workflow_id in after:
            response = cancel(stack, workflow_id)
            # 400 only for one that ended meanwhile (the runner kept going).
            assert response.status_code == 200 or (
                response.status_code == 400 and stack.workflow(workflow_id)["status"]
                in TERMINAL), response.text
        after = [w for w in after if stack.workflow(w).get("cancel")]
        wait_landed(stack, after, timeout=10)
        assert all(p.running for p in stack.workers), stack.worker_logs()
        assert len(ping(stack)) == len(stack.workers)
        logs = all_logs(stack)
        assert "Unrecoverable error" not in logs
        assert "as revoked in backend" not in logs  # revokes happened: no noise about them
    finally:
        aof_redis.process = server.process  # the fixture stops the new one


def test_garbage_on_the_queues_goes_to_the_dead_letter_list(stack: Stack) -> None:
    client = redis.Redis.from_url(stack.settings.redis_url)
    client.lpush("cancel", b"garbage-not-json")
    client.lpush("runner", b"\xff\xfe not even utf-8")
    client.lpush("cancel", json.dumps({"body": "x", "properties": {}}))
    client.lpush("runner", json.dumps([1, 2]))
    stack.wait_for(lambda: client.llen(DEAD_LETTER_KEY) == 4, 15, "4 dead letters")
    records = [json.loads(r) for r in client.lrange(DEAD_LETTER_KEY, 0, -1)]
    assert sorted(r["queue"] for r in records) == ["cancel", "cancel", "runner", "runner"]
    logs = all_logs(stack)
    assert "garbage-not-json" not in logs and "Unrecoverable error" not in logs
    workflow_id = stack.submit(LONG)
    stack.wait_status(workflow_id, {"running"})
    assert cancel(stack, workflow_id).status_code == 200
    wait_landed(stack, [workflow_id], timeout=10)
    assert all(p.running for p in stack.workers)


@pytest.mark.slow
def test_a_killed_cancel_workers_message_comes_back_and_a_runners_does_not(
    stack: Stack, tmp_path: Path
) -> None:
    cancel_worker, runner_worker = stack.workers
    client = redis.Redis.from_url(stack.settings.redis_url)
    visibility = worker.cancel_visibility_timeout(stack.settings)
    # A long run held by the runner worker, and a deadline check as earlier versions sent
    # them (held until its ETA) held by the cancel worker; then both workers die without
    # acknowledging anything.
    long_id = stack.submit(blur_chain(400), name="very long")
    stack.wait_status(long_id, {"running"})
    worker.app.send_task(worker.ENFORCE_DEADLINE_TASK, args=[[long_id], "api", "tester", None],
                         countdown=2, queue=worker.CANCEL_QUEUE)
    stack.wait_for(lambda: client.hlen("comfy_cancel:cancel:unacked") == 1, 10,
                   "the deadline check to be held by the cancel worker")
    assert client.hlen("comfy_cancel:runner:unacked") == 1
    cancel_worker.send_signal(signal.SIGKILL)
    runner_worker.send_signal(signal.SIGKILL)
    cancel_worker.wait(10)
    runner_worker.wait(10)
    killed = time.monotonic()
    log = tmp_path / "worker-cancel-2.log"
    replacement = start_worker(stack.settings, worker.CANCEL_QUEUES, log, 10)
    stack.workers.append(replacement)
    wait_workers_ready(stack.settings, [replacement])

    def redelivered() -> bool:
        return "enforce_cancel_deadline" in log.read_text(errors="replace").split("ready.")[-1]

    stack.wait_for(redelivered, visibility + 10, "the deadline check to be redelivered")
    assert time.monotonic() - killed <= visibility + 5
    # Well past the cancel timeout the runner's message is still waiting for its own.
    time.sleep(3)
    assert client.hlen("comfy_cancel:runner:unacked") == 1
    assert client.llen("runner") == 0
