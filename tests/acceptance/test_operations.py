"""Operators' tools end to end on real PostgreSQL, Redis, Celery workers and the simulated
ComfyUI: bulk cancels by filter and by id list, and a lost cancel message recovered by
the sweep."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from comfy_cancel import cli, manager, status
from comfy_cancel.context import current
from comfy_cancel.embedded.comfyui_sim import blur_chain
from comfy_cancel.models import WorkflowStatus
from comfy_cancel.sweeps import sweep
from testbed.stack import Stack, running_stack
from tests.helpers import seed_workflow

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres]
S = WorkflowStatus
TERMINAL = {"completed", "failed", "cancelled"}


@pytest.fixture
def stack(pg_database_url: str, redis_db_url: str, tmp_path: Path) -> Iterator[Stack]:
    with running_stack(pg_database_url, redis_db_url, tmp_path,
                       redrive_after_seconds=1.0) as s:
        yield s


def statuses(stack: Stack, ids: list[str]) -> dict[str, str]:
    with stack.db.transaction() as session:
        return {w.id: w.status for w in manager.workflows_by_ids(session, ids)}


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert cli.main(args) == 0, capsys.readouterr().err
    return dict(json.loads(capsys.readouterr().out))


def test_bulk_cancel_by_filter(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    queued = [seed_workflow(stack.db, stack.account_id, stack.runner_id, S.QUEUED)
              for _ in range(25)]
    running = stack.submit(blur_chain(40), name="running")
    stack.wait_status(running, {"running"} | TERMINAL)
    done = seed_workflow(stack.db, stack.account_id, stack.runner_id, S.COMPLETED)
    with stack.db.transaction() as session:
        other = manager.get_or_create_account(session, "globex")
        runner = manager.add_runner(session, other.id, name="r", endpoint_url=stack.sim.url)
        other_id, other_runner = other.id, runner.id
    bystander = seed_workflow(stack.db, other_id, other_runner, S.QUEUED)

    dry = run_cli(["bulk-cancel", "--account", "acme", "--dry-run", "--json"], capsys)
    assert dry["matched"] == 26 and dry["by_status"] == {"queued": 25, "running": 1}
    assert dry["dry_run"] is True and len(dry["sample"]) == 10  # type: ignore[arg-type]
    assert set(statuses(stack, [*queued, running]).values()) == {"queued", "running"}

    # Operators only: a customer's token is refused and changes nothing.
    with stack.client() as c:
        refused = c.post("/v1/admin/workflow/cancel", json={"account": "acme"})
    assert refused.status_code == 403 and refused.json()["status"] == 403
    with stack.client(stack.operator_token) as c:
        planned = c.post("/v1/admin/workflow/cancel",
                         json={"account": "acme", "dry_run": True}).json()
        assert planned["matched"] == 26
        response = c.post("/v1/admin/workflow/cancel",
                          json={"account": "acme", "reason": "maintenance"})
    assert response.status_code == 200, response.text
    summary = response.json()
    # The API answers once the queued ones are cancelled and the running one signalled.
    assert summary["matched"] == 26 and summary["cancelled"] == 25 and summary["pending"] == 1
    assert summary["not_found"] == summary["failed_to_signal"] == 0
    assert stack.wait_status(running, TERMINAL, timeout=20)["cancel"]["outcome"] == "cancelled"
    assert set(statuses(stack, queued).values()) == {"cancelled"}
    assert statuses(stack, [done, bystander]) == {done: "completed", bystander: "queued"}
    with stack.db.transaction() as session:
        row = manager.get_workflow(session, queued[0])
        assert row is not None
        assert (row.cancel_source, row.cancel_reason, row.cancel_outcome) == (
            "bulk", "maintenance", "cancelled")


def test_bulk_cancel_by_id_list_counts_each_outcome(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queued = [seed_workflow(stack.db, stack.account_id, stack.runner_id, S.QUEUED)
              for _ in range(5)]
    running = stack.submit(blur_chain(40), name="running")
    stack.wait_status(running, {"running"} | TERMINAL)
    completed = seed_workflow(stack.db, stack.account_id, stack.runner_id, S.COMPLETED)
    cancelled = seed_workflow(stack.db, stack.account_id, stack.runner_id, S.CANCELLED)
    unknown = "00000000-0000-4000-8000-000000000000"
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join([*queued, running, completed, cancelled, unknown, queued[0]]))

    summary = run_cli(["bulk-cancel", "--ids-file", str(ids_file), "--yes", "--json",
                       "--reason", "bad deploy", "--wait", "20s"], capsys)
    assert summary["matched"] == 8
    assert summary["cancelled"] == 6  # five queued at once, the running one acknowledged
    assert summary["already_terminal"] == 2
    assert summary["not_found"] == 1
    assert summary["too_late"] == summary["pending"] == summary["failed_to_signal"] == 0
    assert statuses(stack, [*queued, running]) == {w: "cancelled" for w in [*queued, running]}


def test_a_cancel_whose_message_was_lost_still_ends_cancelled_through_the_sweep(
    stack: Stack, redis_db_url: str
) -> None:
    workflow_id = stack.submit(blur_chain(40), name="lost-message")
    stack.wait_status(workflow_id, {"running"} | TERMINAL)
    # The intent is committed, but its message never reaches a worker: as if Redis had
    # lost it (flushed, or failed over without the write).
    with stack.db.transaction() as session:
        assert status.request_cancel(session, workflow_id,
                                     status.Actor("api", "alice", "lost in transit"))
    redis.Redis.from_url(redis_db_url).delete("cancel")
    assert stack.workflow(workflow_id)["status"] == "running"
    stack.wait_for(lambda: bool(sweep(current()).republished), timeout=10,
                   what="the sweep to re-publish the open intent")
    wf = stack.wait_status(workflow_id, TERMINAL, timeout=20)
    assert wf["status"] == "cancelled" and wf["cancel"]["outcome"] == "cancelled"
    assert wf["cancel"]["actor"] == "alice"  # the original request, not the sweep's
