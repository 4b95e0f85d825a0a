"""Fixtures of the unit tests: simulated ComfyUI servers, the API in a test client, and the
domain code with its world (tests/unit/domain.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest

from comfy_cancel import live
from comfy_cancel.embedded.comfyui_sim import RunningSim, start_in_thread
from tests.apitest import (  # noqa: F401  (the API's fixtures)
    broker,
    broker_down,
    env,
    private_env,
    refusals_env,
)
from tests.unit.domain import domain, revokes  # noqa: F401  (the domain's fixtures)

FAST = 0.05  # time scale of most tests: the 6 s reference workflow takes 0.3 s


@pytest.fixture(autouse=True, scope="session")
def _live_updates_on_fakeredis() -> Iterator[None]:
    """Status writes publish their live updates (comfy_cancel/live.py) into a fakeredis,
    not to whatever Redis the default settings name."""
    with live.publishing_to(fakeredis.FakeRedis()):
        yield


@pytest.fixture
def make_sim() -> Iterator[Callable[..., RunningSim]]:
    """Start simulated ComfyUI servers in threads; all are stopped after the test."""
    started: list[RunningSim] = []

    def make(**options: Any) -> RunningSim:
        options.setdefault("time_scale", FAST)
        sim = start_in_thread(**options)
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


@pytest.fixture
def sim(make_sim: Callable[..., RunningSim]) -> RunningSim:
    return make_sim()
