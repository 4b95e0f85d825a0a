"""The operator page's server side: who may read ``/ops/state``, and what it says about stuck
work, open cancels and recent cancels (the browser test, tests/acceptance/test_ops_page.py,
drives the page itself)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from comfy_cancel import manager, ops, status
from comfy_cancel.manager import FinishedCancel
from comfy_cancel.models import CancelOutcome, Workflow, WorkflowStatus, utcnow
from testbed.database import LOOPBACK_ALLOWED
from tests.apitest import KEY, Env, error
from tests.helpers import seed_workflow

S = WorkflowStatus
BULK = status.Actor("bulk", "ops#token9", "maintenance")
SEALING = LOOPBACK_ALLOWED.model_copy(update={"secret_key": KEY})  # runner headers sealed


def set_columns(env: Env, workflow_id: str, **values: Any) -> None:
    with env.db.transaction() as session:
        session.execute(update(Workflow).where(Workflow.id == workflow_id).values(**values))


def ago(seconds: float) -> Any:
    return utcnow() - timedelta(seconds=seconds)


def state(env: Env) -> dict[str, Any]:
    response = env.client.get("/ops/state", headers=env.auth("ops", operator=True))
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    return dict(response.json())


def stuck(body: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(k for k in body["stuck"] if k["kind"] == kind)


# --- who may read it ---------------------------------------------------------------------------


def test_the_page_is_a_shell_anyone_may_load_with_a_strict_policy(env: Env) -> None:
    for path in ("/ops", "/ops/"):
        page = env.client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        # Only its own inline script runs (by hash), it talks to this origin only.
        assert "script-src 'sha256-" in policy and "unsafe" not in policy
        assert "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "cfc_" not in page.text.replace("cfc_...", "")  # no token in it, ever
        assert 'fetch(path' in page.text and "sessionStorage" in page.text


@pytest.mark.parametrize("path", ["/ops/state", "/ops/nothing-here"])
def test_its_data_needs_an_operator_token(env: Env, path: str) -> None:
    assert "missing token" in error(env.client.get(path), 401)
    unknown = env.client.get(path, headers={"Authorization": "Bearer cfc_nobody"})
    assert "unknown or expired" in error(unknown, 401)
    assert "operator token" in error(env.client.get(path, headers=env.auth()), 403)


def test_an_unknown_ops_path_is_the_usual_404_for_an_operator(env: Env) -> None:
    response = env.client.get("/ops/nothing-here", headers=env.auth("ops", operator=True))
    assert "no route GET /ops/nothing-here" in error(response, 404)


# --- what it shows ---------------------------------------------------------------------------


def test_an_empty_system_shows_nothing_stuck_and_no_cancels(env: Env) -> None:
    body = state(env)
    assert [k["kind"] for k in body["stuck"]] == list(ops.STUCK_KINDS)
    assert all(k["count"] == 0 and k["oldest_seconds"] is None for k in body["stuck"])
    assert body["open_cancels"] == {"count": 0, "oldest_seconds": None, "oldest": []}
    assert body["recent"]["total"] == 0 and body["recent"]["latest"] == []
    assert body["histogram"] == {"bounds_seconds": list(ops.BUCKETS), "counts": {}}


def test_stuck_work_is_the_sweeps_dry_run_with_ages_and_changes_nothing(env: Env) -> None:
    settings = env.app.state.settings
    lost = env.workflow(S.RUNNING)
    set_columns(env, lost, heartbeat_at=ago(settings.heartbeat_timeout_seconds + 30))
    alive = env.workflow(S.RUNNING)
    body = state(env)
    runner_lost = stuck(body, "runner_lost")
    assert runner_lost["count"] == 1 and runner_lost["capped"] is False
    assert [w["id"] for w in runner_lost["sample"]] == [lost]
    assert runner_lost["oldest_seconds"] >= settings.heartbeat_timeout_seconds + 30
    assert alive not in str(body["stuck"])
    # A dry run: the lost runner's workflow is still running, with no cancel recorded.
    row = env.row(lost)
    assert row.status == S.RUNNING and row.cancel_requested_at is None


def test_a_cancel_past_its_grace_period_shows_as_stuck(env: Env) -> None:
    grace = env.app.state.settings.cancel_grace_seconds
    running = env.workflow(S.RUNNING)
    with env.db.transaction() as session:
        assert status.request_cancel(session, running, BULK, publishing=True)
        status.mark_cancel_taken(session, [running])
    set_columns(env, running, cancel_taken_at=ago(grace + 20))
    past = stuck(state(env), "past_grace")
    assert past["count"] == 1 and past["sample"][0]["id"] == running
    assert past["oldest_seconds"] >= grace + 20


def test_open_cancel_requests_are_counted_with_the_oldest_first(env: Env) -> None:
    older, newer = env.workflow(S.QUEUED), env.workflow(S.RUNNING)
    with env.db.transaction() as session:
        status.request_cancel(session, older, BULK, publishing=True)
        status.request_cancel(session, newer, BULK, publishing=True)
    set_columns(env, older, cancel_requested_at=ago(90), cancel_published_at=ago(90))
    open_ = state(env)["open_cancels"]
    assert open_["count"] == 2 and open_["oldest_seconds"] >= 90
    assert [w["id"] for w in open_["oldest"]] == [older, newer]
    assert open_["oldest"][0] | {"age_seconds": None} == {
        "id": older, "status": "queued", "source": "bulk", "age_seconds": None, "taken": False}


def finished_cancel(env: Env, to: S, latency: float, outcome: CancelOutcome) -> str:
    """A workflow whose cancel took ``latency`` seconds from request to ``outcome``."""
    workflow_id = env.workflow(to)
    with env.db.transaction() as session:
        assert status.request_cancel(session, workflow_id, BULK, publishing=True)
        status.cancel_if_active(session, workflow_id, BULK, outcome)
    finished = env.row(workflow_id).cancel_finished_at
    assert finished is not None
    set_columns(env, workflow_id, cancel_requested_at=finished - timedelta(seconds=latency))
    return workflow_id


def test_recent_cancels_by_source_and_outcome_with_latencies_and_histogram(env: Env) -> None:
    fast = [finished_cancel(env, S.QUEUED, 0.05, CancelOutcome.CANCELLED) for _ in range(3)]
    slow = finished_cancel(env, S.RUNNING, 3.0, CancelOutcome.CANCELLED)
    forced = finished_cancel(env, S.RUNNING, 100.0, CancelOutcome.FORCED)
    too_late = env.workflow(S.RUNNING)  # requested, then the runner completed first
    with env.db.transaction() as session:
        status.request_cancel(session, too_late, BULK, publishing=True)
        status.complete_if_running(session, too_late, {})
    old = finished_cancel(env, S.QUEUED, 1.0, CancelOutcome.CANCELLED)
    set_columns(env, old, cancel_requested_at=ago(2 * 3600))  # outside the hour
    env.workflow(S.COMPLETED)  # never cancelled: not a cancel

    body = state(env)
    recent = body["recent"]
    assert recent["total"] == 6
    groups = {(g["source"], g["outcome"]): g for g in recent["by_source_outcome"]}
    assert set(groups) == {("bulk", "cancelled"), ("bulk", "forced"), ("bulk", "too_late")}
    cancelled = groups[("bulk", "cancelled")]
    assert cancelled["count"] == 4 and cancelled["max_seconds"] == pytest.approx(3.0, abs=0.01)
    assert cancelled["p50_seconds"] == pytest.approx(0.05, abs=0.01)
    assert groups[("bulk", "forced")]["p95_seconds"] == pytest.approx(100.0, abs=0.01)
    assert {c["id"] for c in recent["latest"]} == {*fast, slow, forced, too_late}
    assert all(c["actor"] == "ops#token9" for c in recent["latest"])
    # Bars: <=0.1 s (three), <=5 s (one), >60 s (one forced), plus the too-late one.
    counts = body["histogram"]["counts"]
    bar = {b: i for i, b in enumerate(ops.BUCKETS)}
    assert counts["cancelled"][bar[0.1]] == 3 and counts["cancelled"][bar[5.0]] == 1
    assert sum(counts["cancelled"]) == 4 and counts["forced"][len(ops.BUCKETS)] == 1
    assert sum(counts["too_late"]) == 1


def test_nothing_secret_appears_in_the_state(env: Env) -> None:
    with env.db.transaction() as session:
        account = manager.get_or_create_account(session, "acme")
        runner = manager.add_runner(
            session, account.id, name="r",
            endpoint_url="http://user:hunter2@127.0.0.1:1/?k=s3cr3t",
            headers={"X-Api-Key": "topsecretvalue"}, settings=SEALING,
        )
        runner_id = runner.id
    workflow_id = seed_workflow(env.db, env.account_id(), runner_id, S.RUNNING)
    with env.db.transaction() as session:
        status.request_cancel(session, workflow_id, BULK, publishing=True)
    operator = env.token("ops", operator=True)
    text = env.client.get("/ops/state", headers={"Authorization": f"Bearer {operator}"}).text
    assert workflow_id in text
    for secret in ("hunter2", "s3cr3t", "topsecretvalue", operator, "127.0.0.1"):
        assert secret not in text


# --- the arithmetic --------------------------------------------------------------------------


def test_quantiles_are_nearest_rank() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert ops._quantile(values, 0.5) == 2.0 and ops._quantile(values, 0.95) == 4.0
    assert ops._quantile([7.0], 0.5) == 7.0 and ops._quantile([], 0.5) is None
    assert ops._quantile([float(n) for n in range(1, 101)], 0.95) == 95.0


def test_a_latency_on_a_bound_falls_in_that_bar() -> None:
    now = utcnow()

    def cancel(latency: float | None, outcome: str = "cancelled") -> FinishedCancel:
        finished = None if latency is None else now
        return FinishedCancel("x", "api", outcome, None, now - timedelta(seconds=latency or 0),
                              finished)

    counts = ops._histogram([cancel(0.1), cancel(0.11), cancel(60.0), cancel(61.0),
                             cancel(None)])["counts"]["cancelled"]
    assert counts[0] == 1 and counts[1] == 1 and counts[-2] == 1 and counts[-1] == 1
    assert sum(counts) == 4  # one without a finish time has no latency to plot
