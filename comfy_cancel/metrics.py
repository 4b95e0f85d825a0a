"""The Prometheus metrics: what the cancel machinery counts, and how a process shows them.

Counted where it happens, after its transaction commits (the status writer hands its
observations to :func:`after_commit`): cancel requests by source, outcomes by source and
outcome, the seconds from a request (the API's 200) to its outcome and to its runner's
signal, escalations, sweep findings, ComfyUI call errors by runner. A batch counts once per
label set with its size, so a batch of 1,000 cancels costs a few increments, not 1,000.

Label values are bounded: sources and outcomes are the enums of :mod:`models` (anything
else is ``other``), sweep kinds and ComfyUI calls are fixed names, and a runner id is
bounded by the number of runners. A workflow id is never a label.

How a process shows them:

- a Celery worker serves its own on ``COMFY_CANCEL_METRICS_PORT`` (:func:`serve`): one
  port per worker process, the threads pool doing all of its work in that process;
- the API (``comfy-cancel api`` runs several processes) uses the client's multiprocess
  mode: ``PROMETHEUS_MULTIPROC_DIR`` names a directory where each process keeps its values,
  and ``/metrics`` of any of them adds them all up (:func:`exposition`).

The mode is fixed when ``prometheus_client`` is first imported (it picks its value store
then), so ``PROMETHEUS_MULTIPROC_DIR`` must be set before this module is imported.
"""

from __future__ import annotations

import os
import threading
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from comfy_cancel.models import CancelOutcome, CancelSource

CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Read once, as prometheus_client did when it chose where values live.
MULTIPROCESS = bool(os.environ.get(MULTIPROCESS_ENV))

OTHER = "other"
SOURCES = frozenset(s.value for s in CancelSource)
OUTCOMES = frozenset(o.value for o in CancelOutcome)
ESCALATIONS = frozenset({CancelOutcome.FORCED.value, CancelOutcome.RUNNER_LOST.value})

# From milliseconds (a queued cancel) past the grace period (a forced one) to minutes (a
# request that waited for a worker).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0,
                   120.0, 300.0)

CANCEL_REQUESTS = Counter(
    "comfy_cancel_cancel_requests",
    "Cancel requests recorded (a repeat while one is open included), by source.",
    ["source"],
)
CANCEL_OUTCOMES = Counter(
    "comfy_cancel_cancel_outcomes",
    "Cancel requests closed, by source and outcome.",
    ["source", "outcome"],
)
OUTCOME_SECONDS = Histogram(
    "comfy_cancel_cancel_outcome_seconds",
    "Seconds from the cancel request (the API's 200) to its outcome.",
    ["source", "outcome"],
    buckets=LATENCY_BUCKETS,
)
SIGNAL_SECONDS = Histogram(
    "comfy_cancel_cancel_signal_seconds",
    "Seconds from the cancel request (the API's 200) to the first signal sent to the "
    "runner of its running workflow.",
    ["source"],
    buckets=LATENCY_BUCKETS,
)
CANCEL_ESCALATIONS = Counter(
    "comfy_cancel_cancel_escalations",
    "Running cancels ended without the runner's acknowledgement: forced (grace period "
    "over) or runner_lost (heartbeat gone).",
    ["outcome"],
)
SWEEP_PASSES = Counter(
    "comfy_cancel_sweep_passes", "Sweep passes run, by pass (sweep, redrive).", ["sweep"]
)
SWEEP_FINDINGS = Counter(
    "comfy_cancel_sweep_findings",
    "Stuck work the sweep passes acted on, by kind (findings per pass: divide by "
    "comfy_cancel_sweep_passes_total).",
    ["sweep", "kind"],
)
COMFYUI_ERRORS = Counter(
    "comfy_cancel_comfyui_errors",
    "Calls to a ComfyUI server that failed (unreachable, timed out, an unexpected answer), "
    "by runner id and call.",
    ["runner", "call"],
)


# The small series exist from the start (a rate reads 0 instead of "no data"), and the
# API's one increment per cancel skips the label lookup (a lock and a dict: microseconds).
_REQUESTS = {source: CANCEL_REQUESTS.labels(source) for source in (*SOURCES, OTHER)}
for _outcome in ESCALATIONS:
    CANCEL_ESCALATIONS.labels(_outcome)


def label(value: str | None, allowed: frozenset[str]) -> str:
    """``value`` if it is one of ``allowed``, else ``other``: a label never takes a value
    from outside a known set."""
    return value if value in allowed else OTHER


