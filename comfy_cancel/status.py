"""The one status writer. No other code writes ``workflows.status``, the first status
(:func:`create_accepted`) included, nor the cancel request's columns (``cancel_*``).

Every change is one compare-and-set statement::

    UPDATE workflows SET status=:to, ... WHERE id=:id AND status IN (:from...)

judged by the rows it changed, with its audit row written in the same
transaction. Each audit row is also a live update (:mod:`live`), published after the
commit, so that a subscriber never sees a change that then rolls back. Two writers
racing on one row (the runner's ``running -> completed`` and the cancel worker's
``running -> cancelled``) both issue the statement; the database serialises them, one
changes the row and the other changes nothing and reads the status that won. Each verb returns a
:class:`Change` saying what actually happened.

The functions take a session inside a transaction (``Database.transaction()``)
so a caller can make a status change part of a larger unit of work; the one
exception, :func:`request_cancel_as_caller`, is the API's whole unit of work in one
statement and takes the database.

What the cancel verbs did is counted (:mod:`metrics`) once their transaction commits.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    bindparam,
    case,
    column,
    event,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import BindParameter, TextClause
from sqlalchemy.sql.selectable import TextualSelect

from comfy_cancel import live, manager, metrics
from comfy_cancel.db import Database
from comfy_cancel.models import (
    CANCELLABLE,
    CancelOutcome,
    CancelSource,
    EventKind,
    UTCDateTime,
    Workflow,
    WorkflowEvent,
    WorkflowStatus,
    new_id,
    utcnow,
)

S = WorkflowStatus

# The lifecycle: accepted -> uploaded -> queued -> running -> completed | failed | cancelled,
# queued -> cancelled, and any non-terminal status -> failed. Nothing leaves a terminal status.
ALLOWED: Mapping[S, frozenset[S]] = {
    S.ACCEPTED: frozenset({S.UPLOADED, S.FAILED}),
    S.UPLOADED: frozenset({S.QUEUED, S.FAILED}),
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED, S.FAILED}),
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


class InvalidTransition(ValueError):
    """A programming error: code asked for a transition the lifecycle forbids."""


@dataclass(frozen=True)
class Change:
    workflow_id: str
    changed: bool
    status: str | None  # the status after the attempt; None when there is no such workflow
    previous: str | None = None  # the status it changed from, when it changed


@dataclass(frozen=True)
class Actor:
    """Who asks for a change, for the audit trail."""

    source: str
    actor: str | None = None
    reason: str | None = None


RUNNER = Actor(source="runner")
SUBMITTER = Actor(source=CancelSource.API.value)  # who submits a workflow: the API


def sources_of(to: S) -> frozenset[S]:
    return frozenset(frm for frm, tos in ALLOWED.items() if to in tos)


def transition(
    session: Session,
    workflow_id: str,
    to: S,
    *,
    from_: Collection[S] | None = None,
    by: Actor = RUNNER,
    values: Mapping[str, Any] | None = None,
    outcome: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> Change:
    """Move one workflow to ``to`` if its status is one of ``from_`` (default: any allowed)."""
    allowed_from = sources_of(to)
    froms = allowed_from if from_ is None else frozenset(S(f) for f in from_)
    if not froms or not froms <= allowed_from:
        raise InvalidTransition(f"{sorted(froms)} -> {to} is not a transition of the lifecycle")
    now = utcnow()
    values = dict(values or {})
    if to in (S.COMPLETED, S.FAILED):
        # A workflow that ended has no deadline left to enforce: it leaves the timeout
        # pass's index (a cancelled one left it with its request). GET still shows the
        # deadline, from created_at + timeout_seconds.
        values["deadline_at"] = None
    if len(froms) == 1:
        (old,) = froms
    else:
        # With several possible sources the audit row must name the one it left: read it
        # under the row lock, so no other writer can change it before the UPDATE below.
        current = session.execute(
            select(Workflow.status).where(Workflow.id == workflow_id).with_for_update()
        ).scalar_one_or_none()
        if current is None or current not in froms:
            return Change(workflow_id, changed=False, status=current)
        old = S(current)
    changed = session.execute(
        update(Workflow)
        .where(Workflow.id == workflow_id, Workflow.status.in_([f.value for f in froms]))
        .values(status=to.value, updated_at=now, **values)
        .returning(Workflow.id, Workflow.cancel_source, Workflow.cancel_requested_at)
    ).first()
    if changed is None:
        return Change(workflow_id, changed=False, status=_status_of(session, workflow_id))
    _audit(session, workflow_id, EventKind.TRANSITION, by, outcome, now, detail,
           from_status=old.value, to_status=to.value)
    if outcome is not None and to is S.CANCELLED:
        _count_closed(session, [(changed.cancel_source, outcome, changed.cancel_requested_at)],
                      now)
    if to in (S.COMPLETED, S.FAILED):
        # A cancel request still open when the workflow ended another way lost the race.
        record_outcome(session, workflow_id, CancelOutcome.TOO_LATE, by, only_if_requested=True)
    return Change(workflow_id, changed=True, status=to.value, previous=old.value)


def _status_of(session: Session, workflow_id: str) -> str | None:
    return session.execute(
        select(Workflow.status).where(Workflow.id == workflow_id)
    ).scalar_one_or_none()


def create_accepted(
    session: Session,
    account_id: int,
    *,
    name: str,
    workflow_json: Mapping[str, Any],
    tags: Sequence[str] = (),
    timeout_seconds: int | None = None,
    by: Actor = SUBMITTER,
) -> Workflow:
    """A new workflow at its first status, ``accepted``, with its tags and the audit row
    of that first transition, in the caller's transaction. With ``timeout_seconds`` its
    deadline is that long after now (the timeout pass cancels it past that)."""
    now = utcnow()
    workflow = Workflow(
        id=new_id(),
        account_id=account_id,
        name=name,
        status=S.ACCEPTED.value,
        tags=list(tags),
        workflow_json=dict(workflow_json),
        runner_task_id=new_id(),  # known before publishing, so a cancel can always revoke it
        timeout_seconds=timeout_seconds,
        deadline_at=None if timeout_seconds is None else now + timedelta(seconds=timeout_seconds),
        created_at=now,
        updated_at=now,
    )
    session.add(workflow)
    session.flush()
    manager.add_tags(session, workflow.id, tags)
    _audit(session, workflow.id, EventKind.TRANSITION, by, None, now,
           to_status=S.ACCEPTED.value)
    return workflow


# --- the runner's verbs -----------------------------------------------------------------


def mark_uploaded(session: Session, workflow_id: str, runner_id: str) -> Change:
    return transition(
        session, workflow_id, S.UPLOADED, from_=[S.ACCEPTED], values={"runner_id": runner_id}
    )


def mark_queued(session: Session, workflow_id: str) -> Change:
    # The claim is the runner task's first heartbeat: from here the orphan sweep watches it.
    return transition(
        session, workflow_id, S.QUEUED, from_=[S.UPLOADED], values={"heartbeat_at": utcnow()}
    )


def mark_running(session: Session, workflow_id: str) -> Change:
    now = utcnow()
    return transition(
        session,
        workflow_id,
        S.RUNNING,
        from_=[S.QUEUED],
        values={"started_at": now, "heartbeat_at": now},
    )


def complete_if_running(
    session: Session, workflow_id: str, outputs: Mapping[str, Any]
) -> Change:
    return transition(
        session,
        workflow_id,
        S.COMPLETED,
        from_=[S.RUNNING],
        values={"outputs": dict(outputs), "completed_at": utcnow()},
    )


def fail(
    session: Session,
    workflow_id: str,
    *,
    exception_type: str,
    exception_message: str,
    error_node: str | None = None,
    by: Actor = RUNNER,
) -> Change:
    """Any non-terminal status -> failed, with ComfyUI's error fields."""
    return transition(
        session,
        workflow_id,
        S.FAILED,
        by=Actor(by.source, by.actor, by.reason or exception_message[:1000]),
        values={
            "error_node": error_node,
            "exception_type": exception_type[:200],
            "exception_message": exception_message,
            "completed_at": utcnow(),
        },
    )


