"""What the cancel worker does with one cancel request ("Flow of one cancel", DESIGN.md).

- terminal: nothing to write; outcome ``too_late`` or ``already_cancelled``;
- queued: remove the prompt from its ComfyUI queue if it has one, CAS
  ``queued -> cancelled``, revoke the runner task and tell the runner to stop;
- running: signal the runner and schedule a deadline check one grace period
  later, then return: no worker slot is held while the runner interrupts;
- deadline passed, still running: escalate and write ``cancelled`` with outcome
  ``forced`` (or ``runner_lost`` when the runner's heartbeat is gone).

Every decision re-reads the database, and every write is a compare-and-set, so a
cancel racing the runner's completion ends in exactly one terminal status.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from comfy_cancel import manager, signals, status, tasks
from comfy_cancel.comfyui import ComfyUIClient, ComfyUIError
from comfy_cancel.context import Context
from comfy_cancel.models import CancelOutcome, Workflow, WorkflowStatus, utcnow
from comfy_cancel.status import Actor

log = logging.getLogger(__name__)
S = WorkflowStatus

# A direct cancel sent to ComfyUI on escalation is best effort: the runner may be gone,
# and the database write must not wait long on a server that does not answer.
ESCALATION_TIMEOUT_SECONDS = 3.0


def handle(ctx: Context, workflow_id: str, by: Actor) -> CancelOutcome | None:
    """Act on one cancel request; the outcome, or None while a running cancel is in flight."""
    return handle_many(ctx, [workflow_id], by).get(workflow_id)


def handle_many(
    ctx: Context, workflow_ids: Sequence[str], by: Actor
) -> dict[str, CancelOutcome | None]:
    """Act on cancel requests for many workflows; running ones are signalled in one batch."""
    outcomes: dict[str, CancelOutcome | None] = {}
    running: list[Workflow] = []
    queued: list[Workflow] = []
    with ctx.db.transaction() as session:
        for workflow in manager.workflows_by_ids(session, workflow_ids):
            outcomes[workflow.id] = _terminal_outcome(session, workflow, by)
            if workflow.status == S.RUNNING.value:
                running.append(workflow)
            elif workflow.status == S.QUEUED.value:
                queued.append(workflow)
            elif workflow.status not in _TERMINAL:
                log.info("workflow %s is %s: not cancellable yet", workflow.id, workflow.status)
    for workflow in queued:
        outcomes[workflow.id] = _cancel_queued(ctx, workflow, by)
    outcomes.update(signal_running(ctx, running, by))
    return outcomes


def enforce_deadline(
    ctx: Context, workflow_ids: Sequence[str], by: Actor
) -> dict[str, CancelOutcome | None]:
    """One grace period after the signal: end the workflows their runners did not stop."""
    with ctx.db.transaction() as session:
        # Terminal ones were acknowledged, or won the race; their outcome is recorded.
        stuck = [w for w in manager.workflows_by_ids(session, workflow_ids)
                 if w.status not in _TERMINAL]
    return {w.id: escalate(ctx, w, by, _escalation_outcome(ctx, w)) for w in stuck}


def signal_running(
    ctx: Context, workflows: Sequence[Workflow], by: Actor
) -> dict[str, CancelOutcome | None]:
    """Signal the runners of running workflows (one pipelined round trip) and schedule one
    deadline check for all of them; a workflow whose runner is gone ends at once."""
    outcomes: dict[str, CancelOutcome | None] = {}
    live: list[str] = []
    for workflow in workflows:
        if _heartbeat_lost(ctx, workflow):
            outcomes[workflow.id] = escalate(ctx, workflow, by, CancelOutcome.RUNNER_LOST)
        else:
            live.append(workflow.id)
            outcomes[workflow.id] = None
    if live:
        signals.send(ctx.redis, live, signals.SignalKind.CANCEL, ctx.settings.signal_ttl_seconds)
        tasks.schedule_deadline(live, by, ctx.settings.cancel_grace_seconds)
    return outcomes


_TERMINAL = frozenset({S.COMPLETED.value, S.FAILED.value, S.CANCELLED.value})


def _terminal_outcome(session: Any, workflow: Workflow, by: Actor) -> CancelOutcome | None:
    if workflow.status not in _TERMINAL:
        return None
    outcome = (
        CancelOutcome.ALREADY_CANCELLED
        if workflow.status == S.CANCELLED.value
        else CancelOutcome.TOO_LATE
    )
    # Only a workflow with a cancel request gets an outcome: one that was never asked to
    # stop (an id list naming finished work) keeps none.
    status.record_outcome(session, workflow.id, outcome, by, only_if_requested=True)
    return outcome


def _cancel_queued(ctx: Context, workflow: Workflow, by: Actor) -> CancelOutcome | None:
    if workflow.prompt_id is not None:
        # Pending in ComfyUI's own queue: take exactly this prompt out of it.
        _cancel_on_comfyui(ctx, workflow, timeout=ctx.settings.comfyui_timeout_seconds)
    with ctx.db.transaction() as session:
        change = status.cancel_if_queued(
            session, workflow.id, by, CancelOutcome.CANCELLED, workflow.cancel_timing()
        )
        current = None if change.changed else manager.get_workflow(session, workflow.id)
        if current is not None:
            outcome = _terminal_outcome(session, current, by)
            if outcome is not None:
                return outcome
    if current is not None:
        # It started running between our read and our write: cancel it as a running one.
        return signal_running(ctx, [current], by)[current.id]
    if not change.changed:
        return None  # deleted meanwhile
    # Revoke is the fast path for a runner task still waiting in the broker; the task
    # re-checks the database before it submits anything, so a lost revoke changes nothing.
    tasks.revoke_runner_tasks([workflow.runner_task_id] if workflow.runner_task_id else [])
    signals.send(ctx.redis, [workflow.id], signals.SignalKind.STOP, ctx.settings.signal_ttl_seconds)
    return CancelOutcome.CANCELLED


def escalate(
    ctx: Context, workflow: Workflow, by: Actor, outcome: CancelOutcome
) -> CancelOutcome | None:
    """End a workflow without its runner's acknowledgement (``forced``, ``runner_lost``)."""
    with ctx.db.transaction() as session:
        # The audit row names the requester; ``escalated`` says the cancel worker decided.
        detail = {**workflow.cancel_timing(), "escalated": True}
        change = status.cancel_if_active(session, workflow.id, by, outcome, detail)
        if not change.changed:
            current = manager.get_workflow(session, workflow.id)
            return _terminal_outcome(session, current, by) if current else None
    # The runner's thread cannot be killed from here (a revoke with terminate kills a
    # process, and runner workers run threads): tell it to stop, stop redelivery, and ask
    # ComfyUI directly so the GPU is freed even when the runner is gone.
    signals.send(
        ctx.redis, [workflow.id], signals.SignalKind.TERMINATE, ctx.settings.signal_ttl_seconds
    )
    tasks.revoke_runner_tasks([workflow.runner_task_id] if workflow.runner_task_id else [])
    if workflow.prompt_id is not None:
        _cancel_on_comfyui(ctx, workflow, timeout=ESCALATION_TIMEOUT_SECONDS)
    return outcome


def _escalation_outcome(ctx: Context, workflow: Workflow) -> CancelOutcome:
    return CancelOutcome.RUNNER_LOST if _heartbeat_lost(ctx, workflow) else CancelOutcome.FORCED


def _heartbeat_lost(ctx: Context, workflow: Workflow) -> bool:
    limit = timedelta(seconds=ctx.settings.heartbeat_timeout_seconds)
    last = workflow.heartbeat_at or workflow.started_at
    return last is not None and utcnow() - last > limit


def _cancel_on_comfyui(ctx: Context, workflow: Workflow, *, timeout: float) -> bool:
    assert workflow.prompt_id is not None
    with ctx.db.transaction() as session:
        runner = manager.get_runner(session, workflow.runner_id) if workflow.runner_id else None
    if runner is None:
        return False
    client = ComfyUIClient(runner.endpoint_url, runner.headers, timeout=timeout)
    try:
        client.cancel(workflow.prompt_id)
        return True
    except ComfyUIError as exc:
        log.warning("could not cancel prompt %s on %s: %s", workflow.prompt_id,
                    runner.endpoint_url, exc)
        return False
    finally:
        client.close()
