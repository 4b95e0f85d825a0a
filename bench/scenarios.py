"""The measurements, each beside its baseline, on the running system.

Each function takes the :class:`~bench.system.System`, its sizes and a log, plus the
figures it is measured against (the no-op round trip, measured first in the run), and
returns a JSON-ready dict. Times that cross processes are wall-clock (``time.time()`` in the load
generator, ``utcnow()`` where the cancel worker or the runner stamps
``cancel_finished_at``, ``time.time()`` in the simulated ComfyUI): one machine, one clock.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import psycopg
from sqlalchemy import bindparam, text

from bench import cpu, noop, seed
from bench.stats import distribution_ms, median, ratio
from bench.system import GRACE_SECONDS, REPO, System, epoch
from comfy_cancel import db, manager
from comfy_cancel.config import Settings
from comfy_cancel.context import Context
from comfy_cancel.db import Database, make_engine
from comfy_cancel.embedded.comfyui_sim import blur_chain
from comfy_cancel.migrations import upgrade
from comfy_cancel.models import CancelOutcome, CancelSource, EventKind, WorkflowStatus
from comfy_cancel.sweeps import sweep
from testbed import sse

Log = Callable[[str], None]

# ImageBlur at 512x512, radius 31: 0.356 s a node at time scale 1, interruptible every
# tenth of that (the simulated ComfyUI's calibration of a 2-core CPU).
RUNNING_PROMPT = blur_chain(30, size=512, prefix="bench")
SIM_NODE_MS = round((0.01 + 1.32e-6 * 512 * 512) * 1000, 1)
SIM_STEP_MS = round(SIM_NODE_MS / 10, 1)


@dataclass(frozen=True)
class Sizes:
    throughput_cancels: int
    noop_tasks: int
    latency_seconds: float
    running_samples: int
    at_once: int
    at_once_variants: tuple[tuple[str, str], ...]
    bulk_sizes: tuple[int, int]
    one_at_a_time_sample: int
    sweep_sizes: tuple[int, int]
    sweep_passes: int
    load_seconds: float
    clients: int = 32
    # Queued latency: the goal's offered rate is this fraction of the no-op round trip
    # rate of the same run; a fixed rate is reported beside it.
    latency_noop_fraction: float = 0.3
    latency_fixed_rate: int = 50
    # Stream lag: cancels watched on GET /v1/workflow/{id}/subscribe, one after another.
    stream_samples: int = 200


FULL = Sizes(
    throughput_cancels=3000, noop_tasks=10000, latency_seconds=15.0, running_samples=100,
    at_once=1000,
    at_once_variants=(("api", "ack"), ("api", "deaf"), ("bulk", "ack"), ("bulk", "deaf")),
    bulk_sizes=(10_000, 100_000), one_at_a_time_sample=300, sweep_sizes=(10_000, 1_000_000),
    sweep_passes=7, load_seconds=15.0,
)
QUICK = Sizes(
    throughput_cancels=300, noop_tasks=1500, latency_seconds=2.0, running_samples=6,
    at_once=100, at_once_variants=(("api", "ack"), ("bulk", "ack")),
    bulk_sizes=(1_000, 10_000), one_at_a_time_sample=40, sweep_sizes=(10_000, 100_000),
    sweep_passes=3, load_seconds=2.0, stream_samples=30,
)


def _known_pids(system: System) -> dict[int, str]:
    return {system.api_pid: "api", system.cancel_worker_pid: "cancel worker",
            system.runner_worker_pid: "runner worker", system.noop_worker.pid: "no-op worker"}


# What a cancel costs: every process of the system under test (the runner worker too: the
# revoke broadcast reaches it). Not the load generator, the benchmark or the no-op worker.
CANCEL_ROLES = ("api", "cancel worker", "runner worker", "postgresql", "redis")
# What a no-op task costs, besides its producer's publishing (measured in the producer).
NOOP_ROLES = ("no-op worker", "redis")


def _cpu_ms_per(used: dict[str, Any], roles: tuple[str, ...], count: int,
                extra: dict[str, float] | None = None) -> dict[str, Any]:
    """CPU milliseconds per item of ``count``, summed over ``roles`` of a
    :func:`bench.cpu.cpu_by_role` result (and ``extra`` CPU seconds by name)."""
    seconds = {role: used["cpu_seconds_by_role"].get(role, 0.0) for role in roles}
    seconds |= extra or {}
    if not count:
        return {"total": None, "by_process": {}}
    return {"total": round(1000 * sum(seconds.values()) / count, 3),
            "by_process": {k: round(1000 * v / count, 3) for k, v in seconds.items()}}


def _codes(requests: list[list[Any]]) -> dict[str, int]:
    return dict(Counter(str(r[4]) for r in requests))


def _ok(requests: list[list[Any]]) -> list[list[Any]]:
    return [r for r in requests if r[4] == 200]


def pg_sessions(system: System) -> int:
    """Connections ever opened to the benchmark's database (PostgreSQL 14+)."""
    with psycopg.connect(db.libpq_url(system.stack.settings.database_url),
                         autocommit=True) as conn:
        row = conn.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