def _statement(
    sql: str, *params: BindParameter[Any], returns: Sequence[str] = ()
) -> TextClause | TextualSelect:
    """Fixed SQL text, compiled once per process. Times are stored as naive UTC on both
    databases: the column type converts :now, and the columns of workflows the statement
    returns. ``returns`` names what it returns, in order: matched by position, SQLAlchemy
    keeps the result's layout with the compiled statement (by name, it works it out again
    on every execution)."""
    statement = text(sql).bindparams(bindparam("now", type_=UTCDateTime()), *params)
    if not returns:
        return statement
    table = Workflow.__table__.c
    return statement.columns(*(column(name, table[name].type if name in table else None)
                               for name in returns))


# --- the cancel verbs --------------------------------------------------------------------


def _per_row(values: Mapping[str, Any], type_: Any) -> ColumnElement[Any]:
    """One SQL value per workflow (``values`` by id, not empty): a literal when all agree,
    else a CASE over the ids of each other value with the commonest as its ELSE (a batch
    of the cancel worker mixes requesters; a bulk chunk has one)."""
    ids_of: dict[Any, list[str]] = defaultdict(list)
    for workflow_id, value in values.items():
        ids_of[value].append(workflow_id)
    common = max(ids_of, key=lambda value: len(ids_of[value]))
    others = [(Workflow.id.in_(ids), literal(value, type_))
              for value, ids in ids_of.items() if value != common]
    return case(*others, else_=literal(common, type_)) if others else literal(common, type_)


def _requester_columns(by: Mapping[str, Actor]) -> dict[str, ColumnElement[Any]]:
    """Each workflow's requester (``by`` by id) as the values of the columns ``source``,
    ``actor`` and ``reason``."""
    return {name: _per_row({wid: getattr(actor, name) for wid, actor in by.items()},
                           getattr(Workflow, f"cancel_{name}").type)
            for name in ("source", "actor", "reason")}


