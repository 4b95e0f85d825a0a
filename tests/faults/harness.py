"""The fault suite's harness: the whole system as an operator runs it, and faults to inject.

Real Redis (AOF on, a fixed port and data dir, so it can be restarted in place), real
PostgreSQL (a fixed data dir and port, so it can be stopped and started again), the real
Celery worker processes and beat, the API in a process of its own and simulated ComfyUI
servers. Every setting the promise is about (grace period, heartbeats, sweep intervals,
visibility timeouts) keeps its default; only the simulated servers' time scale and the
workflows' sizes are chosen here.

One :class:`Harness` serves every fault of a session and restarts only what a fault broke
(:meth:`Harness.ensure_healthy` runs before each fault). A :class:`Scenario` is one fault:
its workflows, the cancels sent, the moment the fault ended, and the checks of the promise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from comfy_cancel import manager, worker
from comfy_cancel.config import Settings, child_environment
from comfy_cancel.embedded import processes, redis_server
from comfy_cancel.embedded.celery_workers import CeleryWorker
from comfy_cancel.embedded.comfyui_sim import RunningSim, blur_chain, start_in_thread
from comfy_cancel.embedded.processes import Child
from comfy_cancel.models import ApiToken, Workflow, WorkflowEvent, utcnow
from testbed import postgres
from testbed.database import LOOPBACK, migrated
from testbed.stack import TAIL_LINES, api_process, start_worker, wait_workers_ready

FULL = os.environ.get("COMFY_CANCEL_FAULTS", "").strip().lower() == "full"
TERMINAL = frozenset({"completed", "failed", "cancelled"})
# The promise: an accepted cancel lands within this long of the fault's end.
LAND_BUDGET_SECONDS = 10.0
# How long after the fault's end a late cancel is still waited for, so a failure reports
# how late it was instead of just "not within 10 s".
LATE_WAIT_SECONDS = 50.0
# Healthy work left after the fault must finish; this bounds the wait (not the promise).
DRAIN_SECONDS = 90.0
REDIS_DOWN_SECONDS = 3.0
POSTGRES_DOWN_SECONDS = 10.0
# Tokens of the harness may make many requests: the API's rate limit is not under test.
HARNESS_RATE_LIMIT = 1_000_000


@dataclass(frozen=True)
class Counts:
    """How much work each fault puts in flight: small for CI, more with COMFY_CANCEL_FAULTS=full."""

    sims: int
    per_sim: int
    cancels: int


SHORT = Counts(sims=4, per_sim=5, cancels=12)
LONGER = Counts(sims=8, per_sim=8, cancels=40)
COUNTS = LONGER if FULL else SHORT


def long_prompt(seconds: float) -> dict[str, Any]:
    """About ``seconds`` of interruptible work at time scale 1 (0.35 s a blur at 512²)."""
    return blur_chain(max(1, round(seconds / 0.35)), size=512, prefix="long")


SHORT_PROMPT = blur_chain(2, size=512, prefix="short")  # about 0.7 s


def deaf_prompt() -> dict[str, Any]:
    """One node ComfyUI cannot interrupt (no progress steps): ImageScale to 16384², about
    10.7 s at time scale 1, then a node that checks the interrupt flag."""
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScale",
              "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                         "width": 16384, "height": 16384, "crop": "disabled"}},
        "3": {"class_type": "ImageScale",
              "inputs": {"image": ["2", 0], "upscale_method": "nearest-exact",
                         "width": 64, "height": 64, "crop": "disabled"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "deaf"}},
    }


# --------------------------------------------------------------------------- the table


@dataclass
class Row:
    fault: str
    workflows: int
    cancels: int
    landed: int
    too_late: int
    max_land_seconds: float | None
    lost: int
    healthy_cancelled: int
    stuck: int
    drained_seconds: float | None
    problems: list[str] = field(default_factory=list)


RESULTS: list[Row] = []

HEADER = ("fault", "workflows", "cancels (200)", "landed", "of which too_late",
          "max s to land after fault end", "lost", "healthy cancelled or failed", "not terminal",
          "s until all terminal", "result")


def table(rows: Iterable[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        land = "-" if r.max_land_seconds is None else f"{r.max_land_seconds:.1f}"
        drained = "-" if r.drained_seconds is None else f"{r.drained_seconds:.1f}"
        cells = [r.fault, r.workflows, r.cancels, r.landed, r.too_late, land, r.lost,
                 r.healthy_cancelled, r.stuck, drained, "FAIL" if r.problems else "pass"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- simulated ComfyUI


@dataclass
class Sim:
    """One simulated ComfyUI server and the runner registered for it (its own tag)."""

    url: str
    tag: str
    in_process: RunningSim | None = None
    process: Child | None = None

    def stop(self) -> None:
        if self.in_process is not None:
            self.in_process.stop()
        if self.process is not None:
            self.process.kill()  # also ends a SIGSTOPped one

    def prompts_submitted(self) -> int:
        """POST /prompt calls the server accepted (the sim's request log)."""
        requests = httpx.get(f"{self.url}/sim/calls", timeout=10).json()["requests"]
        return sum(1 for r in requests
                   if r["method"] == "POST" and r["path"].endswith("/prompt")
                   and r["status"] == 200)


def _sim_process(time_scale: float, log_path: Path) -> tuple[str, Child]:
    """``comfy-cancel sim-comfyui`` in a process of its own (so it can be killed or frozen)."""
    port = processes.free_port()
    sim = Child("simulated ComfyUI", [sys.executable, "-m", "comfy_cancel.embedded.comfyui_sim",
                                      "--port", str(port), "--time-scale", str(time_scale)],
                log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        sim.start().wait_ready(lambda: processes.http_ok(f"{url}/system_stats"), 30,
                               tail_lines=TAIL_LINES)
    except BaseException:
        sim.stop()
        raise
    return url, sim


# --------------------------------------------------------------------------- the harness


class Harness:
    """Everything a fault can break, each part restartable on its own."""

    ROLES = ("cancel", "runner", "beat")

    def __init__(self, base: Path) -> None:
        self.base = base
        self.logs = base / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._exit = ExitStack()
        self.processes: dict[str, Child] = {}
        self.extra_beats: list[Child] = []
        self._starts: dict[str, int] = {}
        self._sims: list[Sim] = []
        self._sim_count = 0

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.redis_dir = self.base / "redis"
        self.redis = redis_server.start_redis(data_dir=self.redis_dir, appendonly=True)
        # Not under pytest's temp dir (see processes.make_temp_dir), and durable commits
        # (no fast=True): the fault stops and starts this server, and a shutdown that went
        # wrong must not silently drop acknowledged commits.
        self.pg_root = processes.make_temp_dir("comfy-cancel-pg-")
        self.pg_dir = self.pg_root / "data"
        self.pg = postgres.start_postgres(self.pg_dir)
        self.database_url = self.pg.create_database("faults")
        # Defaults for all that the promise is about; the simulated servers are on loopback,
        # which runners may reach only where the operator allows it.
        self.settings = Settings(database_url=self.database_url, redis_url=self.redis.url,
                                 runner_allowed_networks=LOOPBACK)
        self.db = migrated(self.database_url)
        with self.db.transaction() as session:
            account = manager.get_or_create_account(session, "acme")
            self.token = manager.create_token(session, account)
            self.account_id = account.id
            session.execute(update(ApiToken).values(rate_limit=HARNESS_RATE_LIMIT))
        for role in self.ROLES:
            self.start_role(role)
        self.wait_workers_ready()
        self.api_url, self.api_pid = self._exit.enter_context(
            api_process(self.settings, self.logs / "api.log")
        )
        self.http = httpx.Client(
            base_url=self.api_url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )

    def stop(self) -> None:
        for sim in self._sims:
            sim.stop()
        with contextlib.suppress(Exception):
            self.http.close()
        self._exit.close()
        processes.stop_all([*self.processes.values(), *self.extra_beats])
        self.db.engine.dispose()
        self.pg.stop()
        shutil.rmtree(self.pg_root, ignore_errors=True)
        self.redis.stop()

    # ---------------------------------------------------------------- processes

    def _log(self, role: str) -> Path:
        self._starts[role] = self._starts.get(role, 0) + 1
        return self.logs / f"{role}-{self._starts[role]}.log"

    def _spawn(self, role: str) -> Child:
        log_path = self._log(role)
        if role == "cancel":
            return start_worker(self.settings, worker.CANCEL_QUEUES, log_path, concurrency=50)
        if role == "runner":
            return start_worker(self.settings, [worker.RUNNER_QUEUE], log_path,
                                concurrency=self.settings.runner_concurrency)
        if role.startswith("beat"):
            schedule = self.base / f"{log_path.stem}.schedule"
            return Child(log_path.stem, [sys.executable, "-m", "comfy_cancel.cli", "beat",
                                         f"--schedule={schedule}"],
                         log_path, env=child_environment(self.settings)).start()
        raise ValueError(role)

    def start_role(self, role: str) -> None:
        self.processes[role] = self._spawn(role)

    def start_extra_beat(self) -> None:
        self.extra_beats.append(self._spawn(f"beat-extra{len(self.extra_beats) + 1}"))

    def stop_extra_beats(self) -> None:
        processes.stop_all(self.extra_beats)
        self.extra_beats.clear()

    def alive(self, role: str) -> bool:
        return self.processes[role].running

    def kill(self, role: str) -> None:
        self.processes[role].kill()

    def stop_role(self, role: str) -> None:
        self.processes[role].stop()

    def restart(self, role: str) -> None:
        """Start ``role`` again and wait until it answers (a worker) — the fault's end."""
        if self.alive(role):
            self.stop_role(role)
        self.start_role(role)
        if role in ("cancel", "runner"):
            self.wait_workers_ready([role])

    def wait_workers_ready(
        self, roles: Iterable[str] = ("cancel", "runner"), timeout: float = 60.0
    ) -> None:
        """The workers answer a ping (a restarted one has a new node name)."""
        wait_workers_ready(self.settings, [self._worker(role) for role in roles], timeout)

    def _worker(self, role: str) -> CeleryWorker:
        child = self.processes[role]
        assert isinstance(child, CeleryWorker), role
        return child

    def _log_stem(self, role: str) -> str:
        return f"{role}-{self._starts[role]}"

    def tail_logs(self, lines: int = 25) -> str:
        """The end of the current log of each process (earlier incarnations stay on disk)."""
        parts = []
        latest = [self.logs / f"{self._log_stem(role)}.log" for role in self._starts]
        for path in [*latest, self.logs / "api.log"]:
            if not path.exists():
                continue
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def exited(self) -> list[str]:
        return [f"{role} (exit {p.poll()})" for role, p in self.processes.items()
                if not p.running]

    def ensure_healthy(self) -> list[str]:
        """Bring back whatever an earlier fault left broken; returns what was restarted."""
        fixed: list[str] = []
        if self.redis.process.poll() is not None or not self._redis_answers():
            self.start_redis_again()
            fixed.append("redis")
        if self.pg.process.poll() is not None:
            self.start_postgres_again()
            fixed.append("postgres")
        self.stop_extra_beats()
        for role in self.ROLES:
            if not self.alive(role):
                self.start_role(role)
                fixed.append(role)
        if not httpx.get(f"{self.api_url}/healthz", timeout=10).status_code == 200:
            raise AssertionError("the API process is not serving")
        self.wait_workers_ready()
        return fixed

    # ---------------------------------------------------------------- Redis

    def _redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url, socket_timeout=5, socket_connect_timeout=2)

    def _redis_answers(self) -> bool:
        client = self._redis_client()
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def flushall(self) -> None:
        client = self._redis_client()
        try:
            client.flushall()
        finally:
            client.close()

    def shutdown_redis(self) -> None:
        """SHUTDOWN NOSAVE: no snapshot, but the AOF is flushed (appendonly yes)."""
        client = self._redis_client()
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown(nosave=True)
        client.close()
        self.redis.process.wait(15)
        self.redis.stop()  # forget it; the data dir is ours and stays

    def start_redis_again(self) -> None:
        """The same port and data dir, AOF on: what an operator's restart does."""
        self.redis = redis_server.start_redis(
            port=self.redis.port, data_dir=self.redis_dir, appendonly=True
        )

    # ---------------------------------------------------------------- PostgreSQL

    def stop_postgres(self) -> None:
        self.pg.stop()  # fast shutdown; the data dir is ours and stays

    def start_postgres_again(self) -> None:
        self.pg = postgres.start_postgres(self.pg_dir, port=self.pg.port)

    # ---------------------------------------------------------------- simulated ComfyUI

    def sim(self, *, time_scale: float = 1.0, own_process: bool = False) -> Sim:
        """A new simulated ComfyUI server with a runner of its own (tagged) for the account."""
        self._sim_count += 1
        tag = f"sim{self._sim_count}"
        if own_process:
            url, proc = _sim_process(time_scale, self.logs / f"{tag}.log")
            sim = Sim(url, tag, process=proc)
        else:
            running = start_in_thread(time_scale=time_scale)
            sim = Sim(running.url, tag, in_process=running)
        self._sims.append(sim)
        with self.db.transaction() as session:
            manager.add_runner(session, self.account_id, name=tag, endpoint_url=sim.url,
                               tags=[tag], settings=self.settings)
        return sim

    def release_sims(self) -> None:
        for sim in self._sims:
            sim.stop()
        self._sims.clear()

    # ---------------------------------------------------------------- the API and the database

    def submit(self, prompt: dict[str, Any], sim: Sim, name: str = "wf") -> str:
        response = self.http.post(
            "/v1/workflow", json={"name": name, "workflow_json": prompt, "tags": [sim.tag]}
        )
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    def rows(self, ids: Iterable[str]) -> dict[str, Workflow]:
        with self.db.transaction() as session:
            return {w.id: w for w in manager.workflows_by_ids(session, list(ids))}

    def statuses(self, ids: Iterable[str]) -> dict[str, str]:
        return {i: w.status for i, w in self.rows(ids).items()}

    def terminal_transitions(self, ids: Iterable[str]) -> dict[str, list[str]]:
        wanted = list(ids)
        found: dict[str, list[str]] = {i: [] for i in wanted}
        with self.db.transaction() as session:
            rows = session.execute(
                select(WorkflowEvent.workflow_id, WorkflowEvent.to_status)
                .where(WorkflowEvent.workflow_id.in_(wanted),
                       WorkflowEvent.kind == "transition",
                       WorkflowEvent.to_status.in_(sorted(TERMINAL)))
                .order_by(WorkflowEvent.id)
            ).all()
        for workflow_id, to_status in rows:
            found[workflow_id].append(str(to_status))
        return found

    def trails(self, ids: Iterable[str]) -> dict[str, list[str]]:
        """The audit trail of each workflow, one short line an event (for failure reports)."""
        with self.db.transaction() as session:
            return {
                i: [f"{e.at:%H:%M:%S.%f} {e.kind} {e.from_status}->{e.to_status} "
                    f"by {e.source} {e.outcome or ''}".rstrip()
                    for e in manager.events_of(session, i)]
                for i in ids
            }

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``predicate`` until it holds; a database error (an outage) counts as "not yet"."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except SQLAlchemyError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n"
                             f"{self.tail_logs()}")


