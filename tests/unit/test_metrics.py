"""The Prometheus metrics (metrics.py, scrape.py, the API's /metrics): what the domain
counts and when (after its commit, once per batch and label set), the state read at scrape
time, and the exposition: Prometheus names, and label values from bounded sets only."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import fakeredis
import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from comfy_cancel import cancel, metrics, status, sweeps, worker
from comfy_cancel.broker import queue_lengths
from comfy_cancel.comfyui import ComfyUIError
from comfy_cancel.config import get_settings
from comfy_cancel.embedded.processes import free_port
from comfy_cancel.models import CancelOutcome, CancelSource, WorkflowStatus, utcnow
from comfy_cancel.scrape import LiveState
from comfy_cancel.status import Actor
from testbed.database import migrate
from tests.apitest import Env, make_env
from tests.unit.domain import API, Domain
from tests.unit.test_cancel_domain import overdue

S = WorkflowStatus
O = CancelOutcome  # noqa: E741
BULK = Actor(CancelSource.BULK.value, "ops", "maintenance")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def value(name: str, **labels: str) -> float:
    """A sample of this process's registry (0 when the series does not exist yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Deltas:
    """Samples read before and after: counters are process-wide, tests see their change."""

    def __init__(self, *samples: tuple[str, dict[str, str]]) -> None:
        self._samples = samples
        self._before = [value(name, **labels) for name, labels in samples]

    def __call__(self) -> list[float]:
        return [value(name, **labels) - before
                for (name, labels), before in zip(self._samples, self._before, strict=True)]


def outcomes(source: str, outcome: str) -> tuple[str, dict[str, str]]:
    return "comfy_cancel_cancel_outcomes_total", {"source": source, "outcome": outcome}


def latencies(source: str, outcome: str) -> tuple[str, dict[str, str]]:
    return "comfy_cancel_cancel_outcome_seconds_count", {"source": source, "outcome": outcome}


def requests(source: str) -> tuple[str, dict[str, str]]:
    return "comfy_cancel_cancel_requests_total", {"source": source}


def test_a_batch_counts_its_requests_and_outcomes_by_source_with_their_latencies(
    domain: Domain,
) -> None:
    runner_id = domain.runner()
    queued = [domain.workflow(S.QUEUED, runner_id) for _ in range(3)]
    done = domain.workflow(S.COMPLETED, runner_id)
    counted = Deltas(requests("api"), requests("bulk"), outcomes("api", "cancelled"),
                     outcomes("bulk", "cancelled"), latencies("api", "cancelled"),
                     latencies("bulk", "cancelled"))
    domain.request(queued[0], API)
    domain.request(queued[1], API)
    with domain.ctx.db.transaction() as session:  # a bulk cancel records its ids at once
        assert len(status.request_cancel_many(session, [queued[2], done], BULK)) == 1

    cancel.handle_batch(domain.ctx, [(queued[:2], API), ([queued[2]], BULK)])

    assert counted() == [2, 1, 2, 1, 2, 1]


def test_a_transaction_that_rolls_back_counts_nothing(domain: Domain) -> None:
    workflow_id = domain.workflow(S.QUEUED)
    domain.request(workflow_id)
    counted = Deltas(outcomes("api", "cancelled"), latencies("api", "cancelled"))

    with pytest.raises(RuntimeError), domain.ctx.db.transaction() as session:
        assert status.cancel_queued_many(session, [workflow_id], API)
        raise RuntimeError("the commit never happens")

    assert domain.row(workflow_id).status == S.QUEUED.value
    assert counted() == [0, 0]
    cancel.handle_many(domain.ctx, [workflow_id], API)  # counted once it commits
    assert counted() == [1, 1]


