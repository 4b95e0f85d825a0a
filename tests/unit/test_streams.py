"""The events of one stream (comfy_cancel/streams.py) from a subscription fed by hand: the
snapshot, then live updates without duplicates, a catch-up from the database when told,
and the end at the terminal status."""

from __future__ import annotations

import asyncio
from pathlib import Path

import fakeredis

from comfy_cancel import live, manager, status, streams
from comfy_cancel.models import WorkflowStatus
from testbed.database import migrated
from tests.helpers import make_account_and_runner, seed_workflow

S = WorkflowStatus
API = status.Actor("api", "alice", None)


def test_a_stream_sends_each_audit_row_once_catches_up_when_told_and_ends_at_the_end(
    tmp_path: Path,
) -> None:
    db = migrated(f"sqlite:///{tmp_path / 's.db'}")
    account_id, runner_id = make_account_and_runner(db)
    workflow_id = seed_workflow(db, account_id, runner_id, S.RUNNING)
    start = streams.snapshot(db, workflow_id, account_id, None)
    assert start is not None and start.state is not None and not start.terminal
    assert streams.snapshot(db, workflow_id, account_id + 1, None) is None

    with db.transaction() as session:  # committed after the snapshot, not yet published
        status.request_cancel(session, workflow_id, API)
    with db.reading() as session:
        (requested,) = [live.update_of_row(r)
                        for r in manager.events_of(session, workflow_id, start.last_id)]
        old = [live.update_of_row(r) for r in manager.events_of(session, workflow_id)][:-1]

    async def scenario() -> list[tuple[str | None, str | None]]:
        hub = live.Hub(fakeredis.aioredis.FakeRedis())
        sub = live.Subscription(workflow_id, hub)
        sub.deliver(old)  # already in the snapshot: dropped
        sub.deliver([live.progress_update(workflow_id, "3", 1, 10)])
        sub.deliver(live.RESYNC)  # reads the request from the database
        sub.deliver([requested])  # then arrives live too: dropped
        with db.transaction() as session:
            status.cancel_if_active(session, workflow_id, API)
        sub.deliver(live.RESYNC)
        sub.deliver([live.progress_update(workflow_id, "3", 2, 10)])  # after the end: unsent
        return [(e.event, e.id) async for e in streams.events(sub, start, db)]

    sent = asyncio.run(scenario())

    with db.reading() as session:
        *_, cancelled = manager.events_of(session, workflow_id)
    assert sent == [("state", str(start.last_id)), ("progress", None),
                    ("cancel_requested", str(requested["id"])),
                    ("status", str(cancelled.id))]


def test_an_end_that_overtakes_an_earlier_update_live_is_sent_after_it(tmp_path: Path) -> None:
    # Two processes publish after their own commits and race: the runner's acknowledgement
    # and `cancelled` can reach the stream before the cancel worker's `cancel_signalled`.
    db = migrated(f"sqlite:///{tmp_path / 's.db'}")
    account_id, runner_id = make_account_and_runner(db)
    workflow_id = seed_workflow(db, account_id, runner_id, S.RUNNING)
    start = streams.snapshot(db, workflow_id, account_id, None)
    assert start is not None
    with db.transaction() as session:
        status.request_cancel(session, workflow_id, API)
        status.mark_cancel_taken(session, [workflow_id])
    with db.transaction() as session:
        status.acknowledge_cancel(session, workflow_id, API)
        status.cancel_if_active(session, workflow_id, API)
    with db.reading() as session:
        rows = [live.update_of_row(r)
                for r in manager.events_of(session, workflow_id, start.last_id)]
    assert [u["kind"] for u in rows] == ["cancel_requested", "cancel_signalled",
                                         "cancel_acknowledged", "transition"]

    async def scenario() -> list[str | None]:
        sub = live.Subscription(workflow_id, live.Hub(fakeredis.aioredis.FakeRedis()))
        sub.deliver(rows[:1])
        sub.deliver(rows[2:])  # the runner's, before the worker's
        sub.deliver(rows[1:2])
        return [e.event async for e in streams.events(sub, start, db)]

    assert asyncio.run(scenario()) == ["state", "cancel_requested", "cancel_signalled",
                                       "cancel_acknowledged", "status"]
