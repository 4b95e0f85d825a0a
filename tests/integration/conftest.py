"""Fixtures of the integration tests: the API in a test client (see tests/apitest.py)."""

from tests.apitest import broker, broker_down, env, private_env  # noqa: F401
