"""Shared test helpers: migrated databases and workflows brought to a status the legal way."""

from __future__ import annotations

import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from comfy_cancel import manager, status
from comfy_cancel.config import Settings
from comfy_cancel.db import Database, make_engine
from comfy_cancel.embedded.comfyui_sim import TINY_PROMPT
from comfy_cancel.migrations import upgrade
from comfy_cancel.models import WorkflowStatus

S = WorkflowStatus

# Steps through the lifecycle from accepted to each status, via the status writer only.
PATH_TO: dict[S, list[S]] = {
    S.ACCEPTED: [],
    S.UPLOADED: [S.UPLOADED],
    S.QUEUED: [S.UPLOADED, S.QUEUED],
    S.RUNNING: [S.UPLOADED, S.QUEUED, S.RUNNING],
    S.COMPLETED: [S.UPLOADED, S.QUEUED, S.RUNNING, S.COMPLETED],
    S.FAILED: [S.FAILED],
    S.CANCELLED: [S.UPLOADED, S.QUEUED, S.CANCELLED],
}


def migrate(url: str) -> None:
    """Bring the database at ``url`` to the latest schema.

    A SQLite file that does not exist yet becomes a copy of one migrated once per process:
    alembic takes about 0.2 s a run, the copy under a millisecond, and hundreds of tests
    start from an empty database. Anything else (an existing file, PostgreSQL) is migrated
    in place, as ``comfy-cancel migrate`` does."""
    path = _new_sqlite_file(url)
    if path is None:
        upgrade(url)
    else:
        shutil.copyfile(Path(_schema_template().name) / "template.db", path)


def migrated(url: str) -> Database:
    migrate(url)
    return Database(make_engine(url))


def _new_sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database)
    return None if path.exists() else path


@cache
def _schema_template() -> tempfile.TemporaryDirectory[str]:
    """A directory with ``template.db``, migrated to head; the cache keeps it for the
    process, and its finaliser removes it at exit."""
    directory = tempfile.TemporaryDirectory(prefix="comfy-cancel-schema-")
    path = Path(directory.name) / "template.db"
    upgrade(f"sqlite:///{path}")
    # Alembic's engine is disposed, so SQLite has folded its write-ahead log into the file:
    # the file alone is the whole schema.
    assert not path.with_name("template.db-wal").exists()
    return directory


# Test runners point at 127.0.0.1 (a simulated ComfyUI, or a closed port): allowed only
# because the operator says so (comfy_cancel.egress).
LOOPBACK = "127.0.0.0/8"
LOOPBACK_ALLOWED = Settings(runner_allowed_networks=LOOPBACK)


def make_account_and_runner(
    db: Database, account: str = "acme", url: str = "http://127.0.0.1:1"
) -> tuple[int, str]:
    with db.transaction() as session:
        acc = manager.get_or_create_account(session, account)
        runner = manager.add_runner(session, acc.id, name="r1", endpoint_url=url,
                                    settings=LOOPBACK_ALLOWED)
        return acc.id, runner.id


def seed_workflow(
    db: Database, account_id: int, runner_id: str, to: S = S.ACCEPTED, name: str = "wf"
) -> str:
    with db.transaction() as session:
        wf = status.create_accepted(session, account_id, name=name, workflow_json=TINY_PROMPT)
        workflow_id = wf.id
    for step in PATH_TO[to]:
        with db.transaction() as session:
            change = advance(session, workflow_id, step, runner_id)
            assert change.changed, f"seeding {workflow_id} to {step} failed: {change}"
    return workflow_id


def advance(session: Any, workflow_id: str, to: S, runner_id: str) -> status.Change:
    by = status.Actor("api", "tester", "test")
    if to is S.UPLOADED:
        return status.mark_uploaded(session, workflow_id, runner_id)
    if to is S.QUEUED:
        return status.mark_queued(session, workflow_id)
    if to is S.RUNNING:
        return status.mark_running(session, workflow_id)
    if to is S.COMPLETED:
        return status.complete_if_running(session, workflow_id, {"3": {"images": []}})
    if to is S.FAILED:
        return status.fail(session, workflow_id, exception_type="E", exception_message="boom")
    if to is S.CANCELLED:
        return status.cancel_if_active(session, workflow_id, by)
    raise AssertionError(to)