def _cancel_values(by: Mapping[str, Actor], outcome: CancelOutcome,
                   now: datetime) -> dict[str, Any]:
    # A cancel written without an earlier request (a sweep) records itself as the request;
    # an earlier request keeps its own time, source, actor and reason.
    requester = _requester_columns(by)
    return {
        "completed_at": now,
        "cancel_requested_at": func.coalesce(Workflow.cancel_requested_at, now),
        **{f"cancel_{name}": func.coalesce(getattr(Workflow, f"cancel_{name}"), value)
           for name, value in requester.items()},
        "cancel_outcome": outcome.value,
        "cancel_finished_at": now,
    }


def cancel_if_active(
    session: Session,
    workflow_id: str,
    by: Actor,
    outcome: CancelOutcome = CancelOutcome.CANCELLED,
    detail: Mapping[str, Any] | None = None,
    *,
    from_: Collection[S] = CANCELLABLE,
    partial_outputs: Mapping[str, Any] | None = None,
) -> Change:
    """Queued or running (or only the statuses in ``from_``) -> cancelled, with its outcome
    and what ComfyUI reported saved before it stopped (``partial_outputs``), if anything."""
    values = _cancel_values({workflow_id: by}, outcome, utcnow())
    if partial_outputs:
        values["partial_outputs"] = dict(partial_outputs)
    return transition(
        session,
        workflow_id,
        S.CANCELLED,
        from_=from_,
        by=by,
        values=values,
        outcome=outcome.value,
        detail=detail,
    )


@dataclass(frozen=True)
class CancelledQueued:
    """A workflow ``cancel_queued_many`` changed, with what its clean-up needs."""

    id: str
    runner_task_id: str | None
    runner_id: str | None
    prompt_id: str | None


def cancel_queued_many(
    session: Session,
    workflow_ids: Sequence[str],
    by: Actor | Mapping[str, Actor],
    outcome: CancelOutcome = CancelOutcome.CANCELLED,
) -> list[CancelledQueued]:
    """Set-based ``queued -> cancelled`` for many rows, in the caller's transaction: one
    statement with its audit rows on PostgreSQL (see :func:`_cancel_queued`).

    ``by`` is one requester for all, or each workflow's by id (a batch of the cancel
    worker): each audit row names its own. Returns exactly the rows it changed, in the
    order asked, so the caller can revoke their runner tasks in one broadcast and remove
    their pending prompts from ComfyUI.
    """
    now = utcnow()
    done = _cancel_queued(session.connection(), workflow_ids, by, outcome, now)
    live.publish_after_commit(session, done.updates)
    _count_closed(session, done.closed, now)
    return done.cancelled


def cancel_queued_committed(
    db: Database,
    workflow_ids: Sequence[str],
    by: Actor | Mapping[str, Actor],
    outcome: CancelOutcome = CancelOutcome.CANCELLED,
) -> list[CancelledQueued]:
    """:func:`cancel_queued_many` as its own unit of work, committed: the cancel worker's
    hot path, on a Core connection (no ORM session). Its live updates are published and
    its outcomes counted once it has committed.

    An explicit transaction even for PostgreSQL's one statement: in autocommit, a
    statement waiting on a row lock still commits after its worker was killed (the server
    notices the lost client only when it reads the next command), so the killed batch's
    cancels would be written without their revokes and signals, which the redelivered
    messages, finding them cancelled, no longer send. Here the server reads the COMMIT
    that never comes, and rolls back.
    """
    now = utcnow()
    with db.engine.begin() as connection:
        done = _cancel_queued(connection, workflow_ids, by, outcome, now)
    if done.closed:
        metrics.cancels_closed(done.closed, now)
    live.publish(done.updates)
    return done.cancelled


Closed = list[tuple[str | None, str, datetime | None]]  # (source, outcome, requested_at)


@dataclass(frozen=True)
class _QueuedCancelled:
    cancelled: list[CancelledQueued]
    updates: list[live.Update]  # of the audit rows, to publish after the commit
    closed: Closed  # for metrics.cancels_closed, after the commit


# The compare-and-set of queued cancels as fixed SQL text, compiled once per process: the
# ids are one array (PostgreSQL) or an expanding IN (SQLite), and each workflow's requester
# fills the request fields it lacks (a cancel written without an earlier request records
# itself as the request; an earlier request keeps its own time, source, actor and reason).
_SET_CANCELLED = f"""status = '{S.CANCELLED.value}', updated_at = :now, completed_at = :now,
        cancel_requested_at = COALESCE(cancel_requested_at, :now),
        cancel_outcome = :outcome, cancel_finished_at = :now"""
_CANCELLED_COLUMNS = ("id", "runner_task_id", "runner_id", "prompt_id", "cancel_requested_at",
                      "cancel_source")
_REQUESTER_COLUMNS = ("by_source", "by_actor", "by_reason")
_CANCEL_AUDIT_COLUMNS = ("INSERT INTO workflow_events "
                         "(workflow_id, at, kind, from_status, to_status, outcome, "
                         "source, actor, reason)")
