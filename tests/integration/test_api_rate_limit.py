"""Per-token rate limits of the API, counted in a real Redis."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.database import migrate
from tests.apitest import UNREACHABLE, Env, error, make_env

LIMIT, WINDOW = 5, 2


@pytest.fixture
def limited(tmp_path: Path, broker: Any, redis_db_url: str) -> Iterator[Env]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(url)
    yield from make_env(url, redis_url=redis_db_url, rate_limit_requests=LIMIT,
                        rate_limit_window_seconds=WINDOW)


def _at_window_start() -> None:
    # Start at the beginning of a window, so a test's burst falls in one.
    time.sleep(WINDOW - time.time() % WINDOW + 0.01)


def test_a_token_past_its_limit_gets_429_with_retry_after(limited: Env) -> None:
    env, headers, other = limited, limited.auth(), limited.auth("globex")
    _at_window_start()
    codes = [env.client.get("/v1/workflow", headers=headers).status_code
             for _ in range(LIMIT)]
    refused = env.client.get("/v1/runner", headers=headers)  # every route counts
    assert codes == [200] * LIMIT
    message = error(refused, 429)
    assert f"may make {LIMIT} every {WINDOW} s" in message
    assert 1 <= int(refused.headers["retry-after"]) <= WINDOW
    # Another token has its own budget; health checks and the documents have none.
    assert env.client.get("/v1/workflow", headers=other).status_code == 200
    assert all(env.client.get("/healthz").status_code == 200 for _ in range(3 * LIMIT))
    assert env.client.get("/openapi.json").status_code == 200
    time.sleep(int(refused.headers["retry-after"]) + 0.05)
    assert env.client.get("/v1/workflow", headers=headers).status_code == 200


def test_a_tokens_own_limit_wins_and_zero_is_unlimited(limited: Env) -> None:
    env = limited
    tight, unlimited = env.auth(rate_limit=2), env.auth(rate_limit=0)
    _at_window_start()
    codes = [env.client.get("/v1/workflow", headers=tight).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    assert all(env.client.get("/v1/workflow", headers=unlimited).status_code == 200
               for _ in range(4 * LIMIT))


def test_refused_tokens_are_not_counted_and_a_401_comes_first(limited: Env) -> None:
    env = limited
    _at_window_start()
    for _ in range(2 * LIMIT):
        assert env.client.get("/v1/workflow", headers={
            "Authorization": "Bearer cfc_unknown"}).status_code == 401


def test_without_redis_requests_are_served_unlimited_and_it_is_logged(
    tmp_path: Path, broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(url)
    for env in make_env(url, redis_url=UNREACHABLE, rate_limit_requests=1):
        headers = env.auth()
        with caplog.at_level(logging.WARNING, logger="comfy_cancel.ratelimit"):
            codes = [env.client.get("/v1/workflow", headers=headers).status_code
                     for _ in range(5)]
        assert codes == [200] * 5
        warnings = [r.getMessage() for r in caplog.records if r.name == "comfy_cancel.ratelimit"]
        # One line, not one per request: Redis is not asked again for a few seconds.
        assert warnings == ["rate limits not enforced for 5 s: Redis unreachable "
                            "(ConnectionError)"]
