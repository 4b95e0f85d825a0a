"""Shared test helpers: migrated databases and workflows brought to a status the legal way."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from comfy_cancel import manager, status
from comfy_cancel.context import Context
from comfy_cancel.db import Database
from comfy_cancel.embedded.comfyui_sim import TINY_PROMPT
from comfy_cancel.models import WorkflowStatus
from testbed.database import LOOPBACK_ALLOWED

S = WorkflowStatus
T = TypeVar("T")

# Steps through the lifecycle from accepted to each status, via the status writer only.
PATH_TO: dict[S, list[S]] = {
    S.ACCEPTED: [],
    S.UPLOADED: [S.UPLOADED],
    S.QUEUED: [S.UPLOADED, S.QUEUED],
    S.RUNNING: [S.UPLOADED, S.QUEUED, S.RUNNING],
    S.COMPLETED: [S.UPLOADED, S.QUEUED, S.RUNNING, S.COMPLETED],
    S.FAILED: [S.FAILED],
    S.CANCELLED: [S.UPLOADED, S.QUEUED, S.CANCELLED],
}


def make_account_and_runner(
    db: Database, account: str = "acme", url: str = "http://127.0.0.1:1"
) -> tuple[int, str]:
    with db.transaction() as session:
        acc = manager.get_or_create_account(session, account)
        runner = manager.add_runner(session, acc.id, name="r1", endpoint_url=url,
                                    settings=LOOPBACK_ALLOWED)
        return acc.id, runner.id


def seed_workflow(
    db: Database, account_id: int, runner_id: str, to: S = S.ACCEPTED, name: str = "wf"
) -> str:
    with db.transaction() as session:
        wf = status.create_accepted(session, account_id, name=name, workflow_json=TINY_PROMPT)
        workflow_id = wf.id
    for step in PATH_TO[to]:
        with db.transaction() as session:
            change = advance(session, workflow_id, step, runner_id)
            assert change.changed, f"seeding {workflow_id} to {step} failed: {change}"
    return workflow_id


def advance(session: Any, workflow_id: str, to: S, runner_id: str) -> status.Change:
    by = status.Actor("api", "tester", "test")
    if to is S.UPLOADED:
        return status.mark_uploaded(session, workflow_id, runner_id)
    if to is S.QUEUED:
        return status.mark_queued(session, workflow_id)
    if to is S.RUNNING:
        return status.mark_running(session, workflow_id)
    if to is S.COMPLETED:
        return status.complete_if_running(session, workflow_id, {"3": {"images": []}})
    if to is S.FAILED:
        return status.fail(session, workflow_id, exception_type="E", exception_message="boom")
    if to is S.CANCELLED:
        return status.cancel_if_active(session, workflow_id, by)
    raise AssertionError(to)


def twice_at_once(ctx: Context, work: Callable[[Context], T]) -> list[T]:
    """Run ``work`` in two threads released together, each with a context of its own (its
    own connections, as two workers or schedulers have): what both returned."""
    barrier = threading.Barrier(2)
    results: list[T] = []

    def run() -> None:
        other = Context(ctx.settings)
        barrier.wait()
        results.append(work(other))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results
