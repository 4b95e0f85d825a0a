"""Run the suite: start the system, measure, hold each result against its goal, profile
what missed, write JSON, a Markdown report and a plot.

    python -m bench            # the whole suite, about 7 minutes on 2 cores
    python -m bench --quick    # small sizes, under 2 minutes; CI runs it
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from bench import profiling, report, scenarios, seed
from bench.scenarios import FULL, QUICK, Sizes
from bench.system import (
    CANCEL_WORKER_CONCURRENCY,
    GRACE_SECONDS,
    REPO,
    SIM_TIME_SCALE,
    System,
    started_services,
    started_system,
)
from comfy_cancel import db
from comfy_cancel.config import get_settings

SCHEMA_VERSION = 1
# Each figure, in the order they run, with the figures of the same run it is measured
# against (passed to it after the system, sizes and log; measured first when not chosen).
FIGURES: dict[str, tuple[Callable[..., dict[str, Any]], tuple[str, ...]]] = {
    "noop": (scenarios.noop_baseline, ()),
    "throughput": (scenarios.throughput, ("noop",)),
    "queued_latency": (scenarios.queued_latency, ("noop",)),
    "running_latency": (scenarios.running_latency, ()),
    "stream_lag": (scenarios.stream_lag, ()),
    "endpoint_load": (scenarios.endpoint_load, ()),
    "at_once": (scenarios.at_once, ()),
    "bulk": (scenarios.bulk, ()),
    "sweep": (scenarios.sweep_cost, ()),
}


def with_baselines(chosen: list[str]) -> list[str]:
    """The chosen figures and the baselines they need, in :data:`FIGURES` order."""
    wanted = set(chosen)
    for name in chosen:
        wanted.update(FIGURES[name][1])
    return [name for name in FIGURES if name in wanted]


class Logger:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, line: str) -> None:
        print(f"[bench {time.monotonic() - self.started:6.1f}s] {line}", file=sys.stderr,
              flush=True)


def machine(servers: Any, durable: bool) -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cores": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "redis": servers.redis_server.version,
        "redis_persistence": "AOF, appendfsync everysec",
        "postgresql": servers.postgres.version,
        "postgresql_durability": "fsync on, synchronous_commit on" if durable
        else "fsync off, synchronous_commit off (--fast-db)",
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "packages": {p: version(p) for p in ("celery", "kombu", "redis", "SQLAlchemy", "psycopg",
                                             "fastapi", "uvicorn", "aiohttp", "httpx")},
        "system_under_test": {
            "cancel_worker": f"1 process, threads pool x {CANCEL_WORKER_CONCURRENCY}, "
            "late acks, prefetch 1",
            "runner_worker": "1 process, threads pool x 100",
            "api": f"comfy-cancel api, {get_settings().api_workers} uvicorn worker "
            "process(es) (COMFY_CANCEL_API_WORKERS)",
            "simulated_comfyui": f"time scale {SIM_TIME_SCALE}",
            "cancel_grace_seconds": GRACE_SECONDS,
        },
    }


def code_state() -> dict[str, Any]:
    """Which code was measured: the commit, uncommitted changes to the package, and a digest
    of the package's sources (compared at the end: the tree may be shared)."""
    import hashlib
    import subprocess

    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True,
                                  timeout=30, check=False).stdout.strip()
        except OSError:
            return ""

    digest = hashlib.sha256()
    for path in sorted((REPO / "comfy_cancel").rglob("*.py")):
        digest.update(path.read_bytes())
    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "uncommitted_in_comfy_cancel": git("status", "--porcelain", "--", "comfy_cancel")
        .splitlines(),
        "package_digest": digest.hexdigest()[:16],
    }


# --- goals -----------------------------------------------------------------------------------


def _goal(gid: str, figure: str, goal: str, result: str, baseline: str,
          ratio: float | None, met: bool | None, headroom: float | None) -> dict[str, Any]:
    return {"id": gid, "figure": figure, "goal": goal, "result": result, "baseline": baseline,
            "ratio": ratio, "met": met, "headroom": headroom}


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def _headroom_at_most(result: float | None, limit: float) -> float | None:
    return None if not result else round(limit / result, 3)


def _headroom_at_least(result: float | None, floor: float) -> float | None:
    return None if result is None else round(result / floor, 3)


def _judge_p99(p99_ms: float | None) -> tuple[float | None, bool | None, float | None]:
    """The ratio, ``met`` and headroom of a latency goal: p99 under 50 ms."""
    if p99_ms is None:
        return None, None, None
    return round(p99_ms / 50, 2), p99_ms < 50, _headroom_at_most(p99_ms, 50)


