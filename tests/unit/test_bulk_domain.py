"""Operators' bulk cancels (bulk.py) called directly: the dry run counts and changes
nothing; a cancel by filter or by ids cancels the queued ones at once, hands the running
ones to the ``cancel.bulk`` queue in chunks, and sums up what became of every match."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from comfy_cancel import bulk, cancel, status
from comfy_cancel.manager import WorkflowFilter
from comfy_cancel.models import WorkflowStatus
from comfy_cancel.status import Actor
from tests.unit.domain import Domain

S = WorkflowStatus
OPERATOR = Actor("bulk", "ops", "maintenance")
BULK_QUEUE = "cancel.bulk"
CANCEL_TASK = "comfy_cancel.cancel_workflows"


@pytest.fixture
def small_chunks(domain: Domain) -> Domain:
    # Three chunks for five matches: the paging is part of what is tested.
    domain.ctx.settings = domain.ctx.settings.model_copy(update={"bulk_chunk_size": 2})
    return domain


def seed(domain: Domain) -> dict[str, list[str]]:
    runner_id = domain.runner()
    made = {to.value: [domain.workflow(to, runner_id) for _ in range(n)]
            for to, n in ((S.QUEUED, 3), (S.RUNNING, 2), (S.COMPLETED, 1), (S.ACCEPTED, 1))}
    made["other account"] = [domain.workflow(S.QUEUED, account="globex")]
    return made


def trails(domain: Domain, made: dict[str, list[str]]) -> dict[str, Any]:
    return {w: (domain.row(w).status, domain.events(w)) for ids in made.values() for w in ids}


def test_a_dry_run_counts_by_status_and_changes_nothing(
    small_chunks: Domain, broker: Any
) -> None:
    domain = small_chunks
    made = seed(domain)
    before = trails(domain, made)
    active = sorted(made["queued"] + made["running"])

    by_filter = bulk.plan(domain.ctx, WorkflowFilter(account="acme"), sample_size=3)
    assert by_filter.dry_run and by_filter.matched == 5
    assert by_filter.by_status == {"queued": 3, "running": 2}
    assert by_filter.sample == active[:3]

    ids = [*made["queued"][:1], *made["completed"], *made["other account"], "no-such-id"]
    by_ids = bulk.plan(domain.ctx, WorkflowFilter(account="acme"), ids)
    assert (by_ids.matched, by_ids.not_found) == (2, 2)  # another account's is not found
    assert by_ids.by_status == {"queued": 1, "completed": 1}

    assert trails(domain, made) == before
    assert broker(BULK_QUEUE) == []


@dataclass
class OtherSide:
    taken: list[list[str]] = field(default_factory=list)  # the ids of each message taken
    acknowledging: set[str] = field(default_factory=set)  # the others complete first


@pytest.fixture
def other_side(domain: Domain, broker: Any) -> Iterator[OtherSide]:
    """The other side of a bulk cancel, in a thread: takes each message from the bulk
    queue and handles it as the cancel worker does; then, like runners, the runners of
    ``acknowledging`` acknowledge, and the others complete before they heard."""
    side = OtherSide()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            for _, task, args in broker(BULK_QUEUE):
                assert task == CANCEL_TASK
                ids, by = args[0], Actor(*args[1:])
                side.taken.append(ids)
                cancel.handle_many(domain.ctx, ids, by)
                with domain.ctx.db.transaction() as session:
                    for workflow_id in ids:
                        if workflow_id in side.acknowledging:
                            status.cancel_if_active(session, workflow_id, by, from_=[S.RUNNING])
                        else:
                            status.complete_if_running(session, workflow_id, {})
            stop.wait(0.05)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield side
    stop.set()
    thread.join(5)


def test_a_cancel_by_filter_sums_up_what_became_of_every_match(
    small_chunks: Domain, other_side: OtherSide
) -> None:
    domain = small_chunks
    made = seed(domain)
    other_side.acknowledging.add(made["running"][0])
    progress: list[int] = []

    summary = bulk.execute(domain.ctx, WorkflowFilter(account="acme"), OPERATOR,
                           progress=progress.append, wait_seconds=10)

    assert not summary.dry_run and summary.matched == 5 and sum(progress) == 5
    assert progress == [2, 2, 1]
    assert summary.by_status == {"queued": 3, "running": 2}
    # 3 queued at once, 1 running acknowledged, 1 completed before its runner heard.
    assert (summary.cancelled, summary.too_late, summary.pending) == (4, 1, 0)
    assert (summary.already_terminal, summary.not_found, summary.failed_to_signal) == (0, 0, 0)
    for workflow_id in made["queued"]:
        row = domain.row(workflow_id)
        assert (row.status, row.cancel_outcome, row.cancel_source, row.cancel_actor) == (
            "cancelled", "cancelled", "bulk", "ops")
    running = sorted(made["running"])
    assert sorted(w for ids in other_side.taken for w in ids) == running
    acknowledged, completed = (domain.row(w) for w in made["running"])
    assert (acknowledged.status, acknowledged.cancel_outcome) == ("cancelled", "cancelled")
    assert (completed.status, completed.cancel_outcome) == ("completed", "too_late")
    # Handed on: the re-drive pass waits from this stamp.
    assert acknowledged.cancel_published_at and completed.cancel_published_at
    # Another account's work and work not cancellable yet are not touched.
    assert domain.row(made["other account"][0]).status == "queued"
    assert domain.row(made["accepted"][0]).cancel_requested_at is None


def test_a_cancel_by_ids_reports_each_kind_of_id(domain: Domain, broker: Any) -> None:
    made = seed(domain)
    ids = [*made["queued"][:1], *made["running"][:1], *made["completed"], *made["accepted"],
           *made["other account"], "no-such-id", made["queued"][0]]  # a repeat counts once

    summary = bulk.execute(domain.ctx, WorkflowFilter(account="acme"), OPERATOR, ids)

    assert summary.matched == 4 and summary.not_found == 2
    assert (summary.cancelled, summary.already_terminal, summary.not_cancellable) == (1, 1, 1)
    assert (summary.pending, summary.too_late) == (1, 0)  # the running one, not waited for
    ((_, task, args),) = broker(BULK_QUEUE)
    assert task == CANCEL_TASK and args == [made["running"][:1], "bulk", "ops", "maintenance"]
    assert domain.row(made["running"][0]).status == "running"  # its runner will stop it
    assert domain.row(made["completed"][0]).cancel_outcome is None
    assert domain.row(made["other account"][0]).cancel_requested_at is None


def test_running_cancels_that_cannot_be_handed_on_are_counted_and_left_to_the_redrive(
    domain: Domain, broker_down: None,  # in this order: the domain drains its queues first
) -> None:
    runner_id = domain.runner()
    queued, running = domain.workflow(S.QUEUED, runner_id), domain.workflow(S.RUNNING, runner_id)

    summary = bulk.execute(domain.ctx, WorkflowFilter(account="acme"), OPERATOR)

    # The queued one needs no broker (the revoke is a fast path only); the running one's
    # request is recorded, unpublished, for the re-drive pass.
    assert (summary.cancelled, summary.failed_to_signal, summary.pending) == (1, 1, 0)
    assert domain.row(queued).status == "cancelled"
    row = domain.row(running)
    # Open and untaken: the re-drive pass hands it on once the broker is back.
    assert row.cancel_requested_at is not None
    assert (row.cancel_taken_at, row.cancel_outcome) == (None, None)

