"""The benchmark suite's quick mode runs end to end and writes valid results.

It starts its own Redis, PostgreSQL, Celery workers, API and simulated ComfyUI, so it
needs nothing from the other fixtures. It checks the shape of what was written, never a
number: these machines are shared and noisy, and the figures are for reading.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.acceptance, pytest.mark.redis, pytest.mark.postgres,
              pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
FIGURES = {"noop", "throughput", "queued_latency", "running_latency", "stream_lag",
           "endpoint_load", "at_once", "bulk", "sweep"}
GOAL_FIELDS = {"id", "figure", "goal", "result", "baseline", "ratio", "met", "headroom"}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _distribution(value: dict[str, Any]) -> None:
    assert value["count"] > 0
    for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
        assert _number(value[key]) and value[key] >= 0, (key, value)
    assert value["p50_ms"] <= value["p99_ms"] <= value["max_ms"]


def test_quick_mode_runs_and_writes_valid_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out),
         "--work-dir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=230, check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())

    assert results["schema_version"] == 1 and results["mode"] == "quick"
    assert results["errors"] == {}, results["errors"]
    assert set(results["figures"]) == FIGURES
    machine = results["machine"]
    assert machine["cores"] >= 1 and machine["redis"] and machine["postgresql"]

    figures = results["figures"]
    noop = figures["noop"]
    assert noop["completed"] and _number(noop["per_second"])
    # The baseline's worker runs with the cancel worker's pool, concurrency, prefetch, acks.
    assert noop["settings_that_differ"] == [], noop["worker_settings"]
    through = figures["throughput"]
    assert _number(through["cancel_per_second"])
    assert through["noop_per_second"] == noop["per_second"]
    assert through["cancelled"] == through["cancels"]
    assert _number(through["cpu_ms_per_cancel"]) and _number(through["cpu_ms_per_noop_task"])
    for entry in figures["queued_latency"].values():
        assert entry["settled"]
        _distribution(entry["latency_200_to_cancelled"])
    # The goal's offered rate comes from the no-op round trip of the same run.
    (offered,) = [e["offered_per_second"] for e in figures["queued_latency"].values()
                  if e["goal"]]
    assert offered == round(results["sizes"]["latency_noop_fraction"] * noop["per_second"], 1)
    running = figures["running_latency"]
    _distribution(running["to_comfyui_cancel_call"])
    _distribution(running["to_cancelled"])
    _distribution(running["to_freed"])  # 200 -> GPU freed, beside 200 -> cancelled
    assert running["freed_unconfirmed"] == 0
    assert running["outcomes"] == {"cancelled": running["samples"]}
    lag = figures["stream_lag"]
    _distribution(lag["write_to_event"])
    assert lag["failures"] == {} and lag["samples"] == results["sizes"]["stream_samples"]
    for variant in figures["at_once"]["variants"].values():
        assert variant["settled"] and variant["statuses"] == {"cancelled": variant["count"]}
    for size, entry in figures["bulk"]["sizes"].items():
        assert entry["exit_code"] == 0 and entry["cancelled"] == int(size)
        assert _number(entry["peak_rss_mb"])
        assert entry["bare_sql"]["updated"] == entry["bare_sql"]["audit_rows"] == int(size)
    for entry in figures["sweep"]["sizes"].values():
        # The seeded tables hold no orphaned runner work.
        assert entry["found"] == {"republished": 25, "runner_lost": 25, "overdue": 25,
                                  "queued_cancelled": 25, "redispatched": 0,
                                  "orphans_redispatched": 0, "orphans_failed": 0,
                                  "timed_out": 0}
    load = figures["endpoint_load"]
    assert _number(load["cancel"]["ok_per_second"]) and _number(load["healthz"]["ok_per_second"])

    goals = results["goals"]
    assert {g["id"] for g in goals} >= {"queued_p99", "running_p99", "stream_lag_p99",
                                        "throughput",
                                        "cpu_per_cancel", "endpoint_vs_healthz", "bulk_time",
                                        "bulk_vs_api", "bulk_memory", "sweep"}
    for goal in goals:
        assert set(goal) == GOAL_FIELDS
        assert isinstance(goal["met"], bool), goal
        assert _number(goal["ratio"]), goal

    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| goal | result | baseline (same run) | ratio | met? |" in report
    assert "200 -> GPU freed" in report
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
