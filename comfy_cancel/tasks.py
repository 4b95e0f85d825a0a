"""The Celery tasks: thin wrappers that parse, call the domain code and record the outcome.

Publishing lives here too, so every producer (API, CLI, sweeps) hands work on the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import OperationalError

from comfy_cancel.config import get_settings
from comfy_cancel.status import Actor
from comfy_cancel.worker import BULK_QUEUE, CANCEL_QUEUE, RUNNER_QUEUE, SWEEP_QUEUE, app

QUEUE_OF_SOURCE = {"api": CANCEL_QUEUE, "bulk": BULK_QUEUE, "sweep": SWEEP_QUEUE}

# A cancel task is idempotent (the database decides), so a database that is briefly away,
# a deadlock between two batches or SQLite's "database is locked" is worth a few retries;
# after them the re-publish sweep still hands the open request on.
RETRY_ON_DATABASE_ERRORS: dict[str, Any] = {
    "autoretry_for": (OperationalError,),
    "retry_backoff": True,
    "retry_backoff_max": 30,
    "max_retries": 5,
}


def publish_run(workflow_id: str, task_id: str) -> None:
    """Hand a workflow to the runner side; raises kombu/redis errors when the broker is down."""
    run_workflow.apply_async(args=[workflow_id], task_id=task_id, queue=RUNNER_QUEUE)


def runner_backlog() -> int:
    """Messages waiting in the runner queue (not yet taken by a runner worker)."""
    with app.connection_for_read() as connection:
        return int(connection.default_channel.queue_declare(queue=RUNNER_QUEUE).message_count)


def publish_cancels(workflow_ids: Sequence[str], by: Actor, chunk_size: int = 1000) -> None:
    """Publish cancel requests on the queue of their source, one message per chunk of ids.

    Raises kombu/redis errors when the broker is unreachable; the requests are already
    recorded in the database, so the re-publish sweep hands them on later.
    """
    queue = QUEUE_OF_SOURCE.get(by.source, CANCEL_QUEUE)
    with app.producer_or_acquire() as producer:
        for start in range(0, len(workflow_ids), chunk_size):
            cancel_workflows.apply_async(
                args=[list(workflow_ids[start : start + chunk_size]), by.source, by.actor,
                      by.reason],
                queue=queue,
                producer=producer,
                retry=False,
            )


def schedule_deadline(workflow_ids: Sequence[str], by: Actor, after_seconds: float) -> None:
    """Check back on running cancels after the grace period, without holding a worker."""
    enforce_cancel_deadline.apply_async(
        args=[list(workflow_ids), by.source, by.actor, by.reason],
        countdown=after_seconds,
        queue=QUEUE_OF_SOURCE.get(by.source, CANCEL_QUEUE),
    )


def revoke_runner_tasks(task_ids: Sequence[str]) -> None:
    """One broadcast for many runner tasks (a fast path only: see cancel.py)."""
    if task_ids:
        app.control.revoke(list(task_ids))


@app.task(name="comfy_cancel.run_workflow", bind=True)
def run_workflow(self, workflow_id: str) -> str | None:  # type: ignore[no-untyped-def]
    from comfy_cancel import context, runner

    return runner.run(context.current(), workflow_id, task_id=self.request.id)


@app.task(name="comfy_cancel.enforce_cancel_deadline", **RETRY_ON_DATABASE_ERRORS)
def enforce_cancel_deadline(
    workflow_ids: list[str], source: str, actor: str | None = None, reason: str | None = None
) -> dict[str, str | None]:
    from comfy_cancel import cancel, context

    by = Actor(source, actor, reason)
    outcomes = cancel.enforce_deadline(context.current(), workflow_ids, by)
    return {wid: outcome.value if outcome else None for wid, outcome in outcomes.items()}


@app.task(name="comfy_cancel.cancel_workflows", **RETRY_ON_DATABASE_ERRORS)
def cancel_workflows(
    workflow_ids: list[str], source: str, actor: str | None = None, reason: str | None = None
) -> dict[str, str | None]:
    """Cancel requests: one id from the API, a chunk from bulk cancels and sweeps."""
    from comfy_cancel import cancel, context

    outcomes = cancel.handle_many(context.current(), workflow_ids, Actor(source, actor, reason))
    return {wid: outcome.value if outcome else None for wid, outcome in outcomes.items()}


@app.task(name="comfy_cancel.sweep")
def sweep() -> dict[str, int]:
    from comfy_cancel import context
    from comfy_cancel.sweeps import sweep as sweep_once

    return sweep_once(context.current()).counts()


@app.task(name="comfy_cancel.redrive")
def redrive() -> dict[str, int]:
    from comfy_cancel import context
    from comfy_cancel.sweeps import redrive as redrive_once

    return redrive_once(context.current()).counts()


def _schedule_redrive() -> None:
    """The re-drive pass gets its own beat entry, beside the full sweep's (worker.py):
    often, on the sweep queue, and expiring so that passes never pile up."""
    interval = get_settings().redrive_interval_seconds
    app.add_periodic_task(interval, redrive.s(), name="redrive",
                          queue=SWEEP_QUEUE, expires=interval)


_schedule_redrive()
