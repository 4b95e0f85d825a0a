"""Retrying what may fail for a moment: database round trips and calls to ComfyUI.

One policy object per kind of failure, built on tenacity, so no caller hand-writes a
loop. A runner task uses them to ride out a database outage shorter than the heartbeat
timeout (the database decides, so every unit it retries is a whole transaction whose
writes are compare-and-sets: running one twice changes nothing more).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_exponential_jitter,
)

from comfy_cancel.comfyui import ComfyUIError
from comfy_cancel.db import Database

log = logging.getLogger(__name__)
T = TypeVar("T")

# Backoff between attempts at the database: quick at first (a dropped connection is
# replaced at once by the pool's pre-ping), at most this many seconds apart after.
DATABASE_MAX_WAIT_SECONDS = 2.0


def is_transient_database_error(exc: BaseException) -> bool:
    """A database error worth another attempt: unreachable, restarting, a dropped
    connection, a busy pool, SQLite's "database is locked" or a deadlock victim."""
    if isinstance(exc, sa_exc.DBAPIError):
        return exc.connection_invalidated or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError
        )
    return isinstance(exc, sa_exc.TimeoutError)  # no pooled connection free in time


def _log_database_retry(what: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        # The first failure at WARNING, the rest at DEBUG: an outage would otherwise log a
        # line per runner per attempt.
        level = logging.WARNING if state.attempt_number == 1 else logging.DEBUG
        exc = state.outcome.exception() if state.outcome else None
        log.log(level, "database unavailable for %s (attempt %d), retrying: %s",
                what, state.attempt_number, type(exc).__name__)

    return before_sleep


def database_retrying(what: str, give_up_after: float) -> Retrying:
    """Retry transient database errors with jittered exponential backoff for up to
    ``give_up_after`` seconds, then re-raise the last error."""
    return Retrying(
        retry=retry_if_exception(is_transient_database_error),
        wait=wait_exponential_jitter(initial=0.1, max=DATABASE_MAX_WAIT_SECONDS, jitter=0.2),
        stop=stop_after_delay(give_up_after),
        before_sleep=_log_database_retry(what),
        reraise=True,
    )


def in_transaction(
    db: Database, work: Callable[[Session], T], *, what: str, give_up_after: float
) -> T:
    """Run ``work`` in its own transaction, the whole transaction again on a transient
    database error (so ``work`` must be safe to run twice: a commit whose answer was lost
    may have landed)."""

    def attempt() -> T:
        with db.transaction() as session:
            return work(session)

    return database_retrying(what, give_up_after)(attempt)


def comfyui_retrying(attempts: int, first_wait: float = 0.2) -> Retrying:
    """Retry a ComfyUI call ``attempts`` times in all, waiting 0.2, 0.4, 0.8 ... s."""
    return Retrying(
        retry=retry_if_exception_type(ComfyUIError),
        wait=wait_exponential(multiplier=first_wait, exp_base=2, min=first_wait),
        stop=stop_after_attempt(max(1, attempts)),
        reraise=True,
    )
