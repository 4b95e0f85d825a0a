"""The one status writer, on SQLite (tests/integration/test_status_writer_postgres.py runs the
same tests on a real PostgreSQL server)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from comfy_cancel import manager, status
from comfy_cancel.db import Database
from comfy_cancel.models import CancelOutcome, Workflow, WorkflowEvent, WorkflowStatus
from testbed.database import migrated
from tests.helpers import advance, make_account_and_runner, seed_workflow

S = WorkflowStatus


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = migrated(f"sqlite:///{tmp_path / 'status.db'}")
    yield database
    database.engine.dispose()


@pytest.mark.parametrize("start", list(S))
@pytest.mark.parametrize("target", [s for s in S if s is not S.ACCEPTED])
def test_every_transition_is_allowed_or_refused_by_the_lifecycle(
    db: Database, start: S, target: S
) -> None:
    account_id, runner_id = make_account_and_runner(db)
    workflow_id = seed_workflow(db, account_id, runner_id, start)
    with db.transaction() as session:
        change = advance(session, workflow_id, target, runner_id)
    allowed = target in status.ALLOWED[start]
    assert change.changed is allowed
    with db.transaction() as session:
        now = manager.get_workflow(session, workflow_id)
        assert now is not None
        assert now.status == (target.value if allowed else start.value)
        last = manager.events_of(session, workflow_id)[-1]
    if allowed:
        assert (last.from_status, last.to_status) == (start.value, target.value)
    else:
        assert change.status == start.value


def test_nothing_moves_to_accepted_and_forbidden_sources_are_a_programming_error(
    db: Database,
) -> None:
    account_id, runner_id = make_account_and_runner(db)
    workflow_id = seed_workflow(db, account_id, runner_id, S.COMPLETED)
    with db.transaction() as session, pytest.raises(status.InvalidTransition):
        status.transition(session, workflow_id, S.ACCEPTED)
    with db.transaction() as session, pytest.raises(status.InvalidTransition):
        status.transition(session, workflow_id, S.RUNNING, from_=[S.COMPLETED])


def test_a_cancel_of_a_completed_workflow_changes_nothing_and_records_too_late(
    db: Database,
) -> None:
    account_id, runner_id = make_account_and_runner(db)
    workflow_id = seed_workflow(db, account_id, runner_id, S.RUNNING)
    by = status.Actor("api", "alice", "changed my mind")
    with db.transaction() as session:
        assert status.request_cancel(session, workflow_id, by)
    with db.transaction() as session:
        assert status.complete_if_running(session, workflow_id, {"9": {}}).changed
    with db.transaction() as session:
        change = status.cancel_if_active(session, workflow_id, by, from_=[S.RUNNING])
        assert not change.changed and change.status == S.COMPLETED.value
        wf = manager.get_workflow(session, workflow_id)
        assert wf is not None
        assert wf.cancel_outcome == CancelOutcome.TOO_LATE.value
        assert wf.cancel_actor == "alice"


def test_cancel_queued_many_changes_only_queued_rows_and_audits_each(db: Database) -> None:
    account_id, runner_id = make_account_and_runner(db)
    queued = [seed_workflow(db, account_id, runner_id, S.QUEUED) for _ in range(5)]
    running = seed_workflow(db, account_id, runner_id, S.RUNNING)
    done = seed_workflow(db, account_id, runner_id, S.COMPLETED)
    by = status.Actor("bulk", "operator", "maintenance")
    with db.transaction() as session:
        changed = status.cancel_queued_many(session, [*queued, running, done], by)
    assert sorted(c.id for c in changed) == sorted(queued)
    assert all(c.runner_task_id and c.runner_id == runner_id for c in changed)
    with db.transaction() as session:
        rows = {w.id: w for w in session.execute(select(Workflow)).scalars()}
        events = session.execute(
            select(WorkflowEvent).where(WorkflowEvent.source == "bulk")
        ).scalars().all()
        audited = {
            e.workflow_id: (e.kind, e.from_status, e.to_status, e.actor, e.reason, e.outcome,
                            e.at, e.detail)
            for e in events
        }
    assert {rows[w].status for w in queued} == {S.CANCELLED.value}
    assert rows[running].status == S.RUNNING.value and rows[done].status == S.COMPLETED.value
    assert len(events) == len(queued)
    at = rows[queued[0]].cancel_finished_at
    assert at is not None
    assert audited == {
        w: ("transition", "queued", "cancelled", "operator", "maintenance", "cancelled", at, None)
        for w in queued
    }


def test_request_cancel_many_records_open_requests_once_and_audits_each(db: Database) -> None:
    account_id, runner_id = make_account_and_runner(db)
    running = [seed_workflow(db, account_id, runner_id, S.RUNNING) for _ in range(4)]
    done = seed_workflow(db, account_id, runner_id, S.COMPLETED)
    by = status.Actor("sweep", None, "no heartbeat")
    with db.transaction() as session:
        first = status.request_cancel_many(session, [*running[:2], done], by, only_new=True)
    with db.transaction() as session:
        second = status.request_cancel_many(session, [*running, done], by, only_new=True)
    assert sorted(first) == sorted(running[:2]) and sorted(second) == sorted(running[2:])
    with db.transaction() as session:
        rows = {w.id: w for w in session.execute(select(Workflow)).scalars()}
        events = session.execute(
            select(WorkflowEvent).where(WorkflowEvent.kind == "cancel_requested")
        ).scalars().all()
    assert sorted(e.workflow_id for e in events) == sorted(running)
    for event in events:
        row = rows[event.workflow_id]
        assert (event.source, event.actor, event.reason) == ("sweep", None, "no heartbeat")
        assert (event.from_status, event.to_status, event.outcome) == (None, None, None)
        assert event.at == row.cancel_requested_at
    assert rows[done].cancel_requested_at is None


def _race(db: Database, workflow_id: str, by: status.Actor) -> dict[str, status.Change]:
    """Complete and cancel one running workflow from two threads released together."""
    barrier = threading.Barrier(2)
    results: dict[str, status.Change] = {}

    def complete() -> None:
        barrier.wait()
        with db.transaction() as session:
            results["complete"] = status.complete_if_running(session, workflow_id, {})

    def cancel() -> None:
        barrier.wait()
        with db.transaction() as session:
            results["cancel"] = status.cancel_if_active(session, workflow_id, by, from_=[S.RUNNING])

    threads = [threading.Thread(target=complete), threading.Thread(target=cancel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_writers_racing_on_one_row_leave_exactly_one_winner(db: Database) -> None:
    account_id, runner_id = make_account_and_runner(db)
    by = status.Actor("api", "racer")
    for _ in range(25):
        workflow_id = seed_workflow(db, account_id, runner_id, S.RUNNING)
        results = _race(db, workflow_id, by)
        winners = [name for name, change in results.items() if change.changed]
        assert len(winners) == 1, results
        final = S.COMPLETED if winners == ["complete"] else S.CANCELLED
        loser = results["cancel" if winners == ["complete"] else "complete"]
        assert loser.status == final.value
        with db.transaction() as session:
            events = [e for e in manager.events_of(session, workflow_id)
                      if e.from_status == S.RUNNING.value]
        assert [e.to_status for e in events] == [final.value]
