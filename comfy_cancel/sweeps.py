"""The periodic sweeps for stuck work.

Celery beat runs two passes. The re-drive pass (:func:`redrive`, every
``redrive_interval_seconds``) hands on work whose handler is gone:

- open cancel intents nobody took ``redrive_after_seconds`` after their last publish:
  published again (one taken has a deadline, which the cancel workers enforce:
  ``cancel.enforce_deadlines``);
- orphaned runner work: ``queued`` with no heartbeat for ``orphan_timeout_seconds`` (the
  runner task died), or ``accepted`` that no runner task claimed for as long while the
  runner queue is empty (its message was lost): re-dispatched under a new runner task id,
  which adopts the prompt ComfyUI still has or submits it; after ``max_redispatches`` the
  workflow is failed instead.

The full pass (:func:`sweep`, every ``sweep_interval_seconds``) runs the re-drive kinds
and these:

- ``running`` with no heartbeat for ``heartbeat_timeout_seconds``: cancelled at
  once, outcome ``runner_lost`` (there is no runner to ask);
- ``running`` longer than ``max_run_seconds``: a cancel request from the sweep,
  handled like any other (the runner is alive and interrupts its prompt);
- ``queued`` longer than ``queued_timeout_seconds``: cancelled, or re-dispatched
  when its prompt was never submitted, as ``queued_timeout_policy`` says;
- ``queued`` or ``running`` past its own deadline (the customer's ``timeout_seconds``): a
  cancel request with source ``deadline``. Each cancel worker also runs this kind on its
  own every ``timeout_check_interval_seconds`` (:func:`cancel_timed_out`, tasks.py), so a
  timeout is honoured within about that long, beat or no beat.

Each kind finds its rows through an index (its cost follows what it finds, not the
table) and claims them with a conditional write before acting, so two schedulers
running at once do the work once.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

import redis
from sqlalchemy.orm import Session

from comfy_cancel import cancel, manager, metrics, publish, status
from comfy_cancel.context import Context
from comfy_cancel.models import CancelOutcome, CancelSource, Workflow, WorkflowStatus, utcnow
from comfy_cancel.status import Actor

log = logging.getLogger(__name__)
S = WorkflowStatus

# Since when the sweeps have reached the database without a gap (see _database_up_for).
DATABASE_UP_KEY = "comfy-cancel:sweeps:database-up-since"


@dataclass
class SweepReport:
    """What one pass did (or, in a dry run, would do), by workflow id."""

    dry_run: bool = False
    republished: list[str] = field(default_factory=list)
    runner_lost: list[str] = field(default_factory=list)
    overdue: list[str] = field(default_factory=list)
    queued_cancelled: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)
    orphans_redispatched: list[str] = field(default_factory=list)
    orphans_failed: list[str] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: len(ids) for name, ids in asdict(self).items() if isinstance(ids, list)}


def sweep(ctx: Context, *, dry_run: bool = False) -> SweepReport:
    report = _full_pass(ctx, SweepReport(dry_run=dry_run))
    _report(report, "sweep")
    return report


def stuck_now(ctx: Context) -> SweepReport:
    """What a full pass would act on now: a dry run, read only and not logged (the
    operator page asks every few seconds)."""
    return _full_pass(ctx, SweepReport(dry_run=True))


def _full_pass(ctx: Context, report: SweepReport) -> SweepReport:
    _redrive(ctx, report)
    _cancel_lost_runners(ctx, report)
    _cancel_overdue(ctx, report)
    _handle_stale_queued(ctx, report)
    _cancel_timed_out(ctx, report)
    return report


def stuck_since(kind: str, workflow: Workflow) -> datetime | None:
    """Since when a finding of ``kind`` (a :class:`SweepReport` field) has been stuck: the
    clock its sweep compares with its cutoff."""
    if kind == "republished":
        return workflow.cancel_published_at or workflow.cancel_requested_at
    if kind == "overdue":
        return workflow.started_at
    if kind == "timed_out":
        return workflow.deadline_at
    if kind == "runner_lost" or (kind.startswith("orphans_")
                                 and workflow.status == S.QUEUED.value):
        return workflow.heartbeat_at
    return workflow.updated_at  # queued too long; accepted work no runner task claimed


def _reads(ctx: Context, report: SweepReport) -> AbstractContextManager[Session]:
    """The session a sweep finds its rows in: a dry run's takes no write lock (SQLite)."""
    return ctx.db.reading() if report.dry_run else ctx.db.transaction()


def redrive(ctx: Context, *, dry_run: bool = False) -> SweepReport:
    """The frequent, cheap pass: open cancels and orphaned runner work handed on again."""
    report = SweepReport(dry_run=dry_run)
    _redrive(ctx, report)
    _report(report, "redrive")
    return report