# --- what is counted ------------------------------------------------------------------------


def cancels_requested(source: str | None, count: int = 1) -> None:
    if count:
        _REQUESTS[label(source, SOURCES)].inc(count)


def cancels_closed(
    rows: Iterable[tuple[str | None, str, datetime | None]], now: datetime
) -> None:
    """Outcomes written at ``now``: (source, outcome, requested_at) per workflow. A cancel
    written without an earlier request (a sweep's) records itself as its request, at
    ``now``: it counts as a request too."""
    latencies: dict[tuple[str, str], list[float]] = defaultdict(list)
    counts: Tally[tuple[str, str]] = Tally()
    unrequested: Tally[str] = Tally()
    for source, outcome, requested_at in rows:
        key = (label(source, SOURCES), label(outcome, OUTCOMES))
        counts[key] += 1
        if requested_at is not None:
            latencies[key].append((now - requested_at).total_seconds())
            if requested_at >= now:
                unrequested[key[0]] += 1
    for (source, outcome), n in counts.items():
        CANCEL_OUTCOMES.labels(source, outcome).inc(n)
        if outcome in ESCALATIONS:
            CANCEL_ESCALATIONS.labels(outcome).inc(n)
    for key, seconds in latencies.items():
        _observe(OUTCOME_SECONDS.labels(*key), seconds)
    for source, n in unrequested.items():
        _REQUESTS[source].inc(n)


def _observe(histogram: Histogram, values: list[float]) -> None:
    observe = histogram.observe
    for value in values:
        observe(max(0.0, value))


def runners_signalled(rows: Iterable[tuple[str | None, datetime | None]], now: datetime) -> None:
    """First signals to runners of running workflows: (source, requested_at) each."""
    latencies: dict[str, list[float]] = defaultdict(list)
    for source, requested_at in rows:
        if requested_at is not None:
            latencies[label(source, SOURCES)].append((now - requested_at).total_seconds())
    for source, seconds in latencies.items():
        _observe(SIGNAL_SECONDS.labels(source), seconds)


def sweep_pass(sweep: str, findings: Mapping[str, int]) -> None:
    SWEEP_PASSES.labels(sweep).inc()
    for kind, count in findings.items():
        # Every kind, zero included: a series that exists reads 0 instead of "no data".
        SWEEP_FINDINGS.labels(sweep, kind).inc(count)


def comfyui_error(runner_id: str | None, call: str) -> None:
    COMFYUI_ERRORS.labels(runner_id or OTHER, call).inc()


# --- after the commit ------------------------------------------------------------------------

PENDING_KEY = "comfy_cancel_metrics"


def after_commit(info: dict[str, Any], observe: Callable[[], None]) -> None:
    """Count ``observe`` once the transaction of the session whose ``info`` this is commits
    (dropped on rollback: a retried transaction counts once). See :func:`committed`."""
    info.setdefault(PENDING_KEY, []).append(observe)


def committed(info: dict[str, Any]) -> None:
    for observe in info.pop(PENDING_KEY, ()):
        observe()


def rolled_back(info: dict[str, Any]) -> None:
    info.pop(PENDING_KEY, None)


# --- showing them ----------------------------------------------------------------------------


class _Process(Collector):
    """This process's metrics, or in multiprocess mode every process's, summed."""

    def __init__(self) -> None:
        self._all = CollectorRegistry()
        if MULTIPROCESS:
            prometheus_multiprocess.MultiProcessCollector(self._all)

    def collect(self) -> Iterator[Metric]:
        yield from (self._all if MULTIPROCESS else REGISTRY).collect()


def registry(*extra: Collector) -> CollectorRegistry:
    """What ``/metrics`` shows: the counted metrics, and ``extra`` collectors (read when
    scraped)."""
    shown = CollectorRegistry(auto_describe=False)
    shown.register(_Process())
    for collector in extra:
        shown.register(collector)
    return shown


def exposition(shown: CollectorRegistry) -> bytes:
    """The Prometheus text format of ``shown``."""
    return generate_latest(shown)


_served_lock = threading.Lock()
_served: set[int] = set()


def serve(port: int, host: str) -> None:
    """Serve ``/metrics`` on ``host:port`` from a thread of this process (a worker's);
    once per port."""
    with _served_lock:
        if port in _served:
            return
        start_http_server(port, addr=host, registry=registry())
        _served.add(port)


def clear_multiprocess_dir(path: str) -> None:
    """Remove the values of earlier runs from a multiprocess directory (before the
    processes that write there start: counters must start from zero with them)."""
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))
