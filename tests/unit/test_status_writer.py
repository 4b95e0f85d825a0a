"""The one status writer, on SQLite (tests/integration/test_status_writer_postgres.py runs the
same tests on a real PostgreSQL server)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from comfy_cancel import manager, status
from comfy_cancel.db import Database
from comfy_cancel.models import (
    CANCELLABLE,
    ApiToken,
    CancelOutcome,
    EventKind,
    Workflow,
    WorkflowEvent,
    WorkflowStatus,
    utcnow,
)
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


def test_a_committed_queued_cancel_fills_a_missing_request_and_names_each_requester(
    db: Database,
) -> None:
    """Per workflow: a cancel without an earlier request records its requester as the
    request, an earlier request keeps what it has (each field), and each audit row names
    that workflow's requester, as the cancel worker's batches need."""
    account_id, runner_id = make_account_and_runner(db)
    asked, unasked, running = (seed_workflow(db, account_id, runner_id, s)
                               for s in (S.QUEUED, S.QUEUED, S.RUNNING))
    with db.transaction() as session:
        status.request_cancel(session, asked, status.Actor("api", "alice"))
    by = {unasked: status.Actor("sweep"), asked: status.Actor("bulk", "ops", "maintenance"),
          running: status.Actor("api", "bob")}
    changed = status.cancel_queued_committed(db, [unasked, running, asked, unasked], by)
    assert [c.id for c in changed] == [unasked, asked]  # each once, in the order asked
    with db.transaction() as session:
        rows = {w: manager.get_workflow(session, w) for w in (asked, unasked, running)}
        ends = {e.workflow_id: (e.source, e.actor, e.reason, e.outcome) for e in
                session.execute(select(WorkflowEvent).where(
                    WorkflowEvent.to_status == S.CANCELLED.value)).scalars()}
    request = {w: (row.cancel_source, row.cancel_actor, row.cancel_reason, row.cancel_outcome)
               for w, row in rows.items() if row is not None}
    assert request == {asked: ("api", "alice", "maintenance", "cancelled"),
                       unasked: ("sweep", None, None, "cancelled"),
                       running: (None, None, None, None)}
    assert ends == {asked: ("bulk", "ops", "maintenance", "cancelled"),
                    unasked: ("sweep", None, None, "cancelled")}
    unasked_row = rows[unasked]
    assert unasked_row is not None and unasked_row.status == S.CANCELLED.value
    assert unasked_row.cancel_requested_at == unasked_row.cancel_finished_at


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


# --- the API's one-statement cancel request ---------------------------------------------------


def _token_id(db: Database, account: str, days: float | None = None) -> int:
    with db.transaction() as session:
        acc = manager.get_or_create_account(session, account)
        expires = utcnow() + timedelta(days=days) if days is not None else None
        principal = manager.authenticate(
            session, manager.create_token(session, acc, expires_at=expires)
        )
        if principal is not None:
            return principal.token_id
        return session.execute(  # an expired token: authenticate refuses it
            select(ApiToken.id).order_by(ApiToken.id.desc())
        ).scalars().first() or 0


def _requests_of(db: Database, workflow_id: str) -> list[WorkflowEvent]:
    with db.transaction() as session:
        return [e for e in manager.events_of(session, workflow_id)
                if e.kind == EventKind.CANCEL_REQUESTED]


def _audit_row(event: WorkflowEvent) -> tuple[object, ...]:
    return (event.kind, event.from_status, event.to_status, event.source, event.actor,
            event.reason, event.outcome, event.detail)


@pytest.mark.parametrize("start", sorted(CANCELLABLE))
def test_a_callers_request_is_recorded_and_audited_as_request_cancel_many_does(
    db: Database, start: S
) -> None:
    account_id, runner_id = make_account_and_runner(db)
    token_id = _token_id(db, "acme")
    by = status.Actor("api", "acme#token1", "changed my mind")
    ours, theirs = (seed_workflow(db, account_id, runner_id, start) for _ in range(2))
    assert status.request_cancel_as_caller(db, ours, account_id=account_id, token_id=token_id,
                                           by=by)
    with db.transaction() as session:
        assert status.request_cancel_many(session, [theirs], by, publishing=True) == [theirs]
    rows, audits = {}, {}
    for workflow_id in (ours, theirs):
        rows[workflow_id] = row = _row(db, workflow_id)
        [event] = _requests_of(db, workflow_id)
        assert event.at == row.cancel_requested_at == row.cancel_published_at
        assert row.updated_at == row.cancel_requested_at
        audits[workflow_id] = _audit_row(event)
    assert audits[ours] == audits[theirs] == (
        "cancel_requested", None, None, "api", "acme#token1", "changed my mind", None, None)
    row = rows[ours]
    assert row.status == start.value  # a request, not a status change
    assert (row.cancel_source, row.cancel_actor, row.cancel_reason) == (
        "api", "acme#token1", "changed my mind")
    assert (row.cancel_outcome, row.cancel_taken_at, row.cancel_finished_at) == (None, None, None)


def test_a_repeated_callers_request_keeps_the_first_and_is_audited_and_stamped_again(
    db: Database,
) -> None:
    account_id, runner_id = make_account_and_runner(db)
    token_id = _token_id(db, "acme")
    workflow_id = seed_workflow(db, account_id, runner_id, S.RUNNING)
    for reason in ("first", None):
        assert status.request_cancel_as_caller(
            db, workflow_id, account_id=account_id, token_id=token_id,
            by=status.Actor("api", f"acme#token{token_id}", reason))
    row = _row(db, workflow_id)
    assert row.cancel_reason == "first"
    assert row.cancel_published_at is not None and row.cancel_requested_at is not None
    assert row.cancel_published_at > row.cancel_requested_at  # the re-drive waits anew
    assert [e.reason for e in _requests_of(db, workflow_id)] == ["first", None]


def test_a_group_of_callers_requests_records_each_as_its_caller_may(db: Database) -> None:
    """The API's group (intake.py): several callers in one call, each request judged on its
    own: its account's workflow, cancellable, its token valid; each audit row names its own
    requester."""
    acme_id, acme_runner = make_account_and_runner(db, "acme")
    globex_id, globex_runner = make_account_and_runner(db, "globex")
    acme_token, globex_token = _token_id(db, "acme"), _token_id(db, "globex")
    acme_by = status.Actor("api", f"acme#token{acme_token}", "one")
    globex_by = status.Actor("api", f"globex#token{globex_token}", None)
    queued, running = (seed_workflow(db, acme_id, acme_runner, s) for s in (S.QUEUED, S.RUNNING))
    done = seed_workflow(db, acme_id, acme_runner, S.COMPLETED)
    theirs = seed_workflow(db, globex_id, globex_runner, S.QUEUED)
    requests = [
        status.CallersCancel(queued, acme_id, acme_token, acme_by),
        status.CallersCancel(theirs, globex_id, globex_token, globex_by),
        status.CallersCancel(running, acme_id, acme_token, acme_by),
        status.CallersCancel(theirs, acme_id, acme_token, acme_by),  # not acme's
        status.CallersCancel(done, acme_id, acme_token, acme_by),  # not cancellable
        status.CallersCancel(queued, acme_id, acme_token, acme_by),  # twice in one group
    ]
    assert status.request_cancels_as_callers(db, requests) == [
        True, True, True, False, False, True]
    assert [(e.actor, e.reason) for e in _requests_of(db, queued)] == [(acme_by.actor, "one")]
    assert [(e.actor, e.reason) for e in _requests_of(db, theirs)] == [(globex_by.actor, None)]
    assert len(_requests_of(db, running)) == 1
    assert _requests_of(db, done) == []
    assert _row(db, theirs).cancel_actor == globex_by.actor


@pytest.mark.parametrize("start", [s for s in S if s not in CANCELLABLE])
def test_a_callers_request_on_a_workflow_that_cannot_be_cancelled_writes_nothing(
    db: Database, start: S
) -> None:
    account_id, runner_id = make_account_and_runner(db)
    token_id = _token_id(db, "acme")
    workflow_id = seed_workflow(db, account_id, runner_id, start)
    before = _row(db, workflow_id)
    assert not status.request_cancel_as_caller(
        db, workflow_id, account_id=account_id, token_id=token_id,
        by=status.Actor("api", "acme#token1"))
    after = _row(db, workflow_id)
    columns = ("cancel_requested_at", "cancel_published_at", "cancel_reason", "updated_at")
    assert [getattr(after, c) for c in columns] == [getattr(before, c) for c in columns]
    assert before.cancel_published_at is None
    assert _requests_of(db, workflow_id) == []


def test_a_callers_request_needs_the_account_and_a_valid_token_of_it(db: Database) -> None:
    account_id, runner_id = make_account_and_runner(db)
    other_id, _ = make_account_and_runner(db, "globex")
    workflow_id = seed_workflow(db, account_id, runner_id, S.QUEUED)
    by = status.Actor("api", "someone")
    refused = [
        (other_id, _token_id(db, "globex")),  # another account, with its own valid token
        (account_id, _token_id(db, "globex")),  # the owner's account, another's token
        (account_id, _token_id(db, "acme", days=-1)),  # expired
        (account_id, 10**9),  # no such token (deleted)
    ]
    for account, token in refused:
        assert not status.request_cancel_as_caller(db, workflow_id, account_id=account,
                                                   token_id=token, by=by), (account, token)
    assert not status.request_cancel_as_caller(
        db, "7d1c3f6e-0000-4000-8000-000000000000", account_id=account_id,
        token_id=_token_id(db, "acme"), by=by)
    assert _row(db, workflow_id).cancel_requested_at is None
    assert _requests_of(db, workflow_id) == []
    assert status.request_cancel_as_caller(db, workflow_id, account_id=account_id,
                                           token_id=_token_id(db, "acme", days=1), by=by)


def _row(db: Database, workflow_id: str) -> Workflow:
    with db.transaction() as session:
        workflow = manager.get_workflow(session, workflow_id)
        assert workflow is not None
        return workflow