def _at_least(value: float | None, floor: float) -> tuple[bool | None, float | None]:
    return (None if value is None else value >= floor), _headroom_at_least(value, floor)


def _at_most(value: float | None, limit: float) -> tuple[bool | None, float | None]:
    return (None if value is None else value <= limit), _headroom_at_most(value, limit)


def evaluate(figures: dict[str, Any], sizes: Sizes) -> list[dict[str, Any]]:
    """Each goal of the issue beside its result and its baseline of the same run; ``met``
    is None when it was not measured."""
    goals: list[dict[str, Any]] = []
    latency = figures.get("queued_latency")
    if latency:
        high = next(e for e in latency.values() if e["goal"])
        others = "; ".join(
            f"at {e['offered_per_second']:g}/s: p99 "
            f"{_fmt(e['latency_200_to_cancelled']['p99_ms'], ' ms')}"
            for e in latency.values() if not e["goal"])
        p99 = high["latency_200_to_cancelled"]["p99_ms"]
        goals.append(_goal(
            "queued_p99", "queued_latency",
            "queued: p99 from the 200 to `cancelled` < 50 ms at an offered rate of "
            f"{sizes.latency_noop_fraction:g}x the no-op round trip",
            f"p99 {_fmt(p99, ' ms')} at {high['offered_per_second']:g}/s offered "
            f"(achieved {_fmt(high['achieved_per_second'], '/s', 0)})",
            f"offered = {high['offered_as']}; {others}",
            *_judge_p99(p99)))
    running = figures.get("running_latency")
    if running:
        p99 = running["to_comfyui_cancel_call"]["p99_ms"]
        goals.append(_goal(
            "running_p99", "running_latency",
            "running: p99 from the 200 to the runner's cancel call < 50 ms",
            f"p99 {_fmt(p99, ' ms')} ({running['samples']} cancels)",
            f"simulated node step {running['sim_step_ms']} ms; to `cancelled` p99 "
            f"{_fmt(running['to_cancelled']['p99_ms'], ' ms')}; to GPU freed p99 "
            f"{_fmt((running.get('to_freed') or {}).get('p99_ms'), ' ms')}",
            *_judge_p99(p99)))
    lag = figures.get("stream_lag")
    if lag:
        p99 = lag["write_to_event"]["p99_ms"]
        goals.append(_goal(
            "stream_lag_p99", "stream_lag",
            "stream: p99 from the database write of `cancelled` to the subscriber's event "
            "< 50 ms",
            f"p99 {_fmt(p99, ' ms')} ({lag['samples']} cancels)",
            f"p50 {_fmt(lag['write_to_event']['p50_ms'], ' ms')}; one stream open at a time",
            *_judge_p99(p99)))
    through = figures.get("throughput")
    if through:
        settings = (figures.get("noop") or {}).get("worker_settings", {}).get("noop_worker")
        same = "" if not settings else (
            f" (worker: {settings['pool']} x {settings['concurrency']}, prefetch count "
            f"{settings['prefetch_count']}, {'late' if settings['task_acks_late'] else 'early'}"
            " acks"
            + ("" if not figures["noop"]["settings_that_differ"] else
               f"; **differs from the cancel worker in "
               f"{', '.join(figures['noop']['settings_that_differ'])}**") + ")")
        goals.append(_goal(
            "throughput", "throughput",
            "throughput: at least 0.5x the no-op Celery round trip",
            f"{_fmt(through['cancel_per_second'], ' cancels/s', 0)}",
            f"no-op round trip {_fmt(through['noop_per_second'], ' tasks/s', 0)}{same}",
            through["ratio"], *_at_least(through["ratio"], 0.5)))
        per_process = ", ".join(f"{k} {v:g}" for k, v in
                                through["cpu_ms_per_cancel_by_process"].items())
        per_noop = ", ".join(f"{k} {v:g}" for k, v in
                             figures["noop"]["cpu_ms_per_task_by_process"].items())
        goals.append(_goal(
            "cpu_per_cancel", "throughput",
            "CPU per cancel, summed over the system's processes: at most 3x the CPU per "
            "no-op task (producer, worker, Redis)",
            f"{_fmt(through['cpu_ms_per_cancel'], ' ms', 2)} ({per_process})",
            f"no-op task {_fmt(through['cpu_ms_per_noop_task'], ' ms', 2)} ({per_noop})",
            through["cpu_ratio"], *_at_most(through["cpu_ratio"], 3)))
    at_once = figures.get("at_once")
    if at_once:
        for name, variant in at_once["variants"].items():
            wall = variant["wall_seconds"]
            via = "the API, 32 clients" if variant["via"] == "api" else "one bulk cancel"
            runners = ("acknowledge" if variant["runners"] == "ack"
                       else "never acknowledge (forced)")
            goals.append(_goal(
                f"at_once_{name}", "at_once",
                f"{at_once['count']:,} running at once via {via}, runners {runners}: "
                "within 2 grace periods",
                f"{_fmt(wall, ' s')} to all `cancelled`",
                f"one grace period {at_once['grace_seconds']:g} s",
                variant["grace_periods"],
                None if variant["grace_periods"] is None or not variant["settled"]
                else variant["grace_periods"] <= 2,
                _headroom_at_most(variant["grace_periods"], 2)))
    bulk = figures.get("bulk")
    if bulk:
        small_n, large_n = sizes.bulk_sizes
        large, small = bulk["sizes"][str(large_n)], bulk["sizes"][str(small_n)]
        wall = large["command_wall_seconds"]
        within, headroom = _at_most(large["ratio_vs_bare_sql"], 3)
        goals.append(_goal(
            "bulk_time", "bulk",
            f"bulk: {large_n:,} queued by one filter within 3x a bare SQL UPDATE of as many "
            "rows with their audit rows",
            f"{_fmt(wall, ' s', 2)} from the command to the last `cancelled` "
            f"({small_n:,}: {_fmt(small['command_wall_seconds'], ' s', 2)})",
            f"bare SQL, one transaction: {_fmt(large['bare_sql']['seconds'], ' s', 2)} "
            f"({small_n:,}: {_fmt(small['bare_sql']['seconds'], ' s', 2)})",
            large["ratio_vs_bare_sql"],
            None if within is None else within and large["cancelled"] == large_n, headroom))
        goals.append(_goal(
            "bulk_vs_api", "bulk", "bulk: at least 20 times the one-at-a-time API rate",
            f"{_fmt(large['rate_per_second'], ' cancels/s', 0)}",
            f"one API call at a time: {_fmt(bulk['one_at_a_time']['rate_per_second'], '/s', 0)}"
            f" (sample of {bulk['one_at_a_time']['sample']})",
            large["ratio_vs_one_at_a_time"], *_at_least(large["ratio_vs_one_at_a_time"], 20)))
        goals.append(_goal(
            "bulk_memory", "bulk",
            f"bulk: memory flat in N (peak RSS at {large_n:,} within 1.2x of {small_n:,})",
            f"{_fmt(large['peak_rss_mb'], ' MB')} peak RSS",
            f"{small_n:,}: {_fmt(small['peak_rss_mb'], ' MB')}; dry run "
            f"{_fmt(bulk['dry_run_peak_rss_mb'], ' MB')}",
            bulk["memory_ratio"], *_at_most(bulk["memory_ratio"], 1.2)))
    load = figures.get("endpoint_load")
    if load:
        goals.append(_goal(
            "endpoint_vs_healthz", "endpoint_load",
            f"cancel endpoint: at least 0.25x `/healthz` on the same server, {load['clients']} "
            "clients",
            f"{_fmt(load['cancel']['ok_per_second'], ' req/s', 0)}, p99 "
            f"{_fmt(load['cancel']['response']['p99_ms'], ' ms')}",
            f"`/healthz` {_fmt(load['healthz']['ok_per_second'], ' req/s', 0)}, p99 "
            f"{_fmt(load['healthz']['response']['p99_ms'], ' ms')}",
            load["ratio"], *_at_least(load["ratio"], 0.25)))
    swept = figures.get("sweep")
    if swept:
        small_n, large_n = sizes.sweep_sizes
        large, small = swept["sizes"][str(large_n)], swept["sizes"][str(small_n)]
        goals.append(_goal(
            "sweep", "sweep",
            f"sweep: a pass over {large_n:,} rows within 2x the pass over {small_n:,} "
            "(same 100 stuck)",
            f"{_fmt(large['pass_ms'], ' ms', 2)} a pass (median of {swept['passes']})",
            f"{small_n:,} rows: {_fmt(small['pass_ms'], ' ms', 2)}",
            swept["ratio"], *_at_most(swept["ratio"], 2)))
    return goals


