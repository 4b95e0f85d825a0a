"""Test data for the benchmarks.

Set-based seeding (``INSERT ... SELECT ... FROM generate_series``) writes rows directly,
statuses included: it is test setup, not the system under test, and the status writer
would take minutes for a million rows. The one exception is :func:`running_via_status_writer`,
which brings workflows to ``running`` the legal way (create, then ``uploaded``, ``queued``,
``running`` through :mod:`comfy_cancel.status`), with fresh heartbeats.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import text

from comfy_cancel import manager, status
from comfy_cancel.db import Database
from comfy_cancel.embedded.comfyui_sim import TINY_PROMPT

NOW = "(now() AT TIME ZONE 'utc')"  # naive UTC, as the models store times
PROMPT = json.dumps(TINY_PROMPT)


def account(db: Database, name: str, *, operator: bool = False) -> tuple[int, str]:
    """An account and a fresh API token of it, without a rate limit (the load is the point)."""
    with db.transaction() as session:
        acc = manager.get_or_create_account(session, name)
        return acc.id, manager.create_token(session, acc, operator=operator, rate_limit=0)


def vacuum_analyze(db: Database) -> None:
    """What autovacuum does after a bulk load (fresh statistics, the visibility map), done
    now: otherwise it runs inside the next measured window and is counted against it."""
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE workflows"))


def queued(db: Database, account_id: int, runner_id: str, count: int) -> list[str]:
    """``count`` workflows queued a minute ago whose runner task has not started yet,
    vacuumed and analyzed as autovacuum would after such an insert (it once cost the
    endpoint load 0.3-0.4 ms of PostgreSQL CPU per cancel, about half of its share)."""
    with db.transaction() as session:
        rows = session.execute(
            text(
                "INSERT INTO workflows (id, account_id, name, status, runner_id, tags, "
                "workflow_json, runner_task_id, created_at, updated_at) "
                f"SELECT gen_random_uuid()::text, :account_id, 'bench-' || g, 'queued', "
                f":runner_id, '[]', CAST(:prompt AS json), gen_random_uuid()::text, "
                f"{NOW} - interval '1 minute', {NOW} - interval '1 minute' "
                "FROM generate_series(1, :count) AS g RETURNING id"
            ),
            {"account_id": account_id, "runner_id": runner_id, "prompt": PROMPT,
             "count": count},
        ).scalars().all()
    vacuum_analyze(db)
    return list(rows)


def running_via_status_writer(
    db: Database, account_id: int, runner_id: str, count: int, threads: int = 2
) -> list[str]:
    """``count`` workflows at ``running`` (fresh heartbeat), every step a status write."""
    with db.transaction() as session:
        ids = [
            status.create_accepted(session, account_id, name=f"running-{n}",
                                   workflow_json=TINY_PROMPT).id
            for n in range(count)
        ]

    def advance(chunk: Sequence[str]) -> None:
        with db.transaction() as session:
            for workflow_id in chunk:
                for change in (
                    status.mark_uploaded(session, workflow_id, runner_id),
                    status.mark_queued(session, workflow_id),
                    status.mark_running(session, workflow_id),
                ):
                    assert change.changed, f"seeding {workflow_id}: {change}"

    chunks = [ids[n : n + 100] for n in range(0, len(ids), 100)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(advance, chunks))
    return ids


# --- the sweep's tables ----------------------------------------------------------------------


@dataclass(frozen=True)
class Stuck:
    """The 100 stuck workflows a sweep must find, by kind."""

    lost: list[str]  # running, no heartbeat for ten minutes: cancelled, ``runner_lost``
    overdue: list[str]  # running for two hours (past max run time): a cancel request
    stale_queued: list[str]  # queued for an hour, prompt never submitted: a cancel request
    open_intents: list[str]  # a cancel requested five minutes ago with no outcome: re-published

    @property
    def all(self) -> list[str]:
        return self.lost + self.overdue + self.stale_queued + self.open_intents


def history(db: Database, account_id: int, runner_id: str, count: int) -> list[str]:
    """``count`` finished workflows over the last 30 days (96% completed, 2% failed,
    2% cancelled), plus 500 running and 500 queued ones that are not stuck; returns the
    running ones' ids (:func:`keep_alive` refreshes their heartbeats)."""
    running: list[str] = []
    with db.transaction() as session:
        session.execute(
            text(
                "INSERT INTO workflows (id, account_id, name, status, runner_id, tags, "
                "workflow_json, runner_task_id, prompt_id, created_at, updated_at, "
                "started_at, completed_at, heartbeat_at, cancel_requested_at, "
                "cancel_source, cancel_outcome, cancel_finished_at) "
                "SELECT gen_random_uuid()::text, :account_id, 'history-' || g, "
                "CASE g % 50 WHEN 0 THEN 'failed' WHEN 1 THEN 'cancelled' ELSE 'completed' END, "
                ":runner_id, '[]', '{}', gen_random_uuid()::text, gen_random_uuid()::text, "
                "t, t + interval '70 seconds', t + interval '5 seconds', "
                "t + interval '70 seconds', t + interval '70 seconds', "
                "CASE g % 50 WHEN 1 THEN t + interval '60 seconds' END, "
                "CASE g % 50 WHEN 1 THEN 'api' END, "
                "CASE g % 50 WHEN 1 THEN 'cancelled' END, "
                "CASE g % 50 WHEN 1 THEN t + interval '70 seconds' END "
                f"FROM (SELECT g, {NOW} - interval '1 hour' - random() * interval '30 days' AS t "
                "      FROM generate_series(1, :count) AS g) AS s"
            ),
            {"account_id": account_id, "runner_id": runner_id, "count": count},
        )
        for state, extra in (("running", 500), ("queued", 500)):
            inserted = session.execute(
                text(
                    "INSERT INTO workflows (id, account_id, name, status, runner_id, tags, "
                    "workflow_json, runner_task_id, created_at, updated_at, started_at, "
                    "heartbeat_at) "
                    f"SELECT gen_random_uuid()::text, :account_id, 'active-' || g, :state, "
                    f":runner_id, '[]', '{{}}', gen_random_uuid()::text, "
                    f"{NOW} - interval '2 minutes', {NOW} - interval '1 minute', "
                    f"CASE WHEN :running THEN {NOW} - interval '1 minute' END, "
                    f"CASE WHEN :running THEN {NOW} END "
                    "FROM generate_series(1, :count) AS g RETURNING id"
                ),
                {"account_id": account_id, "runner_id": runner_id, "state": state,
                 "running": state == "running", "count": extra},
            ).scalars().all()
            if state == "running":
                running = list(inserted)
    return running


