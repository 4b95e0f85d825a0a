"""The retry policies: transient database errors are retried with the whole transaction,
anything else is not; ComfyUI calls get a bounded number of attempts."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from comfy_cancel import retries
from comfy_cancel.comfyui import ComfyUIError
from comfy_cancel.models import Account
from testbed.database import migrated


def test_a_transient_database_error_reruns_the_whole_transaction(tmp_path: Path) -> None:
    db = migrated(f"sqlite:///{tmp_path / 'r.db'}")
    attempts: list[int] = []

    def work(session: Session) -> int:
        session.add(Account(name=f"a{len(attempts)}"))
        attempts.append(1)
        if len(attempts) < 3:
            raise OperationalError("INSERT", {}, Exception("server closed the connection"))
        return len(attempts)

    assert retries.in_transaction(db, work, what="test", give_up_after=10) == 3
    with db.transaction() as session:
        names = session.execute(select(Account.name)).scalars().all()
    assert names == ["a2"]  # the failed attempts were rolled back


def test_other_errors_are_not_retried_and_a_long_outage_gives_up(tmp_path: Path) -> None:
    db = migrated(f"sqlite:///{tmp_path / 'r.db'}")
    calls: list[int] = []

    def broken(session: Session) -> None:
        calls.append(1)
        raise IntegrityError("INSERT", {}, Exception("duplicate"))

    with pytest.raises(IntegrityError):
        retries.in_transaction(db, broken, what="test", give_up_after=10)
    assert calls == [1]

    def down(session: Session) -> None:
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    with pytest.raises(OperationalError):
        retries.in_transaction(db, down, what="test", give_up_after=0.3)


def test_comfyui_calls_get_a_bounded_number_of_attempts() -> None:
    calls: list[int] = []
    with pytest.raises(ComfyUIError):
        for attempt in retries.comfyui_retrying(3, first_wait=0.01):
            with attempt:
                calls.append(1)
                raise ComfyUIError("unreachable")
    assert len(calls) == 3