def warm_up(system: System, log: Log) -> None:
    """Connections, caches and imports warm in every process before anything is timed."""
    account_id, token = system.new_account("warm-up")
    ids = seed.queued(system.db, account_id, system.stack.runner_id, 100)
    system.loadgen_http("warm-up", system.cancel_url(), method="POST", token=token, ids=ids,
                        concurrency=8)
    system.wait_account_settled(account_id, len(ids), 60)
    key = f"bench:noop:{uuid.uuid4().hex}"
    system.loadgen_noop("warm-up-noop", 200, key)
    _wait_counter(system, key, 200, 60)
    log("warmed up")


def _wait_counter(system: System, key: str, target: int, timeout: float) -> float | None:
    # Every 10 ms: finer polling would add the poll's own Redis CPU to the no-op baseline.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if int(system.redis.get(key) or 0) >= target:
            return time.time()
        time.sleep(0.01)
    return None


# --- 0. the no-op Celery round trip, the baseline of throughput, latency and CPU --------------


def noop_baseline(system: System, sizes: Sizes, log: Log) -> dict[str, Any]:
    """``noop_tasks`` no-op tasks published by one producer process and run by a worker
    with the cancel worker's settings (both workers report theirs, and they are compared)."""
    settings = {"cancel_worker": noop.worker_settings(system.cancel_worker_pid),
                "noop_worker": noop.worker_settings(system.noop_worker.pid)}
    differ = sorted(k for k, v in settings["cancel_worker"].items()
                    if settings["noop_worker"].get(k) != v)
    if differ:
        log(f"warning: the no-op worker's settings differ from the cancel worker's: {differ}")
    key = f"bench:noop:{uuid.uuid4().hex}"
    with cpu.cpu_by_role(_known_pids(system)) as used:
        published = system.loadgen_noop("noop", sizes.noop_tasks, key)
        done_at = _wait_counter(system, key, sizes.noop_tasks, 300)
    rate = sizes.noop_tasks / (done_at - published["started"]) if done_at else None
    per_task = _cpu_ms_per(used, NOOP_ROLES, sizes.noop_tasks,
                           {"producer (publishing)": published["publish_cpu_seconds"]})
    log(f"no-op round trip {_round(rate)} tasks/s, {per_task['total']} ms CPU a task")
    return {
        "tasks": sizes.noop_tasks, "completed": done_at is not None,
        "per_second": _round(rate),
        "publish_seconds": round(published["finished"] - published["started"], 3),
        "cpu_ms_per_task": per_task["total"],
        "cpu_ms_per_task_by_process": per_task["by_process"],
        "cpu": used,
        "worker_settings": settings,
        "settings_that_differ": differ,
    }


# --- 1. throughput ---------------------------------------------------------------------------


