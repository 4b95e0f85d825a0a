"""The sweeps against real PostgreSQL and Redis: each finds exactly its rows, a dry run
changes nothing, and two sweeps at once do the work once."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
import redis
from sqlalchemy import update

from comfy_cancel import manager, status, worker
from comfy_cancel.config import Settings
from comfy_cancel.context import Context
from comfy_cancel.models import Workflow, WorkflowStatus, utcnow
from comfy_cancel.sweeps import sweep
from testbed.database import migrated
from tests.helpers import make_account_and_runner, seed_workflow, twice_at_once

S = WorkflowStatus
LONG_AGO = timedelta(hours=3)


@pytest.fixture
def ctx(pg_database_url: str, redis_db_url: str) -> Iterator[Context]:
    settings = Settings(
        database_url=pg_database_url,
        redis_url=redis_db_url,
        heartbeat_timeout_seconds=60,
        max_run_seconds=3600,
        queued_timeout_seconds=1800,
        redrive_after_seconds=30,
    )
    migrated(pg_database_url)
    worker.configure(settings)
    yield Context(settings)
    worker.configure(Settings())


def backdate(ctx: Context, workflow_id: str, **columns: timedelta) -> None:
    """Test setup: move a row's timestamps into the past (not a status write)."""
    now = utcnow()
    with ctx.db.transaction() as session:
        session.execute(
            update(Workflow)
            .where(Workflow.id == workflow_id)
            .values(**{name: now - age for name, age in columns.items()})
        )


@dataclass
class Scenario:
    healthy: str
    no_heartbeat: str
    overdue: str
    queued_stale: str
    queued_fresh: str
    open_intent: str
    fresh_intent: str
    completed_old: str


def seed(ctx: Context) -> Scenario:
    account_id, runner_id = make_account_and_runner(ctx.db)

    def make(to: S) -> str:
        return seed_workflow(ctx.db, account_id, runner_id, to)

    sc = Scenario(*(make(s) for s in (S.RUNNING, S.RUNNING, S.RUNNING, S.QUEUED, S.QUEUED,
                                      S.RUNNING, S.RUNNING, S.COMPLETED)))
    backdate(ctx, sc.no_heartbeat, heartbeat_at=timedelta(minutes=5))
    backdate(ctx, sc.overdue, started_at=LONG_AGO)
    backdate(ctx, sc.queued_stale, updated_at=LONG_AGO)
    backdate(ctx, sc.completed_old, updated_at=LONG_AGO, started_at=LONG_AGO,
             heartbeat_at=LONG_AGO)
    with ctx.db.transaction() as session:
        for wid in (sc.open_intent, sc.fresh_intent):
            status.request_cancel(session, wid, status.Actor("api", "alice", "lost message"))
    backdate(ctx, sc.open_intent, cancel_requested_at=timedelta(minutes=2))
    return sc


def queued_messages(client: redis.Redis, queue: str) -> list[tuple[str, list[str]]]:
    """(task name, workflow ids) of the Celery messages waiting in a Redis queue."""
    found = []
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        found.append((message["headers"]["task"], body[0][0]))
    return found


