"""The whole system for acceptance tests: real Redis, real Celery worker processes, the
simulated ComfyUI server (or a real one: ``comfyui_url``), the HTTP API on a real socket,
and SQLite or PostgreSQL."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from comfy_cancel import context, manager, worker
from comfy_cancel.config import (
    ENV_PREFIX,
    Settings,
    child_environment,
    get_settings,
    settings_environment,
)
from comfy_cancel.db import Database
from comfy_cancel.embedded import processes
from comfy_cancel.embedded.celery_workers import CeleryWorker, Pinger
from comfy_cancel.embedded.comfyui_sim import RunningSim, start_in_thread
from comfy_cancel.embedded.processes import Child
from testbed.database import LOOPBACK, migrated

# A failing start quotes this much of the child's log: a test's log is what explains it.
TAIL_LINES = 40


@dataclass
class Stack:
    settings: Settings
    db: Database
    sim: RunningSim
    api_url: str
    token: str
    operator_token: str
    account_id: int
    runner_id: str
    log_dir: Path
    workers: list[CeleryWorker] = field(default_factory=list)
    api_pid: int = field(default_factory=os.getpid)  # this process unless api_process
    # Each worker's Prometheus metrics URL, by the stem of its log ("worker-cancel").
    worker_metrics: dict[str, str] = field(default_factory=dict)

    def client(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.api_url,
            headers={"Authorization": f"Bearer {token or self.token}"},
            timeout=30,
        )

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition"
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.worker_logs()}")

    def workflow(self, workflow_id: str) -> dict[str, Any]:
        with self.client() as c:
            response = c.get(f"/v1/workflow/{workflow_id}")
            response.raise_for_status()
            return dict(response.json())

    def wait_status(
        self, workflow_id: str, statuses: set[str], timeout: float = 30.0
    ) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def reached() -> bool:
            seen.update(self.workflow(workflow_id))
            return seen["status"] in statuses

        self.wait_for(reached, timeout, f"{workflow_id} to reach {statuses} (last {seen})")
        return seen

    def submit(
        self, prompt: Mapping[str, Any], name: str = "wf", tags: list[str] | None = None
    ) -> str:
        with self.client() as c:
            response = c.post(
                "/v1/workflow",
                json={"name": name, "workflow_json": dict(prompt), "tags": tags or []},
            )
            assert response.status_code == 200, response.text
            return str(response.json()["id"])

    def worker_logs(self) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("worker-*.log")):
            lines = path.read_text(errors="replace").splitlines()[-40:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)


def start_worker(
    settings: Settings, queues: Sequence[str], log_path: Path, concurrency: int = 50,
    metrics_port: int | None = None,
) -> CeleryWorker:
    """A worker process on ``queues``, threads pool; its node name follows the log's; its
    Prometheus metrics on ``metrics_port``, if given."""
    env = child_environment(settings)
    if metrics_port is not None:
        env[f"{ENV_PREFIX}METRICS_PORT"] = str(metrics_port)
    return CeleryWorker(
        log_path.stem, queues, log_path, env=env,
        options=["-P", "threads", "-c", str(concurrency)],
    ).start()


def wait_workers_ready(
    settings: Settings, workers: Sequence[CeleryWorker], timeout: float = 60.0
) -> None:
    """Until each worker answers a ping; fails early with the log of one that exited."""
    pinger = Pinger(settings)
    try:
        processes.wait_ready([(w, pinger.probe(w)) for w in workers], timeout,
                             tail_lines=TAIL_LINES)
    finally:
        pinger.close()


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # running in a thread
        pass


@contextmanager
def api_server(settings: Settings) -> Iterator[str]:
    from comfy_cancel.api import create_app

    port = processes.free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning"
    )
    server = _Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline:
            raise AssertionError("the API server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def api_process(
    settings: Settings, log_path: Path, log_level: str = "WARNING"
) -> Iterator[tuple[str, int]]:
    """``comfy-cancel api`` in a process of its own, as a deployment runs it: (url, pid)."""
    port = processes.free_port()
    env = child_environment(settings) | {f"{ENV_PREFIX}API_PORT": str(port),
                                         f"{ENV_PREFIX}LOG_LEVEL": log_level}
    api = Child("API process", [sys.executable, "-m", "comfy_cancel.cli", "api"], log_path,
                env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        api.start().wait_ready(lambda: processes.http_ok(f"{url}/healthz"), 30,
                               tail_lines=TAIL_LINES)
        yield url, api.pid
    finally:
        api.stop()


@contextmanager
def running_stack(
    database_url: str,
    redis_url: str,
    log_dir: Path,
    *,
    time_scale: float = 0.2,
    jobs_api: bool = True,
    separate_runner: bool = True,
    cancel_concurrency: int = 50,
    separate_api: bool = False,
    api_log_level: str = "WARNING",
    comfyui_url: str | None = None,
    **overrides: Any,
) -> Iterator[Stack]:
    """Start everything; tear it all down afterwards, workers included. The API runs on a
    thread of this process, or with ``separate_api`` in a process of its own (logging at
    ``api_log_level``). The account's runner is the simulated ComfyUI, or the ComfyUI
    server at ``comfyui_url`` (the simulated one is started all the same: idle)."""
    settings = Settings(
        database_url=database_url,
        redis_url=redis_url,
        cancel_grace_seconds=overrides.pop("cancel_grace_seconds", 3.0),
        heartbeat_interval_seconds=overrides.pop("heartbeat_interval_seconds", 0.5),
        # The simulated ComfyUI listens on 127.0.0.1: the operator allows it.
        runner_allowed_networks=overrides.pop("runner_allowed_networks", LOOPBACK),
        **overrides,
    )
    with configured(settings):
        yield from _stack(settings, database_url, log_dir, time_scale=time_scale,
                          jobs_api=jobs_api, separate_runner=separate_runner,
                          cancel_concurrency=cancel_concurrency, separate_api=separate_api,
                          api_log_level=api_log_level, comfyui_url=comfyui_url)


def _stack(
    settings: Settings,
    database_url: str,
    log_dir: Path,
    *,
    time_scale: float,
    jobs_api: bool,
    separate_runner: bool,
    cancel_concurrency: int,
    separate_api: bool,
    api_log_level: str,
    comfyui_url: str | None,
) -> Iterator[Stack]:
    db = migrated(database_url)
    sim = start_in_thread(time_scale=time_scale, jobs_api=jobs_api)
    with db.transaction() as session:
        account = manager.get_or_create_account(session, "acme")
        # Unlimited (rate_limit=0): the tests drive far more than a customer's 40 per 10 s.
        token = manager.create_token(session, account, rate_limit=0)
        operator = manager.get_or_create_account(session, "ops")
        operator_token = manager.create_token(session, operator, operator=True, rate_limit=0)
        runner = manager.add_runner(session, account.id, name="comfyui" if comfyui_url else "sim",
                                    endpoint_url=comfyui_url or sim.url)
        account_id, runner_id = account.id, runner.id
    workers: list[CeleryWorker] = []
    metrics: dict[str, str] = {}

    def start(queues: Sequence[str], name: str, concurrency: int) -> None:
        port = processes.free_port()
        workers.append(start_worker(settings, queues, log_dir / f"{name}.log", concurrency,
                                    metrics_port=port))
        metrics[name] = f"http://127.0.0.1:{port}/metrics"

    try:
        if separate_runner:
            start(worker.CANCEL_QUEUES, "worker-cancel", cancel_concurrency)
            start([worker.RUNNER_QUEUE], "worker-runner", 100)
        else:
            start(worker.ALL_QUEUES, "worker-all", 100)
        wait_workers_ready(settings, workers)
        if separate_api:
            with api_process(settings, log_dir / "api.log", api_log_level) as (api_url, pid):
                yield Stack(settings, db, sim, api_url, token, operator_token, account_id,
                            runner_id, log_dir, workers, pid, metrics)
        else:
            with api_server(settings) as api_url:
                yield Stack(settings, db, sim, api_url, token, operator_token, account_id,
                            runner_id, log_dir, workers, worker_metrics=metrics)
    finally:
        processes.stop_all(workers)
        sim.stop()
        db.engine.dispose()


@contextmanager
def configured(settings: Settings) -> Iterator[None]:
    """Point this process (settings, context, Celery publishing) at ``settings``; the
    environment is restored afterwards."""
    saved_env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    os.environ.update(settings_environment(settings))
    get_settings.cache_clear()
    context.reset()
    worker.configure(settings)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            del os.environ[key]
        os.environ.update(saved_env)
        get_settings.cache_clear()
        context.reset()
        worker.configure(get_settings())


def cancel(stack: Stack, workflow_id: str, token: str | None = None,
           reason: str | None = None) -> httpx.Response:
    with stack.client(token) as c:
        body = {"reason": reason} if reason else None
        return c.post(f"/v1/workflow/{workflow_id}/cancel", json=body)


def sim_calls(stack: Stack) -> list[dict[str, Any]]:
    """The cancel-related calls the simulated ComfyUI received (a sim-only route)."""
    return list(httpx.get(f"{stack.sim.url}/sim/calls").json()["calls"])


def sim_requests(stack: Stack) -> list[dict[str, Any]]:
    return list(httpx.get(f"{stack.sim.url}/sim/calls").json()["requests"])
