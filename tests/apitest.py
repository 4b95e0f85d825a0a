"""The HTTP API in a test client: a migrated SQLite file, Celery publishing into kombu's
in-memory transport, and helpers to make accounts, tokens, runners and workflows.

The fixtures are imported by the conftest files of the tests that use them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import kombu.pools
import pytest
from fastapi.testclient import TestClient
from kombu import Queue

from comfy_cancel import api, encryption, manager, worker
from comfy_cancel.config import Settings
from comfy_cancel.db import Database, engine_for
from comfy_cancel.embedded.comfyui_sim import TINY_PROMPT
from comfy_cancel.models import Workflow, WorkflowStatus, utcnow
from testbed.database import LOOPBACK_ALLOWED, migrate
from tests.helpers import seed_workflow

S = WorkflowStatus
worker_app = worker.app  # the Celery app the API publishes through
UNREACHABLE = "redis://127.0.0.1:1/0"
KEY = encryption.new_key()  # seals runner headers in the test databases


@dataclass
class Env:
    client: TestClient
    db: Database
    app: Any

    def token(self, account: str = "acme", *, operator: bool = False, days: float | None = None,
              rate_limit: int | None = None) -> str:
        with self.db.transaction() as session:
            acc = manager.get_or_create_account(session, account)
            expires = utcnow() + timedelta(days=days) if days is not None else None
            return manager.create_token(session, acc, operator=operator, expires_at=expires,
                                        rate_limit=rate_limit)

    def auth(self, account: str = "acme", **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(account, **kwargs)}"}

    def account_id(self, account: str = "acme") -> int:
        with self.db.transaction() as session:
            return manager.get_or_create_account(session, account).id

    def runner_id(self, account: str = "acme") -> str:
        with self.db.transaction() as session:
            acc = manager.get_or_create_account(session, account)
            return manager.add_runner(session, acc.id, name="r", endpoint_url="http://127.0.0.1:1",
                                      settings=LOOPBACK_ALLOWED).id

    def workflow(self, to: S = S.ACCEPTED, account: str = "acme") -> str:
        return seed_workflow(self.db, self.account_id(account), self.runner_id(account), to)

    def row(self, workflow_id: str) -> Workflow:
        with self.db.transaction() as session:
            workflow = manager.get_workflow(session, workflow_id)
            assert workflow is not None
            return workflow


def _reset_broker_pools() -> None:
    # Celery keeps its connection and producer pools across a change of broker_url, and
    # has no public call that drops them: without this, the next publish would still go
    # to the previous broker.
    kombu.pools.reset()  # kombu's registry would hand the closed pools back otherwise
    worker_app._pool = None
    worker_app.amqp._producer_pool = None


def take_all(queue: str | Queue) -> list[Any]:
    """Every message waiting on ``queue`` (a name, or a kombu Queue), acknowledged."""
    taken = []
    with worker_app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue)
        while True:
            try:
                message = simple.get(block=False)
            except simple.Empty:
                break
            message.ack()
            taken.append(message)
        simple.close()
    return taken


@pytest.fixture
def broker() -> Iterator[Any]:
    """Celery publishing into kombu's in-process memory transport; yields a queue reader."""
    conf = worker_app.conf
    saved = {k: conf[k] for k in ("broker_url", "broker_connection_retry",
                                  "broker_connection_max_retries", "broker_transport_options")}
    conf.broker_url = "memory://"
    _reset_broker_pools()

    def drain(queue: str) -> list[tuple[str, str, list[Any]]]:
        """(task id, task name, args) of every message waiting on ``queue``, removing them."""
        return [(m.headers["id"], m.headers["task"], m.payload[0]) for m in take_all(queue)]

    for queue in ("cancel", "runner"):
        drain(queue)
    yield drain
    conf.update(saved)
    _reset_broker_pools()


@pytest.fixture
def broker_down(broker: Any) -> None:
    """Publishing against a Redis nobody listens on, failing fast."""
    conf = worker_app.conf
    conf.broker_url = UNREACHABLE
    conf.broker_connection_retry = False
    conf.broker_connection_max_retries = 0
    conf.broker_transport_options = {
        "max_retries": 0, "socket_connect_timeout": 0.5, "socket_timeout": 0.5
    }
    _reset_broker_pools()


def make_env(url: str, **settings: Any) -> Iterator[Env]:
    settings.setdefault("redis_url", UNREACHABLE)
    app = api.create_app(Settings(database_url=url, **settings))
    with TestClient(app) as client:
        yield Env(client, app.state.db, app)
    app.state.db.engine.dispose()
    engine_for.cache_clear()


@pytest.fixture
def env(tmp_path: Path, broker: Any) -> Iterator[Env]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(url)
    yield from make_env(url, secret_key=KEY)


@pytest.fixture(scope="module")
def refusals_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One API for all the cases of a module's parametrised refusals (each a 400 that stores
    nothing but its own token, so no case can see another's effects). FastAPI builds an app's
    routes on its first request, about 40 ms of CPU: more than such a case costs."""
    url = f"sqlite:///{tmp_path_factory.mktemp('refusals') / 'api.db'}"
    migrate(url)
    yield from make_env(url, secret_key=KEY)


@pytest.fixture
def private_env(tmp_path: Path, broker: Any) -> Iterator[Env]:
    """An operator who lets runners reach a private network."""
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(url)
    yield from make_env(url, secret_key=KEY, runner_allowed_networks="10.0.0.0/8")


def error(response: Any, code: int) -> str:
    assert response.status_code == code, response.text
    body = response.json()
    assert set(body) == {"status", "message"}, body
    assert body["status"] == code
    assert "Traceback" not in body["message"]
    return str(body["message"])


def files(name: str = "wf", prompt: Any = TINY_PROMPT, tags: str | list[str] | None = None
           ) -> dict[str, Any]:
    raw = prompt if isinstance(prompt, bytes) else json.dumps(prompt).encode()
    data: dict[str, Any] = {"name": name}
    if tags is not None:
        data["tags"] = tags
    return {"data": data, "files": {"workflow_json": ("prompt.json", raw, "application/json")}}
