"""GET /v1/workflow/{id}/subscribe on the real stack: a subscriber sees a cancel step by
step as the API, the cancel worker and the runner write it, then the stream closes;
Last-Event-ID resumes after an event; another account's workflow is a 404."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import pytest
import redis
from sqlalchemy import text

from comfy_cancel import live, manager
from comfy_cancel.embedded.comfyui_sim import blur_chain
from comfy_cancel.models import WorkflowStatus
from testbed import sse
from testbed.stack import Stack, cancel
from tests.apitest import error
from tests.helpers import seed_workflow

pytestmark = pytest.mark.acceptance
S = WorkflowStatus
TERMINAL = {"completed", "failed", "cancelled"}
LONG = blur_chain(40)  # about 6 s at the stack's time_scale 0.2


@dataclass
class Subscriber:
    """A stream read on a thread until the server closes it."""

    stack: Stack
    workflow_id: str
    last_event_id: str | None = None
    events: list[sse.Event] = field(default_factory=list)
    status_code: int | None = None
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.started = threading.Event()

    def start(self) -> Subscriber:
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        assert self.started.wait(30), "no first event within 30 s"
        return self

    def _read(self) -> None:
        headers = {"Last-Event-ID": self.last_event_id} if self.last_event_id else {}
        with self.stack.client() as client, client.stream(
            "GET", f"/v1/workflow/{self.workflow_id}/subscribe", headers=headers,
            timeout=httpx.Timeout(60, read=60),
        ) as response:
            self.status_code = response.status_code
            for event in sse.events(response.iter_lines()):
                self.events.append(event)
                self.started.set()
        self.started.set()

    def closed(self, timeout: float = 60) -> list[sse.Event]:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the stream did not close: {self.events}"
        return self.events


def test_a_subscriber_sees_each_step_of_a_cancel_in_order_then_the_stream_closes(
    stack: Stack,
) -> None:
    watch_a_cancel(stack)


def test_the_same_on_an_older_comfyui_without_the_jobs_api(
    stack_factory: Callable[..., Any],
) -> None:
    with stack_factory(jobs_api=False) as made:  # the targeted /interrupt path
        watch_a_cancel(cast(Stack, made))


def watch_a_cancel(stack: Stack, prompt: dict[str, Any] = LONG) -> None:
    """A subscriber watches ``prompt`` (long enough to be cancelled while it runs) from
    running to cancelled, then resumes after the request. (Also run against a real
    ComfyUI: tests/acceptance/test_real_comfyui.py.)"""
    workflow_id = stack.submit(prompt, name="watched")
    assert stack.wait_status(workflow_id, {"running"} | TERMINAL)["status"] == "running"
    watcher = Subscriber(stack, workflow_id).start()
    assert watcher.events[0].event == "state"
    assert watcher.events[0].json["status"] == "running"
    stack.wait_for(lambda: any(e.event == "progress" for e in watcher.events),
                   what="ComfyUI's progress on the stream")

    assert cancel(stack, workflow_id, reason="seen enough").status_code == 200
    events = watcher.closed()

    assert watcher.status_code == 200
    named = [e.event for e in events if e.event not in ("state", "progress")]
    # A request handed on twice (the re-drive, on a slow machine) is signalled twice.
    steps = [step for n, step in enumerate(named) if n == 0 or named[n - 1] != step]
    # The worker's "signalled" can land after the runner's acknowledgement is written, when
    # the runner is quicker than the worker's second transaction: then it is not audited.
    assert steps in (
        ["cancel_requested", "cancel_signalled", "cancel_acknowledged", "status"],
        ["cancel_requested", "cancel_acknowledged", "status"],
    ), steps
    last = events[-1]
    assert (last.event, last.json["to_status"], last.json["outcome"]) == (
        "status", "cancelled", "cancelled")
    requested = next(e for e in events if e.event == "cancel_requested").json
    assert (requested["source"], requested["reason"]) == ("api", "seen enough")
    progress = next(e for e in events if e.event == "progress")
    assert progress.id is None and {"node", "value", "max"} <= set(progress.json)
    # Every audited event carries its row's id, in order, and the stream shows them all.
    ids = [int(e.id) for e in events if e.id is not None]
    assert ids == sorted(ids)
    with stack.db.reading() as session:
        audited = [r.id for r in manager.events_of(session, workflow_id)]
    # (A row after the end, such as gpu_freed, is for a resumed stream.)
    assert ids[1:] == [i for i in audited if ids[0] < i <= ids[-1]]

    # Resume after the request: only the later events, then the close.
    resumed = Subscriber(stack, workflow_id, last_event_id=next(
        e.id for e in events if e.event == "cancel_requested")).start().closed()
    later = [(e.event, e.id) for e in events if e.id is not None and e.event != "state"][1:]
    assert [(e.event, e.id) for e in resumed] == later


def test_another_accounts_workflow_is_a_404_and_no_token_a_401(stack: Stack) -> None:
    workflow_id = stack.submit(LONG, name="private")
    with stack.db.transaction() as session:
        intruder = manager.create_token(session, manager.get_or_create_account(session, "evil"))
    with stack.client(intruder) as client:
        error(client.get(f"/v1/workflow/{workflow_id}/subscribe"), 404)
    error(httpx.get(f"{stack.api_url}/v1/workflow/{workflow_id}/subscribe"), 401)
    cancel(stack, workflow_id)
    stack.wait_status(workflow_id, TERMINAL)


STREAMS = 1000
WATCHED = 10  # workflows, each watched by STREAMS / WATCHED streams
PING_SECONDS = 1.0


def test_a_thousand_streams_on_one_api_process_share_one_subscription_and_no_database_session(
    stack_factory: Callable[..., Any],
) -> None:
    with stack_factory(separate_api=True, api_workers=1,
                       stream_ping_seconds=PING_SECONDS) as made:
        stack = cast(Stack, made)
        ids = [seed_workflow(stack.db, stack.account_id, stack.runner_id, S.QUEUED)
               for _ in range(WATCHED)]
        opened = asyncio.Semaphore(0)
        names = asyncio.run(_watch_many(stack, ids, opened, _while_all_open(stack, ids)))

    for events in names:
        assert events[0] == "state", events
        assert "ping" in events, events  # heartbeats on every quiet stream
        assert "cancel_requested" in events
        assert [e for e in events if e != "ping"][-1] == "status", events  # the end, then closed


async def _watch_many(stack: Stack, ids: list[str], opened: asyncio.Semaphore,
                      then: Callable[[], None]) -> list[list[str]]:
    limits = httpx.Limits(max_connections=STREAMS + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=stack.api_url, limits=limits, timeout=120,
                                 headers={"Authorization": f"Bearer {stack.token}"}) as client:

        async def watch(workflow_id: str) -> list[str]:
            names: list[str] = []
            async with client.stream("GET", f"/v1/workflow/{workflow_id}/subscribe") as r:
                assert r.status_code == 200
                buffered: list[str] = []
                async for line in r.aiter_lines():
                    if line.startswith(": ping"):
                        names.append("ping")
                    buffered.append(line)
                    if line:
                        continue
                    for event in sse.events(buffered):
                        names.append(event.event)
                        if event.event == "state":
                            opened.release()
                    buffered = []
            return names

        tasks = [asyncio.create_task(watch(ids[n % len(ids)])) for n in range(STREAMS)]
        for _ in range(STREAMS):
            await asyncio.wait_for(opened.acquire(), 120)
        await asyncio.to_thread(then)
        return await asyncio.wait_for(asyncio.gather(*tasks), 120)


def _while_all_open(stack: Stack, ids: list[str]) -> Callable[[], None]:
    def check_then_cancel() -> None:
        time.sleep(3 * PING_SECONDS)  # every stream quiet long enough for a heartbeat
        # One subscription on Redis for the API process (the updates' channel and the
        # resync one), not one per stream.
        clients = redis.Redis.from_url(stack.settings.redis_url).client_list()
        hub = [c for c in clients if c.get("name") == live.HUB_CLIENT_NAME]
        assert len(hub) == 1 and (hub[0]["sub"], hub[0]["psub"]) == ("2", "0"), hub
        # Idle streams hold no database session (the pool may keep a few idle ones).
        with stack.db.engine.connect() as connection:
            active = connection.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state <> 'idle' AND pid <> pg_backend_pid()")).scalar()
        assert active is not None and active < 10, active
        for workflow_id in ids:
            assert cancel(stack, workflow_id).status_code == 200

    return check_then_cancel