# --------------------------------------------------------------------------- one fault


@dataclass
class Fleet:
    """Workflows put on simulated servers: one running on each, the rest pending behind it."""

    sims: list[Sim]
    running: list[str]
    queued: list[str]
    on: dict[str, Sim]

    @property
    def all(self) -> list[str]:
        return self.running + self.queued

    def pending_behind(self, parity: int, keep: int = 1) -> list[str]:
        """Pending workflows of the even (0) or odd (1) servers, all but the last ``keep``
        of each server. Behind an odd server's healthy running workflow they stay pending
        through a fault; behind an even server's cancelled one they run soon."""
        chosen = []
        for index, sim in enumerate(self.sims):
            if index % 2 == parity:
                mine = [w for w in self.queued if self.on[w] is sim]
                chosen += mine[: len(mine) - keep]
        return chosen

    def running_on(self, parity: int) -> list[str]:
        return [w for i, w in enumerate(self.running) if i % 2 == parity]


class Scenario:
    """One fault: its workflows, the cancels sent, when the fault ended, and the checks."""

    def __init__(self, harness: Harness, fault: str) -> None:
        self.h = harness
        self.fault = fault
        self.workflows: list[str] = []
        self.requested: set[str] = set()
        self.accepted: dict[str, datetime] = {}
        self.responses: list[tuple[str, int, str]] = []
        self.fault_end: datetime | None = None
        self.problems: list[str] = []

    # ---------------------------------------------------------------- work in flight

    def launch(
        self,
        sims: list[Sim],
        per_sim: int,
        running_prompt: dict[str, Any],
        queued_prompt: dict[str, Any] = SHORT_PROMPT,
    ) -> Fleet:
        """On each server one workflow running, then ``per_sim - 1`` pending behind it.

        The running ones are submitted first and waited for, so each server's queue order
        is known whatever order the runner tasks submit in."""
        on: dict[str, Sim] = {}
        running = []
        for sim in sims:
            workflow_id = self.h.submit(running_prompt, sim, name=f"{sim.tag}-running")
            running.append(workflow_id)
            on[workflow_id] = sim
        self.workflows += running
        self.wait_statuses(running, {"running"}, "the first workflow of each server to run")
        queued = []
        for sim in sims:
            for n in range(per_sim - 1):
                workflow_id = self.h.submit(queued_prompt, sim, name=f"{sim.tag}-queued{n}")
                queued.append(workflow_id)
                on[workflow_id] = sim
        self.workflows += queued
        self.wait_statuses(queued, {"queued"}, "the rest to be queued")
        # Status `queued` comes before the prompt reaches ComfyUI: wait for the submission
        # too, so a fault that follows finds them pending on their servers (a workflow
        # cancelled before its submission is rightly never submitted).
        self.h.wait_for(
            lambda: all(w.queue_number is not None for w in self.h.rows(queued).values()),
            60.0, "the rest to be pending on their ComfyUI servers")
        return Fleet(sims, running, queued, on)

    def add(self, workflow_ids: Iterable[str]) -> None:
        self.workflows += list(workflow_ids)

    def wait_statuses(self, ids: list[str], wanted: set[str], what: str,
                      timeout: float = 60.0) -> None:
        def reached() -> bool:
            found = self.h.statuses(ids)
            unexpected = {i: s for i, s in found.items() if s in TERMINAL}
            if unexpected:
                raise AssertionError(f"ended before the fault: {unexpected}")
            return all(found.get(i) in wanted for i in ids)

        self.h.wait_for(reached, timeout, what)

    @staticmethod
    def pick(fleet: Fleet, count: int, *, running: str = "even") -> list[str]:
        """Cancel targets: the running workflow of every other server (``running="even"``),
        of all (``"all"``) or of none (``"none"``), then pending ones round-robin, keeping at
        least one pending workflow per server healthy."""
        chosen = [w for i, w in enumerate(fleet.running)
                  if running == "all" or (running == "even" and i % 2 == 0)]
        per_sim: dict[str, list[str]] = {s.tag: [] for s in fleet.sims}
        for w in fleet.queued:
            per_sim[fleet.on[w].tag].append(w)
        rounds = max((len(v) for v in per_sim.values()), default=0)
        for n in range(rounds - 1):  # the last of each server stays healthy
            for ids in per_sim.values():
                if n < len(ids) - 1 and len(chosen) < count:
                    chosen.append(ids[n])
        return chosen

    # ---------------------------------------------------------------- cancels

    def cancel(self, workflow_ids: Iterable[str], *, recorded: bool = True) -> list[int]:
        """POST .../cancel for each, all at once (a burst, as many clients would); a 200 is
        an accepted cancel that must land.

        ``recorded=False`` for cancels that cannot have been committed (the database is
        down), so a workflow that ends cancelled anyway counts as healthy work lost."""
        ids = list(workflow_ids)
        if recorded:
            self.requested.update(ids)

        def send(workflow_id: str) -> tuple[str, int, str]:
            try:
                response = self.h.http.post(f"/v1/workflow/{workflow_id}/cancel")
                code, text = response.status_code, response.text
            except httpx.HTTPError as exc:
                code, text = 0, f"{type(exc).__name__}: {exc}"
            if code == 200:
                self.accepted.setdefault(workflow_id, utcnow())
            return workflow_id, code, text

        with ThreadPoolExecutor(max_workers=max(1, min(len(ids), 16))) as pool:
            results = list(pool.map(send, ids))
        self.responses += results
        return [code for _, code, _ in results]

    def fault_ended(self, at: datetime | None = None) -> None:
        self.fault_end = at or utcnow()

    # ---------------------------------------------------------------- the checks

    def finish(self, *, healthy_complete: bool = True) -> Row:
        """Wait for the cancels to land and the rest to end, check the promise, record a row
        for the table and fail with every broken invariant at once.

        ``healthy_complete``: workflows nobody asked to cancel must complete (the fault must
        not throw healthy work away); False where the fault itself ends them (a dead
        ComfyUI server fails its work)."""
        assert self.fault_end is not None, "fault_ended() was not called"
        h = self.h
        end = self.fault_end
        landed_at: dict[str, float] = {}

        def all_landed() -> bool:
            rows = h.rows(self.accepted)
            for workflow_id, w in rows.items():
                if workflow_id not in landed_at and w.cancel_outcome is not None \
                        and w.status in TERMINAL and w.cancel_finished_at is not None:
                    landed_at[workflow_id] = max(
                        0.0, (w.cancel_finished_at - end).total_seconds()
                    )
            return len(landed_at) == len(self.accepted)

        late_deadline = (end + timedelta(seconds=LAND_BUDGET_SECONDS + LATE_WAIT_SECONDS)
                         - utcnow()).total_seconds()
        with contextlib.suppress(AssertionError):
            h.wait_for(all_landed, max(late_deadline, 1.0), "accepted cancels to land")

        started = utcnow()
        drained_at: list[float] = []

        def all_terminal() -> bool:
            if set(h.statuses(self.workflows).values()) <= TERMINAL:
                drained_at.append((utcnow() - end).total_seconds())
                return True
            return False

        with contextlib.suppress(AssertionError):
            h.wait_for(all_terminal, DRAIN_SECONDS, "every workflow to end")
        drain_waited = (utcnow() - started).total_seconds()

        rows = h.rows(self.workflows)
        transitions = h.terminal_transitions(self.workflows)
        lost = [w for w in self.accepted if w not in landed_at]
        late = {w: s for w, s in landed_at.items() if s > LAND_BUDGET_SECONDS}
        healthy_cancelled = [w for w, r in rows.items()
                             if r.status == "cancelled" and w not in self.requested]
        stuck = {w: r.status for w, r in rows.items() if r.status not in TERMINAL}
        healthy_failed = {w: (r.exception_type, (r.exception_message or "")[:120])
                          for w, r in rows.items()
                          if healthy_complete and r.status == "failed" and w not in self.requested}
        wrong_end = {w: (rows[w].status, rows[w].cancel_outcome) for w in landed_at
                     if rows[w].status != "cancelled" and rows[w].cancel_outcome != "too_late"}
        transition_problems = {
            w: ends for w, ends in transitions.items()
            if w not in stuck and (len(ends) != 1 or ends[0] != rows[w].status)
        }
        if lost:
            self.problems.append(f"{len(lost)} accepted cancels never landed: "
                                 f"{ {w: (rows[w].status, rows[w].cancel_outcome) for w in lost} }"
                                 f"; their audit trails: {h.trails(lost[:3])}")
        if late:
            self.problems.append(f"{len(late)} cancels landed later than "
                                 f"{LAND_BUDGET_SECONDS:g}s after the fault's end: {late}; "
                                 f"audit trails: {h.trails(list(late)[:3])}")
        if healthy_cancelled:
            self.problems.append(
                "workflows nobody asked to cancel ended cancelled: "
                f"{ {w: (rows[w].cancel_source, rows[w].cancel_outcome, rows[w].cancel_reason) for w in healthy_cancelled} }"  # noqa: E501
            )
        if healthy_failed:
            self.problems.append(f"workflows nobody asked to cancel failed: {healthy_failed}")
        if stuck:
            self.problems.append(f"not terminal {drain_waited:.0f}s later: {stuck}")
        if wrong_end:
            self.problems.append(f"landed as neither cancelled nor too_late: {wrong_end}")
        exited = h.exited()
        if exited:
            self.problems.append(f"processes exited: {exited}")
        if transition_problems:
            self.problems.append("not exactly one terminal transition matching the status: "
                                 f"{transition_problems}")
        row = Row(
            fault=self.fault,
            workflows=len(self.workflows),
            cancels=len(self.accepted),
            landed=len(landed_at),
            too_late=sum(1 for w in landed_at if rows[w].cancel_outcome == "too_late"),
            max_land_seconds=max(landed_at.values()) if landed_at else None,
            lost=len(lost),
            healthy_cancelled=len(healthy_cancelled) + len(healthy_failed),
            stuck=len(stuck),
            drained_seconds=drained_at[0] if drained_at else None,
            problems=list(self.problems),
        )
        RESULTS.append(row)
        if self.problems:
            raise AssertionError(
                f"{self.fault}:\n- " + "\n- ".join(self.problems) + f"\n{h.tail_logs()}"
            )
        return row


@contextlib.contextmanager
def scenario(harness: Harness, fault: str) -> Iterator[Scenario]:
    """A fault on a healthy system; its simulated servers are released afterwards. A fault
    that broke the test before its checks still gets a row in the table."""
    harness.ensure_healthy()
    sc = Scenario(harness, fault)
    recorded = len(RESULTS)
    try:
        yield sc
    except BaseException as exc:
        if len(RESULTS) == recorded:
            RESULTS.append(Row(fault, len(sc.workflows), len(sc.accepted), 0, 0, None,
                               len(sc.accepted), 0, 0, None,
                               [f"{type(exc).__name__}: {str(exc)[:300]}"]))
        raise
    finally:
        harness.release_sims()


def sleep_until(deadline: float) -> None:
    """Hold a fault for its stated duration (a monotonic deadline), not a guess at timing."""
    remaining = deadline - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)