def test_a_running_cancel_counts_its_first_signal_then_its_escalation(domain: Domain) -> None:
    running = domain.workflow(S.RUNNING)
    domain.request(running)
    counted = Deltas(("comfy_cancel_cancel_signal_seconds_count", {"source": "api"}),
                     ("comfy_cancel_cancel_escalations_total", {"outcome": "forced"}),
                     outcomes("api", "forced"), latencies("api", "forced"))

    assert cancel.handle_many(domain.ctx, [running], API) == {running: None}
    assert counted() == [1, 0, 0, 0]
    cancel.handle_many(domain.ctx, [running], API)  # handed on again: still the first signal
    assert counted() == [1, 0, 0, 0]

    overdue(domain, running)
    assert cancel.enforce_deadlines(domain.ctx) == {running: O.FORCED}
    assert counted() == [1, 1, 1, 1]


def test_a_cancel_written_without_a_request_counts_as_its_own_request(domain: Domain) -> None:
    """A sweep that ends a workflow whose runner is gone asks nobody first."""
    running = domain.workflow(S.RUNNING)
    sweep = Actor(CancelSource.SWEEP.value, "sweep", "no heartbeat")
    counted = Deltas(requests("sweep"), outcomes("sweep", "runner_lost"),
                     ("comfy_cancel_cancel_escalations_total", {"outcome": "runner_lost"}))

    cancel.escalate(domain.ctx, [domain.row(running)], sweep, O.RUNNER_LOST)

    assert counted() == [1, 1, 1]


def test_a_sweep_pass_counts_itself_and_every_kind_of_finding(domain: Domain) -> None:
    counted = Deltas(("comfy_cancel_sweep_passes_total", {"sweep": "redrive"}))
    sweeps.redrive(domain.ctx, dry_run=True)  # a dry run changes nothing, counts nothing
    assert counted() == [0]

    sweeps.redrive(domain.ctx)

    assert counted() == [1]
    for kind in sweeps.SweepReport().counts():
        labels = {"sweep": "redrive", "kind": kind}
        assert REGISTRY.get_sample_value("comfy_cancel_sweep_findings_total", labels) is not None


def test_a_failed_comfyui_call_is_counted_once_for_its_runner_by_the_outermost_call(
    domain: Domain,
) -> None:
    runner_id = domain.runner()
    client = domain.ctx.comfyui("http://127.0.0.1:1", None, 0.5, runner_id=runner_id)
    counted = Deltas(("comfy_cancel_comfyui_errors_total", {"runner": runner_id, "call": "cancel"}),
                     ("comfy_cancel_comfyui_errors_total", {"runner": runner_id, "call": "queue"}))

    with pytest.raises(ComfyUIError):
        client.cancel_many(["p1"])  # nothing listens on port 1
    with pytest.raises(ComfyUIError):
        client.queue()

    assert value("comfy_cancel_comfyui_errors_total", runner=runner_id,
                 call="cancel_many") == 1
    assert counted() == [0, 1]


def test_label_values_outside_the_known_sets_become_other() -> None:
    at = utcnow()
    counted = Deltas(outcomes("other", "other"), requests("other"))

    metrics.cancels_closed([("made-up", "weird", None)], at)
    metrics.cancels_requested("also-made-up")

    assert counted() == [1, 1]
    assert metrics.label("api", metrics.SOURCES) == "api"


@pytest.fixture
def api_env(tmp_path: Any, broker: Any) -> Iterator[Env]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(url)
    yield from make_env(url)


