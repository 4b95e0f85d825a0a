"""The Celery tasks: thin wrappers that parse, call the domain code and record the outcome.

Publishing lives here too, so every producer (API, CLI, sweeps) hands work on the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from comfy_cancel.status import Actor
from comfy_cancel.worker import BULK_QUEUE, CANCEL_QUEUE, RUNNER_QUEUE, SWEEP_QUEUE, app

QUEUE_OF_SOURCE = {"api": CANCEL_QUEUE, "bulk": BULK_QUEUE, "sweep": SWEEP_QUEUE}


def publish_run(workflow_id: str, task_id: str) -> None:
    """Hand a workflow to the runner side; raises kombu/redis errors when the broker is down."""
    run_workflow.apply_async(args=[workflow_id], task_id=task_id, queue=RUNNER_QUEUE)


def publish_cancels(workflow_ids: Sequence[str], by: Actor) -> None:
    """Publish one cancel message per workflow on the queue of the request's source."""
    queue = QUEUE_OF_SOURCE.get(by.source, CANCEL_QUEUE)
    with app.producer_or_acquire() as producer:
        for workflow_id in workflow_ids:
            cancel_workflow.apply_async(
                args=[workflow_id, by.source, by.actor, by.reason],
                queue=queue,
                producer=producer,
                retry=False,
            )


def schedule_deadline(workflow_id: str, by: Actor, after_seconds: float) -> None:
    """Check back on a running cancel after the grace period, without holding a worker."""
    enforce_cancel_deadline.apply_async(
        args=[workflow_id, by.source, by.actor, by.reason],
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


@app.task(name="comfy_cancel.cancel_workflow")
def cancel_workflow(
    workflow_id: str, source: str, actor: str | None = None, reason: str | None = None
) -> str | None:
    from comfy_cancel import cancel, context

    outcome = cancel.handle(context.current(), workflow_id, Actor(source, actor, reason))
    return outcome.value if outcome else None


@app.task(name="comfy_cancel.enforce_cancel_deadline")
def enforce_cancel_deadline(
    workflow_id: str, source: str, actor: str | None = None, reason: str | None = None
) -> str | None:
    from comfy_cancel import cancel, context

    outcome = cancel.enforce_deadline(
        context.current(), workflow_id, Actor(source, actor, reason)
    )
    return outcome.value if outcome else None
