"""The Celery task bodies: thin wrappers that parse, call the domain code and return its
outcome. Nothing here publishes: producers send these tasks by name (publish.py), so no
domain module imports this one.

A cancel worker runs the cancel messages that arrive together as one batch
(:class:`CancelRequests`, batching.py), and enforces the deadlines of running cancels every
``deadline_check_interval_seconds`` (:func:`cancel.enforce_deadlines`) and the workflows'
own timeouts every ``timeout_check_interval_seconds`` (:func:`sweeps.cancel_timed_out`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import OperationalError

from comfy_cancel import batching, cancel, context, runner, sweeps
from comfy_cancel.config import get_settings
from comfy_cancel.status import Actor
from comfy_cancel.worker import (
    CANCEL_QUEUES,
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


def _request(
    workflow_ids: list[str], source: str, actor: str | None = None, reason: str | None = None
) -> tuple[list[str], Actor]:
    """The arguments of a cancel message (what producers send, publish.py)."""
    return list(workflow_ids), Actor(source, actor, reason)


class CancelRequests(batching.BatchTask):
    """How a worker runs the messages of :func:`cancel_workflows` that arrive together: one
    :func:`cancel.handle_batch` for all, up to ``cancel_batch_size`` workflow ids."""

    # Settings, not the context: these are read in the consumer, which under the prefork
    # pool is the parent of the processes that use a context (and its connections).
    def batch_size(self) -> int:
        return get_settings().cancel_batch_size

    def batches_in_flight(self) -> int:
        return get_settings().cancel_batches_in_flight

    def weight(self, call: batching.Call) -> int:
        try:
            return max(1, len(_request(*call.args, **call.kwargs)[0]))
        except TypeError:  # malformed: its batch fails, and it is retried on its own
            return 1

    def run_batch(self, calls: Sequence[batching.Call]) -> None:
        cancel.handle_batch(context.current(),
                            [_request(*call.args, **call.kwargs) for call in calls])


@app.task(name=RUN_WORKFLOW_TASK, bind=True)
def run_workflow(self, workflow_id: str) -> str | None:  # type: ignore[no-untyped-def]
    return runner.run(context.current(), workflow_id, task_id=self.request.id)


@app.task(name=CANCEL_WORKFLOWS_TASK, base=CancelRequests, **RETRY_ON_DATABASE_ERRORS)
def cancel_workflows(
    workflow_ids: list[str], source: str, actor: str | None = None, reason: str | None = None
) -> dict[str, str | None]:
    """Cancel requests: one id from the API, a chunk from bulk cancels and sweeps. Run on
    its own (a retry, or a call outside a worker), else in a batch of :class:`CancelRequests`."""
    outcomes = cancel.handle_batch(context.current(),
                                   [_request(workflow_ids, source, actor, reason)])
    return {wid: outcome.value if outcome else None for wid, outcome in outcomes.items()}


@app.task(name=ENFORCE_DEADLINE_TASK)
def enforce_cancel_deadline(*_args: Any, **_kwargs: Any) -> None:
    """Earlier versions scheduled one of these per batch of running cancels, a grace period
    ahead. Still accepted while one may be in flight (a rolling upgrade), and nothing to do:
    every cancel worker enforces the deadlines the database holds."""


@app.task(name=SWEEP_TASK)
def sweep() -> dict[str, int]:
    return sweeps.sweep(context.current()).counts()


@app.task(name=REDRIVE_TASK)
def redrive() -> dict[str, int]:
    return sweeps.redrive(context.current()).counts()


def _enforce_deadlines() -> None:
    cancel.enforce_deadlines(context.current())


def _cancel_timed_out() -> None:
    sweeps.cancel_timed_out(context.current())


batching.every(app, get_settings().deadline_check_interval_seconds, _enforce_deadlines,
               CANCEL_QUEUES)
batching.every(app, get_settings().timeout_check_interval_seconds, _cancel_timed_out,
               CANCEL_QUEUES)
