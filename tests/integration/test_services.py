"""The shared fixtures give real servers over TCP, not stand-ins.

Each test here fails if a fixture hands out a fake (fakeredis, SQLite), a shared database,
or a db that is not emptied between tests.
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

import psycopg
import pytest
import redis
from sqlalchemy import create_engine, text

from comfy_cancel import db
from testbed import postgres


def _dbname(url: str) -> str:
    return unquote(urlsplit(url).path.lstrip("/"))


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    deadline = time.monotonic() + 5
    while len(data) < size and time.monotonic() < deadline:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


# --------------------------------------------------------------------------- Redis


def test_redis_is_a_real_server_answering_over_tcp(
    redis_client: redis.Redis, redis_db_url: str
) -> None:
    info = redis_client.info("server")
    version = str(info["redis_version"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    assert int(version.split(".")[0]) >= 5
    assert int(info["tcp_port"]) > 0

    # SET on one connection, GET on an independent one: the state lives in the server.
    key, value = f"probe:{uuid.uuid4().hex}", b"\x00payload\xff"
    assert redis_client.set(key, value, ex=60)
    other = redis.Redis.from_url(redis_db_url)
    try:
        assert other.get(key) == value
    finally:
        other.close()

    # Speak RESP on a bare socket: only a real server listening on that port answers.
    parts = urlsplit(redis_db_url)
    if parts.password:
        pytest.skip("raw-socket probe needs an unauthenticated server")
    db = parts.path.lstrip("/")
    request = (
        f"*2\r\n$6\r\nSELECT\r\n${len(db)}\r\n{db}\r\n".encode()
        + f"*2\r\n$3\r\nGET\r\n${len(key)}\r\n{key}\r\n".encode()
    )
    expected = b"+OK\r\n" + f"${len(value)}\r\n".encode() + value + b"\r\n"
    with socket.create_connection((parts.hostname or "", parts.port or 6379), timeout=5) as sock:
        sock.sendall(request)
        assert _recv_exactly(sock, len(expected)) == expected


@pytest.mark.parametrize("run", [1, 2])
def test_redis_client_starts_on_an_empty_dedicated_db(redis_client: redis.Redis, run: int) -> None:
    assert redis_client.connection_pool.connection_kwargs["db"] != 0
    # Whichever run goes second finds the other's key unless the fixture flushed the db.
    assert redis_client.dbsize() == 0
    redis_client.set("leftover", run)


# --------------------------------------------------------------------------- PostgreSQL


def test_postgres_is_a_real_server(pg_database_url: str) -> None:
    with psycopg.connect(db.libpq_url(pg_database_url)) as conn:
        row = conn.execute("SELECT version(), current_database()").fetchone()
        assert row is not None
        assert row[0].startswith("PostgreSQL "), row[0]
        assert row[1] == _dbname(pg_database_url)
        if not os.environ.get("COMFY_CANCEL_TEST_POSTGRES_URL"):
            # Our own server: sized for many concurrent workers.
            limit = conn.execute("SHOW max_connections").fetchone()
            assert limit is not None and int(limit[0]) >= 300


def test_two_connections_see_each_others_committed_rows(pg_database_url: str) -> None:
    url = db.libpq_url(pg_database_url)
    with psycopg.connect(url) as a, psycopg.connect(url) as b:
        pid_a = a.execute("SELECT pg_backend_pid()").fetchone()
        pid_b = b.execute("SELECT pg_backend_pid()").fetchone()
        assert pid_a != pid_b
        a.execute("CREATE TABLE notes (id int PRIMARY KEY, author text NOT NULL)")
        a.commit()
        b.rollback()  # leave b's snapshot so it sees the new table

        a.execute("INSERT INTO notes VALUES (1, 'a')")
        # Not yet committed: another session must not see it.
        assert b.execute("SELECT count(*) FROM notes").fetchone() == (0,)
        b.rollback()
        a.commit()
        assert b.execute("SELECT id, author FROM notes").fetchall() == [(1, "a")]
        b.execute("INSERT INTO notes VALUES (2, 'b')")
        b.commit()
        a.rollback()
        assert a.execute("SELECT id, author FROM notes ORDER BY id").fetchall() == [
            (1, "a"),
            (2, "b"),
        ]


def test_sqlalchemy_uses_psycopg3_with_the_url(pg_database_url: str) -> None:
    engine = create_engine(pg_database_url)
    try:
        assert engine.dialect.name == "postgresql"
        assert engine.dialect.driver == "psycopg"
        with engine.connect() as conn:
            assert conn.execute(text("SELECT current_database()")).scalar() == _dbname(
                pg_database_url
            )
    finally:
        engine.dispose()


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_a_fresh_empty_database(pg_database_url: str, run: int) -> None:
    with psycopg.connect(db.libpq_url(pg_database_url)) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        assert tables == (0,)
        # Same name in both runs: the second fails if it gets the first's database.
        conn.execute("CREATE TABLE leftover (run int)")
        conn.execute("INSERT INTO leftover VALUES (%s)", (run,))


def test_two_database_urls_are_distinct_databases(
    pg_database_url: str, pg_database_factory: Callable[[], str]
) -> None:
    other_url = pg_database_factory()
    assert _dbname(other_url) != _dbname(pg_database_url)
    with psycopg.connect(db.libpq_url(pg_database_url)) as first:
        first.execute("CREATE TABLE only_here (x int)")
        first.commit()
    with psycopg.connect(db.libpq_url(other_url)) as second:
        assert second.execute("SELECT current_database()").fetchone() == (_dbname(other_url),)
        found = second.execute("SELECT to_regclass('public.only_here')").fetchone()
        assert found == (None,)


def test_dropped_databases_are_gone(postgres_url: str) -> None:
    name = f"cc_drop_{uuid.uuid4().hex[:12]}"
    url = postgres.create_database(postgres_url, name)
    with psycopg.connect(db.libpq_url(url)):  # an open session must not block the drop
        postgres.drop_database(postgres_url, name)
    with psycopg.connect(db.libpq_url(postgres_url)) as conn:
        row = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,))
        assert row.fetchone() == (0,)
