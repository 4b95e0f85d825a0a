"""Where the machine's CPU went during a scenario, by process role (psutil)."""

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


def _snapshot(known: dict[int, str]) -> dict[int, tuple[str, float]]:
    seen: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter():
        role = _role(proc, known)
        if role is None:
            continue
        try:
            times = proc.cpu_times()
            seen[proc.pid] = (role, times.user + times.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return seen


@contextmanager
def cpu_by_role(known: dict[int, str]) -> Iterator[dict[str, Any]]:
    """CPU seconds per role (the processes in ``known`` by pid, the others recognised by
    name) spent while the block ran; the dict is filled when the block ends.

    A process that starts and ends inside the block is caught only if it is still alive
    at the end; the load generator and the bulk command are, because the caller waits for
    them through ``known`` or for short ones accepts the gap.
    """
    known = {os.getpid(): "api + benchmark driver", **known}
    result: dict[str, Any] = {}
    before = _snapshot(known)
    machine_before = _machine_busy()
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
        # Processes that came and went (a PostgreSQL backend per new connection, the load
        # generator) are only in the machine's total.
        spent["other (short-lived processes)"] = max(0.0, machine - sum(spent.values()))
        cores = psutil.cpu_count() or 1
        result["wall_seconds"] = round(wall, 2)
        result["cores"] = cores
        result["cpu_seconds_by_role"] = {
            k: round(v, 2) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])
        }
        result["machine_busy_pct"] = round(100 * machine / (wall * cores), 1) if wall else None


def _machine_busy() -> float:
    times = psutil.cpu_times()
    return float(sum(getattr(times, name, 0.0)
                     for name in ("user", "system", "nice", "irq", "softirq", "steal")))
