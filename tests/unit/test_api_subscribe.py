"""GET /v1/workflow/{id}/subscribe in a test client: the first event, resume, the refusals.
Streams that stay open (live updates, heartbeats) are on the real stack:
tests/acceptance/test_subscribe.py."""

from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest

from comfy_cancel import live, manager
from comfy_cancel.models import WorkflowStatus
from testbed import sse
from tests.apitest import Env, error

S = WorkflowStatus


@pytest.fixture
def hub_env(env: Env) -> Iterator[Env]:
    """The API with its hub and the status writer's publisher on one fakeredis server."""
    server = fakeredis.FakeServer()
    env.app.state.hub = live.Hub(fakeredis.aioredis.FakeRedis(server=server))
    with live.publishing_to(fakeredis.FakeRedis(server=server)):
        yield env


def subscribe(env: Env, workflow_id: str, token: dict[str, str],
              last_event_id: str | None = None) -> tuple[int, list[sse.Event], str]:
    headers = dict(token)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    response = env.client.get(f"/v1/workflow/{workflow_id}/subscribe", headers=headers)
    return response.status_code, sse.parse(response.text), response.headers.get(
        "content-type", "")


def test_an_ended_workflow_streams_its_state_then_closes(hub_env: Env) -> None:
    auth = hub_env.auth()
    workflow_id = hub_env.workflow(S.CANCELLED)

    code, events, content_type = subscribe(hub_env, workflow_id, auth)

    assert code == 200 and content_type.startswith("text/event-stream")
    (state,) = events
    assert state.event == "state"
    shown = hub_env.client.get(f"/v1/workflow/{workflow_id}", headers=auth).json()
    assert {**state.json, "cancel": None} == {**shown, "cancel": None}  # age_seconds moves
    with hub_env.db.reading() as session:
        assert state.id == str(manager.last_event_id(session, workflow_id))


def test_resume_replays_only_the_later_events_and_a_finished_stream_says_204(
    hub_env: Env,
) -> None:
    auth = hub_env.auth()
    workflow_id = hub_env.workflow(S.CANCELLED)
    with hub_env.db.reading() as session:
        ids = [e.id for e in manager.events_of(session, workflow_id)]
    assert len(ids) == 4  # accepted, uploaded, queued, cancelled

    code, events, _ = subscribe(hub_env, workflow_id, auth, last_event_id=str(ids[1]))
    assert code == 200
    assert [(e.event, e.id, e.json["to_status"]) for e in events] == [
        ("status", str(ids[2]), "queued"), ("status", str(ids[3]), "cancelled")]
    assert events[-1].json["from_status"] == "queued"

    code, events, _ = subscribe(hub_env, workflow_id, auth, last_event_id=str(ids[3]))
    assert (code, events) == (204, [])  # EventSource stops reconnecting on a 204


def test_refusals_are_the_usual_error_bodies(hub_env: Env) -> None:
    mine = hub_env.workflow(S.RUNNING)
    theirs = hub_env.workflow(S.RUNNING, account="globex")
    auth = hub_env.auth()
    url = "/v1/workflow/{}/subscribe"

    assert "no workflow" in error(hub_env.client.get(url.format(theirs), headers=auth), 404)
    assert "no workflow" in error(hub_env.client.get(url.format("nope"), headers=auth), 404)
    error(hub_env.client.get(url.format(mine)), 401)
    bad = {**auth, "Last-Event-ID": "12; DROP"}
    assert "Last-Event-ID" in error(hub_env.client.get(url.format(mine), headers=bad), 400)
    assert hub_env.app.state.hub.stream_count == 0  # no refusal leaves a subscription