# --- profiles of the misses ------------------------------------------------------------------

PROFILE_OF_GOAL = {
    "throughput": "cancel_path", "queued_p99": "cancel_path", "running_p99": "running_path",
    "at_once_api-ack": "cancel_path", "at_once_api-deaf": "cancel_path",
    "at_once_bulk-ack": "cancel_path", "at_once_bulk-deaf": "cancel_path",
    "bulk_time": "bulk", "bulk_vs_api": "bulk", "bulk_memory": "bulk",
    "cpu_per_cancel": "cancel_path", "endpoint_vs_healthz": "cancel_path",
}


def profile_misses(system: System, goals: list[dict[str, Any]], out_dir: Path,
                   log: Callable[[str], None]) -> dict[str, Any]:
    wanted: dict[str, list[str]] = {}
    for goal in goals:
        kind = PROFILE_OF_GOAL.get(goal["id"])
        if goal["met"] is False and kind:
            wanted.setdefault(kind, []).append(goal["id"])
    if not wanted:
        return {}
    if not profiling.available():
        return {kind: {"goals": ids, "error": "py-spy is not installed (pip install py-spy)"}
                for kind, ids in wanted.items()}
    results: dict[str, Any] = {}
    for kind, ids in wanted.items():
        log(f"profiling {kind} (missed: {', '.join(ids)})")
        results[kind] = {"goals": ids, **PROFILERS[kind](system, out_dir)}
    return results