# PostgreSQL: the compare-and-set and its audit rows in one statement (a data-modifying
# CTE), each row joined to its own requester. The rows are found through that join alone:
# psycopg prepares a statement run often, and PostgreSQL's generic plan (made for ten ids,
# whatever the chunk holds) of an extra ``id = ANY(:ids)`` estimated one changed row and
# joined the updated and the audited rows by a nested loop, every pair compared (100,000
# queued cancels took 10.7 s in this statement instead of 4.7 s). Its plan is checked by
# tests/integration/test_plans_postgres.py.
_CANCEL_QUEUED_AND_AUDIT = _statement(f"""
    WITH requested AS (
        SELECT * FROM unnest(CAST(:ids AS VARCHAR[]), CAST(:sources AS VARCHAR[]),
                             CAST(:actors AS VARCHAR[]), CAST(:reasons AS VARCHAR[]))
            AS r (by_id, by_source, by_actor, by_reason)
    ), cancelled AS (
        UPDATE workflows SET {_SET_CANCELLED},
            cancel_source = COALESCE(cancel_source, by_source),
            cancel_actor = COALESCE(cancel_actor, by_actor),
            cancel_reason = COALESCE(cancel_reason, by_reason)
        FROM requested
        WHERE id = by_id AND status = '{S.QUEUED.value}'
        RETURNING {", ".join(_CANCELLED_COLUMNS + _REQUESTER_COLUMNS)}
    ), audited AS (
        {_CANCEL_AUDIT_COLUMNS}
        SELECT id, :now, '{EventKind.TRANSITION.value}', '{S.QUEUED.value}',
            '{S.CANCELLED.value}', :outcome, by_source, by_actor, by_reason
        FROM cancelled
        RETURNING id AS event_id, workflow_id
    )
    SELECT {", ".join(_CANCELLED_COLUMNS + _REQUESTER_COLUMNS)}, event_id
    FROM cancelled JOIN audited ON workflow_id = id""",
    returns=(*_CANCELLED_COLUMNS, *_REQUESTER_COLUMNS, "event_id"))
# SQLite has no data-modifying CTE nor arrays: the compare-and-set, then the request
# fields a requester fills (rare: a worker's requests were recorded first), then the audit
# rows, in one transaction.
_SQLITE_RETURNS = (*_CANCELLED_COLUMNS, "cancel_actor", "cancel_reason")
_CANCEL_QUEUED = _statement(
    f"""UPDATE workflows SET {_SET_CANCELLED}
    WHERE id IN :ids AND status = '{S.QUEUED.value}'
    RETURNING {", ".join(_SQLITE_RETURNS)}""",
    bindparam("ids", expanding=True), returns=_SQLITE_RETURNS)
# One multi-row INSERT: its rows come back in no set order, so each names its workflow
# (once per batch).
_AUDIT_CANCELLED = insert(WorkflowEvent).returning(WorkflowEvent.id, WorkflowEvent.workflow_id)
_FILL_REQUESTER = text(
    "UPDATE workflows SET cancel_source = COALESCE(cancel_source, :source), "
    "cancel_actor = COALESCE(cancel_actor, :actor), "
    "cancel_reason = COALESCE(cancel_reason, :reason) WHERE id = :workflow_id")


def _cancel_queued(
    connection: Connection,
    workflow_ids: Sequence[str],
    by: Actor | Mapping[str, Actor],
    outcome: CancelOutcome,
    now: datetime,
) -> _QueuedCancelled:
    """The statements of :func:`cancel_queued_many` on ``connection``, inside its
    transaction; what to publish and count is left to the caller, for after the commit."""
    ids = list(dict.fromkeys(workflow_ids))
    if not ids:
        return _QueuedCancelled([], [], [])
    requesters = by if isinstance(by, Mapping) else dict.fromkeys(ids, by)
    fixed: dict[str, Any] = {"from_status": S.QUEUED.value, "to_status": S.CANCELLED.value,
                             "outcome": outcome.value}
    found: dict[str, tuple[CancelledQueued, str | None, datetime | None]] = {}
    audited: list[tuple[int, str, str | None, str | None, str | None]] = []
    if connection.dialect.name == "postgresql":
        actors = [requesters[wid] for wid in ids]
        for row in connection.execute(_CANCEL_QUEUED_AND_AUDIT, {
            "now": now, "outcome": outcome.value, "ids": ids,
            "sources": [a.source for a in actors], "actors": [a.actor for a in actors],
            "reasons": [a.reason for a in actors],
        }):
            found[row.id] = (CancelledQueued(row.id, row.runner_task_id, row.runner_id,
                                             row.prompt_id),
                             row.cancel_source, row.cancel_requested_at)
            audited.append((row.event_id, row.id, row.by_source, row.by_actor, row.by_reason))
    else:
        rows = connection.execute(_CANCEL_QUEUED,
                                  {"now": now, "outcome": outcome.value, "ids": ids}).all()
        unfilled = []
        for row in rows:
            asked = requesters[row.id]
            if any(getattr(row, f"cancel_{name}") is None and getattr(asked, name) is not None
                   for name in ("source", "actor", "reason")):
                unfilled.append({"workflow_id": row.id, "source": asked.source,
                                 "actor": asked.actor, "reason": asked.reason})
            found[row.id] = (CancelledQueued(row.id, row.runner_task_id, row.runner_id,
                                             row.prompt_id),
                             row.cancel_source or asked.source, row.cancel_requested_at)
        if unfilled:
            connection.execute(_FILL_REQUESTER, unfilled)
        audit = {row.id: {"workflow_id": row.id, "at": now, "kind": EventKind.TRANSITION.value,
                          "source": requesters[row.id].source,
                          "actor": requesters[row.id].actor,
                          "reason": requesters[row.id].reason, **fixed} for row in rows}
        if audit:
            audited = [(event_id, workflow_id, requesters[workflow_id].source,
                        requesters[workflow_id].actor, requesters[workflow_id].reason)
                       for event_id, workflow_id in connection.execute(_AUDIT_CANCELLED,
                                                                       list(audit.values()))]
    updates = live.audit_updates(audited, EventKind.TRANSITION.value, now, **fixed)
    ordered = [found[wid] for wid in ids if wid in found]
    return _QueuedCancelled([cancelled for cancelled, _, _ in ordered], updates,
                            [(source, outcome.value, requested_at)
                             for _, source, requested_at in ordered])


