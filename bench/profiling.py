"""Sampling profiles of the system's processes while a scenario runs (py-spy).

py-spy samples another process from outside (``--nonblocking``: it never pauses the
target), so the API, the cancel worker and a bulk-cancel command are profiled as they
run. It is optional: without it the suite still measures everything and says that no
profile was taken (``pip install py-spy``).

A profile is summarised into where the samples were: by package (the innermost frame's),
and by our own functions (every ``comfy_cancel`` function on a sampled stack, counted once
per stack). The raw collapsed stacks are kept beside the summary for a flame graph.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RATE_HZ = 50
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
PACKAGES = (
    "comfy_cancel", "bench", "sqlalchemy", "psycopg", "kombu", "celery", "redis", "billiard",
    "fastapi", "starlette", "anyio", "uvicorn", "h11", "pydantic", "httpx", "httpcore",
    "aiohttp", "json", "logging", "threading", "socket", "ssl", "selectors", "asyncio",
    "concurrent", "queue", "uuid", "email", "http", "urllib", "vine", "amqp",
)


def available() -> bool:
    return shutil.which("py-spy") is not None


@dataclass
class Profile:
    name: str
    pid: int
    raw_path: Path
    samples: int = 0
    by_package: list[tuple[str, float]] = field(default_factory=list)
    our_functions: list[tuple[str, float]] = field(default_factory=list)
    hottest_stacks: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "process": self.name, "pid": self.pid, "raw": self.raw_path.name,
            "samples": self.samples, "error": self.error,
            "self_time_by_package_pct": [[k, v] for k, v in self.by_package],
            "comfy_cancel_functions_inclusive_pct": [[k, v] for k, v in self.our_functions],
            "hottest_leaf_frames_pct": [[k, v] for k, v in self.hottest_stacks],
        }


def _package(path: str) -> str:
    parts = re.split(r"[\\/]", path)
    for part in parts:
        name = part.removesuffix(".py")
        if name in PACKAGES:
            return name
    return parts[-1].removesuffix(".py") if parts else "?"


def _frame(text: str) -> tuple[str, str]:
    match = _FRAME.match(text.strip())
    if not match:
        return text.strip(), ""
    return match["func"], match["file"]


def summarise(profile: Profile, top: int = 15) -> Profile:
    """Read the raw collapsed stacks of a finished recording into the summary fields."""
    if not profile.raw_path.exists():
        profile.error = profile.error or "py-spy wrote no profile"
        return profile
    by_package: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in profile.raw_path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        if frames and frames[0][0].startswith("thread ("):
            frames = frames[1:]
        if not frames:
            continue
        total += count
        func, path = frames[-1]
        by_package[_package(path)] += count
        leaves[f"{func} ({_package(path)}:{Path(path).name})"] += count
        seen = set()
        for func, path in frames:
            if "comfy_cancel" in path:
                seen.add(f"{Path(path).stem}.{func}")
        for name in seen:
            ours[name] += count
    profile.samples = total

    def pct(counter: Counter[str]) -> list[tuple[str, float]]:
        if not total:
            return []
        return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(top)]

    profile.by_package = pct(by_package)
    profile.our_functions = pct(ours)
    profile.hottest_stacks = pct(leaves)
    return profile


@contextmanager
def sampled(targets: dict[str, int], out_dir: Path, label: str) -> Iterator[list[Profile]]:
    """Sample each ``name: pid`` for as long as the block runs; summaries after it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    profiles: list[Profile] = []
    recorders: list[subprocess.Popen[bytes]] = []
    if not available():
        yield profiles
        return
    for name, pid in targets.items():
        raw = out_dir / f"{label}-{name}.txt"
        raw.unlink(missing_ok=True)
        profiles.append(Profile(name, pid, raw))
        recorders.append(subprocess.Popen(
            ["py-spy", "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--format", "raw",
             # --subprocesses: the API's uvicorn parent only supervises; its worker
             # processes, its children, do the work.
             "--nonblocking", "--gil", "--subprocesses", "--output", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        ))
    time.sleep(0.5)  # py-spy attaches
    try:
        yield profiles
    finally:
        for recorder in recorders:
            if recorder.poll() is None:
                recorder.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        for recorder, profile in zip(recorders, profiles, strict=True):
            try:
                _, err = recorder.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                _, err = recorder.communicate()
            if not profile.raw_path.exists():
                profile.error = (err or b"").decode(errors="replace")[-300:] or "no output"
            summarise(profile)


@contextmanager
def pg_waits(libpq_url: str, interval: float = 0.02) -> Iterator[dict[str, Any]]:
    """Sample ``pg_stat_activity`` while the block runs: what the database's client
    backends were doing (active on what, waiting on what, or idle inside a transaction,
    which means the application held a transaction open while it was busy elsewhere)."""
    import threading

    import psycopg

    result: dict[str, Any] = {}
    states: Counter[str] = Counter()
    waits: Counter[str] = Counter()
    stop = threading.Event()

    def sample() -> None:
        with psycopg.connect(libpq_url, autocommit=True) as conn:
            while not stop.is_set():
                rows = conn.execute(
                    "SELECT state, wait_event_type, wait_event, left(query, 48) "
                    "FROM pg_stat_activity WHERE backend_type = 'client backend' "
                    "AND pid <> pg_backend_pid() AND datname = current_database()"
                ).fetchall()
                for state, wait_type, wait_event, query in rows:
                    states[str(state)] += 1
                    if state == "active":
                        what = f"{wait_type}:{wait_event}" if wait_type else "on CPU"
                        waits[f"{what} ({' '.join(str(query).split()[:3])})"] += 1
                time.sleep(interval)

    thread = threading.Thread(target=sample, name="pg-waits", daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join(10)
        total = sum(states.values()) or 1
        active = sum(waits.values()) or 1
        result["backend_states_pct"] = {k: round(100 * v / total, 1)
                                        for k, v in states.most_common()}
        result["active_backends_waiting_on_pct"] = [
            [k, round(100 * v / active, 1)] for k, v in waits.most_common(10)
        ]