def test_each_sweep_finds_exactly_its_rows(ctx: Context, redis_client: redis.Redis) -> None:
    sc = seed(ctx)
    dry = sweep(ctx, dry_run=True)
    assert queued_messages(redis_client, worker.SWEEP_QUEUE) == []
    report = sweep(ctx)
    for r in (dry, report):
        assert r.runner_lost == [sc.no_heartbeat]
        assert r.overdue == [sc.overdue]
        assert r.queued_cancelled == [sc.queued_stale]
        assert r.republished == [sc.open_intent]
        assert r.redispatched == []
    with ctx.db.transaction() as session:
        lost = manager.get_workflow(session, sc.no_heartbeat)
        overdue = manager.get_workflow(session, sc.overdue)
        untouched = [manager.get_workflow(session, w)
                     for w in (sc.healthy, sc.queued_fresh, sc.completed_old)]
    assert lost is not None and lost.status == "cancelled"
    assert (lost.cancel_source, lost.cancel_outcome) == ("sweep", "runner_lost")
    assert lost.cancel_reason and "heartbeat" in lost.cancel_reason
    # The overdue one is still running: its cancel goes through the cancel worker.
    assert overdue is not None and overdue.status == "running"
    assert overdue.cancel_source == "sweep" and "longer than" in (overdue.cancel_reason or "")
    assert all(w is not None and w.cancel_requested_at is None for w in untouched)
    sweep_queue = queued_messages(redis_client, worker.SWEEP_QUEUE)
    assert sorted(ids[0] for _, ids in sweep_queue) == sorted([sc.overdue, sc.queued_stale])
    assert {name for name, _ in sweep_queue} == {"comfy_cancel.cancel_workflows"}
    # A republished customer cancel goes back to the customers' queue.
    assert queued_messages(redis_client, worker.CANCEL_QUEUE) == [
        ("comfy_cancel.cancel_workflows", [sc.open_intent])
    ]
    # Everything found was claimed: a second pass finds nothing.
    assert not any(sweep(ctx).counts().values())


def test_a_dry_run_changes_nothing(ctx: Context, redis_client: redis.Redis) -> None:
    sc = seed(ctx)
    with ctx.db.transaction() as session:
        before = {w: manager.get_workflow(session, w) for w in vars(sc).values()}
        snapshot = {w: (r.status, r.cancel_requested_at, r.cancel_published_at)
                    for w, r in before.items() if r is not None}
    assert any(sweep(ctx, dry_run=True).counts().values())
    with ctx.db.transaction() as session:
        after = {w: manager.get_workflow(session, w) for w in snapshot}
        assert {w: (r.status, r.cancel_requested_at, r.cancel_published_at)
                for w, r in after.items() if r is not None} == snapshot
    assert redis_client.llen(worker.SWEEP_QUEUE) == 0


def test_two_sweeps_at_once_do_the_work_once(ctx: Context, redis_client: redis.Redis) -> None:
    sc = seed(ctx)
    reports = twice_at_once(ctx, sweep)  # two schedulers
    for kind in ("runner_lost", "overdue", "queued_cancelled", "republished"):
        done = [wid for r in reports for wid in getattr(r, kind)]
        assert len(done) == 1, (kind, reports)
    assert sorted(w for r in reports for w in r.overdue + r.queued_cancelled) == sorted(
        [sc.overdue, sc.queued_stale]
    )
    assert len(queued_messages(redis_client, worker.SWEEP_QUEUE)) == 2
    assert len(queued_messages(redis_client, worker.CANCEL_QUEUE)) == 1


def test_the_redispatch_policy_gives_a_never_submitted_workflow_a_new_runner_task(
    ctx: Context, redis_client: redis.Redis
) -> None:
    ctx.settings.queued_timeout_policy = "redispatch"
    account_id, runner_id = make_account_and_runner(ctx.db)
    stale = seed_workflow(ctx.db, account_id, runner_id, S.QUEUED)
    backdate(ctx, stale, updated_at=LONG_AGO)
    with ctx.db.transaction() as session:
        old_task = manager.get_workflow(session, stale).runner_task_id  # type: ignore[union-attr]
    report = sweep(ctx)
    assert report.redispatched == [stale] and report.queued_cancelled == []
    with ctx.db.transaction() as session:
        row = manager.get_workflow(session, stale)
    assert row is not None and row.status == "queued" and row.runner_task_id != old_task
    runs = [json.loads(raw) for raw in redis_client.lrange(worker.RUNNER_QUEUE, 0, -1)]
    assert [m["headers"]["id"] for m in runs] == [row.runner_task_id]
    assert sweep(ctx).redispatched == []  # it was touched just now
