"""The connection pool on a real PostgreSQL server: a connection the server closed is never
handed out, and handing one out costs no round trip."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, text

from comfy_cancel import db


@pytest.fixture
def engine(pg_database_url: str) -> Iterator[Engine]:
    engine = db.make_engine(pg_database_url, pool_size=2, max_overflow=0)
    yield engine
    engine.dispose()


def _backend_pids(engine: Engine, count: int) -> list[int]:
    """Fill the pool with ``count`` connections; their server processes."""
    connections = [engine.connect() for _ in range(count)]
    pids = [c.execute(text("SELECT pg_backend_pid()")).scalar_one() for c in connections]
    for connection in connections:
        connection.close()
    return pids


def test_a_connection_the_server_closed_is_replaced_at_checkout(
    engine: Engine, pg_database_url: str
) -> None:
    stale = _backend_pids(engine, 2)
    with psycopg.connect(db.libpq_url(pg_database_url), autocommit=True) as admin:
        for pid in stale:
            assert admin.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone() == (True,)
        deadline = time.monotonic() + 10
        while admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)",
                            [stale]).fetchone() != (0,):
            assert time.monotonic() < deadline, "the backends did not exit"
            time.sleep(0.05)
    # Both pooled connections are dead: each checkout must notice and connect anew.
    fresh = _backend_pids(engine, 2)
    assert not set(fresh) & set(stale)
    with db.Database(engine).transaction() as session:
        assert session.execute(text("SELECT 1")).scalar_one() == 1


def test_a_checkout_sends_nothing_to_the_server(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _backend_pids(engine, 1)  # one idle connection in the pool
    sent: list[str] = []
    execute = psycopg.Cursor.execute

    def counted(self: psycopg.Cursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(str(query))
        return execute(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", counted)
    with db.Database(engine).autocommit() as connection:
        assert connection.execute(text("SELECT 41 + 1")).scalar_one() == 42
    assert sent == ["SELECT 41 + 1"]