def throughput(system: System, sizes: Sizes, log: Log,
               noop_run: dict[str, Any]) -> dict[str, Any]:
    account_id, token = system.new_account("throughput")
    ids = seed.queued(system.db, account_id, system.stack.runner_id, sizes.throughput_cancels)
    sessions_before = pg_sessions(system)
    with cpu.cpu_by_role(_known_pids(system)) as cancel_cpu:
        load = system.loadgen_http("throughput", system.cancel_url(), method="POST",
                                   token=token, ids=ids, concurrency=sizes.clients)
        settled = system.wait_account_settled(account_id, len(ids), 300)
    new_connections = pg_sessions(system) - sessions_before
    finished = [t for _, t, _ in system.cancel_times(account_id).values() if t is not None]
    start = min(r[2] for r in load["requests"])
    cancel_rate = len(finished) / (max(finished) - start) if finished else None
    per_cancel = _cpu_ms_per(cancel_cpu, CANCEL_ROLES, len(finished))
    log(f"throughput: {_round(cancel_rate)} cancels/s end to end, {per_cancel['total']} ms "
        "CPU a cancel")
    return {
        "cancels": len(ids), "cancelled": len(finished), "settled": settled,
        "clients": sizes.clients, "cancel_worker_processes": 1,
        "cancel_per_second": _round(cancel_rate),
        "noop_tasks": noop_run["tasks"],
        "noop_per_second": noop_run["per_second"],
        "noop_publish_seconds": noop_run["publish_seconds"],
        "ratio": ratio(cancel_rate, noop_run["per_second"]),
        "api_response": distribution_ms([r[3] - r[2] for r in _ok(load["requests"])]),
        "http_codes": _codes(load["requests"]),
        "new_postgresql_connections": new_connections,
        "cpu_cancel": cancel_cpu, "cpu_noop": noop_run["cpu"],
        "cpu_ms_per_cancel": per_cancel["total"],
        "cpu_ms_per_cancel_by_process": per_cancel["by_process"],
        "cpu_ms_per_noop_task": noop_run["cpu_ms_per_task"],
        "cpu_ratio": ratio(per_cancel["total"], noop_run["cpu_ms_per_task"]),
    }


# --- 2. queued latency -----------------------------------------------------------------------


def queued_latency(system: System, sizes: Sizes, log: Log,
                   noop_run: dict[str, Any]) -> dict[str, Any]:
    """Open-loop load at the goal's offered rate (a fraction of the no-op round trip rate
    of this run) and at a fixed rate; entries keyed by label, the goal's marked."""
    if not noop_run.get("per_second"):
        raise RuntimeError("no no-op round trip rate to derive the offered rate from")
    fraction = sizes.latency_noop_fraction
    runs = ((f"{sizes.latency_fixed_rate}/s", float(sizes.latency_fixed_rate), None),
            (f"{fraction:g}x no-op", round(fraction * noop_run["per_second"], 1), fraction))
    result: dict[str, Any] = {}
    for label, rate, of_noop in runs:
        name = "latency-" + label.replace("/", "-per-").replace(" ", "-")
        count = max(1, int(rate * sizes.latency_seconds))
        account_id, token = system.new_account(name)
        ids = seed.queued(system.db, account_id, system.stack.runner_id, count)
        with cpu.cpu_by_role(_known_pids(system)) as used:
            load = system.loadgen_http(name, system.cancel_url(), method="POST",
                                       token=token, ids=ids, rate=rate,
                                       concurrency=sizes.clients,
                                       duration=sizes.latency_seconds * 4 + 30)
            settled = system.wait_account_settled(account_id, count, 300)
        times = system.cancel_times(account_id)
        ok = _ok(load["requests"])
        latencies, early = [], 0
        for item, _due, _sent, done, _code in ok:
            finished = times[item][1]
            if finished is None:
                continue
            if finished < done:
                early += 1  # cancelled before the client had read the 200
            latencies.append(max(0.0, finished - done))
        span = max(r[3] for r in ok) - min(r[2] for r in ok) if ok else None
        result[label] = {
            "offered_per_second": rate,
            "goal": of_noop is not None,
            "offered_as": "fixed" if of_noop is None else
            f"{of_noop:g}x the no-op round trip ({noop_run['per_second']} tasks/s)",
            "requests": len(load["requests"]),
            "achieved_per_second": _round(len(ok) / span if span else None),
            "settled": settled,
            "latency_200_to_cancelled": distribution_ms(latencies),
            "cancelled_before_the_200_was_read": early,
            "api_response": distribution_ms([r[3] - r[2] for r in ok]),
            "send_lag": distribution_ms([max(0.0, r[2] - r[1]) for r in load["requests"]]),
            "http_codes": _codes(load["requests"]),
            "cpu": used,
            "samples_ms": [round(v * 1000, 2) for v in latencies],
        }
        p99 = result[label]["latency_200_to_cancelled"]["p99_ms"]
        log(f"queued latency at {rate}/s ({label}): p99 {p99} ms")
    return result


# --- 3. running latency ----------------------------------------------------------------------


