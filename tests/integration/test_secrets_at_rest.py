"""Runner header values at rest (sealed, migrated from clear, wrong and missing keys) and
SQL parameters kept out of errors and logs, on SQLite and the real PostgreSQL."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from comfy_cancel import context, encryption, manager, runner
from comfy_cancel.config import Settings, get_settings
from comfy_cancel.db import Database, engine_for, make_engine
from comfy_cancel.migrations import upgrade
from comfy_cancel.models import Runner, WorkflowStatus
from testbed.database import migrated
from tests.helpers import seed_workflow

KEY = encryption.new_key()


@pytest.fixture
def secret_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("COMFY_CANCEL_SECRET_KEY", KEY)
    get_settings.cache_clear()
    context.reset()
    yield KEY
    get_settings.cache_clear()
    context.reset()


def _plaintext_runner_at_0002(url: str) -> None:
    upgrade(url, "0002")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO accounts (name, created_at) VALUES ('acme', '2026-01-01')"))
        for runner_id, headers in (("r-1", {"Authorization": "Bearer s3cret"}), ("r-2", {})):
            conn.execute(
                text("INSERT INTO runners (id, account_id, name, endpoint_url, headers, tags, "
                     "status, created_at, updated_at) VALUES (:id, 1, 'r', 'http://h:1', "
                     ":headers, '[]', 'active', '2026-01-01', '2026-01-01')"),
                {"id": runner_id, "headers": json.dumps(headers)},
            )
    engine.dispose()


def test_migration_seals_existing_plaintext_headers(tmp_path: Path, secret_key: str) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    _plaintext_runner_at_0002(url)
    upgrade(url)
    db = Database(make_engine(url))
    with db.transaction() as session:
        sealed = session.get(Runner, "r-1")
        empty = session.get(Runner, "r-2")
        assert sealed is not None and empty is not None
        assert sealed.header_names == ["Authorization"] and empty.header_names == []
        assert sealed.sealed_headers is not None and "s3cret" not in sealed.sealed_headers
        assert sealed.headers == {"Authorization": "Bearer s3cret"}
        assert empty.sealed_headers is None and empty.headers == {}
    db.engine.dispose()
    assert b"s3cret" not in (tmp_path / "m.db").read_bytes()


def test_migration_without_a_key_stops_and_keeps_the_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COMFY_CANCEL_SECRET_KEY", raising=False)
    get_settings.cache_clear()
    url = f"sqlite:///{tmp_path / 'm.db'}"
    _plaintext_runner_at_0002(url)
    with pytest.raises(encryption.SecretKeyMissing, match="COMFY_CANCEL_SECRET_KEY"):
        upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0002"
        stored = conn.execute(text("SELECT headers FROM runners WHERE id = 'r-1'")).scalar()
    engine.dispose()
    assert json.loads(str(stored)) == {"Authorization": "Bearer s3cret"}


def _runner_with_headers(db: Database) -> tuple[int, str]:
    """(account id, runner id) of a runner whose headers are sealed with the current key."""
    with db.transaction() as session:
        account = manager.get_or_create_account(session, "acme")
        runner = manager.add_runner(session, account.id, name="r", endpoint_url="http://h:1",
                                    headers={"X-Key": "v"})
        return account.id, runner.id


def test_a_wrong_key_is_a_clear_error(tmp_path: Path, secret_key: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    db = migrated(url)
    _, runner_id = _runner_with_headers(db)
    monkeypatch.setenv("COMFY_CANCEL_SECRET_KEY", encryption.new_key())
    get_settings.cache_clear()
    with db.transaction() as session:
        runner = manager.get_runner(session, runner_id)
        assert runner is not None and runner.header_names == ["X-Key"]
        with pytest.raises(encryption.SecretKeyWrong, match="not the key they were encrypted"):
            _ = runner.headers
    monkeypatch.delenv("COMFY_CANCEL_SECRET_KEY")
    get_settings.cache_clear()
    with db.transaction() as session:
        runner = manager.get_runner(session, runner_id)
        assert runner is not None
        with pytest.raises(encryption.SecretKeyMissing, match="cannot be decrypted"):
            _ = runner.headers
    db.engine.dispose()


def test_a_malformed_key_fails_at_startup() -> None:
    with pytest.raises(ValueError, match="not a list of Fernet keys"):
        Settings(secret_key="hunter2")


def test_failing_statements_never_carry_their_parameters(
    pg_database_url: str, secret_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """On PostgreSQL a NUL byte fails the statement; its error (and so every traceback in
    a log) must not print the row's other values, e.g. a runner's credentials."""
    db = migrated(pg_database_url)
    try:
        with db.transaction() as session:
            account_id = manager.get_or_create_account(session, "acme").id
        log = logging.getLogger("test.secrets")
        with caplog.at_level(logging.INFO), pytest.raises(sa_exc.DataError) as failed:
            try:
                with db.transaction() as session:
                    manager.add_runner(session, account_id, name="bad\x00name",
                                       endpoint_url="https://h/comfy?token=url-s3cret",
                                       headers={"Authorization": "Bearer header-s3cret"})
            except sa_exc.DataError:
                log.exception("the insert failed")
                raise
        assert "hide_parameters=True" in str(failed.value)
        for secret in ("url-s3cret", "header-s3cret", "bad\x00name"):
            assert secret not in str(failed.value)
            assert secret not in caplog.text
    finally:
        db.engine.dispose()
        engine_for.cache_clear()


def test_a_runner_worker_with_the_wrong_key_fails_the_workflow_clearly(
    tmp_path: Path, secret_key: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker that cannot open a runner's headers ends the workflow (never leaves it
    queued), tells the customer nothing about keys, and tells the operator which setting."""
    url = f"sqlite:///{tmp_path / 'w.db'}"
    db = migrated(url)
    account_id, runner_id = _runner_with_headers(db)
    workflow_id = seed_workflow(db, account_id, runner_id, WorkflowStatus.QUEUED)
    monkeypatch.setenv("COMFY_CANCEL_DATABASE_URL", url)
    monkeypatch.setenv("COMFY_CANCEL_SECRET_KEY", encryption.new_key())
    get_settings.cache_clear()
    context.reset()
    with caplog.at_level(logging.ERROR, logger="comfy_cancel.runner"):
        assert runner.run(context.current(), workflow_id) == WorkflowStatus.FAILED.value
    with db.transaction() as session:
        workflow = manager.get_workflow(session, workflow_id)
        assert workflow is not None and workflow.status == WorkflowStatus.FAILED.value
        assert workflow.exception_type == "RunnerUnavailable"
        assert "contact support" in (workflow.exception_message or "")
        assert "SECRET_KEY" not in (workflow.exception_message or "")
    assert "COMFY_CANCEL_SECRET_KEY" in caplog.text
    db.engine.dispose()
    engine_for.cache_clear()
