"""What the cancel worker does with cancel requests ("Flow of one cancel", DESIGN.md).

The worker takes the messages that arrive together as one batch (tasks.py, batching.py):
:func:`handle_batch` acts on all their workflows at once, each for its own requester.

- terminal: nothing to write; outcome ``too_late`` or ``already_cancelled``;
- queued: CAS ``queued -> cancelled`` (one statement for the batch), then revoke the
  runner tasks (one broadcast), and remove the prompts already pending in ComfyUI and
  tell their runners to stop;
- running: signal the runners (one pipelined round trip) and stamp the requests as taken,
  then return: no worker slot is held while the runners interrupt;
- the deadline passed with no outcome: :func:`enforce_deadlines`, which each cancel worker
  runs every ``deadline_check_interval_seconds``, escalates and writes ``cancelled`` with
  outcome ``forced`` (or ``runner_lost`` when the runner's heartbeat is gone).

The deadline is ``cancel_taken_at + cancel_grace_seconds``, kept by the database and
defined once (``manager._past_deadline``). The worker stamps ``cancel_taken_at`` once it
has signalled a running workflow's runner: a worker that fails before (a Redis outage)
leaves it unstamped, so the re-drive pass (sweeps.py) hands the request on within seconds;
a request handed on again keeps its first take, and so its deadline.

Every decision re-reads the database, and every write is a compare-and-set, so a
cancel racing the runner's completion ends in exactly one terminal status.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta

from sqlalchemy.orm import Session

from comfy_cancel import manager, metrics, publish, signals, status
from comfy_cancel.comfyui import ComfyUIClient, ComfyUIError
from comfy_cancel.context import Context
from comfy_cancel.encryption import SecretKeyError
from comfy_cancel.models import (
    TERMINAL,
    CancelOutcome,
    CancelSource,
    Workflow,
    WorkflowStatus,
    utcnow,
)
from comfy_cancel.status import Actor, CancelledQueued

log = logging.getLogger(__name__)
S = WorkflowStatus

# A direct cancel sent to ComfyUI on escalation is best effort: the runner may be gone,
# and the database write must not wait long on a server that does not answer.
ESCALATION_TIMEOUT_SECONDS = 3.0

Outcomes = dict[str, CancelOutcome | None]


def handle_batch(ctx: Context, requests: Sequence[tuple[Sequence[str], Actor]]) -> Outcomes:
    """Act on the cancel requests of a batch of messages, each some workflow ids and who
    asked; a workflow named twice is handled once, for the first to ask.

    The queued ones are cancelled by one compare-and-set first (no read needed; committed
    on its own, one statement on PostgreSQL); only what it did not change is read, in a
    transaction of its own (what a read in the CAS's transaction would see on PostgreSQL
    too: each statement reads what had committed when it began): terminal ones get their
    outcome, running ones (including queued ones that just started) are signalled in one
    round trip and then stamped as taken.
    """
    by: dict[str, Actor] = {}
    for workflow_ids, requester in requests:
        for workflow_id in workflow_ids:
            by.setdefault(workflow_id, requester)
    if not by:
        return {}
    cancelled = status.cancel_queued_committed(ctx.db, list(by), by)
    outcomes: Outcomes = {c.id: CancelOutcome.CANCELLED for c in cancelled}
    rest = [wid for wid in by if wid not in outcomes]
    running = _read_not_queued(ctx, rest, by, outcomes) if rest else []
    _after_queued_cancelled(ctx, cancelled)
    signalled = signal_running(ctx, running, by)
    outcomes.update(signalled)
    # Only now "taken": a stamp written before the signal went out would start a deadline
    # that no runner was told about.
    live = [wid for wid, outcome in signalled.items() if outcome is None]
    # The first signal of each request (one handed on again was taken already), counted now:
    # its runner may well have acknowledged before the stamp below.
    metrics.runners_signalled([(w.cancel_source, w.cancel_requested_at) for w in running
                               if w.id in signalled and signalled[w.id] is None
                               and w.cancel_taken_at is None], utcnow())
    if live:
        with ctx.db.transaction() as session:
            status.mark_cancel_taken(session, live)
    _log_batch(by, outcomes, set(live))
    return outcomes


def _read_not_queued(
    ctx: Context, workflow_ids: Sequence[str], by: Mapping[str, Actor], outcomes: Outcomes
) -> list[Workflow]:
    """Read the workflows of a batch that the compare-and-set left alone: a terminal one's
    outcome is recorded (and put in ``outcomes``); returns the running ones."""
    running: list[Workflow] = []
    with ctx.db.transaction() as session:
        for workflow in manager.workflows_by_ids(session, workflow_ids):
            outcomes[workflow.id] = _terminal_outcome(session, workflow, by[workflow.id])
            if workflow.status == S.RUNNING.value:
                running.append(workflow)
            elif workflow.status not in TERMINAL:
                log.info("workflow %s is %s: not cancellable yet", workflow.id, workflow.status,
                         extra={"workflow_id": workflow.id,
                                "cancel_source": by[workflow.id].source})
    return running


def _log_batch(by: Mapping[str, Actor], outcomes: Outcomes, signalled: set[str]) -> None:
    """One line per batch: how many, from which sources, what became of them (a running
    one's outcome comes from its runner later: ``signalled``). A batch of one names its
    workflow; a bigger one only counts (a line per workflow would cost the hot path)."""
    def result(workflow_id: str) -> str:
        outcome = outcomes.get(workflow_id)
        if outcome is not None:
            return outcome.value
        return "signalled" if workflow_id in signalled else "not_cancellable"

    results = Counter(result(wid) for wid in by)
    sources = Counter(actor.source for actor in by.values())
    said = ", ".join(f"{name} {n}" for name, n in sorted(results.items()))
    fields: dict[str, object] = {"workflows": len(by), "results": dict(results),
                                 "sources": dict(sources)}
    if len(by) == 1:
        ((workflow_id, requester),) = by.items()
        fields.update(workflow_id=workflow_id, cancel_source=requester.source,
                      outcome=result(workflow_id))
        log.info("cancel of workflow %s (%s): %s", workflow_id, requester.source, said,
                 extra=fields)
    else:
        log.info("cancel batch of %d workflows (%s): %s", len(by),
                 ", ".join(f"{name} {n}" for name, n in sorted(sources.items())), said,
                 extra=fields)


def _log_escalated(outcomes: Outcomes) -> None:
    """The running cancels ended without their runners, counted by outcome; one alone by
    its id."""
    ended = {wid: o for wid, o in outcomes.items()
             if o in (CancelOutcome.FORCED, CancelOutcome.RUNNER_LOST)}
    if not ended:
        return
    counts = Counter(o.value for o in ended.values())
    fields: dict[str, object] = {"workflows": len(ended), "results": dict(counts)}
    if len(ended) == 1:
        ((workflow_id, outcome),) = ended.items()
        fields.update(workflow_id=workflow_id, outcome=outcome.value)
    log.info("ended %d running workflows without their runners' acknowledgement: %s",
             len(ended), ", ".join(f"{name} {n}" for name, n in sorted(counts.items())),
             extra=fields)


def handle_many(ctx: Context, workflow_ids: Sequence[str], by: Actor) -> Outcomes:
    """:func:`handle_batch` of one message."""
    return handle_batch(ctx, [(workflow_ids, by)])


def cancel_queued(ctx: Context, workflow_ids: Sequence[str], by: Actor) -> set[str]:
    """``queued -> cancelled`` for those of these workflows still queued, and the clean-up
    behind it; returns the ids it cancelled.

    Revoke is the fast path for a runner task still waiting in the broker: the task
    re-checks the database before it submits anything, so a lost revoke changes nothing.
    A prompt already pending in ComfyUI is removed, and its runner told to stop watching;
    a runner that submits after this finds the workflow cancelled when it records the
    submission, and removes its prompt itself.
    """
    cancelled = status.cancel_queued_committed(ctx.db, workflow_ids, by)
    _after_queued_cancelled(ctx, cancelled)
    return {c.id for c in cancelled}


def _after_queued_cancelled(ctx: Context, cancelled: Sequence[CancelledQueued]) -> None:
    """After the commit: revoke the runner tasks, stop and remove the pending prompts."""
    if not cancelled:
        return
    publish.revoke_runner_tasks([c.runner_task_id for c in cancelled if c.runner_task_id])
    with_prompt = [c for c in cancelled if c.prompt_id]
    if not with_prompt:  # their runner tasks have not submitted anything yet: revoked
        return
    signals.send(ctx.redis, [c.id for c in with_prompt], signals.SignalKind.STOP,
                 ctx.settings.signal_ttl_seconds)
    prompts: dict[str, list[str]] = defaultdict(list)
    for row in with_prompt:
        if row.runner_id and row.prompt_id:
            prompts[row.runner_id].append(row.prompt_id)
    if prompts:
        # Beside the batch: a ComfyUI that never answers must not hold up the signals of
        # the batch's running cancels (their grace period starts only once they are sent).
        _beside(cancel_prompts, ctx, prompts)


def enforce_deadlines(ctx: Context) -> Outcomes:
    """End the workflows whose runners did not stop within the grace period, in batches of
    ``cancel_batch_size`` until none is left; each audit row names its own requester.

    Each worker runs this every second or so: the look is a read that takes no lock (on
    SQLite, a write transaction would take the database's one write lock every time), and
    only what it finds is locked and ended.
    """
    settings = ctx.settings
    grace, limit = settings.cancel_grace_seconds, settings.cancel_batch_size
    outcomes: Outcomes = {}
    while True:
        with ctx.db.reading() as session:
            due = manager.overdue_cancel_ids(session, grace, limit)
        if not due:
            return outcomes
        with ctx.db.transaction() as session:
            overdue = manager.lock_overdue_cancels(session, due, grace)
            ended, found = _end_running(session, ctx, overdue,
                                        {w.id: _requester(w) for w in overdue})
        # The pass runs every second and never twice at once: it must not wait on a ComfyUI
        # that does not answer, or every other deadline waits with it.
        _after_escalation(ctx, ended, direct=_beside)
        _log_escalated(found)
        outcomes.update(found)
        if len(due) < limit or not ended:  # all done, or the rest is for the next turn
            return outcomes


def _requester(workflow: Workflow) -> Actor:
    return Actor(workflow.cancel_source or CancelSource.SWEEP.value, workflow.cancel_actor,
                 workflow.cancel_reason)


def signal_running(
    ctx: Context, workflows: Sequence[Workflow], by: Mapping[str, Actor]
) -> Outcomes:
    """Signal the runners of running workflows (one pipelined round trip); a workflow whose
    runner is gone ends at once. ``by``: each one's requester, by id."""
    lost = [w for w in workflows if _heartbeat_lost(ctx, w)]
    lost_ids = {w.id for w in lost}
    live = [w.id for w in workflows if w.id not in lost_ids]
    outcomes: Outcomes = dict.fromkeys(live)
    if lost:
        outcomes.update(escalate(ctx, lost, by, CancelOutcome.RUNNER_LOST))
    if live:
        signals.send(ctx.redis, live, signals.SignalKind.CANCEL, ctx.settings.signal_ttl_seconds)
    return outcomes


def _terminal_outcome(
    session: Session, workflow: Workflow, by: Actor
) -> CancelOutcome | None:
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
    by: Actor | Mapping[str, Actor],
    outcome: CancelOutcome | None = None,
) -> Outcomes:
    """End running workflows without their runners' acknowledgement (``forced``, or
    ``runner_lost`` where the heartbeat is gone; ``outcome`` overrides). ``by``: who asked,
    for all or by id. Returns each one's outcome: the escalation's, or the terminal outcome
    of one that ended first.

    One transaction for all (a set-based compare-and-set: it cannot deadlock with a runner,
    whose transactions each touch one workflow's row), then the side effects once for all:
    one pipelined TERMINATE signal, one revoke broadcast, one ComfyUI call per server.
    """
    requesters = by if isinstance(by, Mapping) else {w.id: by for w in workflows}
    with ctx.db.transaction() as session:
        ended, outcomes = _end_running(session, ctx, workflows, requesters, outcome)
    _after_escalation(ctx, ended)
    _log_escalated(outcomes)
    return outcomes


def _end_running(
    session: Session,
    ctx: Context,
    workflows: Sequence[Workflow],
    by: Mapping[str, Actor],
    outcome: CancelOutcome | None = None,
) -> tuple[list[Workflow], Outcomes]:
    """The compare-and-set of :func:`escalate`, in the caller's transaction: the
    workflows it ended, and every one's outcome."""
    if not workflows:
        return [], {}
    escalations = [
        # The audit row names the requester; ``escalated`` says the cancel worker decided.
        status.Escalation(w.id, by[w.id], outcome or _escalation_outcome(ctx, w),
                          {**w.cancel_timing(), "escalated": True})
        for w in workflows
    ]
    changed = status.cancel_running_many(session, escalations)
    outcomes: Outcomes = {e.workflow_id: e.outcome if e.workflow_id in changed else None
                          for e in escalations}
    ended_first = [w.id for w in workflows if w.id not in changed]
    for current in manager.workflows_by_ids(session, ended_first) if ended_first else []:
        outcomes[current.id] = _terminal_outcome(session, current, by[current.id])
    return [w for w in workflows if w.id in changed], outcomes


def _after_escalation(
    ctx: Context, ended: Sequence[Workflow], direct: Callable[..., object] | None = None
) -> None:
    """After the commit: stop the runners, their tasks and their prompts. ``direct`` runs
    the calls to ComfyUI (default: here and now; the deadline pass hands them to threads)."""
    if not ended:
        return
    # The runner's thread cannot be killed from here (a revoke with terminate kills a
    # process, and runner workers run threads): tell it to stop, stop redelivery, and ask
    # ComfyUI directly so the GPU is freed even when the runner is gone.
    signals.send(ctx.redis, [w.id for w in ended], signals.SignalKind.TERMINATE,
                 ctx.settings.signal_ttl_seconds)
    publish.revoke_runner_tasks([w.runner_task_id for w in ended if w.runner_task_id])
    prompts: dict[str, list[str]] = defaultdict(list)
    for workflow in ended:
        if workflow.prompt_id and workflow.runner_id:
            prompts[workflow.runner_id].append(workflow.prompt_id)
    if prompts:
        # Each server's call is followed by a watch for it to let go of the prompts, on a
        # thread of its own: the only confirmation of the GPU freed that a workflow whose
        # runner is gone gets (a live runner confirms too; the first one counts).
        workflow_of = {w.prompt_id: w.id for w in ended if w.prompt_id}
        (direct or _call)(cancel_prompts, ctx, prompts, ESCALATION_TIMEOUT_SECONDS, workflow_of)


def _call(function: Callable[..., object], *args: object) -> None:
    function(*args)


# Direct cancels to ComfyUI, beside the batch or deadline pass that asks for them (a few at
# once: one per hung server).
_DIRECT_CANCELS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="direct-cancel")