@dataclass(frozen=True)
class Escalation:
    """A running workflow to end without its runner's acknowledgement."""

    workflow_id: str
    by: Actor  # who asked for the cancel, for the audit row
    outcome: CancelOutcome  # forced, or runner_lost
    detail: Mapping[str, Any]


def cancel_running_many(session: Session, escalations: Sequence[Escalation]) -> set[str]:
    """Set-based ``running -> cancelled`` with each one's outcome: one statement per
    outcome, the audit rows in one insert. Returns the ids it changed; the others had
    ended already."""
    now = utcnow()
    changed: set[str] = set()
    by_outcome: dict[CancelOutcome, dict[str, Actor]] = defaultdict(dict)
    for escalation in escalations:
        by_outcome[escalation.outcome][escalation.workflow_id] = escalation.by
    closed: list[tuple[str | None, str, datetime | None]] = []
    for outcome, requesters in by_outcome.items():
        for row in session.execute(
            update(Workflow)
            .where(Workflow.id.in_(list(requesters)), Workflow.status == S.RUNNING.value)
            .values(status=S.CANCELLED.value, updated_at=now,
                    **_cancel_values(requesters, outcome, now))
            .returning(Workflow.id, Workflow.cancel_source, Workflow.cancel_requested_at)
            .execution_options(synchronize_session=False)
        ):
            changed.add(row.id)
            closed.append((row.cancel_source, outcome.value, row.cancel_requested_at))
    _count_closed(session, closed, now)
    rows: list[dict[str, Any]] = [
        {"workflow_id": e.workflow_id, "at": now, "kind": EventKind.TRANSITION.value,
         "from_status": S.RUNNING.value, "to_status": S.CANCELLED.value,
         "source": e.by.source, "actor": e.by.actor, "reason": e.by.reason,
         "outcome": e.outcome.value, "detail": dict(e.detail) or None}
        for e in escalations if e.workflow_id in changed
    ]
    _audit_rows(session, rows)
    return changed


# --- the cancel request beside the status (no status change) ---------------------------


def request_cancel(
    session: Session, workflow_id: str, by: Actor, *, publishing: bool = False
) -> bool:
    """Record a cancel request on a cancellable workflow; True when it was recorded.

    A repeat while the first request is open keeps the first request's fields (the
    request is idempotent) but is still audited. ``publishing`` also stamps
    ``cancel_published_at``, for a caller that publishes right after the commit: the
    re-drive pass waits ``redrive_after_seconds`` from that stamp either way, so a
    publish that then fails costs no extra write.
    """
    return bool(request_cancel_many(session, [workflow_id], by, publishing=publishing))


def request_cancel_many(
    session: Session,
    workflow_ids: Sequence[str],
    by: Actor,
    *,
    only_new: bool = False,
    skip_locked: bool = False,
    publishing: bool = False,
) -> list[str]:
    """Record cancel requests on many cancellable workflows in one statement.

    Returns the ids it recorded. With ``only_new`` only workflows without an earlier
    request are touched, which lets two sweeps racing on the same rows claim each once.
    With ``skip_locked`` rows another transaction holds are left out (``FOR UPDATE SKIP
    LOCKED`` on PostgreSQL; SQLite, one writer at a time, ignores it): two periodic
    passes split the work instead of waiting for each other.
    """
    if not workflow_ids:
        return []
    now = utcnow()
    query = update(Workflow).where(
        Workflow.id.in_(list(workflow_ids)),
        Workflow.status.in_(sorted(CANCELLABLE)),
    )
    if only_new:
        query = query.where(Workflow.cancel_requested_at.is_(None))
    if skip_locked:
        free = (select(Workflow.id).where(Workflow.id.in_(list(workflow_ids)))
                .with_for_update(skip_locked=True))
        query = query.where(Workflow.id.in_(free.scalar_subquery()))
    values: dict[str, Any] = {
        "cancel_requested_at": func.coalesce(Workflow.cancel_requested_at, now),
        "cancel_source": func.coalesce(Workflow.cancel_source, by.source),
        "cancel_actor": func.coalesce(Workflow.cancel_actor, by.actor),
        "cancel_reason": func.coalesce(Workflow.cancel_reason, by.reason),
        "updated_at": now,
    }
    if publishing:
        values["cancel_published_at"] = now
    recorded = session.execute(
        query.values(**values)
        .returning(Workflow.id)
        .execution_options(synchronize_session=False)
    ).scalars().all()
    _audit_many(session, dict.fromkeys(recorded, by), EventKind.CANCEL_REQUESTED, now)
    if recorded:
        metrics.after_commit(session.info, lambda: metrics.cancels_requested(by.source,
                                                                              len(recorded)))
    return list(recorded)