def _profile_cancel_path(system: System, out_dir: Path) -> dict[str, Any]:
    """1,000 API cancels of queued workflows, 32 clients, sampled in the API process and
    the cancel worker, with the database's wait events and new connections."""
    account_id, token = system.new_account("profile-cancel-path")
    ids = seed.queued(system.db, account_id, system.stack.runner_id, 1000)
    sessions = scenarios.pg_sessions(system)
    url = db.libpq_url(system.stack.settings.database_url)
    targets = {"api": system.api_pid, "cancel_worker": system.cancel_worker_pid}
    with profiling.pg_waits(url) as waits, \
            profiling.sampled(targets, out_dir, "cancel_path") as profiles:
        system.loadgen_http("profile-cancel-path", system.cancel_url(), method="POST",
                            token=token, ids=ids, concurrency=32)
        system.wait_account_settled(account_id, len(ids), 300)
    return {
        "what": "1,000 API cancels of queued workflows from 32 clients; py-spy --gil "
        "(samples only the thread holding the GIL: where each process's CPU went)",
        "processes": [p.to_dict() for p in profiles],
        "postgresql": waits,
        "new_postgresql_connections_per_1000_cancels": scenarios.pg_sessions(system) - sessions,
    }


def _profile_running_path(system: System, out_dir: Path) -> dict[str, Any]:
    targets = {"cancel_worker": system.cancel_worker_pid,
               "runner_worker": system.runner_worker_pid}
    sizes = Sizes(**{**vars(QUICK), "running_samples": 20})
    with profiling.sampled(targets, out_dir, "running_path") as profiles:
        scenarios.running_latency(system, sizes, lambda _line: None)
    return {"what": "20 running cancels, py-spy --gil on the cancel and runner workers",
            "processes": [p.to_dict() for p in profiles]}


def _profile_bulk(system: System, out_dir: Path) -> dict[str, Any]:
    import subprocess

    name = "profile-bulk"
    account_id, _ = system.new_account(name)
    seed.queued(system.db, account_id, system.stack.runner_id, 30_000)
    out_dir.mkdir(parents=True, exist_ok=True)  # py-spy writes nothing into a missing one
    raw = out_dir / "bulk-command.txt"
    measure = out_dir / "bulk-command.json"
    subprocess.run(
        ["py-spy", "record", "--rate", str(profiling.RATE_HZ), "--format", "raw", "--gil",
         "--output", str(raw), "--", sys.executable, "-m", "bench.measure", str(measure), "--",
         "bulk-cancel", "--account", name, "--status", "queued", "--yes", "--json",
         "--wait", "0"],
        cwd=REPO, check=False, capture_output=True, timeout=600,
    )
    profile = profiling.summarise(profiling.Profile("bulk_command", 0, raw))
    return {"what": "one bulk cancel of 30,000 queued workflows, py-spy --gil on the command",
            "processes": [profile.to_dict()]}