def _beside(function: Callable[..., object], *args: object) -> None:
    """Run ``function`` on the pool of direct cancels; nobody waits for its result, so what
    it raises is logged here instead of lost with the future."""
    def logged(future: Future[object]) -> None:
        if future.exception() is not None:
            log.error("a direct cancel to ComfyUI failed", exc_info=future.exception())

    _DIRECT_CANCELS.submit(function, *args).add_done_callback(logged)
# Who confirmed the release, in the audit row of a GPU freed seen by the cancel worker.
CANCEL_WORKER = Actor(source="cancel_worker")


def cancel_prompts(
    ctx: Context,
    prompts: Mapping[str, list[str]],
    timeout: float | None = None,
    confirm_for: Mapping[str, str] | None = None,
) -> None:
    """One ComfyUI call per server for all of its prompts (``prompts`` by runner id).
    Best effort: the workflows are cancelled in the database already, and their runners
    were signalled to remove their prompts themselves. With ``confirm_for`` (each
    prompt's workflow id), a watch for each server to let go of them follows, and
    records ``freed_at`` for those it sees released."""
    if not prompts:
        return
    with ctx.db.transaction() as session:
        runners = manager.runner_endpoints(session, list(prompts))
    for runner_id, prompt_ids in prompts.items():
        runner = runners.get(runner_id)
        if runner is None:
            continue
        try:
            client = ctx.comfyui(runner.endpoint_url, runner.headers, timeout, runner_id)
            client.cancel_many(prompt_ids)
        except (ComfyUIError, SecretKeyError) as exc:
            log.warning("could not cancel %d prompts on runner %s: %s", len(prompt_ids),
                        runner_id, exc)
            continue
        if confirm_for:
            # A daemon thread per server and call, apart from the cancel calls (a long watch
            # delays none) and best effort: a worker that exits does not wait for it.
            workflows = {p: confirm_for[p] for p in prompt_ids if p in confirm_for}
            threading.Thread(target=_record_release, args=(ctx, client, workflows),
                             name=f"release-watch-{runner_id[:8]}", daemon=True).start()


def _record_release(ctx: Context, client: ComfyUIClient, workflow_of: Mapping[str, str]) -> None:
    """Watch one server let go of these prompts (by prompt id, their workflow ids) and
    record ``freed_at`` for those it does, within ``freed_confirm_timeout_seconds``."""
    try:
        released = client.wait_released(
            list(workflow_of), ctx.settings.freed_confirm_timeout_seconds, history=False)
        if released:
            with ctx.db.transaction() as session:
                status.record_freed(session, [workflow_of[p] for p in released],
                                    CANCEL_WORKER)
    except Exception:  # a thread of its own: nothing above it would log the failure
        log.exception("recording the release of %d prompts failed", len(workflow_of))


def _escalation_outcome(ctx: Context, workflow: Workflow) -> CancelOutcome:
    return CancelOutcome.RUNNER_LOST if _heartbeat_lost(ctx, workflow) else CancelOutcome.FORCED


def _heartbeat_lost(ctx: Context, workflow: Workflow) -> bool:
    limit = timedelta(seconds=ctx.settings.heartbeat_timeout_seconds)
    last = workflow.heartbeat_at or workflow.started_at
    return last is not None and utcnow() - last > limit