# The API's cancels, the hot path: one round trip on PostgreSQL for a caller's requests, no
# ORM objects. The caller's token is checked again in the statement (the API's cache of
# tokens lasts a few seconds); a row changes only if it is the token's account's and
# cancellable; the request keeps an earlier request's fields (a repeat is idempotent) but
# is stamped as published and audited anew, as request_cancel_many(publishing=True) does.
_RECORD_CALLERS_REQUESTS = f"""
    UPDATE workflows SET
        cancel_requested_at = COALESCE(cancel_requested_at, :now),
        cancel_source = COALESCE(cancel_source, :source),
        cancel_actor = COALESCE(cancel_actor, :actor),
        cancel_reason = COALESCE(cancel_reason, :reason),
        cancel_published_at = :now,
        updated_at = :now
    WHERE {{ids}} AND account_id = :account_id
        AND status IN ({", ".join(f"'{s.value}'" for s in sorted(CANCELLABLE))})
        AND EXISTS (SELECT 1 FROM api_tokens WHERE id = :token_id
                    AND account_id = :account_id AND (expires_at IS NULL OR expires_at > :now))
    RETURNING id"""
_AUDIT_COLUMNS = "INSERT INTO workflow_events (workflow_id, at, kind, source, actor, reason)"
_AUDIT_VALUES = (
    f":now, '{EventKind.CANCEL_REQUESTED.value}', CAST(:source AS VARCHAR(16)), "
    "CAST(:actor AS VARCHAR(200)), CAST(:reason AS VARCHAR(1000))"
)


# PostgreSQL: the compare-and-set and its audit rows in one statement (a data-modifying
# CTE), the ids one array parameter, so the statement's text never changes.
_REQUEST_AND_AUDIT = _statement(
    f"WITH recorded AS ({_RECORD_CALLERS_REQUESTS.format(ids='id = ANY(:workflow_ids)')}) "
    f"{_AUDIT_COLUMNS} SELECT id, {_AUDIT_VALUES} FROM recorded RETURNING id, workflow_id"
)
# SQLite has no data-modifying CTE: the same UPDATE, then the audit rows, in one transaction.
_REQUEST = _statement(
    _RECORD_CALLERS_REQUESTS.format(ids="id IN :workflow_ids")
).bindparams(bindparam("workflow_ids", expanding=True))
_AUDIT = _statement(
    f"{_AUDIT_COLUMNS} SELECT id, {_AUDIT_VALUES} FROM workflows WHERE id IN :workflow_ids "
    "RETURNING id, workflow_id"
).bindparams(bindparam("workflow_ids", expanding=True))


@dataclass(frozen=True)
class CallersCancel:
    """One API caller's cancel request: the workflow, and who asks with which token."""

    workflow_id: str
    account_id: int
    token_id: int
    by: Actor


def request_cancels_as_callers(db: Database, requests: Sequence[CallersCancel]) -> list[bool]:
    """Record API callers' cancel requests, stamped as published, with their audit rows,
    committed: for each request, whether it was recorded. Not recorded: the workflow is
    not the account's, not cancellable, or the token is no longer valid (the caller asks
    which, if it must say).

    Requests of one caller (account, token and requester) are one statement; on PostgreSQL
    a lone caller's statement runs outside an explicit transaction (a statement is atomic
    on its own, which saves the BEGIN and COMMIT round trips), several callers' share one
    transaction. Their live updates are published once they have committed.
    """
    now = utcnow()
    by_caller: dict[tuple[int, int, Actor], list[str]] = defaultdict(list)
    for request in requests:
        by_caller[(request.account_id, request.token_id, request.by)].append(request.workflow_id)
    recorded: set[tuple[int, int, Actor, str]] = set()
    audited: list[tuple[int, str, str | None, str | None, str | None]] = []
    postgresql = db.engine.dialect.name == "postgresql"
    with (db.autocommit() if postgresql and len(by_caller) == 1
          else db.engine.begin()) as connection:
        for (account_id, token_id, by), workflow_ids in by_caller.items():
            params = {"now": now, "workflow_ids": workflow_ids, "account_id": account_id,
                      "token_id": token_id, "source": by.source, "actor": by.actor,
                      "reason": by.reason}
            if postgresql:
                rows = connection.execute(_REQUEST_AND_AUDIT, params).all()
            else:
                changed = connection.execute(_REQUEST, params).scalars().all()
                rows = (connection.execute(_AUDIT, {**params, "workflow_ids": changed}).all()
                        if changed else [])
            for event_id, workflow_id in rows:
                recorded.add((account_id, token_id, by, workflow_id))
                audited.append((event_id, workflow_id, by.source, by.actor, by.reason))
    for source, count in Counter(source for _, _, source, _, _ in audited).items():
        metrics.cancels_requested(source, count)
    live.publish(live.audit_updates(audited, EventKind.CANCEL_REQUESTED.value, now))
    return [(r.account_id, r.token_id, r.by, r.workflow_id) in recorded for r in requests]


