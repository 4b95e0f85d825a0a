"""Acceptance fixtures: the whole stack, on SQLite or on a real PostgreSQL server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.stack import Stack, running_stack


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'stack.db'}"
    return str(request.getfixturevalue("pg_database_url"))


@pytest.fixture
def stack(database_url: str, redis_db_url: str, tmp_path: Path) -> Iterator[Stack]:
    with running_stack(database_url, redis_db_url, tmp_path) as s:
        yield s


@pytest.fixture
def stack_factory(
    redis_db_url: str, tmp_path: Path, pg_database_url: str
) -> Callable[..., object]:
    """For tests that need other settings: ``with stack_factory(**overrides) as s``."""

    def make(**overrides: Any) -> object:
        return running_stack(pg_database_url, redis_db_url, tmp_path, **overrides)

    return make
