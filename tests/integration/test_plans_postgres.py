"""The plans PostgreSQL keeps for the hot statements. psycopg prepares a statement that a
connection runs often, and PostgreSQL then may switch to a generic plan, made without the
parameters' values, which guesses ten ids where a bulk chunk has thousands: a plan that
scans the whole table, or joins every pair of rows by a filter, then costs every bulk chunk
and every cancel batch that much (a nested loop over the updated and the audited rows once
took a bulk cancel of 100,000 queued workflows from 4.7 s to 10.7 s).
``EXPLAIN (GENERIC_PLAN)`` shows that plan."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import text
from sqlalchemy.sql.elements import ClauseElement

from comfy_cancel import status
from comfy_cancel.db import Database
from testbed.database import migrated
from tests.helpers import make_account_and_runner

HOT_STATEMENTS: dict[str, ClauseElement] = {
    "the cancel worker's and bulk's queued cancels": status._CANCEL_QUEUED_AND_AUDIT,
    "the API's group of a caller's requests": status._REQUEST_AND_AUDIT,
}


def _generic_plan(db: Database, statement: ClauseElement) -> str:
    sql = str(statement.compile(dialect=db.engine.dialect))
    names: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    numbered = re.sub(r"%\((\w+)\)s", placeholder, sql)
    with db.engine.connect() as connection:
        if (connection.dialect.server_version_info or (0,)) < (16,):
            pytest.skip("EXPLAIN (GENERIC_PLAN) needs PostgreSQL 16")
        rows = connection.exec_driver_sql(f"EXPLAIN (GENERIC_PLAN) {numbered}").all()
    return "\n".join(row[0] for row in rows)


@pytest.mark.postgres
@pytest.mark.parametrize("name", sorted(HOT_STATEMENTS))
def test_the_generic_plan_of_a_hot_statement_scans_nothing_whole(
    pg_database_url: str, name: str
) -> None:
    db = migrated(pg_database_url)
    account_id, runner_id = make_account_and_runner(db)
    # Enough rows that a scan costs what it does in production.
    with db.engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO workflows (id, account_id, name, status, runner_id, tags, "
            "workflow_json, created_at, updated_at) SELECT gen_random_uuid()::text, :account, "
            "'w' || g, 'queued', :runner, '[]', '{}', now(), now() "
            "FROM generate_series(1, 50000) AS g"), {"account": account_id, "runner": runner_id})
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("ANALYZE workflows"))
    plan = _generic_plan(db, HOT_STATEMENTS[name])
    assert "Seq Scan on workflows" not in plan, plan
    # A join by a filter over every pair of rows: quadratic in the ids of a chunk.
    assert "Join Filter" not in plan, plan