def _report(report: SweepReport, name: str) -> None:
    """Log what a pass found, and count it (a dry run changes nothing and counts nothing)."""
    counts = report.counts()
    if not report.dry_run:
        metrics.sweep_pass(name, counts)
    if any(counts.values()):
        found = {kind: n for kind, n in counts.items() if n}
        log.info("%s%s: %s", name, " (dry run)" if report.dry_run else "", found,
                 extra={"sweep": name, "findings": found})


def _redrive(ctx: Context, report: SweepReport) -> None:
    _republish_open_intents(ctx, report)
    _redispatch_orphans(ctx, report)


def _republish_open_intents(ctx: Context, report: SweepReport) -> None:
    settings = ctx.settings
    published_before = utcnow() - timedelta(seconds=settings.redrive_after_seconds)
    with _reads(ctx, report) as session:
        found = manager.intents_to_redrive(session, published_before, settings.sweep_batch_size)
        if report.dry_run:
            report.republished = found
            return
        claimed = status.claim_redrive(session, found, published_before)
    by_requester: dict[Actor, list[str]] = defaultdict(list)
    for workflow_id, source, actor, reason in claimed:
        by_requester[Actor(source or CancelSource.SWEEP.value, actor, reason)].append(workflow_id)
    for by, ids in by_requester.items():
        publish.hand_on(ids, by)
        report.republished.extend(ids)


def _redispatch_orphans(ctx: Context, report: SweepReport) -> None:
    """Queued work whose runner task stopped beating, and accepted work no task claimed.

    Counted only once the sweeps have reached the database for a whole orphan timeout: a
    runner rides out a database outage and beats again when it is back, so heartbeats
    that are old because the database was away do not make orphans.
    """
    settings = ctx.settings
    timeout = settings.orphan_timeout_seconds
    if not report.dry_run and not _database_up_for(ctx, timeout):
        return
    cutoff = utcnow() - timedelta(seconds=timeout)
    with _reads(ctx, report) as session:
        silent = manager.queued_without_heartbeat(session, cutoff, settings.sweep_batch_size)
        unclaimed = manager.never_claimed(session, cutoff, settings.sweep_batch_size)
    if unclaimed and not report.dry_run and not _runner_queue_empty():
        # Waiting behind others in the broker (a backlog), not lost: a new message would
        # only queue behind its own first one.
        unclaimed = []
    for workflow in [*silent, *unclaimed]:
        if report.dry_run:
            report.orphans_redispatched.append(workflow.id)
            continue
        stale_before = cutoff if workflow.status == S.QUEUED.value else None
        with ctx.db.transaction() as session:
            claim = manager.claim_redispatch(session, workflow, stale_before=stale_before)
        if claim is None:
            continue  # another scheduler, or its runner task, got there first
        if claim.count > settings.max_redispatches:
            _fail_orphan(ctx, workflow, claim.count - 1)
            report.orphans_failed.append(workflow.id)
            continue
        log.info("workflow %s (%s) lost its runner task %s; re-dispatched as %s",
                 workflow.id, workflow.status, workflow.runner_task_id, claim.task_id,
                 extra={"workflow_id": workflow.id})
        if _publish_run(workflow.id, claim.task_id):
            report.orphans_redispatched.append(workflow.id)


def _fail_orphan(ctx: Context, workflow: Workflow, redispatches: int) -> None:
    """Give up on a workflow whose runner tasks keep getting lost, and free ComfyUI."""
    with ctx.db.transaction() as session:
        change = status.fail(
            session, workflow.id,
            exception_type="RunnerTaskLost",
            exception_message=(
                f"the runner task driving this workflow was lost {redispatches + 1} times "
                f"(re-dispatched {redispatches} times); submit it again"
            ),
            by=Actor(CancelSource.SWEEP.value, "sweep"),
        )
    if change.changed and workflow.prompt_id and workflow.runner_id:
        cancel.cancel_prompts(ctx, {workflow.runner_id: [workflow.prompt_id]})


def _database_up_for(ctx: Context, seconds: float) -> bool:
    """Whether the sweeps have reached the database for ``seconds`` without a gap.

    Each pass that got here (it read the database) refreshes a Redis key holding the time
    the streak began; a gap in the passes longer than the key's lifetime (the database, or
    the workers running the sweeps, were away) starts a new streak. Unknown (Redis away)
    counts as no.
    """
    settings = ctx.settings
    ttl = max(seconds / 2, 2 * settings.redrive_interval_seconds + 1)
    now = time.time()
    try:
        pipe = ctx.redis.pipeline()
        pipe.set(DATABASE_UP_KEY, now, nx=True, px=int(ttl * 1000))
        pipe.pexpire(DATABASE_UP_KEY, int(ttl * 1000))
        pipe.get(DATABASE_UP_KEY)
        since = pipe.execute()[-1]
    except redis.RedisError as exc:
        log.warning("re-drive: Redis unavailable (%s); orphaned work waits", exc)
        return False
    return since is not None and now - float(since) >= seconds


