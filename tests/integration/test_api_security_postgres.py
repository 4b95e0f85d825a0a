"""NUL characters and lone surrogates on a real PostgreSQL server: the tests of
tests/unit/test_api_security.py that take ``store_env`` (SQLite there), collected again
here with the API on PostgreSQL. PostgreSQL fails a statement with either in its text, so
only here does a missed check show as a 500 instead of a stored row."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from testbed.database import migrate
from tests.apitest import Env, make_env
from tests.unit.test_api_security import (  # noqa: F401  (collected here too)
    test_a_nul_character_in_any_string_input_is_400,
    test_lone_surrogates_are_400,
)


@pytest.fixture
def store_env(pg_database_url: str, broker: Any) -> Iterator[Env]:
    migrate(pg_database_url)
    yield from make_env(pg_database_url)
