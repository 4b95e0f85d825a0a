"""The human report: ``docs/BENCHMARKS.md`` and the latency plot, from the results JSON."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.system import REPO

ANALYSIS = REPO / "docs" / "bench" / "ANALYSIS.md"
FLOOR_MS = 0.1  # the plots' left edge: a cancel done before its 200 was read counts as 0


def write_plot(results: dict[str, Any], path: Path) -> None:
    """Three panels: queued-cancel latency, running-cancel latency, every goal's headroom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = results["figures"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1, 1, 1.25]})
    ax_q, ax_r, ax_g = axes

    def cdf(ax: Any, samples: list[float], label: str, color: str) -> None:
        if not samples:
            return
        xs = sorted(max(v, FLOOR_MS) for v in samples)
        ys = [100 * (n + 1) / len(xs) for n in range(len(xs))]
        ax.step(xs, ys, where="post", label=label, color=color, linewidth=2)

    queued = figures.get("queued_latency", {})
    for (label, entry), color in zip(queued.items(), ("#4c72b0", "#dd8452"), strict=False):
        p99 = entry["latency_200_to_cancelled"]["p99_ms"]
        cdf(ax_q, entry.get("samples_ms", []), f"{_offered(label, entry)} (p99 {p99} ms)", color)
    ax_q.set_title("Queued cancel: API 200 -> `cancelled` in the database")

    running = figures.get("running_latency", {})
    if running:
        cdf(ax_r, running.get("samples_to_call_ms", []),
            f"to the ComfyUI cancel call (p99 {running['to_comfyui_cancel_call']['p99_ms']} ms)",
            "#55a868")
        cdf(ax_r, running.get("samples_to_cancelled_ms", []),
            f"to `cancelled` (p99 {running['to_cancelled']['p99_ms']} ms)", "#8172b3")
        if running.get("to_freed"):
            cdf(ax_r, running.get("samples_to_freed_ms", []),
                f"to GPU freed (p99 {running['to_freed']['p99_ms']} ms)", "#c44e52")
        ax_r.axvspan(0.01, running["sim_step_ms"], color="#cccccc", alpha=0.35,
                     label=f"one simulated node step ({running['sim_step_ms']} ms)")
    ax_r.set_title("Running cancel: API 200 -> ComfyUI / database")

    for ax in (ax_q, ax_r):
        ax.axvline(50, color="#c44e52", linestyle="--", linewidth=1.5, label="goal: p99 < 50 ms")
        ax.axhline(99, color="#999999", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlim(FLOOR_MS * 0.8, None)
        ax.set_xlabel(f"milliseconds (log scale; {FLOOR_MS} = done before the 200 was read)")
        ax.set_ylabel("% of cancels done within")
        ax.set_ylim(0, 101)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(loc="lower right", fontsize=8)

    goals = [g for g in results.get("goals", []) if g.get("headroom")]
    names = [_short(g) for g in goals]
    values = [g["headroom"] for g in goals]
    colors = ["#55a868" if g["met"] else "#c44e52" for g in goals]
    ax_g.barh(range(len(goals)), values, color=colors)
    ax_g.set_yticks(range(len(goals)), names, fontsize=8)
    ax_g.invert_yaxis()
    ax_g.axvline(1, color="#333333", linewidth=1.2)
    ax_g.set_xscale("log")
    ax_g.set_xlabel("times better than the goal (log; left of 1 = missed)")
    ax_g.set_title("Every goal: green met, red missed")
    for n, value in enumerate(values):
        ax_g.text(value, n, f" {value:.2g}x", va="center", fontsize=8)
    ax_g.grid(True, axis="x", which="both", alpha=0.25)

    machine = results.get("machine", {})
    fig.suptitle(
        f"comfy-cancel benchmarks ({results['mode']} run, {results['started_at']}): "
        f"{machine.get('cores')} cores, {machine.get('memory_gb')} GB, PostgreSQL "
        f"{machine.get('postgresql')}, Redis {machine.get('redis')}, Python "
        f"{machine.get('python')}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _offered(label: str, entry: dict[str, Any]) -> str:
    """A queued-latency run's offered rate: "50/s offered", or "95/s offered (0.3x no-op)"
    for one derived from the no-op round trip (entries of results older than that are
    keyed by the rate alone)."""
    rate = f"{entry['offered_per_second']:g}/s offered"
    return rate if entry.get("offered_as", "fixed") == "fixed" else f"{rate} ({label})"


def _short(goal: dict[str, Any]) -> str:
    labels = {
        "queued_p99": "queued p99 < 50 ms", "running_p99": "running p99 < 50 ms",
        "throughput": "throughput >= 0.5x no-op", "bulk_time": "bulk <= 3x bare SQL",
        "bulk_vs_api": "bulk >= 20x API", "bulk_memory": "bulk memory flat",
        "sweep": "sweep <= 2x", "cpu_per_cancel": "CPU/cancel <= 3x no-op",
        "endpoint_vs_healthz": "cancel >= 0.25x /healthz",
    }
    if goal["id"].startswith("at_once_"):
        return "at once " + goal["id"].removeprefix("at_once_") + " <= 2 grace"
    return labels.get(goal["id"], goal["id"])


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "**yes**" if value else "**no**"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "\\|")


def _machine_tag(machine: dict[str, Any]) -> str:
    return (f"{machine.get('cores')} cores, {machine.get('memory_gb'):g} GB, "
            f"PG {machine.get('postgresql')}, Redis {machine.get('redis')}")


def write_markdown(results: dict[str, Any], path: Path, plot: Path) -> None:
    figures, machine = results["figures"], results.get("machine", {})
    tag = _machine_tag(machine)
    quick = results["mode"] == "quick"
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m bench` from docs/bench/results.json; the analysis at the "
        "end is docs/bench/ANALYSIS.md. Do not edit by hand. -->",
        "",
        "How fast a cancel takes effect, how many the system takes, what a bulk cancel costs "
        "and whether the sweep slows down as history grows: measured on the whole system "
        "(real Redis, real PostgreSQL, real Celery worker processes, the simulated ComfyUI, "
        "the HTTP API on a socket), every figure beside a baseline measured in the same run.",
        "",
        "Run it from a checkout: `python -m bench` (or `comfy-cancel bench`) runs the whole "
        "suite in about seven minutes on two cores and rewrites this page, "
        "`docs/bench/results.json` and `docs/bench/latency.png`; `python -m bench --quick` "
        "runs small sizes in under two minutes (CI runs it, and never fails on a number).",
        "",
        f"This run: **{results['mode']}**, started {results['started_at']}, took "
        f"{results.get('duration_seconds')} s, {_code_line(results.get('code') or {})}.",
    ]
    if quick:
        lines += ["", "*Quick sizes: the numbers show the suite works, not what the system "
                  "can do; see docs/BENCHMARKS.md for a full run.*"]
    lines += ["", f"![latency plot]({os.path.relpath(plot, path.parent)})", "",
              "## Goals", "",
              "| goal | result | baseline (same run) | ratio | met? |",
              "|---|---|---|---|---|"]
    for goal in results.get("goals", []):
        lines.append(f"| {_cell(goal['goal'])} | {_cell(goal['result'])} | "
                     f"{_cell(goal['baseline'])} | {_cell(goal['ratio'])} | {_cell(goal['met'])} |")
    lines += ["", "Ratio: result over the same-run baseline, held against the goal's factor "
              "(throughput >= 0.5, cancel endpoint >= 0.25, bulk >= 20 against the API and "
              "<= 3 against bare SQL, CPU <= 3, memory <= 1.2 and sweep <= 2, larger N over "
              "smaller); in grace periods for the at-once goals (<= 2); p99 over 50 ms for "
              "the latency goals (below 1 is met), whose baseline column says the load they "
              "were measured at.", ""]
    lines += ["## Figures", "",
              "| figure | result | goal | baseline (same run) | ratio | machine |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(_cell(c) for c in row)} | {tag} |" for row in _figure_rows(figures)]
    lines += ["", "## Machine", "", "| | |", "|---|---|"]
    for key, value in machine.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        lines.append(f"| {key.replace('_', ' ')} | {_cell(value)} |")
    lines += ["", "## How each figure is measured", "", *_method_notes(results)]
    if results.get("errors"):
        lines += ["", "## Errors", ""]
        lines += [f"- {name}: {error}" for name, error in results["errors"].items()]
    if results.get("profiles"):
        lines += ["", "## Profiles of the missed goals", "", *_profile_lines(results["profiles"])]
    if not quick and ANALYSIS.exists():
        lines += ["", ANALYSIS.read_text().strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _code_line(code: dict[str, Any]) -> str:
    if not code:
        return "code version not recorded"
    line = f"measuring commit `{code.get('commit')}`"
    changed = code.get("uncommitted_in_comfy_cancel") or []
    if changed:
        line += f" with {len(changed)} uncommitted change(s) in comfy_cancel/"
    if code.get("changed_during_run"):
        line += " (**warning: comfy_cancel/ changed while the suite ran**)"
    return line


def _figure_rows(figures: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    n = figures.get("noop")
    if n:
        rows.append(["no-op Celery round trip (the baseline, measured first)",
                     f"{n['per_second']} tasks/s, {n['cpu_ms_per_task']} ms CPU a task", None,
                     f"{n['tasks']:,} tasks, one producer, a worker with the cancel worker's "
                     "settings", None])
    t = figures.get("throughput")
    if t:
        rows.append(["cancel throughput (HTTP -> queue -> 1 worker process -> database)",
                     f"{t['cancel_per_second']} cancels/s", ">= 0.5x baseline",
                     f"no-op Celery round trip {t['noop_per_second']} tasks/s", t["ratio"]])
        if "cpu_ms_per_cancel" in t:
            rows.append(["CPU per cancel (API, cancel and runner workers, PostgreSQL, Redis)",
                         f"{t['cpu_ms_per_cancel']} ms", "<= 3x baseline",
                         f"CPU per no-op task (producer, worker, Redis) "
                         f"{t['cpu_ms_per_noop_task']} ms", t["cpu_ratio"]])
    q = figures.get("queued_latency")
    if q:
        for label, e in q.items():
            d = e["latency_200_to_cancelled"]
            rows.append([f"queued cancel latency at {_offered(label, e)} (200 -> `cancelled`)",
                         f"p50 {d['p50_ms']} / p90 {d['p90_ms']} / p99 {d['p99_ms']} / max "
                         f"{d['max_ms']} ms", "p99 < 50 ms" if e.get("goal") else None,
                         f"API response p99 {e['api_response']['p99_ms']} ms; achieved "
                         f"{e['achieved_per_second']}/s", None])
    r = figures.get("running_latency")
    if r:
        c, d = r["to_comfyui_cancel_call"], r["to_cancelled"]
        rows.append(["running cancel latency: 200 -> ComfyUI cancel call",
                     f"p50 {c['p50_ms']} / p99 {c['p99_ms']} ms", "p99 < 50 ms",
                     f"simulated node step {r['sim_step_ms']} ms (node {r['sim_node_ms']} ms)",
                     None])
        rows.append(["running cancel latency: 200 -> `cancelled`",
                     f"p50 {d['p50_ms']} / p99 {d['p99_ms']} ms", None,
                     f"includes ComfyUI's interrupt at the next step ({r['sim_step_ms']} ms)",
                     None])
        f = r.get("to_freed")
        if f:
            rows.append(["running cancel latency: 200 -> GPU freed (`freed_at`)",
                         f"p50 {f['p50_ms']} / p99 {f['p99_ms']} ms", None,
                         f"to `cancelled` p50 {d['p50_ms']} / p99 {d['p99_ms']} ms; "
                         f"unconfirmed {r['freed_unconfirmed']} of {r['samples']}", None])
    lag = figures.get("stream_lag")
    if lag:
        d = lag["write_to_event"]
        rows.append(["stream lag: database write of `cancelled` -> subscriber's event",
                     f"p50 {d['p50_ms']} / p99 {d['p99_ms']} / max {d['max_ms']} ms",
                     "p99 < 50 ms", f"{lag['samples']} cancels, one stream at a time", None])
    a = figures.get("at_once")
    if a:
        for name, v in a["variants"].items():
            rows.append([f"{a['count']:,} running cancelled at once ({name})",
                         f"{v['wall_seconds']} s", "<= 2 grace periods",
                         f"grace period {a['grace_seconds']:g} s", v["grace_periods"]])
    b = figures.get("bulk")
    if b:
        for size, v in b["sizes"].items():
            rows.append([f"bulk cancel of {int(size):,} queued by one filter",
                         f"{v['command_wall_seconds']} s, peak RSS {v['peak_rss_mb']} MB",
                         ">= 20x API, flat memory",
                         f"one API call at a time {b['one_at_a_time']['rate_per_second']}/s "
                         f"(sample of {b['one_at_a_time']['sample']})",
                         v["ratio_vs_one_at_a_time"]])
            if "bare_sql" in v:
                rows.append([f"bulk cancel of {int(size):,} queued against bare SQL",
                             f"{v['command_wall_seconds']} s", "<= 3x baseline",
                             f"bare SQL UPDATE + audit INSERT ... SELECT, one transaction: "
                             f"{v['bare_sql']['seconds']} s", v["ratio_vs_bare_sql"]])
    s = figures.get("sweep")
    if s:
        sizes = list(s["sizes"])
        rows.append([f"sweep pass over {int(sizes[1]):,} rows, 100 stuck",
                     f"{s['sizes'][sizes[1]]['pass_ms']} ms (finding only "
                     f"{s['sizes'][sizes[1]]['dry_run_ms']} ms)", "<= 2x baseline",
                     f"{int(sizes[0]):,} rows: {s['sizes'][sizes[0]]['pass_ms']} ms (finding "
                     f"only {s['sizes'][sizes[0]]['dry_run_ms']} ms)", s["ratio"]])
    e = figures.get("endpoint_load")
    if e:
        rows.append([f"cancel endpoint, {e['clients']} clients from another process",
                     f"{e['cancel']['ok_per_second']} req/s, p99 "
                     f"{e['cancel']['response']['p99_ms']} ms", ">= 0.25x baseline",
                     f"/healthz on the same server {e['healthz']['ok_per_second']} req/s, p99 "
                     f"{e['healthz']['response']['p99_ms']} ms", e["ratio"]])
    return rows


def _method_notes(results: dict[str, Any]) -> list[str]:
    sizes = results["sizes"]
    return [
        "- **System.** `testbed.stack.running_stack` (the acceptance tests' harness): one cancel "
        "worker process and one runner worker process (Celery, threads pool, late acks, "
        "prefetch 1; the cancel worker runs its messages in batches), the API (`comfy-cancel "
        "api`: uvicorn, `COMFY_CANCEL_API_WORKERS` processes, default one per core), the "
        "simulated ComfyUI at time scale 1; "
        "PostgreSQL and Redis started by the suite from their PyPI wheels, durable as in "
        "production unless `--fast-db`. Load comes from `bench/loadgen.py` in a separate "
        "process (aiohttp, loopback only, bounded in count and time).",
        "- **Seeding is setup, not the system under test.** Queued workflows and the sweep's "
        "tables are inserted set-based (`INSERT ... SELECT generate_series`), statuses "
        "included, without audit rows, then `VACUUM ANALYZE`, as autovacuum does after such "
        "an insert: its work on the seeded rows would otherwise fall into the measured "
        "window (it cost the endpoint load 0.3-0.4 ms of PostgreSQL CPU per cancel). The "
        "autovacuum that the measured cancels' own updates trigger is counted. The running "
        "workflows of the \"at once\" figure are "
        "brought to `running` through the status writer, one legal transition at a time, "
        "with fresh heartbeats.",
        "- **Baselines are measured in the same run, on the same servers.** A goal is a "
        "ratio to one of them, so a slow day moves both sides: the no-op Celery round trip "
        "(throughput, the queued-latency load, CPU), `/healthz` (the cancel endpoint), bare "
        "SQL (bulk), one API call at a time (bulk), the smaller table (sweep).",
        f"- **No-op round trip**, measured first. {sizes['noop_tasks']:,} no-op tasks "
        "(`bench/noop.py`, one Redis INCR so completion is visible) published by one "
        "producer in another process and run by one worker process; rate = tasks / (first "
        "publish -> counter reaches the total). The no-op worker takes its pool, concurrency "
        "and prefetch from what the running cancel worker reports of itself (Celery's remote "
        "control), its acks and broker options from the same app configuration and a cancel "
        "worker's transport options; both workers' settings are recorded and compared "
        "(`figures.noop.worker_settings`).",
        f"- **Throughput.** {sizes['throughput_cancels']:,} queued workflows cancelled through "
        f"the API by {sizes['clients']} clients; rate = cancels / (first request sent -> last "
        "`cancel_finished_at`), against the no-op rate.",
        "- **CPU per cancel.** psutil's CPU times of the benchmark's own processes (its "
        "descendants only: another tenant's servers on the machine do not count), before and "
        "after: the API, the cancel worker, the runner worker (the revoke broadcast reaches "
        "it), PostgreSQL (the postmaster, its background processes and every backend, "
        "including those that exited, through the postmaster's reaped-children times) and "
        "Redis, over the throughput run, divided by the cancels. Against: the no-op worker "
        "and Redis over the no-op run plus the producer's own CPU while publishing, divided "
        "by the tasks. The load generator (the clients) counts on neither side.",
        "- **Queued latency.** Open-loop load at an offered rate (request i due at "
        f"start + i/rate, at most {sizes['clients']} in flight) for "
        f"{sizes['latency_seconds']:g} s: the goal's rate is "
        f"{sizes.get('latency_noop_fraction', 0.3):g}x the no-op round trip rate of the run, "
        f"and {sizes.get('latency_fixed_rate', 50)}/s is reported beside it; latency = the "
        "worker's `cancel_finished_at` minus the moment the load generator read the 200. A "
        "cancel that landed before the 200 was read counts as 0.",
        f"- **Running latency.** {sizes['running_samples']} workflows, one at a time, each a "
        "chain of ImageBlur nodes on the simulated ComfyUI (really driven by the runner "
        "worker), cancelled at a random moment 50-250 ms into its run; the ComfyUI server "
        "stamps the cancel call it receives (`/sim/calls`), the database stamps "
        "`cancel_finished_at`, and `freed_at` once the runner saw ComfyUI's `/queue` hold the "
        "prompt no more (200 -> freed; one not confirmed within 10 s is counted apart).",
        f"- **At once.** {sizes['at_once']:,} running workflows whose runners are simulated "
        "by `bench/fake_runner.py` in its own process (it listens to the cancel signals like "
        "a runner worker; `ack`: writes `running -> cancelled` one node step after the "
        "signal, as runner._interrupted does; `deaf`: never answers, so the cancel "
        "worker's deadline pass forces them after the grace period). Cancelled by the API "
        "from 32 clients, or by "
        "one `comfy-cancel bulk-cancel --status running`; wall time = start -> last "
        "`cancel_finished_at`.",
        "- **Bulk.** `comfy-cancel bulk-cancel --account A --status queued --yes` run as an "
        "operator would (a new process, imports included) on an account holding exactly N "
        "queued workflows; peak memory is the process's `ru_maxrss`. The one-at-a-time rate "
        f"is measured on a sample of {sizes['one_at_a_time_sample']} in the same run (one "
        "client, one API call after the other, until the last is `cancelled`) and "
        "extrapolated to N. Bare SQL: another account seeded alike with N queued workflows, "
        "one `UPDATE workflows SET status = 'cancelled', ...` of its queued rows and one "
        "`INSERT INTO workflow_events ... SELECT` of their audit rows in one transaction on "
        "the same server (as durable as the system), timed from the first statement to the "
        "end of the commit; then `VACUUM ANALYZE`, so the command meets the table in the "
        "state the SQL met it in.",
        "- **Sweep.** Two databases with the same 100 stuck workflows (25 each: runner lost, "
        "overdue, queued too long, open cancel intent) among 10,000 or 1,000,000 rows "
        "(96% completed history, 500 running and 500 queued that are not stuck); `VACUUM "
        "ANALYZE` after seeding, as autovacuum would. One pass = `sweeps.sweep`, acting on "
        f"all 100; the stuck rows are reset between passes; median of {sizes['sweep_passes']} "
        "passes, and of as many dry runs (finding only).",
        f"- **Endpoint under load.** {sizes['clients']} clients in a closed loop for "
        f"{sizes['load_seconds']:g} s each, from the same load generator: the cancel endpoint "
        "(distinct queued workflows), then `/healthz` on the same server after the cancel "
        "worker drained; rate = 200s / (first sent -> last answered).",
    ]