def _runner_queue_empty() -> bool:
    try:
        return publish.runner_backlog() == 0
    except publish.BROKER_ERRORS as exc:
        log.warning("re-drive: runner queue unreadable (%s); unclaimed work waits", exc)
        return False


def _cancel_lost_runners(ctx: Context, report: SweepReport) -> None:
    settings = ctx.settings
    cutoff = utcnow() - timedelta(seconds=settings.heartbeat_timeout_seconds)
    by = Actor(
        CancelSource.SWEEP.value, "sweep",
        f"no heartbeat from the runner for {settings.heartbeat_timeout_seconds:g} s",
    )
    with _reads(ctx, report) as session:
        lost = manager.running_without_heartbeat(session, cutoff, settings.sweep_batch_size)
    if report.dry_run:
        report.runner_lost = [w.id for w in lost]
        return
    outcomes = cancel.escalate(ctx, lost, by, CancelOutcome.RUNNER_LOST)
    report.runner_lost = [w.id for w in lost if outcomes[w.id] is CancelOutcome.RUNNER_LOST]


def _cancel_overdue(ctx: Context, report: SweepReport) -> None:
    settings = ctx.settings
    cutoff = utcnow() - timedelta(seconds=settings.max_run_seconds)
    by = Actor(CancelSource.SWEEP.value, "sweep", f"ran longer than {settings.max_run_seconds:g} s")
    with _reads(ctx, report) as session:
        found = manager.running_since_before(session, cutoff, settings.sweep_batch_size)
    if report.dry_run:
        report.overdue = found
        return
    report.overdue = publish.request_cancels(ctx.db, found, by, only_new=True).recorded


def _handle_stale_queued(ctx: Context, report: SweepReport) -> None:
    settings = ctx.settings
    cutoff = utcnow() - timedelta(seconds=settings.queued_timeout_seconds)
    with _reads(ctx, report) as session:
        stale = manager.queued_since_before(session, cutoff, settings.sweep_batch_size)
    if settings.queued_timeout_policy == "redispatch":
        _redispatch(ctx, report, [w for w in stale if w.prompt_id is None])
        stale = [w for w in stale if w.prompt_id is not None]  # in ComfyUI's queue: cancel
    by = Actor(CancelSource.SWEEP.value, "sweep",
               f"queued longer than {settings.queued_timeout_seconds:g} s")
    ids = [w.id for w in stale]
    if report.dry_run:
        report.queued_cancelled = ids
        return
    report.queued_cancelled = publish.request_cancels(ctx.db, ids, by, only_new=True).recorded


def _redispatch(ctx: Context, report: SweepReport, workflows: list[Workflow]) -> None:
    for workflow in workflows:
        if report.dry_run:
            report.redispatched.append(workflow.id)
            continue
        with ctx.db.transaction() as session:
            claim = manager.claim_redispatch(session, workflow)
        if claim is not None and _publish_run(workflow.id, claim.task_id):
            report.redispatched.append(workflow.id)


def _publish_run(workflow_id: str, task_id: str) -> bool:
    """Hand a re-dispatched workflow to the runner queue; if the broker is down, its new
    runner task never beats, and a later orphan pass re-dispatches it."""
    try:
        publish.publish_run(workflow_id, task_id)
    except publish.BROKER_ERRORS as exc:
        log.warning("could not re-dispatch %s (%s: %s); a later pass will",
                    workflow_id, type(exc).__name__, exc, extra={"workflow_id": workflow_id})
        return False
    return True


# Who cancels a workflow past its deadline, for its cancel view and audit rows.
TIMEOUT = Actor(CancelSource.DEADLINE.value, "deadline", "its timeout_seconds ran out")


def cancel_timed_out(ctx: Context) -> list[str]:
    """Request the cancel of every queued or running workflow past its deadline, as the
    customer's own cancel would (recorded, committed, then published on the customers'
    cancel queue; the outcome follows as usual), in batches of ``sweep_batch_size`` until
    none is left; returns the ids it requested.

    The look is a read that takes no lock (most passes find nothing); the request is one
    set-based statement that skips rows another pass holds and claims only workflows
    nobody asked to cancel yet, so passes running at once request each cancel once.
    """
    limit = ctx.settings.sweep_batch_size
    requested: list[str] = []
    while True:
        with ctx.db.reading() as session:
            due = manager.timed_out_ids(session, limit)
        if not due:
            return requested
        handed = publish.request_cancels(ctx.db, due, TIMEOUT, only_new=True, skip_locked=True)
        requested.extend(handed.recorded)
        if len(due) < limit or not handed.recorded:  # all done, or the rest is another's
            return requested


def _cancel_timed_out(ctx: Context, report: SweepReport) -> None:
    if report.dry_run:
        with ctx.db.reading() as session:
            report.timed_out = manager.timed_out_ids(session, ctx.settings.sweep_batch_size)
        return
    report.timed_out = cancel_timed_out(ctx)
