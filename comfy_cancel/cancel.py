"""What the cancel worker does with one cancel request ("Flow of one cancel", DESIGN.md).

- terminal: nothing to write; outcome ``too_late`` or ``already_cancelled``;
- queued: CAS ``queued -> cancelled`` (one statement for many), then revoke the
  runner task, and remove a prompt already pending in ComfyUI and tell its runner to stop;
- running: signal the runner and schedule a deadline check one grace period
  later, then return: no worker slot is held while the runner interrupts;
- deadline passed, still running: escalate and write ``cancelled`` with outcome
  ``forced`` (or ``runner_lost`` when the runner's heartbeat is gone).

Every decision re-reads the database, and every write is a compare-and-set, so a
cancel racing the runner's completion ends in exactly one terminal status.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from comfy_cancel import manager, signals, status, tasks
from comfy_cancel.comfyui import ComfyUIError
from comfy_cancel.context import Context
from comfy_cancel.models import CancelOutcome, Runner, Workflow, WorkflowStatus, utcnow
from comfy_cancel.status import Actor, CancelledQueued

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
    """Act on cancel requests for many workflows.

    The queued ones are cancelled by one compare-and-set first (no read needed); only what
    it did not change is read: terminal ones get their outcome, running ones (including
    queued ones that just started) are signalled in one batch.
    """
    running: list[Workflow] = []
    with ctx.db.transaction() as session:  # one transaction: the CAS, then the read
        cancelled = status.cancel_queued_many(session, workflow_ids, by)
        outcomes: dict[str, CancelOutcome | None] = {
            c.id: CancelOutcome.CANCELLED for c in cancelled
        }
        rest = [wid for wid in workflow_ids if wid not in outcomes]
        for workflow in manager.workflows_by_ids(session, rest) if rest else []:
            outcomes[workflow.id] = _terminal_outcome(session, workflow, by)
            if workflow.status == S.RUNNING.value:
                running.append(workflow)
            elif workflow.status not in _TERMINAL:
                log.info("workflow %s is %s: not cancellable yet", workflow.id, workflow.status)
    _after_queued_cancelled(ctx, cancelled)
    outcomes.update(signal_running(ctx, running, by))
    return outcomes


def cancel_queued(ctx: Context, workflow_ids: Sequence[str], by: Actor) -> set[str]:
    """``queued -> cancelled`` for those of these workflows still queued, and the clean-up
    behind it; returns the ids it cancelled.

    Revoke is the fast path for a runner task still waiting in the broker: the task
    re-checks the database before it submits anything, so a lost revoke changes nothing.
    A prompt already pending in ComfyUI is removed, and its runner told to stop watching;
    a runner that submits after this finds the workflow cancelled when it records the
    submission, and removes its prompt itself.
    """
    if not workflow_ids:
        return set()
    with ctx.db.transaction() as session:
        cancelled = status.cancel_queued_many(session, workflow_ids, by)
    _after_queued_cancelled(ctx, cancelled)
    return {c.id for c in cancelled}


def _after_queued_cancelled(ctx: Context, cancelled: Sequence[CancelledQueued]) -> None:
    """After the commit: revoke the runner tasks, stop and remove the pending prompts."""
    if not cancelled:
        return
    tasks.revoke_runner_tasks([c.runner_task_id for c in cancelled if c.runner_task_id])
    with_prompt = [c for c in cancelled if c.prompt_id]
    signals.send(ctx.redis, [c.id for c in with_prompt], signals.SignalKind.STOP,
                 ctx.settings.signal_ttl_seconds)
    _remove_pending_prompts(ctx, with_prompt)


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
        runner = (
            manager.get_runner(session, workflow.runner_id)
            if workflow.prompt_id is not None and workflow.runner_id
            else None
        )
    # The runner's thread cannot be killed from here (a revoke with terminate kills a
    # process, and runner workers run threads): tell it to stop, stop redelivery, and ask
    # ComfyUI directly so the GPU is freed even when the runner is gone.
    signals.send(
        ctx.redis, [workflow.id], signals.SignalKind.TERMINATE, ctx.settings.signal_ttl_seconds
    )
    tasks.revoke_runner_tasks([workflow.runner_task_id] if workflow.runner_task_id else [])
    if runner is not None and workflow.prompt_id is not None:
        _cancel_on_comfyui(ctx, runner, workflow.prompt_id)
    return outcome


def _remove_pending_prompts(ctx: Context, cancelled: Sequence[CancelledQueued]) -> None:
    """One call per ComfyUI server for all of its prompts among these."""
    by_runner: dict[str, list[str]] = defaultdict(list)
    for row in cancelled:
        if row.runner_id and row.prompt_id:
            by_runner[row.runner_id].append(row.prompt_id)
    if not by_runner:
        return
    with ctx.db.transaction() as session:
        runners = manager.runner_endpoints(session, list(by_runner))
    for runner_id, prompt_ids in by_runner.items():
        runner = runners.get(runner_id)
        if runner is None:
            continue
        client = ctx.comfyui(runner.endpoint_url, runner.headers)
        try:
            client.cancel_many(prompt_ids)
        except ComfyUIError as exc:
            # Their runners got a STOP signal and remove their own prompts too.
            log.warning("could not remove %d prompts from %s: %s", len(prompt_ids),
                        client.shown_url, exc)


def _escalation_outcome(ctx: Context, workflow: Workflow) -> CancelOutcome:
    return CancelOutcome.RUNNER_LOST if _heartbeat_lost(ctx, workflow) else CancelOutcome.FORCED


def _heartbeat_lost(ctx: Context, workflow: Workflow) -> bool:
    limit = timedelta(seconds=ctx.settings.heartbeat_timeout_seconds)
    last = workflow.heartbeat_at or workflow.started_at
    return last is not None and utcnow() - last > limit


def _cancel_on_comfyui(ctx: Context, runner: Runner, prompt_id: str) -> None:
    """Best effort: the workflow is cancelled in the database already."""
    client = ctx.comfyui(runner.endpoint_url, runner.headers, ESCALATION_TIMEOUT_SECONDS)
    try:
        client.cancel(prompt_id)
    except ComfyUIError as exc:
        log.warning("could not cancel prompt %s on %s: %s", prompt_id, client.shown_url, exc)
