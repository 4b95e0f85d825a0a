"""Shared fixtures: real Redis and PostgreSQL servers, started once per session.

``COMFY_CANCEL_TEST_REDIS_URL`` / ``COMFY_CANCEL_TEST_POSTGRES_URL`` point the tests at
servers someone else runs; otherwise :mod:`comfy_cancel.embedded.redis_server` and
:mod:`testbed.postgres` start local ones (the binaries come with the dev extras). A server
that cannot be had skips its tests when run by hand, and fails them when ``CI=true``: in CI
a silently skipped integration suite would look green."""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Callable, Iterator
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from hypothesis import settings

from comfy_cancel import db
from comfy_cancel.embedded import processes, redis_server
from testbed import postgres

REDIS_ENV = "COMFY_CANCEL_TEST_REDIS_URL"
POSTGRES_ENV = "COMFY_CANCEL_TEST_POSTGRES_URL"
# Tests use their own db index so a shared server's db 0 is never flushed.
REDIS_TEST_DB = 15


# Property tests (tests/unit/test_status_properties.py): enough examples by default to
# walk every rule many times within a few seconds; `--hypothesis-profile=thorough` (the
# Hypothesis plugin's option) for a long search. Loaded here, before any test module makes
# its settings; the option, if given, replaces it afterwards.
settings.register_profile("quick", max_examples=30)
settings.register_profile("thorough", max_examples=1000)
settings.load_profile("quick")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _unavailable(what: str, why: str) -> NoReturn:
    why = " ".join(why.split())  # driver errors span lines; the reason should be one
    if in_ci():
        pytest.fail(f"{what} is unavailable under CI=true: {why}", pytrace=False)
    pytest.skip(f"{what} is unavailable: {why}")


def pytest_collection_finish(session: pytest.Session) -> None:
    # What is loaded by now (the libraries, the package, the collected tests) lives to the
    # end of the run. Frozen, it is no longer scanned by every full collection of the cyclic
    # garbage collector: about 2 s less CPU in a unit run.
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that use the real-server fixtures get the markers, so `-m "not postgres"` works
    # without every test having to remember the decorator.
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & {"redis_url", "redis_db_url", "redis_client"}:
            item.add_marker(pytest.mark.redis)
        if names & {"postgres_url", "pg_database_url", "pg_database_factory"}:
            item.add_marker(pytest.mark.postgres)


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis server for the whole session (db 0 of it)."""
    external = os.environ.get(REDIS_ENV)
    if external:
        client = redis.Redis.from_url(external, socket_connect_timeout=5)
        try:
            client.ping()
        except redis.RedisError as exc:
            _unavailable("Redis", f"{REDIS_ENV}={external} does not answer PING ({exc})")
        finally:
            client.close()
        yield external
        return
    try:
        server = redis_server.start_redis()
    except processes.ServiceError as exc:
        _unavailable("Redis", str(exc))
    try:
        yield server.url
    finally:
        server.stop()


def with_db_index(url: str, index: int) -> str:
    """The Redis URL with its db index replaced (a path index beats redis-py's db=)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{index}"))


@pytest.fixture
def redis_db_url(redis_url: str) -> str:
    """URL of the dedicated test db index, emptied before the test (e.g. a Celery broker)."""
    url = with_db_index(redis_url, REDIS_TEST_DB)
    client = redis.Redis.from_url(url)
    try:
        # FLUSHDB, not FLUSHALL: only the tests' own index, whatever else shares the server.
        client.flushdb()
    finally:
        client.close()
    return url


@pytest.fixture
def redis_client(redis_db_url: str) -> Iterator[redis.Redis]:
    """A client on the emptied test db index (bytes responses, redis-py's default)."""
    client = redis.Redis.from_url(redis_db_url)
    try:
        yield client
    finally:
        client.close()


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL (postgresql+psycopg://) of a real PostgreSQL server's maintenance db."""
    external = os.environ.get(POSTGRES_ENV)
    if external:
        url = postgres.sqlalchemy_url(external)
        try:
            with psycopg.connect(db.libpq_url(url), connect_timeout=5) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            _unavailable("PostgreSQL", f"cannot connect to {POSTGRES_ENV}={external} ({exc})")
        yield url
        return
    try:
        # fast: no fsync; the data lives as long as the session.
        server = postgres.start_postgres(fast=True)
    except processes.ServiceError as exc:
        _unavailable("PostgreSQL", str(exc))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def pg_database_factory(postgres_url: str) -> Iterator[Callable[[], str]]:
    """Call it for a fresh, empty database (its SQLAlchemy URL); all are dropped after."""
    created: list[str] = []

    def make() -> str:
        name = f"cc_test_{uuid.uuid4().hex[:16]}"
        url = postgres.create_database(postgres_url, name)
        created.append(name)
        return url

    yield make
    for name in created:
        postgres.drop_database(postgres_url, name)


@pytest.fixture
def pg_database_url(pg_database_factory: Callable[[], str]) -> str:
    """SQLAlchemy URL of a fresh, empty database of its own for this test."""
    return pg_database_factory()
