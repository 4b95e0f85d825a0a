"""The operator page's reads, on PostgreSQL and SQLite: read only (no write, no write lock),
and each of its own statements goes through an index, so a page left open costs what it
shows, not the size of the table. Statements are captured as they run and explained with
the same parameters."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from comfy_cancel import manager, ops, status
from comfy_cancel.config import Settings
from comfy_cancel.context import Context
from comfy_cancel.models import CancelOutcome, WorkflowStatus, utcnow
from testbed.database import migrate
from tests.helpers import make_account_and_runner, seed_workflow

S = WorkflowStatus
Statement = tuple[str, Any]
BY = status.Actor("api", "tester", "test")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ctx(request: pytest.FixtureRequest, tmp_path: Path) -> Context:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ops.db'}"
    else:
        url = str(request.getfixturevalue("pg_database_url"))
    migrate(url)
    # Redis is never reached: the sweeps' dry run asks it nothing.
    return Context(Settings(database_url=url, redis_url="redis://127.0.0.1:1/0"))


@pytest.fixture
def seeded(ctx: Context) -> Context:
    """A little of everything the page reads: open requests, finished cancels, others."""
    account_id, runner_id = make_account_and_runner(ctx.db)
    for to in ("queued", "running", "running", "completed"):
        seed_workflow(ctx.db, account_id, runner_id, S(to))
    open_ = seed_workflow(ctx.db, account_id, runner_id, S.RUNNING)
    done = seed_workflow(ctx.db, account_id, runner_id, S.QUEUED)
    with ctx.db.transaction() as session:
        status.request_cancel(session, open_, BY, publishing=True)
        status.request_cancel(session, done, BY, publishing=True)
        status.cancel_if_active(session, done, BY, CancelOutcome.CANCELLED)
    return ctx


@contextmanager
def captured(ctx: Context) -> Iterator[list[Statement]]:
    statements: list[Statement] = []

    def grab(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    event.listen(ctx.db.engine, "before_cursor_execute", grab)
    try:
        yield statements
    finally:
        event.remove(ctx.db.engine, "before_cursor_execute", grab)


def plan(ctx: Context, statement: Statement) -> str:
    """How the database runs ``statement``; on PostgreSQL with sequential scans priced out,
    so the plan names an index whenever one can serve it (a tiny table would not tell)."""
    sql, parameters = statement
    sqlite = ctx.db.engine.dialect.name == "sqlite"
    with ctx.db.engine.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        if not sqlite:
            cursor.execute("SET enable_seqscan = off")
        cursor.execute(("EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN ") + sql, parameters)
        lines = [" ".join(str(v) for v in row) for row in cursor.fetchall()]
        if not sqlite:
            cursor.execute("RESET enable_seqscan")
    return "\n".join(lines)


def test_the_page_reads_and_never_writes(seeded: Context) -> None:
    now = utcnow()
    with captured(seeded) as statements:
        stuck = ops._stuck(seeded, now)
        cancels = ops._cancels(seeded, now)
    assert cancels["open_cancels"]["count"] == 1 and cancels["recent"]["total"] == 1
    assert len(stuck) == len(ops.STUCK_KINDS)
    verbs = {sql.split()[0].upper() for sql, _ in statements}
    # No UPDATE, no INSERT; on SQLite no BEGIN IMMEDIATE (the write lock) either.
    assert verbs <= {"SELECT", "BEGIN", "COMMIT", "ROLLBACK"}, verbs
    assert not any("IMMEDIATE" in sql.upper() for sql, _ in statements)


def test_open_cancels_are_read_through_the_partial_index_of_open_intents(
    seeded: Context,
) -> None:
    with captured(seeded) as statements, seeded.db.reading() as session:
        found = manager.open_cancels(session, 5)
    assert found.count == 1 and len(found.oldest) == 1
    selects = [s for s in statements if s[0].lstrip().upper().startswith("SELECT")]
    assert len(selects) == 2
    for statement in selects:
        assert "ix_workflows_open_cancel" in plan(seeded, statement), statement[0]


def test_recent_cancels_are_read_through_the_status_and_update_time_index(
    seeded: Context,
) -> None:
    with captured(seeded) as statements, seeded.db.reading() as session:
        found = manager.cancels_finished_since(session, utcnow() - timedelta(hours=1), 100)
    assert [c.outcome for c in found] == ["cancelled"]
    (statement,) = [s for s in statements if s[0].lstrip().upper().startswith("SELECT")]
    assert "ix_workflows_status_updated" in plan(seeded, statement)