def request_cancel_as_caller(
    db: Database, workflow_id: str, *, account_id: int, token_id: int, by: Actor
) -> bool:
    """One API caller's cancel request (:func:`request_cancels_as_callers`); True when
    recorded."""
    return request_cancels_as_callers(
        db, [CallersCancel(workflow_id, account_id, token_id, by)])[0]


def record_outcome(
    session: Session,
    workflow_id: str,
    outcome: CancelOutcome,
    by: Actor,
    detail: Mapping[str, Any] | None = None,
    *,
    only_if_requested: bool = False,
) -> bool:
    """Close an open cancel request that wrote no status (``too_late``, ``already_cancelled``).

    The first outcome wins; True when this call recorded it. With ``only_if_requested``
    nothing is written (not even an audit row) unless a request is open.
    """
    now = utcnow()
    query = update(Workflow).where(
        Workflow.id == workflow_id, Workflow.cancel_outcome.is_(None)
    )
    if only_if_requested:
        query = query.where(Workflow.cancel_requested_at.is_not(None))
    changed = session.execute(
        query.values(cancel_outcome=outcome.value, cancel_finished_at=now)
        .returning(Workflow.cancel_source, Workflow.cancel_requested_at)
    ).first()
    if changed is None and only_if_requested:
        return False
    if changed is None:
        # Not changed, so not locked: lock before auditing, to keep the workflow's audit
        # rows numbered in the order they commit (see acknowledge_cancel).
        session.execute(
            select(Workflow.id).where(Workflow.id == workflow_id).with_for_update()
        )
    else:
        _count_closed(session, [(changed.cancel_source, outcome.value,
                                 changed.cancel_requested_at)], now)
    # A later request's outcome is audited too, marked as not the one the workflow keeps.
    audited = dict(detail or {}) if changed is not None else {**(detail or {}), "recorded": False}
    _audit(session, workflow_id, EventKind.CANCEL_OUTCOME, by, outcome.value, now, audited)
    return changed is not None


def claim_redrive(
    session: Session,
    workflow_ids: Sequence[str],
    published_before: datetime,
) -> list[tuple[str, str | None, str | None, str | None]]:
    """Stamp intents as published now if they are still due, so two schedulers hand each
    on once; returns the claimed (id, source, actor, reason)."""
    if not workflow_ids:
        return []
    rows = session.execute(
        update(Workflow)
        .where(Workflow.id.in_(list(workflow_ids)), *manager.redrive_due(published_before))
        .values(cancel_published_at=utcnow())
        .returning(Workflow.id, Workflow.cancel_source, Workflow.cancel_actor,
                   Workflow.cancel_reason)
        .execution_options(synchronize_session=False)
    ).all()
    return [(wid, source, actor, reason) for wid, source, actor, reason in rows]


def mark_cancel_taken(session: Session, workflow_ids: Sequence[str]) -> None:
    """A cancel worker took these open requests (it signalled their runners): the first
    take is kept, since the grace period, and so the deadline, runs from it. Each signal
    is audited (``cancel_signalled``, naming the request it serves)."""
    if not workflow_ids:
        return
    now = utcnow()
    taken = session.execute(
        update(Workflow)
        .where(Workflow.id.in_(list(workflow_ids)), Workflow.cancel_outcome.is_(None))
        .values(cancel_taken_at=func.coalesce(Workflow.cancel_taken_at, now))
        .returning(Workflow.id)
        .execution_options(synchronize_session=False)
    ).scalars().all()
    _audit_many(session, list(taken), EventKind.CANCEL_SIGNALLED, now)


def acknowledge_cancel(
    session: Session, workflow_id: str, by: Actor, detail: Mapping[str, Any] | None = None
) -> None:
    """The runner saw ComfyUI stop the prompt it was asked to cancel: audited before the
    status it then writes. The row is locked first, so that the audit rows of one
    workflow are numbered in the order they commit (the live streams rely on it)."""
    session.execute(
        select(Workflow.id).where(Workflow.id == workflow_id).with_for_update()
    )
    _audit(session, workflow_id, EventKind.CANCEL_ACKNOWLEDGED, by, None, utcnow(), detail)


# --- after a cancel: what ComfyUI kept, and that it let go (no status change) -----------


