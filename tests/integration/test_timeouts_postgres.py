"""The timeout pass (sweeps.cancel_timed_out) against real PostgreSQL and Redis: a row
another transaction holds is skipped, not waited for, and two passes at once request each
cancel once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from sqlalchemy import select, update

from comfy_cancel import manager, sweeps, worker
from comfy_cancel.config import Settings
from comfy_cancel.context import Context
from comfy_cancel.models import Workflow, WorkflowStatus, utcnow
from testbed.database import migrated
from tests.helpers import make_account_and_runner, seed_workflow, twice_at_once
from tests.integration.test_sweeps import queued_messages

pytestmark = pytest.mark.postgres
S = WorkflowStatus


@pytest.fixture
def ctx(pg_database_url: str, redis_db_url: str) -> Iterator[Context]:
    settings = Settings(database_url=pg_database_url, redis_url=redis_db_url)
    migrated(pg_database_url)
    worker.configure(settings)
    yield Context(settings)
    worker.configure(Settings())


def past_deadline(ctx: Context, count: int) -> list[str]:
    account_id, runner_id = make_account_and_runner(ctx.db)
    ids = [seed_workflow(ctx.db, account_id, runner_id, to)
           for to in [S.RUNNING, S.QUEUED] * (count // 2) + [S.RUNNING] * (count % 2)]
    with ctx.db.transaction() as session:  # test setup, not a status write
        session.execute(update(Workflow).where(Workflow.id.in_(ids)).values(
            timeout_seconds=1, deadline_at=utcnow() - timedelta(seconds=1)))
    return ids


def test_a_row_another_transaction_holds_is_skipped_not_waited_for(
    ctx: Context, redis_client: redis.Redis
) -> None:
    held, free = past_deadline(ctx, 2)
    requested: list[str] = []
    with ctx.db.transaction() as holder:  # e.g. its runner writing it
        holder.execute(select(Workflow.id).where(Workflow.id == held).with_for_update())
        passing = threading.Thread(target=lambda: requested.extend(
            sweeps.cancel_timed_out(Context(ctx.settings))))
        passing.start()
        passing.join(60)  # it would wait for the holder forever without SKIP LOCKED
        assert not passing.is_alive()
    assert requested == [free]
    assert sweeps.cancel_timed_out(ctx) == [held]  # released: the next pass takes it
    messages = queued_messages(redis_client, worker.CANCEL_QUEUE)
    assert sorted(ids[0] for _, ids in messages) == sorted([free, held])  # one message each
    with ctx.db.transaction() as session:
        rows = [manager.get_workflow(session, w) for w in (held, free)]
    assert all(r is not None and r.cancel_source == "deadline" for r in rows)


def test_two_passes_at_once_request_each_cancel_once(
    ctx: Context, redis_client: redis.Redis
) -> None:
    due = past_deadline(ctx, 40)
    found = twice_at_once(ctx, sweeps.cancel_timed_out)  # two cancel workers
    requested = [w for ids in found for w in ids]
    assert sorted(requested) == sorted(due)  # each once, between them
    published = [w for _, ids in queued_messages(redis_client, worker.CANCEL_QUEUE) for w in ids]
    assert sorted(published) == sorted(due)
    assert sweeps.cancel_timed_out(ctx) == []
