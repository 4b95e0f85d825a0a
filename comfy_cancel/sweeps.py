"""The periodic sweeps for stuck work (Celery beat runs :func:`sweep`).

Each kind finds its rows through an index (its cost follows what it finds, not the
table) and claims them with a conditional write before acting, so two schedulers
running at once do the work once:

- open cancel intents older than ``intent_republish_seconds``: published again
  (a message lost with Redis loses no cancel);
- ``running`` with no heartbeat for ``heartbeat_timeout_seconds``: cancelled at
  once, outcome ``runner_lost`` (there is no runner to ask);
- ``running`` longer than ``max_run_seconds``: a cancel request from the sweep,
  handled like any other (the runner is alive and interrupts its prompt);
- ``queued`` longer than ``queued_timeout_seconds``: cancelled, or re-dispatched
  when its prompt was never submitted, as ``queued_timeout_policy`` says.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import timedelta

from comfy_cancel import cancel, manager, status, tasks
from comfy_cancel.context import Context
from comfy_cancel.models import CancelOutcome, Workflow, utcnow
from comfy_cancel.status import Actor

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    """What one pass did (or, in a dry run, would do), by workflow id."""

    dry_run: bool = False
    republished: list[str] = field(default_factory=list)
    runner_lost: list[str] = field(default_factory=list)
    overdue: list[str] = field(default_factory=list)
    queued_cancelled: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: len(ids) for name, ids in asdict(self).items() if isinstance(ids, list)}


def sweep(ctx: Context, *, dry_run: bool = False) -> SweepReport:
    report = SweepReport(dry_run=dry_run)
    _republish_open_intents(ctx, report)
    _cancel_lost_runners(ctx, report)
    _cancel_overdue(ctx, report)
    _handle_stale_queued(ctx, report)
    if any(report.counts().values()):
        log.info("sweep%s: %s", " (dry run)" if dry_run else "", report.counts())
    return report


def _republish_open_intents(ctx: Context, report: SweepReport) -> None:
    settings = ctx.settings
    cutoff = utcnow() - timedelta(seconds=settings.intent_republish_seconds)
    with ctx.db.transaction() as session:
        found = manager.open_intents(session, cutoff, settings.sweep_batch_size)
        if report.dry_run:
            report.republished = found
            return
        claimed = manager.claim_republish(session, found, cutoff)
    by_requester: dict[Actor, list[str]] = defaultdict(list)
    for workflow_id, source, actor, reason in claimed:
        by_requester[Actor(source or "sweep", actor, reason)].append(workflow_id)
    for by, ids in by_requester.items():
        _publish(ids, by)
        report.republished.extend(ids)


def _cancel_lost_runners(ctx: Context, report: SweepReport) -> None:
    settings = ctx.settings
    cutoff = utcnow() - timedelta(seconds=settings.heartbeat_timeout_seconds)
    by = Actor(
        "sweep", "sweep",
        f"no heartbeat from the runner for {settings.heartbeat_timeout_seconds:g} s",
    )
    with ctx.db.transaction() as session:
        lost = manager.running_without_heartbeat(session, cutoff, settings.sweep_batch_size)
    if report.dry_run:
        report.runner_lost = [w.id for w in lost]
        return
    outcomes = cancel.escalate(ctx, lost, by, CancelOutcome.RUNNER_LOST)
    report.runner_lost = [w.id for w in lost if outcomes[w.id] is CancelOutcome.RUNNER_LOST]


def _cancel_overdue(ctx: Context, report: SweepReport) -> None:
    settings = ctx.settings
    cutoff = utcnow() - timedelta(seconds=settings.max_run_seconds)
    by = Actor("sweep", "sweep", f"ran longer than {settings.max_run_seconds:g} s")
    with ctx.db.transaction() as session:
        found = manager.running_since_before(session, cutoff, settings.sweep_batch_size)
        if report.dry_run:
            report.overdue = found
            return
        claimed = status.request_cancel_many(session, found, by, only_new=True)
    _publish(claimed, by)
    report.overdue = claimed


def _handle_stale_queued(ctx: Context, report: SweepReport) -> None:
    settings = ctx.settings
    cutoff = utcnow() - timedelta(seconds=settings.queued_timeout_seconds)
    with ctx.db.transaction() as session:
        stale = manager.queued_since_before(session, cutoff, settings.sweep_batch_size)
    if settings.queued_timeout_policy == "redispatch":
        _redispatch(ctx, report, [w for w in stale if w.prompt_id is None])
        stale = [w for w in stale if w.prompt_id is not None]  # in ComfyUI's queue: cancel
    by = Actor("sweep", "sweep", f"queued longer than {settings.queued_timeout_seconds:g} s")
    ids = [w.id for w in stale]
    if report.dry_run:
        report.queued_cancelled = ids
        return
    with ctx.db.transaction() as session:
        claimed = status.request_cancel_many(session, ids, by, only_new=True)
    _publish(claimed, by)
    report.queued_cancelled = claimed


def _redispatch(ctx: Context, report: SweepReport, workflows: list[Workflow]) -> None:
    for workflow in workflows:
        if report.dry_run:
            report.redispatched.append(workflow.id)
            continue
        with ctx.db.transaction() as session:
            task_id = manager.claim_redispatch(session, workflow.id, workflow.runner_task_id)
        if task_id is not None:
            tasks.publish_run(workflow.id, task_id)
            report.redispatched.append(workflow.id)


def _publish(workflow_ids: list[str], by: Actor) -> None:
    """Hand claimed cancels on; if the broker is down, the intents are recorded and the
    re-publish pass of a later sweep hands them on."""
    if not workflow_ids:
        return
    try:
        tasks.publish_cancels(workflow_ids, by)
    except Exception as exc:  # kombu and redis raise several types for "broker down"
        log.warning("sweep could not publish %d cancels (%s); a later pass will",
                    len(workflow_ids), exc)