def test_the_api_serves_the_exposition_without_a_token_in_prometheus_conventions(
    domain: Domain, api_env: Env
) -> None:
    # Everything counted at least once, with a workflow id at hand to look for.
    runner_id = domain.runner()
    queued, running = domain.workflow(S.QUEUED, runner_id), domain.workflow(S.RUNNING, runner_id)
    for workflow_id in (queued, running):
        domain.request(workflow_id)
    cancel.handle_batch(domain.ctx, [([queued, running], API)])
    overdue(domain, running)
    cancel.enforce_deadlines(domain.ctx)
    sweeps.redrive(domain.ctx)
    with pytest.raises(ComfyUIError):
        domain.ctx.comfyui("http://127.0.0.1:1", None, 0.5, runner_id=runner_id).queue()

    response = api_env.client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert queued not in text and running not in text
    families = {f.name: f for f in text_string_to_metric_families(text)
                if f.name.startswith("comfy_cancel_")}
    assert {"comfy_cancel_cancel_requests", "comfy_cancel_cancel_outcomes",
            "comfy_cancel_cancel_outcome_seconds", "comfy_cancel_cancel_signal_seconds",
            "comfy_cancel_cancel_escalations", "comfy_cancel_sweep_passes",
            "comfy_cancel_sweep_findings", "comfy_cancel_comfyui_errors",
            "comfy_cancel_state_up", "comfy_cancel_open_cancel_requests",
            "comfy_cancel_open_cancel_oldest_age_seconds"} <= set(families)
    allowed = {
        "source": metrics.SOURCES | {metrics.OTHER},
        "outcome": metrics.OUTCOMES | {metrics.OTHER},
        "sweep": {"sweep", "redrive"},
        "kind": set(sweeps.SweepReport().counts()),
        "call": {"system_stats", "submit", "queue", "delete_pending", "interrupt", "cancel",
                 "cancel_many", "history", "watch", "events"},
        "queue": {"cancel", "cancel.bulk", "cancel.sweep", "runner"},
        "part": {"database", "redis"},
    }
    for family in families.values():
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        for sample in family.samples:
            for name, label_value in sample.labels.items():
                if name == "le":
                    continue
                if name == "runner":  # bounded by the number of runners
                    assert UUID.fullmatch(label_value) or label_value == metrics.OTHER
                    continue
                assert label_value in allowed[name], (family.name, name, label_value)
    # This API's Redis is unreachable: the scrape says so, and shows the database's state.
    assert families["comfy_cancel_state_up"].samples[1].labels == {"part": "redis"}
    assert families["comfy_cancel_state_up"].samples[1].value == 0
    assert "comfy_cancel_queue_messages" not in families


def test_the_api_can_keep_metrics_off(tmp_path: Any, broker: Any) -> None:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(url)
    for env in make_env(url, api_metrics=False):
        assert env.client.get("/metrics").status_code == 404


def test_the_state_read_at_scrape_time(domain: Domain) -> None:
    old, new = domain.workflow(S.RUNNING), domain.workflow(S.QUEUED)
    domain.workflow(S.RUNNING)  # no request: not open
    for workflow_id in (old, new):
        domain.request(workflow_id)
    domain.age(old, cancel_requested_at=30)
    fake = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    fake.lpush("cancel", b"m1", b"m2")
    fake.lpush("cancel\x06\x163", b"m3")  # kombu's list of priority 3
    fake.lpush("runner", b"r1")

    state = {(m.name, tuple(s.labels.items())): s.value
             for m in LiveState(domain.ctx.db, fake).collect() for s in m.samples}

    assert state[("comfy_cancel_open_cancel_requests", ())] == 2
    assert 29 < state[("comfy_cancel_open_cancel_oldest_age_seconds", ())] < 120
    assert {queue: state[("comfy_cancel_queue_messages", (("queue", queue),))]
            for queue in ("cancel", "cancel.bulk", "cancel.sweep", "runner")} == {
        "cancel": 3, "cancel.bulk": 0, "cancel.sweep": 0, "runner": 1}
    assert queue_lengths(fake, ["cancel"]) == {"cancel": 3}


def test_a_worker_serves_its_metrics_on_its_port_and_runs_on_when_the_port_is_taken(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def start_worker(port: int) -> None:
        monkeypatch.setenv("COMFY_CANCEL_METRICS_PORT", str(port))
        get_settings.cache_clear()
        try:
            worker.on_worker_init(conf=SimpleNamespace(result_backend="rpc://"), options={})
        finally:
            get_settings.cache_clear()

    port = free_port()
    start_worker(port)
    page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert page.status_code == 200
    assert 'comfy_cancel_cancel_requests_total{source="api"}' in page.text

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with caplog.at_level(logging.ERROR, logger="comfy_cancel.worker"):
            start_worker(taken.getsockname()[1])
    assert "no metrics: cannot serve them on 127.0.0.1" in caplog.text
