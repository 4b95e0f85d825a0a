"""What the cancel worker does with one cancel request ("Flow of one cancel", DESIGN.md).

- terminal: nothing to write; outcome ``too_late`` or ``already_cancelled``;
- queued: CAS ``queued -> cancelled`` (one statement for many), then revoke the
  runner task, and remove a prompt already pending in ComfyUI and tell its runner to stop;
- running: signal the runner and schedule a deadline check one grace period
  later, then return: no worker slot is held while the runner interrupts;
- deadline passed, still running: escalate and write ``cancelled`` with outcome
  ``forced`` (or ``runner_lost`` when the runner's heartbeat is gone).

The worker stamps ``cancel_taken_at`` once it has signalled a running workflow's runner
and scheduled its deadline check (a worker that fails before, e.g. on a broker outage,
leaves it unstamped, so the re-drive pass hands it on within seconds). The deadline is
``cancel_taken_at + cancel_grace_seconds``, kept by the database: the countdown task is
the fast path, and a request handed on again by the re-drive pass (sweeps.py) after its
deadline escalates at once instead of signalling again.

Every decision re-reads the database, and every write is a compare-and-set, so a
cancel racing the runner's completion ends in exactly one terminal status.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from comfy_cancel import manager, publish, signals, status
from comfy_cancel.comfyui import ComfyUIError
from comfy_cancel.context import Context
from comfy_cancel.encryption import SecretKeyError
from comfy_cancel.models import TERMINAL, CancelOutcome, Workflow, WorkflowStatus, utcnow
from comfy_cancel.status import Actor, CancelledQueued

log = logging.getLogger(__name__)
S = WorkflowStatus

# A direct cancel sent to ComfyUI on escalation is best effort: the runner may be gone,
# and the database write must not wait long on a server that does not answer.
ESCALATION_TIMEOUT_SECONDS = 3.0


def handle_many(
    ctx: Context, workflow_ids: Sequence[str], by: Actor
) -> dict[str, CancelOutcome | None]:
    """Act on cancel requests for many workflows.

    The queued ones are cancelled by one compare-and-set first (no read needed); only what
    it did not change is read: terminal ones get their outcome, running ones (including
    queued ones that just started) are signalled in one batch and then stamped as taken;
    those whose deadline already passed (a request handed on again) are escalated instead.
    """
    running: list[Workflow] = []
    overdue: list[Workflow] = []
    with ctx.db.transaction() as session:  # one transaction: the CAS, then the read
        cancelled = status.cancel_queued_many(session, workflow_ids, by)
        outcomes: dict[str, CancelOutcome | None] = {
            c.id: CancelOutcome.CANCELLED for c in cancelled
        }
        rest = [wid for wid in workflow_ids if wid not in outcomes]
        for workflow in manager.workflows_by_ids(session, rest) if rest else []:
            outcomes[workflow.id] = _terminal_outcome(session, workflow, by)
            if workflow.status == S.RUNNING.value:
                (overdue if _deadline_passed(ctx, workflow) else running).append(workflow)
            elif workflow.status not in TERMINAL:
                log.info("workflow %s is %s: not cancellable yet", workflow.id, workflow.status)
    _after_queued_cancelled(ctx, cancelled)
    if overdue:
        outcomes.update(escalate(ctx, overdue, by))
    signalled = signal_running(ctx, running, by)
    outcomes.update(signalled)
    # Only now "taken": a stamp written before the signal went out would make the re-drive
    # pass wait for a deadline that no runner was told about.
    live = [wid for wid, outcome in signalled.items() if outcome is None]
    if live:
        with ctx.db.transaction() as session:
            status.mark_cancel_taken(session, live)
    return outcomes


def _deadline_passed(ctx: Context, workflow: Workflow) -> bool:
    """Taken before, and its runner's grace period is over: signalling again would only
    give it another one."""
    taken = workflow.cancel_taken_at
    grace = timedelta(seconds=ctx.settings.cancel_grace_seconds)
    return taken is not None and utcnow() - taken >= grace


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
    publish.revoke_runner_tasks([c.runner_task_id for c in cancelled if c.runner_task_id])
    with_prompt = [c for c in cancelled if c.prompt_id]
    signals.send(ctx.redis, [c.id for c in with_prompt], signals.SignalKind.STOP,
                 ctx.settings.signal_ttl_seconds)
    prompts: dict[str, list[str]] = defaultdict(list)
    for row in with_prompt:
        if row.runner_id and row.prompt_id:
            prompts[row.runner_id].append(row.prompt_id)
    cancel_prompts(ctx, prompts)


def enforce_deadline(
    ctx: Context, workflow_ids: Sequence[str], by: Actor
) -> dict[str, CancelOutcome | None]:
    """One grace period after the signal: end the workflows their runners did not stop."""
    with ctx.db.transaction() as session:
        # Terminal ones were acknowledged, or won the race; their outcome is recorded.
        stuck = [w for w in manager.workflows_by_ids(session, workflow_ids)
                 if w.status not in TERMINAL]
    return escalate(ctx, stuck, by)


def signal_running(
    ctx: Context, workflows: Sequence[Workflow], by: Actor
) -> dict[str, CancelOutcome | None]:
    """Signal the runners of running workflows (one pipelined round trip) and schedule one
    deadline check for all of them; a workflow whose runner is gone ends at once."""
    lost = [w for w in workflows if _heartbeat_lost(ctx, w)]
    lost_ids = {w.id for w in lost}
    live = [w.id for w in workflows if w.id not in lost_ids]
    outcomes: dict[str, CancelOutcome | None] = dict.fromkeys(live)
    if lost:
        outcomes.update(escalate(ctx, lost, by, CancelOutcome.RUNNER_LOST))
    if live:
        signals.send(ctx.redis, live, signals.SignalKind.CANCEL, ctx.settings.signal_ttl_seconds)
        publish.schedule_deadline(live, by, ctx.settings.cancel_grace_seconds)
    return outcomes


def _terminal_outcome(session: Any, workflow: Workflow, by: Actor) -> CancelOutcome | None:
    if workflow.status not in TERMINAL:
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
    ctx: Context,
    workflows: Sequence[Workflow],
    by: Actor,
    outcome: CancelOutcome | None = None,
) -> dict[str, CancelOutcome | None]:
    """End workflows without their runners' acknowledgement (``forced``, or
    ``runner_lost`` where the heartbeat is gone; ``outcome`` overrides). Returns each
    one's outcome: the escalation's, or the terminal outcome of one that ended first.

    One short transaction per workflow for its compare-and-set (it holds one row lock at a
    time, so it never deadlocks with runners writing theirs), then the side effects once
    for all: one pipelined TERMINATE signal, one revoke broadcast, one ComfyUI call per
    server.
    """
    outcomes: dict[str, CancelOutcome | None] = {}
    ended: list[Workflow] = []
    for workflow in workflows:
        chosen = outcome or _escalation_outcome(ctx, workflow)
        with ctx.db.transaction() as session:
            # The audit row names the requester; ``escalated`` says the cancel worker decided.
            detail = {**workflow.cancel_timing(), "escalated": True}
            change = status.cancel_if_active(session, workflow.id, by, chosen, detail)
            if change.changed:
                outcomes[workflow.id] = chosen
                ended.append(workflow)
            else:
                current = manager.get_workflow(session, workflow.id)
                outcomes[workflow.id] = (
                    _terminal_outcome(session, current, by) if current else None
                )
    if not ended:
        return outcomes
    with_prompt = [w for w in ended if w.prompt_id and w.runner_id]
    # The runner's thread cannot be killed from here (a revoke with terminate kills a
    # process, and runner workers run threads): tell it to stop, stop redelivery, and ask
    # ComfyUI directly so the GPU is freed even when the runner is gone.
    signals.send(ctx.redis, [w.id for w in ended], signals.SignalKind.TERMINATE,
                 ctx.settings.signal_ttl_seconds)
    publish.revoke_runner_tasks([w.runner_task_id for w in ended if w.runner_task_id])
    prompts: dict[str, list[str]] = defaultdict(list)
    for workflow in with_prompt:
        prompts[str(workflow.runner_id)].append(str(workflow.prompt_id))
    cancel_prompts(ctx, prompts, ESCALATION_TIMEOUT_SECONDS)
    return outcomes


def cancel_prompts(
    ctx: Context,
    prompts: Mapping[str, list[str]],
    timeout: float | None = None,
) -> None:
    """One ComfyUI call per server for all of its prompts (``prompts`` by runner id).
    Best effort: the workflows are cancelled in the database already, and their runners
    were signalled to remove their prompts themselves."""
    if not prompts:
        return
    with ctx.db.transaction() as session:
        runners = manager.runner_endpoints(session, list(prompts))
    for runner_id, prompt_ids in prompts.items():
        runner = runners.get(runner_id)
        if runner is None:
            continue
        try:
            client = ctx.comfyui(runner.endpoint_url, runner.headers, timeout)
            client.cancel_many(prompt_ids)
        except (ComfyUIError, SecretKeyError) as exc:
            log.warning("could not cancel %d prompts on runner %s: %s", len(prompt_ids),
                        runner_id, exc)


def _escalation_outcome(ctx: Context, workflow: Workflow) -> CancelOutcome:
    return CancelOutcome.RUNNER_LOST if _heartbeat_lost(ctx, workflow) else CancelOutcome.FORCED


def _heartbeat_lost(ctx: Context, workflow: Workflow) -> bool:
    limit = timedelta(seconds=ctx.settings.heartbeat_timeout_seconds)
    last = workflow.heartbeat_at or workflow.started_at
    return last is not None and utcnow() - last > limit