PROFILERS: dict[str, Callable[[System, Path], dict[str, Any]]] = {
    "cancel_path": _profile_cancel_path,
    "running_path": _profile_running_path,
    "bulk": _profile_bulk,
}


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark comfy-cancel on real Redis, real PostgreSQL, real Celery workers "
        "and the simulated ComfyUI. Writes results JSON, a Markdown report and a latency plot.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, under 2 minutes (what CI runs; never fails on a number)")
    parser.add_argument("--out", type=Path, help="results JSON (default: docs/bench/results.json;"
                        " with --quick, results.json in a new temporary directory)")
    parser.add_argument("--report", type=Path,
                        help="Markdown report (default: docs/BENCHMARKS.md; with --quick or "
                        "--out, beside the results)")
    parser.add_argument("--plot", type=Path, help="latency plot PNG (default: "
                        "docs/bench/latency.png; with --quick or --out, beside the results)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(FIGURES)}")
    parser.add_argument("--no-profile", action="store_true",
                        help="do not profile the missed goals (py-spy)")
    parser.add_argument("--fast-db", action="store_true",
                        help="PostgreSQL without fsync (default: durable, as in production)")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                        help="measure nothing: write the report and the plot of these results")
    parser.add_argument("--work-dir", type=Path, help="logs and raw load-generator output "
                        "(default: a temporary directory, kept)")
    args = parser.parse_args(argv)
    # The committed report is the full run's; any other run writes beside its own results.
    beside_out = args.quick or args.out is not None
    if args.out is None:
        args.out = (Path(tempfile.mkdtemp(prefix="comfy-cancel-bench-")) / "results.json"
                    if args.quick else REPO / "docs" / "bench" / "results.json")
    if args.report is None:
        args.report = (args.out.parent / "BENCHMARKS.md" if beside_out
                       else REPO / "docs" / "BENCHMARKS.md")
    if args.plot is None:
        args.plot = (args.out.parent / "latency.png" if beside_out
                     else REPO / "docs" / "bench" / "latency.png")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        rendered = json.loads(args.render.read_text())
        report.write_plot(rendered, args.plot)
        report.write_markdown(rendered, args.report, args.plot)
        print(f"wrote {args.report} and {args.plot}", file=sys.stderr)
        return 0
    sizes = QUICK if args.quick else FULL
    only = [f.strip() for f in (args.only or ",".join(FIGURES)).split(",") if f.strip()]
    unknown = sorted(set(only) - set(FIGURES))
    if unknown:
        print(f"bench: unknown figure {', '.join(unknown)}; choose from {', '.join(FIGURES)}",
              file=sys.stderr)
        return 2
    only = with_baselines(only)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="comfy-cancel-bench-work-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    log = Logger()
    started_at = datetime.now(UTC)
    durable = not args.fast_db
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "mode": "quick" if args.quick else "full",
        "started_at": started_at.isoformat(timespec="seconds"), "sizes": vars(sizes),
        "figures": {}, "errors": {},
    }
    results["code"] = code_state()
    log(f"{results['mode']} run of {results['code']['commit']}; work dir {work_dir}")
    with started_services(durable=durable) as servers:
        results["machine"] = machine(servers, durable)
        log(f"redis {servers.redis_server.version}, postgresql {servers.postgres.version} up")
        with started_system(servers, work_dir) as system:
            log("system up: API, cancel worker, runner worker, no-op worker, simulated ComfyUI")
            scenarios.warm_up(system, log)
            for name in only:
                measure, baselines = FIGURES[name]
                try:
                    missing = [b for b in baselines if b not in results["figures"]]
                    if missing:
                        raise RuntimeError(f"its baseline {', '.join(missing)} failed")
                    results["figures"][name] = measure(
                        system, sizes, log, *(results["figures"][b] for b in baselines))
                except Exception as exc:  # one broken figure must not lose the others
                    log(f"{name} failed: {type(exc).__name__}: {exc}")
                    results["errors"][name] = f"{type(exc).__name__}: {exc}"
            results["goals"] = evaluate(results["figures"], sizes)
            results["profiles"] = {}
            if not args.quick and not args.no_profile:
                results["profiles"] = profile_misses(
                    system, results["goals"], work_dir / "profiles", log)
    results["code"]["changed_during_run"] = (
        code_state()["package_digest"] != results["code"]["package_digest"])
    if results["code"]["changed_during_run"]:
        log("warning: comfy_cancel/ changed while the suite ran; the figures mix versions")
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["duration_seconds"] = round(time.monotonic() - log.started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    report.write_plot(results, args.plot)
    report.write_markdown(results, args.report, args.plot)
    met = sum(1 for g in results["goals"] if g["met"])
    log(f"done in {results['duration_seconds']} s: {met}/{len(results['goals'])} goals met; "
        f"{args.out}, {args.report}, {args.plot}")
    return 0
