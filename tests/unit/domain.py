"""The domain (cancel, runner, bulk, sweeps) called directly, without a Celery process: a
:class:`~comfy_cancel.context.Context` on a migrated SQLite file and a fakeredis server,
Celery publishing into kombu's in-memory transport (``broker`` in tests/apitest.py), and
simulated ComfyUI servers in threads (``make_sim`` in the unit conftest).

The fixtures are imported by tests/unit/conftest.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from kombu import Queue
from sqlalchemy import update

from comfy_cancel import manager, signals, status
from comfy_cancel.comfyui import ComfyUIClient
from comfy_cancel.config import Settings
from comfy_cancel.context import Context
from comfy_cancel.db import engine_for
from comfy_cancel.embedded.comfyui_sim import RunningSim
from comfy_cancel.models import Workflow, WorkflowStatus, utcnow
from comfy_cancel.signals import SignalKind
from comfy_cancel.worker import ALL_QUEUES
from testbed.database import LOOPBACK, migrated
from tests.apitest import take_all, worker_app
from tests.helpers import seed_workflow

S = WorkflowStatus
API = status.Actor("api", "alice", "no longer needed")
GRACE_SECONDS = 5.0  # the deadline is drained from the queue, never waited for


@dataclass
class Domain:
    """A context for the domain code, and the means to arrange and inspect its world."""

    ctx: Context
    redis: fakeredis.FakeRedis

    def runner(self, url: str = "http://127.0.0.1:1", account: str = "acme") -> str:
        with self.ctx.db.transaction() as session:
            account_id = manager.get_or_create_account(session, account).id
            return manager.add_runner(session, account_id, name="r", endpoint_url=url,
                                      settings=self.ctx.settings).id

    def workflow(self, to: S = S.RUNNING, runner_id: str | None = None,
                 prompt: dict[str, Any] | None = None, account: str = "acme") -> str:
        runner_id = runner_id or self.runner(account=account)
        with self.ctx.db.transaction() as session:
            account_id = manager.get_or_create_account(session, account).id
        workflow_id = seed_workflow(self.ctx.db, account_id, runner_id, to)
        if prompt is not None:
            self.set(workflow_id, workflow_json=prompt)
        return workflow_id

    def row(self, workflow_id: str) -> Workflow:
        with self.ctx.db.transaction() as session:
            found = manager.get_workflow(session, workflow_id)
        assert found is not None
        return found

    def set(self, workflow_id: str, **values: Any) -> None:
        """Arrange a column directly (times, ids): not a status write."""
        with self.ctx.db.transaction() as session:
            session.execute(update(Workflow).where(Workflow.id == workflow_id).values(**values))

    def age(self, workflow_id: str, **seconds: float) -> None:
        """Move these time columns ``seconds`` into the past."""
        self.set(workflow_id, **{name: utcnow() - timedelta(seconds=s)
                                 for name, s in seconds.items()})

    def request(self, workflow_id: str, by: status.Actor = API) -> None:
        """A cancel request recorded as the API does (before it publishes)."""
        with self.ctx.db.transaction() as session:
            assert status.request_cancel(session, workflow_id, by, publishing=True)

    def signal(self, workflow_id: str) -> SignalKind | None:
        """The signal key left for a workflow's runner."""
        return signals.pending(self.redis, workflow_id)

    def events(self, workflow_id: str) -> list[tuple[str, str | None, str | None]]:
        """(kind, to status, outcome) of the workflow's audit trail."""
        with self.ctx.db.transaction() as session:
            return [(e.kind, e.to_status, e.outcome)
                    for e in manager.events_of(session, workflow_id)]

    def on_sim(self, sim: RunningSim) -> ComfyUIClient:
        """A client of ``sim`` (for arranging and inspecting its queue)."""
        return self.ctx.comfyui(sim.url, None)


@pytest.fixture
def domain(tmp_path: Path, broker: Any) -> Iterator[Domain]:
    for queue in ALL_QUEUES:  # the memory transport outlives a test: start empty
        broker(queue)
    url = f"sqlite:///{tmp_path / 'domain.db'}"
    db = migrated(url)
    db.engine.dispose()
    settings = Settings(
        database_url=url,
        redis_url="redis://127.0.0.1:1/0",  # never used: the fakeredis client below is
        runner_allowed_networks=LOOPBACK,
        cancel_grace_seconds=GRACE_SECONDS,
        heartbeat_interval_seconds=0.2,
        comfyui_retry_attempts=2,
    )
    ctx = Context(settings)
    fake = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    # Context builds its client from redis_url on first use; this one is used instead.
    ctx.__dict__["redis"] = fake
    yield Domain(ctx, fake)
    signals.listener_for(fake).stop(timeout=0)  # started by runner.run; it ends within 1 s
    for client in ctx._clients.values():
        client.close()
    ctx.db.engine.dispose()
    engine_for.cache_clear()


@pytest.fixture
def revokes(broker: Any) -> Callable[[], list[str]]:
    """The task ids revoked since the fixture was set up, read from Celery's broadcast
    exchange (a queue of our own bound to it, as every worker binds one)."""
    queue = Queue("test.revokes", worker_app.control.mailbox.exchange, auto_delete=False)
    with worker_app.connection_for_write() as conn:
        queue(conn.default_channel).declare()

    def read() -> list[str]:
        ids: list[str] = []
        for message in take_all(queue):
            body = message.payload
            if body.get("method") == "revoke":
                found = body["arguments"]["task_id"]
                ids.extend([found] if isinstance(found, str) else found)
        return ids

    read()  # what earlier tests broadcast (the memory transport outlives a test)
    return read


def wait_until(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll ``check`` until it returns something true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            assert result, f"not true after {timeout} s: {check}"
            return result
        time.sleep(0.02)
