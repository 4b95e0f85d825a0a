"""A cancel worker killed (SIGKILL) in the middle of a batch loses nothing: the batch's
transaction never commits, its messages were never acknowledged, and another worker ends
every one of its workflows exactly once. End to end: the API, real Redis, real Celery
worker processes, the simulated ComfyUI and PostgreSQL."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psycopg
import pytest
import redis

from comfy_cancel import db, manager, worker
from comfy_cancel.embedded.comfyui_sim import blur_chain
from comfy_cancel.models import EventKind, WorkflowStatus
from testbed.stack import Stack, cancel, running_stack, start_worker
from tests.helpers import seed_workflow

pytestmark = pytest.mark.acceptance
S = WorkflowStatus
VERY_LONG = blur_chain(400)  # about a minute at the stack's time scale: running throughout
UNACKED = "comfy_cancel:cancel:unacked"  # the cancel workers' unacknowledged messages


def waiting_on_a_lock(url: str) -> int:
    """Backends of the test database waiting for a row lock."""
    with psycopg.connect(db.libpq_url(url), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                           "current_database() AND wait_event_type = 'Lock'").fetchone()
    return int(row[0]) if row else 0


def statuses(stack: Stack, ids: list[str]) -> dict[str, str]:
    with stack.db.transaction() as session:
        return {w.id: w.status for w in manager.workflows_by_ids(session, ids)}


@pytest.mark.postgres
def test_a_cancel_worker_killed_mid_batch_loses_no_cancel(
    pg_database_url: str, redis_db_url: str, tmp_path: Path
) -> None:
    with running_stack(pg_database_url, redis_db_url, tmp_path,
                       cancel_visibility_timeout_seconds=4.0) as stack:
        cancel_worker = stack.workers[0]
        # One running on the simulated ComfyUI, one pending in its queue behind it, and
        # queued ones whose runner tasks have not started.
        running = stack.submit(VERY_LONG, name="running")
        stack.wait_status(running, {"running"})
        pending = stack.submit(VERY_LONG, name="pending")
        stack.wait_for(lambda: stack.workflow(pending)["queue_number"] is not None,
                       what="the second prompt to wait in ComfyUI's queue")
        queued = [seed_workflow(stack.db, stack.account_id, stack.runner_id, S.QUEUED)
                  for _ in range(20)]
        ids = [*queued, pending, running]
        before = statuses(stack, ids)
        client = redis.Redis.from_url(stack.settings.redis_url)

        # The requests wait on the queue while the worker is frozen, and its batches then
        # wait for the rows this test holds: the worker dies inside its transactions,
        # holding every message unacknowledged.
        cancel_worker.send_signal(signal.SIGSTOP)
        holder = psycopg.connect(db.libpq_url(pg_database_url))
        try:
            try:
                for workflow_id in ids:
                    assert cancel(stack, workflow_id).status_code == 200
                holder.execute("SELECT id FROM workflows WHERE id = ANY(%s) FOR UPDATE",
                               (ids,))
            finally:
                cancel_worker.send_signal(signal.SIGCONT)
            stack.wait_for(lambda: client.hlen(UNACKED) == len(ids), 15,
                           "the cancel worker to hold every message")
            stack.wait_for(lambda: waiting_on_a_lock(pg_database_url) > 0, 15,
                           "a batch to be inside its transaction")
            cancel_worker.send_signal(signal.SIGKILL)
            cancel_worker.wait(10)
        finally:
            holder.rollback()
            holder.close()
        time.sleep(1)
        assert statuses(stack, ids) == before  # nothing of the killed batches committed
        assert client.hlen(UNACKED) == len(ids)

        stack.workers.append(start_worker(stack.settings, worker.CANCEL_QUEUES,
                                          tmp_path / "worker-cancel-2.log"))
        for workflow_id in ids:
            stack.wait_status(workflow_id, {"cancelled", "completed", "failed"}, timeout=60)

        with stack.db.transaction() as session:
            for workflow_id in ids:
                found = manager.get_workflow(session, workflow_id)
                assert found is not None
                assert (found.status, found.cancel_outcome) == ("cancelled", "cancelled")
                ends = [e.to_status for e in manager.events_of(session, workflow_id)
                        if e.kind == EventKind.TRANSITION.value
                        and e.to_status in ("cancelled", "completed", "failed")]
                assert ends == ["cancelled"], (workflow_id, ends)
        stack.wait_for(lambda: client.hlen(UNACKED) == 0, 15, "every message acknowledged")
