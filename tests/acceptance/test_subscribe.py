"""GET /v1/workflow/{id}/subscribe on the real stack: a subscriber sees a cancel step by
step as the API, the cancel worker and the runner write it, then the stream closes;
Last-Event-ID resumes after an event; another account's workflow is a 404."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import httpx
import pytest

from comfy_cancel import manager
from comfy_cancel.embedded.comfyui_sim import blur_chain
from testbed import sse
from testbed.stack import Stack, cancel
from tests.apitest import error

pytestmark = pytest.mark.acceptance
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
    workflow_id = stack.submit(LONG, name="watched")
    assert stack.wait_status(workflow_id, {"running"} | TERMINAL)["status"] == "running"
    watcher = Subscriber(stack, workflow_id).start()
    assert watcher.events[0].event == "state"
    assert watcher.events[0].json["status"] == "running"
    stack.wait_for(lambda: any(e.event == "progress" for e in watcher.events),
                   what="ComfyUI's progress on the stream")

    assert cancel(stack, workflow_id, reason="seen enough").status_code == 200
    events = watcher.closed()

    assert watcher.status_code == 200
    steps = [e.event for e in events if e.event not in ("state", "progress")]
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
    assert ids[1:] == [i for i in audited if i > ids[0]]

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
