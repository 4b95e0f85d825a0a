"""Where the machine's CPU went during a scenario, by process role (psutil).

Only the benchmark's own processes count: itself and its descendants (the servers it
started, PostgreSQL's backends under its postmaster, the workers, the API, the load
generators). Another tenant's PostgreSQL or Redis on a shared machine is not the system
under test; what it used shows as not attributed."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil


def _role(proc: psutil.Process, known: dict[int, str]) -> str | None:
    if proc.pid in known:
        return known[proc.pid]
    try:
        # A known process's own children (uvicorn's API worker processes, a prefork pool)
        # do its work: they count as it.
        parent = proc.ppid()
        if parent in known:
            return known[parent]
        name = proc.name()
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    if name.startswith("postgres") or "postgres" in cmdline.split(" ")[0]:
        return "postgresql"
    if "redis-server" in name or "redis-server" in cmdline:
        return "redis"
    if "bench.loadgen" in cmdline:
        return "load generator"
    if "bench.fake_runner" in cmdline:
        return "simulated runners"
    if "bench.measure" in cmdline:
        return "bulk-cancel command"
    if "py-spy" in name:
        return "profiler"
    return None


CHILDREN = "processes the benchmark started and waited for (load generator, commands)"


def _snapshot(known: dict[int, str]) -> dict[int, tuple[str, float]]:
    """CPU seconds so far by pid; under -pid, what its waited-for children used: the
    PostgreSQL postmaster reaps one backend per closed connection, and the benchmark
    reaps its load generators and commands."""
    seen: dict[int, tuple[str, float]] = {}
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        role = _role(proc, known)
        if role is None:
            continue
        try:
            times = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        seen[proc.pid] = (role, times.user + times.system)
        if role == "postgresql" or proc.pid == os.getpid():
            children = times.children_user + times.children_system
            seen[-proc.pid] = (role if role == "postgresql" else CHILDREN, children)
    return seen


@contextmanager
def cpu_by_role(known: dict[int, str]) -> Iterator[dict[str, Any]]:
    """CPU seconds per role (the processes in ``known`` by pid, the others recognised by
    name) spent while the block ran; the dict is filled when the block ends.

    Processes that start and end inside the block count through the parent that reaped
    them (see :func:`_snapshot`); what is left of the machine's total is shown as not
    attributed.
    """
    known = {os.getpid(): "benchmark driver", **known}
    result: dict[str, Any] = {}
    before = _snapshot(known)
    machine_before = _machine_busy()
    steal_before = getattr(psutil.cpu_times(), "steal", 0.0)
    started = time.monotonic()
    try:
        yield result
    finally:
        after = _snapshot(known)
        machine = _machine_busy() - machine_before
        wall = time.monotonic() - started
        spent: dict[str, float] = {}
        for pid, (role, cpu) in after.items():
            spent[role] = spent.get(role, 0.0) + cpu - before.get(pid, (role, 0.0))[1]
        # Whatever else ran on the machine: another tenant, the kernel, a process of ours
        # that came and went unseen.
        spent["other (not attributed)"] = max(0.0, machine - sum(spent.values()))
        cores = psutil.cpu_count() or 1
        result["wall_seconds"] = round(wall, 2)
        result["cores"] = cores
        result["cpu_seconds_by_role"] = {
            k: round(v, 2) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])
        }
        result["machine_busy_pct"] = round(100 * machine / (wall * cores), 1) if wall else None
        stolen = getattr(psutil.cpu_times(), "steal", 0.0) - steal_before
        result["hypervisor_steal_pct"] = round(100 * stolen / (wall * cores), 1) if wall else None


def _machine_busy() -> float:
    times = psutil.cpu_times()
    return float(sum(getattr(times, name, 0.0)
                     for name in ("user", "system", "nice", "irq", "softirq")))
