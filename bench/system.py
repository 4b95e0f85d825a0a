"""The system under test, started by the suite, and what the scenarios do to it.

:func:`testbed.stack.running_stack` brings up the whole system (the acceptance tests' own
harness, reused unchanged): Celery worker processes (one cancel worker, one runner worker;
threads pool, late acks, prefetch 1), the simulated ComfyUI server and the HTTP API on a
socket. Here it runs on a real PostgreSQL and a real Redis with its AOF on, as in ``docker-
compose.yml``, started from their PyPI wheels by :mod:`comfy_cancel.embedded.redis_server`
and :mod:`testbed.postgres`. One more worker process serves the no-op baseline task
(:mod:`bench.noop`) with the cancel worker's settings."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import text

from bench import noop, seed
from comfy_cancel.config import child_environment
from comfy_cancel.db import Database
from comfy_cancel.embedded import redis_server
from comfy_cancel.embedded.celery_workers import CeleryWorker
from comfy_cancel.embedded.processes import Child
from testbed import postgres
from testbed.stack import Stack, running_stack, wait_workers_ready

REPO = Path(__file__).resolve().parent.parent
CANCEL_WORKER_CONCURRENCY = 50  # threads; the database pool holds 10 + 40 connections
GRACE_SECONDS = 10.0  # the shipped default of cancel_grace_seconds
HEARTBEAT_SECONDS = 2.0  # the shipped default of heartbeat_interval_seconds
SIM_TIME_SCALE = 1.0  # ComfyUI's node times as calibrated on a 2-core CPU


@dataclass
class System:
    stack: Stack
    redis_server: redis_server.RedisServer
    postgres: postgres.PostgresServer
    work_dir: Path
    noop_worker: CeleryWorker
    redis: redis.Redis = field(init=False)

    def __post_init__(self) -> None:
        self.redis = redis.Redis.from_url(self.stack.settings.redis_url)

    @property
    def db(self) -> Database:
        return self.stack.db

    @property
    def api_pid(self) -> int:
        return self.stack.api_pid

    @property
    def cancel_worker_pid(self) -> int:
        return self.stack.workers[0].pid

    @property
    def runner_worker_pid(self) -> int:
        return self.stack.workers[1].pid

    def path(self, name: str) -> Path:
        return self.work_dir / name

    # --- load from other processes ------------------------------------------------------------

    def loadgen_http(
        self,
        label: str,
        url: str,
        *,
        method: str = "GET",
        token: str | None = None,
        ids: Sequence[str] | None = None,
        concurrency: int = 32,
        rate: float | None = None,
        count: int | None = None,
        duration: float = 120.0,
    ) -> dict[str, Any]:
        """Run :mod:`bench.loadgen` in its own process; its results."""
        out = self.path(f"loadgen-{label}.json")
        argv = [sys.executable, "-m", "bench.loadgen", "http", "--url", url, "--method", method,
                "--concurrency", str(concurrency), "--duration", str(duration),
                "--out", str(out)]
        if token:
            argv += ["--token", token]
        if ids is not None:
            ids_file = self.path(f"ids-{label}.txt")
            ids_file.write_text("\n".join(ids))
            argv += ["--ids", str(ids_file)]
            count = len(ids) if count is None else count
        argv += ["--count", str(count or 1000)]
        if rate:
            argv += ["--rate", str(rate)]
        self.run(f"loadgen-{label}", argv, timeout=duration + 120)
        return dict(json.loads(out.read_text()))

    def loadgen_noop(self, label: str, count: int, counter_key: str) -> dict[str, Any]:
        out = self.path(f"loadgen-{label}.json")
        self.run(f"loadgen-{label}", [sys.executable, "-m", "bench.loadgen", "noop", "--count",
                 str(count), "--counter-key", counter_key, "--out", str(out)], timeout=300)
        return dict(json.loads(out.read_text()))

    def run(self, name: str, argv: list[str], *, timeout: float) -> None:
        """Run ``argv`` to its end (its output in ``<name>.log``); an error with the end of
        that log if it fails or outlasts ``timeout``."""
        Child(name, argv, self.path(f"{name}.log"), cwd=REPO).run(timeout)

    def cancel_url(self) -> str:
        return self.stack.api_url + "/v1/workflow/{id}/cancel"

    # --- reading the database cheaply -------------------------------------------------------

    def wait_account_settled(
        self, account_id: int, expected: int, timeout: float, poll: float = 0.1
    ) -> bool:
        """Until ``expected`` workflows of the account are terminal; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.db.transaction() as session:
                done = session.execute(
                    text("SELECT count(*) FROM workflows WHERE account_id = :a "
                         "AND status IN ('cancelled', 'completed', 'failed')"),
                    {"a": account_id},
                ).scalar_one()
            if done >= expected:
                return True
            time.sleep(poll)
        return False

    def cancel_times(self, account_id: int) -> dict[str, tuple[str, float | None, str | None]]:
        """Per workflow of the account: (status, cancel_finished_at as epoch, outcome)."""
        with self.db.transaction() as session:
            rows = session.execute(
                text("SELECT id, status, cancel_finished_at, cancel_outcome FROM workflows "
                     "WHERE account_id = :a"),
                {"a": account_id},
            ).all()
        return {row[0]: (row[1], epoch(row[2]), row[3]) for row in rows}

    def new_account(self, name: str, *, operator: bool = False) -> tuple[int, str]:
        return seed.account(self.db, name, operator=operator)


def epoch(naive_utc: datetime | None) -> float | None:
    return None if naive_utc is None else naive_utc.replace(tzinfo=UTC).timestamp()


def start_noop_worker(stack: Stack, log_path: Path) -> CeleryWorker:
    """A worker process like the cancel worker (same app; the pool, concurrency and
    prefetch the running cancel worker reports), on the no-op queue only."""
    return CeleryWorker(
        log_path.stem, ["bench.noop"], log_path, env=child_environment(stack.settings),
        app="bench.noop", options=noop.worker_options(stack.workers[0].pid), cwd=REPO,
    ).start()


@dataclass
class Services:
    redis_server: redis_server.RedisServer
    postgres: postgres.PostgresServer


@contextmanager
def started_services(durable: bool = True) -> Iterator[Services]:
    """Redis (AOF on, fsync every second, as in docker-compose.yml) and PostgreSQL
    (``durable``: fsync and synchronous commit on, as in production)."""
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server.start_redis(appendonly=True))
        pg = stack.enter_context(postgres.start_postgres(fast=not durable))
        yield Services(redis, pg)


@contextmanager
def started_system(servers: Services, work_dir: Path) -> Iterator[System]:
    log_dir = work_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    database_url = servers.postgres.create_database("bench")
    with running_stack(
        database_url,
        servers.redis_server.url,
        log_dir,
        time_scale=SIM_TIME_SCALE,
        cancel_concurrency=CANCEL_WORKER_CONCURRENCY,
        separate_api=True,  # as deployed: never sharing a GIL with the driver or the sim
        cancel_grace_seconds=GRACE_SECONDS,
        heartbeat_interval_seconds=HEARTBEAT_SECONDS,
    ) as stack:
        noop_worker = start_noop_worker(stack, log_dir / "worker-noop.log")
        try:
            wait_workers_ready(stack.settings, [noop_worker])
            yield System(stack, servers.redis_server, servers.postgres, work_dir, noop_worker)
        finally:
            noop_worker.stop()
