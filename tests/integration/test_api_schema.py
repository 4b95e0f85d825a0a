"""Schemathesis over the API's own ``/openapi.json``, with real tokens: no 5xx, and every
answer (status, content type, headers, body) as the document says.

Bounded for CI (a fixed number of examples per operation, derandomized: the same cases
every run), on SQLite, the real Redis of the test session (rate limits, readiness) and
Celery publishing into kombu's in-memory transport (tests/apitest.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from testbed.database import migrate
from tests.apitest import Env, make_env

EXAMPLES_PER_OPERATION = 40
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


@pytest.fixture
def api(tmp_path: Path, broker: Any, redis_db_url: str) -> Iterator[Env]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(url)
    yield from make_env(url, redis_url=redis_db_url)


@pytest.fixture
def api_schema(api: Env) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", api.app)


@pytest.fixture
def tokens(api: Env) -> dict[str, dict[str, str]]:
    """Unlimited tokens (the run makes hundreds of calls), and real objects for some ids."""
    api.workflow()
    api.runner_id()
    return {"customer": api.auth(rate_limit=0),
            "operator": api.auth("ops", operator=True, rate_limit=0)}


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, deadline=None,
          suppress_health_check=list(HealthCheck), database=None)
def test_the_api_keeps_its_openapi_contract(
    case: schemathesis.Case, tokens: dict[str, dict[str, str]]
) -> None:
    headers = tokens["operator" if case.path.startswith("/v1/admin") else "customer"]
    case.call_and_validate(headers=headers, checks=CHECKS)