def _profile_lines(profiles: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for kind, entry in profiles.items():
        lines.append(f"### {kind.replace('_', ' ')} (for {', '.join(entry.get('goals', []))})")
        lines.append("")
        if entry.get("error"):
            lines += [entry["error"], ""]
            continue
        lines += [entry.get("what", ""), ""]
        for process in entry.get("processes", []):
            lines.append(f"**{process['process']}** ({process['samples']} samples)")
            lines.append("")
            lines.append("- CPU by package: " + ", ".join(
                f"`{k}` {v}%" for k, v in process["self_time_by_package_pct"][:8]))
            lines.append("- comfy_cancel functions (inclusive): " + ", ".join(
                f"`{k}` {v}%" for k, v in process["comfy_cancel_functions_inclusive_pct"][:10]))
            lines.append("")
        pg = entry.get("postgresql")
        if pg:
            lines.append("**PostgreSQL client backends** (sampled every 20 ms): " + ", ".join(
                f"{k} {v}%" for k, v in pg["backend_states_pct"].items()))
            lines.append("")
            lines.append("- active ones waiting on: " + ", ".join(
                f"{k} {v}%" for k, v in pg["active_backends_waiting_on_pct"][:6]))
            lines.append("")
        if "new_postgresql_connections_per_1000_cancels" in entry:
            lines.append("- new PostgreSQL connections opened during 1,000 cancels: "
                         f"{entry['new_postgresql_connections_per_1000_cancels']}")
            lines.append("")
    return lines
