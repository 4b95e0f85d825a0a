"""Self-healing against real PostgreSQL and Redis: the re-drive pass hands on exactly the
open cancels nobody took, the deadline pass ends exactly those whose deadline passed (two
at once split the work), orphaned runner work is re-dispatched (boundedly) and adopted,
and a runner task rides out a database outage."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import psycopg
import pytest
import redis
from sqlalchemy import update

from comfy_cancel import cancel, db, manager, runner, status, sweeps, worker
from comfy_cancel.config import Settings
from comfy_cancel.context import Context
from comfy_cancel.embedded.comfyui_sim import blur_chain, start_in_thread
from comfy_cancel.models import EventKind, Workflow, WorkflowStatus, utcnow
from testbed.database import LOOPBACK, migrated
from tests.helpers import make_account_and_runner, seed_workflow, twice_at_once
from tests.integration.test_sweeps import backdate, queued_messages

S = WorkflowStatus
API = status.Actor("api", "alice", "no longer needed")


@pytest.fixture
def ctx(pg_database_url: str, redis_db_url: str) -> Iterator[Context]:
    settings = Settings(database_url=pg_database_url, redis_url=redis_db_url,
                        heartbeat_interval_seconds=0.5, runner_allowed_networks=LOOPBACK)
    migrated(pg_database_url)
    worker.configure(settings)
    yield Context(settings)
    worker.configure(Settings())


def row(ctx: Context, workflow_id: str) -> Workflow:
    with ctx.db.transaction() as session:
        found = manager.get_workflow(session, workflow_id)
    assert found is not None
    return found


def requested(ctx: Context, to: S, *, published: float, taken: float | None = None) -> str:
    """A workflow with an open cancel request published ``published`` s ago (and taken
    ``taken`` s ago)."""
    account_id, runner_id = make_account_and_runner(ctx.db, url=f"http://127.0.0.1:{to}")
    workflow_id = seed_workflow(ctx.db, account_id, runner_id, to)
    with ctx.db.transaction() as session:
        assert status.request_cancel(session, workflow_id, API, publishing=True)
        if taken is not None:
            status.mark_cancel_taken(session, [workflow_id])
    ages = {"cancel_requested_at": timedelta(seconds=published),
            "cancel_published_at": timedelta(seconds=published)}
    if taken is not None:
        ages["cancel_taken_at"] = timedelta(seconds=taken)
    backdate(ctx, workflow_id, **ages)
    return workflow_id


def test_redrive_hands_on_what_nobody_took_and_the_deadline_pass_ends_what_is_overdue(
    ctx: Context, redis_client: redis.Redis
) -> None:
    grace = ctx.settings.cancel_grace_seconds  # 10 s; re-drive after 3 s
    not_taken = requested(ctx, S.RUNNING, published=5)
    just_published = requested(ctx, S.RUNNING, published=1)
    in_flight = requested(ctx, S.RUNNING, published=grace, taken=grace - 1)
    lost_deadline = requested(ctx, S.RUNNING, published=grace + 10, taken=grace + 5)
    just_past_deadline = requested(ctx, S.RUNNING, published=grace + 2, taken=grace + 1)
    closed = requested(ctx, S.RUNNING, published=60)
    with ctx.db.transaction() as session:
        status.cancel_if_active(session, closed, API, from_=[S.RUNNING])

    assert sweeps.redrive(ctx, dry_run=True).republished == [not_taken]
    assert redis_client.llen(worker.CANCEL_QUEUE) == 0
    report = sweeps.redrive(ctx)
    assert report.republished == [not_taken]
    assert [w for _, ids in queued_messages(redis_client, worker.CANCEL_QUEUE)
            for w in ids] == [not_taken]
    published = row(ctx, not_taken).cancel_published_at
    assert published is not None and published > utcnow() - timedelta(seconds=2)
    untouched = [just_published, in_flight, just_past_deadline, lost_deadline, closed]
    recent = utcnow() - timedelta(seconds=0.5)
    assert all((row(ctx, w).cancel_published_at or recent) < recent for w in untouched)
    # Claimed: neither this scheduler nor another hands them on again now. (On a slow
    # machine ``just_published`` may have come due meanwhile; that one is not the point.)
    again = sweeps.redrive(Context(ctx.settings)).republished
    assert not_taken not in again, again
    # Taken ones have a deadline, which the deadline pass enforces, once.
    assert cancel.enforce_deadlines(ctx) == {lost_deadline: "forced",
                                             just_past_deadline: "forced"}
    assert cancel.enforce_deadlines(ctx) == {}
    assert row(ctx, in_flight).status == "running"


def test_two_redrive_passes_at_once_publish_each_cancel_once(
    ctx: Context, redis_client: redis.Redis
) -> None:
    ids = [requested(ctx, S.RUNNING, published=5) for _ in range(20)]
    reports = twice_at_once(ctx, sweeps.redrive)
    assert sorted(w for r in reports for w in r.republished) == sorted(ids)
    published = [w for _, chunk in queued_messages(redis_client, worker.CANCEL_QUEUE)
                 for w in chunk]
    assert sorted(published) == sorted(ids)


def test_a_handed_on_running_cancel_keeps_its_deadline(
    ctx: Context, redis_client: redis.Redis
) -> None:
    grace = ctx.settings.cancel_grace_seconds
    overdue = requested(ctx, S.RUNNING, published=grace + 5, taken=grace + 4)
    fresh = requested(ctx, S.RUNNING, published=1)
    assert cancel.handle_many(ctx, [overdue, fresh], API) == {overdue: None, fresh: None}
    taken = row(ctx, overdue).cancel_taken_at  # its first take kept: no new grace period
    assert taken is not None and taken < utcnow() - timedelta(seconds=grace)
    # The fresh one was signalled and stamped as taken; its deadline runs from now.
    pending = row(ctx, fresh)
    assert pending.status == "running" and pending.cancel_taken_at is not None
    first_take = pending.cancel_taken_at
    cancel.handle_many(ctx, [fresh], API)  # a duplicate delivery keeps the first take
    assert row(ctx, fresh).cancel_taken_at == first_take
    assert cancel.enforce_deadlines(ctx) == {overdue: "forced"}


def test_a_batch_mixing_requesters_names_each_on_its_audit_row(
    ctx: Context, redis_client: redis.Redis
) -> None:
    """The per-row requester columns (a CASE over the ids) as PostgreSQL runs them."""
    requesters = [API, status.Actor("bulk", "ops", None), status.Actor("sweep", "sweep", "x")]
    ids = [requested(ctx, S.QUEUED, published=1) for _ in requesters]
    outcomes = cancel.handle_batch(ctx, [([w], by) for w, by in zip(ids, requesters,
                                                                     strict=True)])
    assert outcomes == dict.fromkeys(ids, "cancelled")
    with ctx.db.transaction() as session:
        for workflow_id, by in zip(ids, requesters, strict=True):
            (end,) = [e for e in manager.events_of(session, workflow_id)
                      if e.kind == EventKind.TRANSITION and e.to_status == "cancelled"]
            assert (end.source, end.actor, end.reason) == (by.source, by.actor, by.reason)


def test_two_deadline_passes_at_once_split_the_work_and_end_each_workflow_once(
    ctx: Context, redis_client: redis.Redis
) -> None:
    grace = ctx.settings.cancel_grace_seconds
    ids = [requested(ctx, S.RUNNING, published=grace + 5, taken=grace + 1) for _ in range(30)]
    ctx.settings.cancel_batch_size = 4  # several rounds each
    results = twice_at_once(ctx, cancel.enforce_deadlines)
    ended = {wid: outcome for found in results for wid, outcome in found.items()
             if outcome is not None}
    assert ended == dict.fromkeys(ids, "forced")
    with ctx.db.transaction() as session:
        for workflow_id in ids:
            ends = [e for e in manager.events_of(session, workflow_id)
                    if e.kind == EventKind.TRANSITION and e.to_status == "cancelled"]
            assert len(ends) == 1


def test_a_running_cancel_whose_signal_could_not_be_sent_is_not_taken(
    ctx: Context, redis_client: redis.Redis
) -> None:
    """Redis went away between the worker's read and its signal: the request stays
    untaken, so the re-drive pass hands it on seconds after Redis is back instead of
    waiting out a deadline that no runner was told about."""
    workflow_id = requested(ctx, S.RUNNING, published=5)
    unreachable = Context(ctx.settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
    with pytest.raises(redis.ConnectionError):
        cancel.handle_many(unreachable, [workflow_id], API)
    pending = row(ctx, workflow_id)
    assert (pending.status, pending.cancel_taken_at) == ("running", None)
    assert sweeps.redrive(ctx).republished == [workflow_id]


def open_streak(ctx: Context, ago: float) -> None:
    """Test setup: the sweeps have reached the database for ``ago`` seconds."""
    ctx.redis.set(sweeps.DATABASE_UP_KEY, time.time() - ago)


def test_orphaned_queued_and_unclaimed_work_is_redispatched_then_failed(
    ctx: Context, redis_client: redis.Redis
) -> None:
    account_id, runner_id = make_account_and_runner(ctx.db)
    silent = seed_workflow(ctx.db, account_id, runner_id, S.QUEUED)
    beating = seed_workflow(ctx.db, account_id, runner_id, S.QUEUED)
    unclaimed = seed_workflow(ctx.db, account_id, runner_id, S.ACCEPTED)
    timeout = timedelta(seconds=ctx.settings.orphan_timeout_seconds + 1)
    backdate(ctx, silent, heartbeat_at=timeout)
    backdate(ctx, unclaimed, updated_at=timeout)
    old_task = row(ctx, silent).runner_task_id

    # Right after a gap in the sweeps (a database outage), old heartbeats prove nothing.
    assert sweeps.redrive(ctx).orphans_redispatched == []
    open_streak(ctx, ago=ctx.settings.orphan_timeout_seconds)
    report = sweeps.redrive(ctx)
    assert sorted(report.orphans_redispatched) == sorted([silent, unclaimed])
    moved = row(ctx, silent)
    assert moved.status == "queued" and moved.runner_task_id != old_task
    assert moved.redispatch_count == 1
    runs = queued_messages(redis_client, worker.RUNNER_QUEUE)
    assert sorted(str(wid) for _, wid in runs) == sorted([silent, unclaimed])
    assert sweeps.redrive(ctx).orphans_redispatched == []  # the new tasks get a timeout
    assert row(ctx, beating).redispatch_count == 0

    # With a message waiting in the runner queue, an unclaimed one is behind a backlog.
    backdate(ctx, unclaimed, updated_at=timeout)
    assert sweeps.redrive(ctx).orphans_redispatched == []

    # Bounded: past max_redispatches the workflow fails with a clear message.
    redis_client.delete(worker.RUNNER_QUEUE)
    for _ in range(ctx.settings.max_redispatches):
        backdate(ctx, silent, heartbeat_at=timeout)
        report = sweeps.redrive(ctx)
    assert report.orphans_failed == [silent]
    failed = row(ctx, silent)
    assert failed.status == "failed" and failed.exception_type == "RunnerTaskLost"
    assert "submit it again" in (failed.exception_message or "")


def accepted_on(ctx: Context, sim_url: str, name: str, prompt: dict[str, Any]) -> str:
    """A workflow accepted for an account whose one runner is the simulated server."""
    account_id, _ = make_account_and_runner(ctx.db, url=sim_url)
    with ctx.db.transaction() as session:
        return status.create_accepted(session, account_id, name=name, workflow_json=prompt).id


def test_a_superseded_runner_task_leaves_without_touching_the_prompt(ctx: Context) -> None:
    sim = start_in_thread(time_scale=1.0)
    try:
        wid = accepted_on(ctx, sim.url, "long", blur_chain(6))
        first_task = row(ctx, wid).runner_task_id
        # Another prompt keeps ComfyUI busy, so ours waits in its queue (status queued).
        blocker = httpx.post(f"{sim.url}/prompt", json={"prompt": blur_chain(4)})
        assert blocker.status_code == 200, blocker.text
        results: dict[str, str | None] = {}
        first = threading.Thread(target=lambda: results.update(
            first=runner.run(ctx, wid, task_id=first_task)))
        first.start()
        wait_for(ctx, wid, lambda w: w.queue_number is not None)
        # The orphan sweep re-dispatches it (as if the first task's heartbeats were lost).
        with ctx.db.transaction() as session:
            claim = manager.claim_redispatch(session, row(ctx, wid))
        assert claim is not None
        second = threading.Thread(target=lambda: results.update(
            second=runner.run(ctx, wid, task_id=claim.task_id)))
        second.start()
        first.join(timeout=10)
        assert not first.is_alive() and results["first"] is None
        second.join(timeout=30)
        done = row(ctx, wid)
        assert results["second"] == "completed" and done.status == "completed"
        # One prompt, run once, never cancelled: the second task adopted the first's.
        assert len(sim.sim._history) == 2 and done.prompt_id in sim.sim._history
        assert httpx.get(f"{sim.url}/sim/calls").json()["calls"] == []
    finally:
        sim.stop()


def wait_for(ctx: Context, workflow_id: str, check: object, timeout: float = 20) -> Workflow:
    deadline = time.monotonic() + timeout
    while True:
        found = row(ctx, workflow_id)
        if callable(check) and check(found):
            return found
        assert time.monotonic() < deadline, f"{workflow_id} stuck in {found.status}"
        time.sleep(0.1)


def database_name(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?")[0]


def test_a_runner_task_rides_out_a_database_outage(
    ctx: Context, postgres_url: str
) -> None:
    sim = start_in_thread(time_scale=1.0)
    admin = psycopg.connect(db.libpq_url(postgres_url), autocommit=True)
    name = database_name(ctx.settings.database_url)
    try:
        wid = accepted_on(ctx, sim.url, "through an outage", blur_chain(8))
        task_id = row(ctx, wid).runner_task_id
        results: dict[str, str | None] = {}
        thread = threading.Thread(target=lambda: results.update(
            ended=runner.run(ctx, wid, task_id=task_id)))
        thread.start()
        wait_for(ctx, wid, lambda w: w.status == "running")
        # The database goes away: no new connections, and the open ones are cut.
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        time.sleep(4)
        assert thread.is_alive()
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        thread.join(timeout=60)
        assert results.get("ended") == "completed"
        assert httpx.get(f"{sim.url}/sim/calls").json()["calls"] == []
        done = row(ctx, wid)
        assert done.status == "completed" and done.cancel_requested_at is None
        with ctx.db.transaction() as session:
            transitions = [e.to_status for e in manager.events_of(session, wid)
                           if e.kind == EventKind.TRANSITION]
        assert transitions == ["accepted", "uploaded", "queued", "running", "completed"]
    finally:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.close()
        sim.stop()


def test_claim_redispatch_needs_the_row_as_read(ctx: Context) -> None:
    account_id, runner_id = make_account_and_runner(ctx.db)
    wid = seed_workflow(ctx.db, account_id, runner_id, S.QUEUED)
    seen = row(ctx, wid)
    with ctx.db.transaction() as session:
        session.execute(update(Workflow).where(Workflow.id == wid).values(prompt_id="p1"))
    with ctx.db.transaction() as session:
        assert manager.claim_redispatch(session, seen) is None  # changed since it was read
        assert manager.claim_redispatch(session, row(ctx, wid)) is not None
