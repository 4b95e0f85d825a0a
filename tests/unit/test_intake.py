"""The API's cancels taken in together (comfy_cancel/intake.py), through the real route:
requests that arrive while a group is written become one group, one message per requester,
and each is still answered on its own."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from comfy_cancel import intake
from comfy_cancel.models import WorkflowStatus as S
from tests.apitest import Env


async def _burst(env: Env, posts: Sequence[tuple[str, dict[str, str]]]) -> list[httpx.Response]:
    """All the cancels at once on one event loop, as concurrent clients send them."""
    transport = httpx.ASGITransport(app=env.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        return await asyncio.gather(*(
            client.post(f"/v1/workflow/{workflow_id}/cancel", headers=headers)
            for workflow_id, headers in posts))


@pytest.fixture
def groups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every group the intake writes."""
    sizes: list[int] = []
    real = intake.take

    def counted(db: Any, requests: Sequence[intake.CallersCancel]) -> list[intake.Taken]:
        sizes.append(len(requests))
        return real(db, requests)

    monkeypatch.setattr(intake, "take", counted)
    return sizes


def test_cancels_arriving_together_are_written_and_published_in_groups(
    env: Env, broker: Any, groups: list[int]
) -> None:
    auth = env.auth()
    ids = [env.workflow(S.QUEUED) for _ in range(30)]
    responses = asyncio.run(_burst(env, [(workflow_id, auth) for workflow_id in ids]))
    assert [r.status_code for r in responses] == [200] * 30
    # The first request starts a group at once (it waits for no other); those that arrive
    # while it is written join the next.
    assert sum(groups) == 30 and len(groups) < 30 and max(groups) > 1, groups
    messages = broker("cancel")
    assert len(messages) == len(groups)  # one message per group of one requester
    assert sorted(i for _, _, args in messages for i in args[0]) == sorted(ids)
    assert all(env.row(i).cancel_requested_at is not None for i in ids)


def test_each_request_of_a_group_is_answered_for_its_own_caller(
    env: Env, broker: Any, groups: list[int]
) -> None:
    acme, globex = env.auth("acme"), env.auth("globex")
    ours = [env.workflow(S.QUEUED, "acme") for _ in range(4)]
    theirs = env.workflow(S.RUNNING, "globex")
    finished = env.workflow(S.COMPLETED, "acme")
    posts = [(i, acme) for i in ours] + [(theirs, globex), (theirs, acme), (finished, acme)]
    responses = asyncio.run(_burst(env, posts))
    assert [r.status_code for r in responses] == [200] * 5 + [404, 400]
    assert max(groups) > 1, groups
    actor = env.row(theirs).cancel_actor
    assert actor is not None and actor.startswith("globex#")  # not acme's request
    assert env.row(finished).cancel_requested_at is None
    published = {i for _, _, args in broker("cancel") for i in args[0]}
    assert published == {*ours, theirs}


def test_a_group_whose_publish_fails_answers_500_to_each_and_keeps_the_requests(
    env: Env, broker_down: None, groups: list[int]
) -> None:
    auth = env.auth()
    ids = [env.workflow(S.QUEUED) for _ in range(6)]
    responses = asyncio.run(_burst(env, [(workflow_id, auth) for workflow_id in ids]))
    assert [r.status_code for r in responses] == [500] * 6
    assert all("retrying is safe" in r.json()["message"] for r in responses)
    assert all(env.row(i).cancel_published_at is not None for i in ids)  # re-drive's stamp