def record_partial_outputs(
    session: Session, workflow_id: str, outputs: Mapping[str, Any]
) -> bool:
    """Keep what ComfyUI reported saved before a cancel stopped the prompt, on a cancelled
    workflow only (``outputs`` stays for completed work). ComfyUI's history entry is the
    fuller account (the runner may have missed ``executed`` events), so it replaces what
    was kept at the cancel. True when written."""
    if not outputs:
        return False
    return session.execute(
        update(Workflow)
        .where(Workflow.id == workflow_id, Workflow.status == S.CANCELLED.value)
        .values(partial_outputs=dict(outputs), updated_at=utcnow())
        .returning(Workflow.id)
    ).first() is not None


def record_freed(session: Session, workflow_ids: Sequence[str], by: Actor = RUNNER) -> list[str]:
    """ComfyUI was seen holding these cancelled workflows' prompts no more (neither
    running nor pending): stamp ``freed_at`` and audit it (``gpu_freed``). The first
    confirmation is kept; returns the ids this call stamped."""
    if not workflow_ids:
        return []
    now = utcnow()
    rows = session.execute(
        update(Workflow)
        .where(Workflow.id.in_(list(workflow_ids)), Workflow.status == S.CANCELLED.value,
               Workflow.freed_at.is_(None))
        .values(freed_at=now, updated_at=now)
        .returning(Workflow.id, Workflow.cancel_requested_at)
        .execution_options(synchronize_session=False)
    ).all()
    _audit_rows(session, [
        {"workflow_id": workflow_id, "at": now, "kind": EventKind.GPU_FREED.value,
         "source": by.source, "actor": by.actor, "reason": by.reason,
         "detail": _since(requested_at, now)}
        for workflow_id, requested_at in rows
    ])
    return [workflow_id for workflow_id, _ in rows]


def _since(requested_at: datetime | None, now: datetime) -> dict[str, float] | None:
    if requested_at is None:
        return None
    return {"seconds_since_request": round((now - requested_at).total_seconds(), 4)}


def _count_closed(
    session: Session, rows: list[tuple[str | None, str, datetime | None]], now: datetime
) -> None:
    """Count these outcomes (:func:`metrics.cancels_closed`) once the transaction commits."""
    if rows:
        metrics.after_commit(session.info, lambda: metrics.cancels_closed(rows, now))


@event.listens_for(Session, "after_commit")
def _count_committed(session: Session) -> None:
    metrics.committed(session.info)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    metrics.rolled_back(session.info)


def _audit(
    session: Session,
    workflow_id: str,
    kind: EventKind,
    by: Actor,
    outcome: str | None,
    at: datetime,
    detail: Mapping[str, Any] | None = None,
    *,
    from_status: str | None = None,
    to_status: str | None = None,
) -> None:
    """One audit row, and its live update after the commit."""
    columns: dict[str, Any] = {
        "kind": kind.value, "from_status": from_status, "to_status": to_status,
        "source": by.source, "actor": by.actor, "reason": by.reason, "outcome": outcome,
        "detail": dict(detail) if detail else None,
    }
    event_id = session.execute(
        insert(WorkflowEvent).values(workflow_id=workflow_id, at=at, **columns)
        .returning(WorkflowEvent.id)
    ).scalar_one()
    live.publish_after_commit(session, [live.audit_update(event_id, workflow_id, at=at,
                                                          **columns)])


def _audit_rows(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Audit rows that differ in more than their requester, in one insert; their live
    updates follow the commit."""
    if not rows:
        return
    ids = session.execute(
        insert(WorkflowEvent).returning(WorkflowEvent.id, sort_by_parameter_order=True),
        [dict(row) for row in rows],
    ).scalars().all()
    live.publish_after_commit(session, [live.audit_update(event_id, **row)
                                        for event_id, row in zip(ids, rows, strict=True)])


def _audit_many(
    session: Session,
    by: Mapping[str, Actor] | Sequence[str],
    kind: EventKind,
    at: datetime,
    **columns: Any,
) -> None:
    """One audit row per id of ``by``, alike but for the id and the requester, in one
    ``INSERT ... SELECT``: the database builds the rows, Python sends about one parameter
    per id instead of a dict of nine per row (bulk cancels write thousands at a time).
    ``by`` maps each id to its requester, or lists ids whose rows name the cancel request
    each workflow carries. Their live updates follow the commit."""
    if not by:
        return
    table = WorkflowEvent.__table__
    fixed: dict[str, Any] = {"at": at, "kind": kind.value, **columns}
    values: dict[str, ColumnElement[Any]] = {
        name: literal(value, table.c[name].type)
        for name, value in fixed.items() if value is not None
    }
    if isinstance(by, Mapping):
        values.update(_requester_columns(by))
    else:
        values.update({name: getattr(Workflow, f"cancel_{name}")
                       for name in ("source", "actor", "reason")})
    rows = session.execute(
        insert(WorkflowEvent).from_select(
            ["workflow_id", *values],
            select(Workflow.id, *values.values()).where(Workflow.id.in_(list(by))),
        ).returning(WorkflowEvent.id, WorkflowEvent.workflow_id, WorkflowEvent.source,
                    WorkflowEvent.actor, WorkflowEvent.reason)
    ).all()
    live.publish_after_commit(session, live.audit_updates(rows, kind.value, at, **columns))
