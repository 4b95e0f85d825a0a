"""Engines and transactions for PostgreSQL (production) and SQLite (embedded default)."""

from __future__ import annotations

import select
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from sqlalchemy import create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from comfy_cancel.config import get_settings

# The execution option of Database.reading's sessions (see _configure_sqlite).
READ_ONLY = "comfy_cancel_read_only"


def libpq_url(url: str) -> str:
    """``postgresql+psycopg://...`` -> ``postgresql://...``, the form psycopg.connect takes."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    return urlunsplit(parts._replace(scheme="postgresql" if scheme == "postgres" else scheme))


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine with what each backend needs for many processes writing at once.

    Statement parameters are never put into errors (``hide_parameters``): a failing
    statement's message ends up in logs, and its parameters can be a runner's sealed
    headers, a token hash or a customer's workflow."""
    kwargs.setdefault("hide_parameters", True)
    if url.startswith("sqlite"):
        connect_args = {"timeout": 30, "check_same_thread": False}
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        _configure_sqlite(engine)
        return engine
    settings = get_settings()
    # A pool smaller than the threads that use it opens and closes a PostgreSQL backend
    # per checkout under load: that churn cost more than the cancels themselves.
    kwargs.setdefault("pool_size", settings.db_pool_size)
    kwargs.setdefault("max_overflow", settings.db_max_overflow)
    engine = create_engine(url, **kwargs)
    _discard_closed_connections(engine)
    return engine


def _discard_closed_connections(engine: Engine) -> None:
    """Hand out no pooled connection that the server has closed (a restart, a killed
    backend), checked without a round trip: an idle connection's socket has nothing to
    read unless the server said goodbye (or, rarely, sent a notice; that connection is
    replaced too). ``pool_pre_ping`` would send a query on every checkout instead: a
    second round trip for a one-statement transaction such as the API's cancel."""

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        try:
            poller = select.poll()  # not select.select: a busy process has fds past 1024
            poller.register(dbapi_connection.fileno(), select.POLLIN)
            closed = bool(poller.poll(0))
        except (OSError, ValueError, psycopg.Error):
            closed = True
        if closed:
            # The pool throws it away and checks out another (or connects anew).
            raise sa_exc.DisconnectionError("the server closed this pooled connection")


def _configure_sqlite(engine: Engine) -> None:
    # WAL lets readers run beside the writer; the busy timeout makes writers wait their
    # turn instead of failing with "database is locked". BEGIN IMMEDIATE takes the write
    # lock up front: a deferred transaction that upgrades to a write later can fail at once
    # with SQLITE_BUSY when another process committed meanwhile, whatever the timeout. A
    # read-only session (Database.reading) begins nothing: each read gets its own snapshot,
    # and a process frozen or slow inside one blocks no writer.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if not conn.get_execution_options().get(READ_ONLY):
            conn.exec_driver_sql("BEGIN IMMEDIATE")


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """One engine (one pool) per URL per process."""
    return make_engine(url)


class Database:
    """Hands out sessions on one engine; every write happens inside ``transaction()``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # The same pool; each statement commits on its own.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._readers = sessionmaker(engine.execution_options(**{READ_ONLY: True}),
                                     expire_on_commit=False)

    @classmethod
    def from_url(cls, url: str) -> Database:
        return cls(engine_for(url))

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work commits on success and rolls back on error."""
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """A Core connection on which each statement commits by itself: for a unit of work
        that is one statement, without the BEGIN and COMMIT round trips."""
        with self._autocommit.connect() as connection:
            yield connection

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads only, which takes no lock on SQLite: for a periodic check
        that usually finds nothing to write."""
        with self._readers() as session, session.begin():
            yield session