def running_latency(system: System, sizes: Sizes, log: Log) -> dict[str, Any]:
    stack = system.stack
    rng = random.Random(5)
    records: list[tuple[str, float]] = []
    failures: Counter[str] = Counter()

    def status_of(workflow_id: str) -> str:
        with system.db.transaction() as session:
            return str(session.execute(text("SELECT status FROM workflows WHERE id = :i"),
                                       {"i": workflow_id}).scalar_one())

    def wait_status(workflow_id: str, wanted: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        current = status_of(workflow_id)
        while current not in wanted and time.monotonic() < deadline:
            time.sleep(0.01)
            current = status_of(workflow_id)
        return current

    terminal = {"cancelled", "completed", "failed"}
    with httpx.Client(base_url=stack.api_url, timeout=30,
                      headers={"Authorization": f"Bearer {stack.token}"}) as client:
        for n in range(sizes.running_samples + 1):  # the first one warms the runner up
            response = client.post("/v1/workflow", json={
                "name": f"running-latency-{n}", "workflow_json": RUNNING_PROMPT})
            workflow_id = response.json()["id"]
            if wait_status(workflow_id, {"running"} | terminal, 30) != "running":
                failures["never ran"] += 1
                continue
            time.sleep(rng.uniform(0.05, 0.25))  # land anywhere within a node's step
            response = client.post(f"/v1/workflow/{workflow_id}/cancel")
            acknowledged = time.time()
            if response.status_code != 200:
                failures[f"cancel answered {response.status_code}"] += 1
                continue
            if wait_status(workflow_id, terminal, 30) != "cancelled":
                failures["did not end cancelled"] += 1
            if n > 0:
                records.append((workflow_id, acknowledged))
    _wait_freed(system, [workflow_id for workflow_id, _ in records])
    calls = httpx.get(f"{stack.sim.url}/sim/calls", timeout=30).json()["calls"]
    first_call: dict[str, float] = {}
    for call in calls:
        if call["prompt_id"] and call["prompt_id"] not in first_call:
            first_call[call["prompt_id"]] = float(call["at"])
    to_call: list[float] = []
    to_cancelled: list[float] = []
    to_freed: list[float] = []
    outcomes: Counter[str] = Counter()
    call_before_200 = 0
    with system.db.transaction() as session:
        for workflow_id, acknowledged in records:
            prompt_id, finished, outcome, freed = session.execute(
                text("SELECT prompt_id, cancel_finished_at, cancel_outcome, freed_at "
                     "FROM workflows WHERE id = :i"), {"i": workflow_id}).one()
            outcomes[str(outcome)] += 1
            if prompt_id in first_call:
                call_before_200 += first_call[prompt_id] < acknowledged
                to_call.append(max(0.0, first_call[prompt_id] - acknowledged))
            if finished is not None:
                to_cancelled.append(max(0.0, (epoch(finished) or 0.0) - acknowledged))
            if freed is not None:
                to_freed.append(max(0.0, (epoch(freed) or 0.0) - acknowledged))
    result: dict[str, Any] = {
        "samples": len(records),
        "to_comfyui_cancel_call": distribution_ms(to_call),
        "to_cancelled": distribution_ms(to_cancelled),
        # The runner saw ComfyUI hold the prompt no more (freed_at); unconfirmed ones left out.
        "to_freed": distribution_ms(to_freed),
        "freed_unconfirmed": len(records) - len(to_freed),
        "call_before_the_200_was_read": call_before_200,
        "sim_node_ms": SIM_NODE_MS,
        "sim_step_ms": SIM_STEP_MS,
        "sim_time_scale": system.stack.sim.sim.time_scale,
        "outcomes": dict(outcomes),
        "failures": dict(failures),
        "samples_to_call_ms": [round(v * 1000, 2) for v in to_call],
        "samples_to_cancelled_ms": [round(v * 1000, 2) for v in to_cancelled],
        "samples_to_freed_ms": [round(v * 1000, 2) for v in to_freed],
    }
    log(f"running latency: p99 to the ComfyUI call {result['to_comfyui_cancel_call']['p99_ms']}"
        f" ms, to cancelled {result['to_cancelled']['p99_ms']} ms, to freed "
        f"{result['to_freed']['p99_ms']} ms")
    return result


def _wait_freed(system: System, workflow_ids: list[str], timeout: float = 10.0) -> None:
    """Until every one has its freed_at (it follows `cancelled` by the runner's look at
    ComfyUI's queue), or ``timeout``: the ones still without count as unconfirmed."""
    if not workflow_ids:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with system.db.transaction() as session:
            missing = session.execute(
                text("SELECT count(*) FROM workflows WHERE id IN :ids AND freed_at IS NULL")
                .bindparams(bindparam("ids", expanding=True)), {"ids": workflow_ids}).scalar()
        if not missing:
            return
        time.sleep(0.05)


# --- 3b. the live stream -----------------------------------------------------------------------


def stream_lag(system: System, sizes: Sizes, log: Log) -> dict[str, Any]:
    """From the database write of `cancelled` (its audit row's time, stamped just before the
    statement: the commit is inside the figure) to the subscriber reading its event, for
    queued workflows cancelled through the API one after another while watched."""
    stack = system.stack
    ids = seed.queued(system.db, stack.account_id, stack.runner_id, sizes.stream_samples + 1)
    lags: list[float] = []
    failures: Counter[str] = Counter()
    with httpx.Client(base_url=stack.api_url, timeout=30,
                      headers={"Authorization": f"Bearer {stack.token}"}) as client:
        for n, workflow_id in enumerate(ids):
            with client.stream("GET", f"/v1/workflow/{workflow_id}/subscribe") as response:
                events = sse.events(response.iter_lines())
                if next(events).event != "state":
                    failures["no state first"] += 1
                    continue
                if client.post(f"/v1/workflow/{workflow_id}/cancel").status_code != 200:
                    failures["cancel refused"] += 1
                    continue
                for event in events:
                    if event.event == "status":
                        received = time.time()
                        written = datetime.fromisoformat(event.json["at"]).timestamp()
                        if event.json["to_status"] != "cancelled":
                            failures[f"ended {event.json['to_status']}"] += 1
                        elif n > 0:  # the first one warms the path up
                            lags.append(max(0.0, received - written))
                        break
                else:
                    failures["stream closed without a status"] += 1
    result: dict[str, Any] = {
        "samples": len(lags),
        "write_to_event": distribution_ms(lags),
        "failures": dict(failures),
        "samples_ms": [round(v * 1000, 2) for v in lags],
    }
    log(f"stream lag: p99 {result['write_to_event']['p99_ms']} ms over {len(lags)} cancels")
    return result


# --- 4. a thousand running at once -----------------------------------------------------------


def at_once(system: System, sizes: Sizes, log: Log) -> dict[str, Any]:
    variants = {}
    for via, mode in sizes.at_once_variants:
        variants[f"{via}-{mode}"] = _at_once(system, sizes, via, mode)
        log(f"{sizes.at_once} running at once ({via}, runners {mode}): "
            f"{variants[f'{via}-{mode}']['wall_seconds']} s")
    return {"count": sizes.at_once, "grace_seconds": GRACE_SECONDS, "variants": variants}


def _at_once(system: System, sizes: Sizes, via: str, mode: str) -> dict[str, Any]:
    name = f"at-once-{via}-{mode}"
    account_id, token = system.new_account(name)
    ids = seed.running_via_status_writer(system.db, account_id, system.stack.runner_id,
                                         sizes.at_once)
    ids_file = system.path(f"ids-{name}.txt")
    ids_file.write_text("\n".join(ids))
    out = system.path(f"fake-runner-{name}.json")
    runners = subprocess.Popen(
        [sys.executable, "-m", "bench.fake_runner", "--ids", str(ids_file), "--mode", mode,
         "--ack-delay", str(SIM_STEP_MS / 1000), "--out", str(out)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert runners.stdout is not None
        if runners.stdout.readline().strip() != "ready":
            raise RuntimeError("the simulated runners did not start")
        with cpu.cpu_by_role({**_known_pids(system), runners.pid: "simulated runners"}) as used:
            started = time.time()
            if via == "api":
                load = system.loadgen_http(name, system.cancel_url(), method="POST", token=token,
                                           ids=ids, concurrency=sizes.clients)
                codes = _codes(load["requests"])
            else:
                command = _measured_cli(system, name, ["bulk-cancel", "--account", name,
                                                       "--status", "running", "--yes", "--json",
                                                       "--wait", "0"])
                codes = {"bulk command exit": command["exit_code"]}
            settled = system.wait_account_settled(account_id, len(ids), 4 * GRACE_SECONDS + 120)
    finally:
        if runners.stdin is not None:
            runners.stdin.close()
        runners.wait(60)
    times = system.cancel_times(account_id)
    finished = [t for _, t, _ in times.values() if t is not None]
    wall = max(finished) - started if finished else None
    runner_report = json.loads(out.read_text()) if out.exists() else {}
    return {
        "via": via, "runners": mode, "count": len(ids), "settled": settled,
        "wall_seconds": _round(wall, 2),
        "grace_periods": ratio(wall, GRACE_SECONDS),
        "statuses": dict(Counter(s for s, _, _ in times.values())),
        "outcomes": dict(Counter(str(o) for _, _, o in times.values())),
        "requests": codes, "simulated_runners": runner_report, "cpu": used,
    }


def _measured_cli(system: System, label: str, command: list[str]) -> dict[str, Any]:
    out = system.path(f"measure-{label}.json")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bench.measure", str(out), "--", *command],
                   cwd=REPO, check=False, capture_output=True, timeout=900)
    result = dict(json.loads(out.read_text()))
    result["wall_seconds"] = round(time.perf_counter() - started, 3)
    return result


# --- 5. bulk cancel --------------------------------------------------------------------------


def bulk(system: System, sizes: Sizes, log: Log) -> dict[str, Any]:
    runner_id = system.stack.runner_id
    database_url = system.stack.settings.database_url
    accounts = {}
    bare = {}
    for size in sizes.bulk_sizes:
        name = f"bulk-{size}"
        account_id, _ = system.new_account(name)
        seed.queued(system.db, account_id, runner_id, size)
        accounts[size] = (name, account_id)
        # The bare SQL baseline's own account, seeded alike, in the same state.
        bare[size], _ = system.new_account(f"bulk-sql-{size}")
        seed.queued(system.db, bare[size], runner_id, size)

    # One at a time through the API, on a sample, in this run.
    account_id, token = system.new_account("one-at-a-time")
    ids = seed.queued(system.db, account_id, runner_id, sizes.one_at_a_time_sample)
    load = system.loadgen_http("one-at-a-time", system.cancel_url(), method="POST",
                               token=token, ids=ids, concurrency=1)
    system.wait_account_settled(account_id, len(ids), 120)
    finished = [t for _, t, _ in system.cancel_times(account_id).values() if t is not None]
    one_span = max(finished) - min(r[2] for r in load["requests"])
    one_rate = len(finished) / one_span
    log(f"bulk: one API call at a time: {one_rate:.0f} cancels/s on {len(ids)}")

    dry = _measured_cli(system, "bulk-dry-run", [
        "bulk-cancel", "--account", accounts[sizes.bulk_sizes[0]][0], "--status", "queued",
        "--dry-run", "--json"])
    result: dict[str, Any] = {
        "one_at_a_time": {"sample": len(ids), "cancelled": len(finished),
                          "rate_per_second": _round(one_rate),
                          "api_response": distribution_ms(
                              [r[3] - r[2] for r in _ok(load["requests"])])},
        "dry_run_peak_rss_mb": _mb(dry["peak_rss_bytes"]),
        "sizes": {},
    }
    for size in sizes.bulk_sizes:
        name, account_id = accounts[size]
        sql = bare_sql_cancel(database_url, bare[size])
        # Its dead row versions cleaned up, as autovacuum would: the command then meets
        # the table in the state the SQL met it in.
        seed.vacuum_analyze(system.db)
        log(f"bulk {size}: bare SQL {sql['seconds']} s")
        started = time.time()
        with cpu.cpu_by_role(_known_pids(system)) as used:
            command = _measured_cli(system, name, [
                "bulk-cancel", "--account", name, "--status", "queued", "--yes", "--json",
                "--wait", "0"])
        times = system.cancel_times(account_id)
        finished = [t for _, t, _ in times.values() if t is not None]
        summary = json.loads(command["stdout"]) if command["exit_code"] == 0 else {}
        to_last = max(finished) - started if finished else None
        estimate_one_at_a_time = size / one_rate
        result["sizes"][str(size)] = {
            "workflows": size,
            "cancelled": sum(1 for s, _, _ in times.values() if s == "cancelled"),
            "command_wall_seconds": command["wall_seconds"],
            "to_last_cancelled_seconds": _round(to_last, 3),
            "command_own_seconds": summary.get("seconds"),
            "rate_per_second": _round(size / command["wall_seconds"]),
            "peak_rss_mb": _mb(command["peak_rss_bytes"]),
            "one_at_a_time_estimate_seconds": round(estimate_one_at_a_time, 1),
            "ratio_vs_one_at_a_time": ratio(estimate_one_at_a_time, command["wall_seconds"]),
            "bare_sql": sql,
            "ratio_vs_bare_sql": ratio(command["wall_seconds"], sql["seconds"]),
            "exit_code": command["exit_code"],
            "cpu": used,
        }
        log(f"bulk {size}: {command['wall_seconds']} s, peak RSS "
            f"{result['sizes'][str(size)]['peak_rss_mb']} MB")
    small, large = (result["sizes"][str(s)] for s in sizes.bulk_sizes)
    result["memory_ratio"] = ratio(large["peak_rss_mb"], small["peak_rss_mb"])
    return result


def _mb(value: float) -> float:
    return round(value / 2**20, 1)


def bare_sql_cancel(database_url: str, account_id: int) -> dict[str, Any]:
    """The floor of a bulk cancel: the account's queued workflows set to ``cancelled``
    by one ``UPDATE`` and their audit rows written by one ``INSERT ... SELECT``, in one
    transaction on the system's own server (so as durable as it); timed from the first
    statement to the end of the commit, the connection made beforehand."""
    now = "(now() AT TIME ZONE 'utc')"  # naive UTC, as the models store times
    values = {"a": account_id, "cancelled": WorkflowStatus.CANCELLED.value,
              "queued": WorkflowStatus.QUEUED.value, "source": CancelSource.BULK.value,
              "actor": "operator:bench@sql", "outcome": CancelOutcome.CANCELLED.value,
              "kind": EventKind.TRANSITION.value}
    with psycopg.connect(db.libpq_url(database_url)) as conn:
        conn.execute("SELECT 1")
        conn.commit()
        started = time.perf_counter()
        with conn.transaction():
            updated = conn.execute(
                f"UPDATE workflows SET status = %(cancelled)s, updated_at = {now}, "
                f"completed_at = {now}, cancel_requested_at = {now}, "
                "cancel_source = %(source)s, cancel_actor = %(actor)s, "
                f"cancel_outcome = %(outcome)s, cancel_finished_at = {now} "
                "WHERE account_id = %(a)s AND status = %(queued)s", values).rowcount
            audited = conn.execute(
                "INSERT INTO workflow_events (workflow_id, at, kind, from_status, to_status, "
                "source, actor, outcome) "
                f"SELECT id, {now}, %(kind)s, %(queued)s, %(cancelled)s, %(source)s, "
                "%(actor)s, %(outcome)s FROM workflows WHERE account_id = %(a)s", values
            ).rowcount
        seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "updated": updated, "audit_rows": audited}


# --- 6. sweep cost ---------------------------------------------------------------------------


def sweep_cost(system: System, sizes: Sizes, log: Log) -> dict[str, Any]:
    result: dict[str, Any] = {"stuck": 100, "passes": sizes.sweep_passes, "sizes": {}}
    for size in sizes.sweep_sizes:
        result["sizes"][str(size)] = _sweep_table(system, size, sizes.sweep_passes)
        log(f"sweep over {size} rows: {result['sizes'][str(size)]['pass_ms']} ms a pass")
    small, large = (result["sizes"][str(s)] for s in sizes.sweep_sizes)
    result["ratio"] = ratio(large["pass_ms"], small["pass_ms"])
    result["dry_run_ratio"] = ratio(large["dry_run_ms"], small["dry_run_ms"])
    return result


def _sweep_table(system: System, size: int, passes: int) -> dict[str, Any]:
    url = system.postgres.create_database(f"sweep_{size}")
    upgrade(url)
    db = Database(make_engine(url))
    try:
        with db.transaction() as session:
            account = manager.get_or_create_account(session, "history")
            runner = manager.add_runner(session, account.id, name="sim",
                                        endpoint_url=system.stack.sim.url)
            account_id, runner_id = account.id, runner.id
        seeding = time.perf_counter()
        active_running = seed.history(db, account_id, runner_id, size - 1000 - 100)
        stuck = seed.stuck(db, account_id, runner_id)
        seed.vacuum_analyze(db)
        seed_seconds = time.perf_counter() - seeding
        with db.transaction() as session:
            rows = session.execute(text("SELECT count(*) FROM workflows")).scalar_one()
        ctx = Context(Settings(database_url=url, redis_url=system.stack.settings.redis_url))
        sweep(ctx, dry_run=True)  # connections and statement caches warm
        timings, dry_timings, counts = [], [], {}
        for _ in range(passes):
            seed.make_stuck_again(db, stuck)
            seed.keep_alive(db, active_running)
            started = time.perf_counter()
            report = sweep(ctx)
            timings.append(time.perf_counter() - started)
            counts = report.counts()
        seed.make_stuck_again(db, stuck)
        seed.keep_alive(db, active_running)
        for _ in range(passes):
            started = time.perf_counter()
            dry = sweep(ctx, dry_run=True)
            dry_timings.append(time.perf_counter() - started)
        plans = _sweep_plans(url)
        ctx.db.engine.dispose()
    finally:
        db.engine.dispose()
        system.postgres.drop_database(f"sweep_{size}")
    return {
        "rows": rows, "seed_seconds": round(seed_seconds, 1),
        "pass_ms": round(median(timings) * 1000, 2),
        "pass_ms_all": [round(t * 1000, 2) for t in timings],
        "dry_run_ms": round(median(dry_timings) * 1000, 2),
        "dry_run_ms_all": [round(t * 1000, 2) for t in dry_timings],
        "found": counts, "dry_run_found": dry.counts(), "query_plans": plans,
    }


def _sweep_plans(url: str) -> dict[str, str]:
    """Each sweep query's plan as run (``EXPLAIN ANALYZE``), with the predicates of the
    :mod:`comfy_cancel.manager` function it stands for and the default cut-offs."""
    cutoff = "(now() AT TIME ZONE 'utc') - interval '{}'"
    queries = {
        "open_intents": "SELECT id FROM workflows WHERE cancel_requested_at IS NOT NULL AND "
        f"cancel_outcome IS NULL AND cancel_requested_at < {cutoff.format('30 seconds')} AND "
        f"(cancel_published_at IS NULL OR cancel_published_at < {cutoff.format('30 seconds')})"
        " ORDER BY cancel_requested_at LIMIT 500",
        "running_without_heartbeat": "SELECT * FROM workflows WHERE status = 'running' AND "
        f"heartbeat_at < {cutoff.format('30 seconds')} ORDER BY heartbeat_at LIMIT 500",
        "running_since_before": "SELECT id FROM workflows WHERE status = 'running' AND "
        f"started_at < {cutoff.format('1 hour')} AND cancel_requested_at IS NULL "
        "ORDER BY started_at LIMIT 500",
        "queued_since_before": "SELECT * FROM workflows WHERE status = 'queued' AND "
        f"updated_at < {cutoff.format('30 minutes')} AND cancel_requested_at IS NULL "
        "ORDER BY updated_at LIMIT 500",
    }
    plans = {}
    with psycopg.connect(db.libpq_url(url), autocommit=True) as conn:
        for name, query in queries.items():
            lines = [row[0] for row in conn.execute(
                "EXPLAIN (ANALYZE, COSTS OFF) " + query).fetchall()]
            plans[name] = " / ".join(" ".join(line.split()) for line in lines)
    return plans


# --- 7. the cancel endpoint under load -------------------------------------------------------


def endpoint_load(system: System, sizes: Sizes, log: Log) -> dict[str, Any]:
    account_id, token = system.new_account("endpoint-load")
    # Enough distinct workflows for 1,000 cancels a second: the closed loop must not run
    # out before its time is up.
    ids = seed.queued(system.db, account_id, system.stack.runner_id,
                      int(1000 * sizes.load_seconds) + 500)
    result: dict[str, Any] = {"clients": sizes.clients, "seconds": sizes.load_seconds}
    for label, url, method, items, auth in (
        ("cancel", system.cancel_url(), "POST", ids, token),
        ("healthz", system.stack.api_url + "/healthz", "GET", None, None),
    ):
        with cpu.cpu_by_role(_known_pids(system)) as used:
            load = system.loadgen_http(f"load-{label}", url, method=method, token=auth, ids=items,
                                       count=None if items else 10**7,
                                       concurrency=sizes.clients, duration=sizes.load_seconds)
        ok = _ok(load["requests"])
        span = max(r[3] for r in ok) - min(r[2] for r in ok) if ok else None
        result[label] = {
            "requests": len(load["requests"]),
            "ok_per_second": _round(len(ok) / span if span else None),
            "response": distribution_ms([r[3] - r[2] for r in ok]),
            "http_codes": _codes(load["requests"]),
            "cpu": used,
        }
        if label == "cancel":
            system.wait_account_settled(account_id, len(ok), 300)  # drain before the baseline
        log(f"endpoint under load: {label} {result[label]['ok_per_second']} req/s, "
            f"p99 {result[label]['response']['p99_ms']} ms")
    result["ratio"] = ratio(result["cancel"]["ok_per_second"], result["healthz"]["ok_per_second"])
    return result


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)

