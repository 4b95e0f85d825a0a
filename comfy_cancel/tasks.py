"""The Celery task bodies: thin wrappers that parse, call the domain code and return its
outcome. Nothing here publishes: producers send these tasks by name (publish.py), so no
domain module imports this one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.exc import OperationalError

from comfy_cancel import cancel, context, runner, sweeps
from comfy_cancel.models import CancelOutcome
from comfy_cancel.status import Actor
from comfy_cancel.worker import (
    CANCEL_WORKFLOWS_TASK,
    ENFORCE_DEADLINE_TASK,
    REDRIVE_TASK,
    RUN_WORKFLOW_TASK,
    SWEEP_TASK,
    app,
)

# A cancel task is idempotent (the database decides), so a database that is briefly away,
# a deadlock between two batches or SQLite's "database is locked" is worth a few retries;
# after them the re-drive pass still hands the open request on.
RETRY_ON_DATABASE_ERRORS: dict[str, Any] = {
    "autoretry_for": (OperationalError,),
    "retry_backoff": True,
    "retry_backoff_max": 30,
    "max_retries": 5,
}


def _cancel_step(
    step: Callable[[context.Context, Sequence[str], Actor], dict[str, CancelOutcome | None]],
    workflow_ids: list[str],
    source: str,
    actor: str | None,
    reason: str | None,
) -> dict[str, str | None]:
    """Run a step of the cancel path on these ids for this actor; its outcomes as JSON."""
    outcomes = step(context.current(), workflow_ids, Actor(source, actor, reason))
    return {wid: outcome.value if outcome else None for wid, outcome in outcomes.items()}


@app.task(name=RUN_WORKFLOW_TASK, bind=True)
def run_workflow(self, workflow_id: str) -> str | None:  # type: ignore[no-untyped-def]
    return runner.run(context.current(), workflow_id, task_id=self.request.id)


@app.task(name=ENFORCE_DEADLINE_TASK, **RETRY_ON_DATABASE_ERRORS)
def enforce_cancel_deadline(
    workflow_ids: list[str], source: str, actor: str | None = None, reason: str | None = None
) -> dict[str, str | None]:
    return _cancel_step(cancel.enforce_deadline, workflow_ids, source, actor, reason)


@app.task(name=CANCEL_WORKFLOWS_TASK, **RETRY_ON_DATABASE_ERRORS)
def cancel_workflows(
    workflow_ids: list[str], source: str, actor: str | None = None, reason: str | None = None
) -> dict[str, str | None]:
    """Cancel requests: one id from the API, a chunk from bulk cancels and sweeps."""
    return _cancel_step(cancel.handle_many, workflow_ids, source, actor, reason)


@app.task(name=SWEEP_TASK)
def sweep() -> dict[str, int]:
    return sweeps.sweep(context.current()).counts()


@app.task(name=REDRIVE_TASK)
def redrive() -> dict[str, int]:
    return sweeps.redrive(context.current()).counts()