def keep_alive(db: Database, workflow_ids: list[str]) -> None:
    """Fresh heartbeats for running workflows that are not stuck (their runners are alive)."""
    with db.transaction() as session:
        session.execute(
            text(f"UPDATE workflows SET heartbeat_at = {NOW} WHERE id = ANY(:ids)"),
            {"ids": workflow_ids},
        )


def stuck(db: Database, account_id: int, runner_id: str, per_kind: int = 25) -> Stuck:
    """Insert the stuck ones (in their stuck state; :func:`make_stuck_again` resets them)."""
    kinds: dict[str, list[str]] = {}
    with db.transaction() as session:
        for kind in ("lost", "overdue", "stale_queued", "open_intents"):
            kinds[kind] = list(session.execute(
                text(
                    "INSERT INTO workflows (id, account_id, name, status, runner_id, tags, "
                    "workflow_json, runner_task_id, created_at, updated_at) "
                    f"SELECT gen_random_uuid()::text, :account_id, 'stuck-{kind}-' || g, "
                    f"'queued', :runner_id, '[]', '{{}}', gen_random_uuid()::text, {NOW}, {NOW} "
                    "FROM generate_series(1, :count) AS g RETURNING id"
                ),
                {"account_id": account_id, "runner_id": runner_id, "count": per_kind},
            ).scalars().all())
    result = Stuck(**kinds)
    make_stuck_again(db, result)
    return result


_STUCK_STATE = {
    "lost": (
        "status = 'running', started_at = {now} - interval '10 minutes', "
        "heartbeat_at = {now} - interval '10 minutes', updated_at = {now} - interval '10 minutes'"
    ),
    "overdue": (
        "status = 'running', started_at = {now} - interval '2 hours', heartbeat_at = {now}, "
        "updated_at = {now}"
    ),
    "stale_queued": (
        "status = 'queued', started_at = NULL, heartbeat_at = NULL, "
        "updated_at = {now} - interval '1 hour'"
    ),
    "open_intents": (
        "status = 'running', started_at = {now} - interval '6 minutes', heartbeat_at = {now}, "
        "updated_at = {now}, cancel_requested_at = {now} - interval '5 minutes', "
        "cancel_source = 'api', cancel_published_at = {now} - interval '5 minutes'"
    ),
}


def make_stuck_again(db: Database, workflows: Stuck) -> None:
    """Put the stuck ones back as they were before a sweep pass acted on them."""
    with db.transaction() as session:
        for kind, ids in vars(workflows).items():
            session.execute(
                text(
                    "UPDATE workflows SET completed_at = NULL, cancel_requested_at = NULL, "
                    "cancel_source = NULL, cancel_actor = NULL, cancel_reason = NULL, "
                    "cancel_published_at = NULL, cancel_outcome = NULL, "
                    "cancel_finished_at = NULL, prompt_id = NULL WHERE id = ANY(:ids)"
                ),
                {"ids": ids},
            )
            session.execute(
                text(
                    f"UPDATE workflows SET {_STUCK_STATE[kind].format(now=NOW)} "
                    "WHERE id = ANY(:ids)"
                ),
                {"ids": ids},
            )
