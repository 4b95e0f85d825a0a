"""What the cancel worker does with requests (cancel.py), called directly: the status it
writes, the outcome it records, what it hands on (revokes, signals, ComfyUI calls) and the
deadlines it enforces, on SQLite, fakeredis, kombu's memory transport and a simulated
ComfyUI."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event

from comfy_cancel import cancel, manager, signals, status
from comfy_cancel.embedded.comfyui_sim import TINY_PROMPT, RunningSim, blur_chain
from comfy_cancel.models import CancelOutcome, EventKind, WorkflowEvent, WorkflowStatus
from comfy_cancel.signals import SignalKind
from comfy_cancel.status import Actor
from tests.unit.domain import API, GRACE_SECONDS, Domain, wait_until

S = WorkflowStatus
O = CancelOutcome  # noqa: E741
CANCEL_QUEUE = "cancel"
LONG = blur_chain(20)  # about 16 s on a sim at time scale 1: it runs for the whole test


def slow_sim(make_sim: Callable[..., RunningSim]) -> RunningSim:
    return make_sim(time_scale=1.0)


def start_prompt(domain: Domain, sim: RunningSim, workflow_id: str | None = None) -> str:
    """Submit a long prompt and wait until the sim runs it; with ``workflow_id``, as that
    workflow's prompt (as the runner records it)."""
    client = domain.on_sim(sim)
    prompt_id = client.submit(LONG, "test-blocker").prompt_id
    wait_until(lambda: client.queue().running == [prompt_id])
    if workflow_id is not None:
        domain.set(workflow_id, prompt_id=prompt_id)
    return prompt_id


def transitions(domain: Domain, workflow_id: str) -> list[tuple[str, str | None, str | None]]:
    """The audit trail's status changes (a ``gpu_freed`` row may follow them any time)."""
    return [e for e in domain.events(workflow_id) if e[0] == EventKind.TRANSITION.value]


def listen(domain: Domain) -> Callable[[], list[dict[str, Any]]]:
    """The messages published on the signal channel from now on."""
    pubsub = domain.redis.pubsub()
    pubsub.subscribe(signals.CHANNEL)
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"

    def read() -> list[dict[str, Any]]:
        found = []
        while (message := pubsub.get_message(timeout=0.1)) is not None:
            found.append(json.loads(message["data"]))
        return found

    return read


def test_a_queued_cancel_is_one_cas_then_revoke_stop_signal_and_its_pending_prompt_removed(
    domain: Domain, make_sim: Callable[..., RunningSim], broker: Any,
    revokes: Callable[[], list[str]],
) -> None:
    sim = slow_sim(make_sim)
    runner_id = domain.runner(sim.url)
    client = domain.on_sim(sim)
    blocker = start_prompt(domain, sim)  # another workflow's prompt, running
    pending = domain.workflow(S.QUEUED, runner_id)
    prompt_id = client.submit(TINY_PROMPT, "c").prompt_id
    domain.set(pending, prompt_id=prompt_id)
    unsubmitted = domain.workflow(S.QUEUED, runner_id)
    assert client.queue().pending == [prompt_id]
    for workflow_id in (pending, unsubmitted):
        domain.request(workflow_id)
    signalled = listen(domain)

    outcomes = cancel.handle_many(domain.ctx, [pending, unsubmitted], API)

    assert outcomes == {pending: O.CANCELLED, unsubmitted: O.CANCELLED}
    for workflow_id in (pending, unsubmitted):
        row = domain.row(workflow_id)
        assert (row.status, row.cancel_outcome) == (S.CANCELLED.value, O.CANCELLED.value)
        assert (row.cancel_source, row.cancel_actor) == ("api", "alice")
        assert domain.events(workflow_id)[-1] == ("transition", "cancelled", "cancelled")
    assert sorted(revokes()) == sorted(
        str(domain.row(w).runner_task_id) for w in (pending, unsubmitted))
    # Only a workflow with a prompt has a runner watching it: told to stop, prompt removed.
    assert domain.signal(pending) is SignalKind.STOP and domain.signal(unsubmitted) is None
    assert signalled() == [{"workflow_id": pending, "kind": "stop"}]
    queue = client.queue()
    assert queue.pending == [] and queue.running == [blocker]  # another's prompt untouched
    assert broker(CANCEL_QUEUE) == []  # nothing left to check on


def overdue(domain: Domain, workflow_id: str, by: float = 1.0) -> None:
    """Its cancel was taken a grace period (and ``by`` seconds) ago."""
    domain.age(workflow_id, cancel_taken_at=GRACE_SECONDS + by)


@contextmanager
def statements(domain: Domain) -> Iterator[list[str]]:
    """The SQL statements the domain's engine runs inside the block."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(domain.ctx.db.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(domain.ctx.db.engine, "before_cursor_execute", record)


def transition_to(domain: Domain, workflow_id: str, to: str) -> list[WorkflowEvent]:
    with domain.ctx.db.transaction() as session:
        return [e for e in manager.events_of(session, workflow_id)
                if e.kind == EventKind.TRANSITION.value and e.to_status == to]


def test_a_batch_of_messages_is_one_transaction_and_each_audit_row_names_its_requester(
    domain: Domain, revokes: Callable[[], list[str]]
) -> None:
    runner_id = domain.runner()
    bob = Actor("api", "bob", None)
    ops = Actor("bulk", "ops", "maintenance")
    sweep = Actor("sweep", "sweep", "queued too long")
    a, b, c, d, e = (domain.workflow(S.QUEUED, runner_id) for _ in range(5))
    running = domain.workflow(S.RUNNING, runner_id)
    for workflow_id, by in ((a, API), (b, bob), (c, ops), (d, ops), (e, sweep),
                            (running, API)):
        domain.request(workflow_id, by)
    signalled = listen(domain)

    with statements(domain) as ran:  # ``a`` named twice: handled once, for the first to ask
        outcomes = cancel.handle_batch(domain.ctx, [([a], API), ([b], bob), ([c, d, a], ops),
                                                    ([e], sweep), ([running], API)])

    assert outcomes == {**dict.fromkeys((a, b, c, d, e), O.CANCELLED), running: None}
    for workflow_id, by in ((a, API), (b, bob), (c, ops), (d, ops), (e, sweep)):
        (end,) = transition_to(domain, workflow_id, "cancelled")
        assert (end.source, end.actor, end.reason, end.outcome) == (
            by.source, by.actor, by.reason, "cancelled")
        row = domain.row(workflow_id)
        assert (row.cancel_source, row.cancel_actor) == (by.source, by.actor)
    assert sorted(revokes()) == sorted(str(domain.row(w).runner_task_id)
                                       for w in (a, b, c, d, e))
    assert signalled() == [{"workflow_id": running, "kind": "cancel"}]
    assert domain.row(running).cancel_taken_at is not None
    writes = [s for s in ran if s.lstrip().upper().startswith(("UPDATE", "INSERT"))]
    # One compare-and-set for the queued ones, one insert of their audit rows, the stamp
    # of the running one and its audit row (signalled): not a statement per message.
    assert len([s for s in writes if "SET status" in s]) == 1
    assert len(writes) == 4, writes


def test_a_batch_costs_the_same_statements_for_three_cancels_or_thirty(
    domain: Domain, broker: Any
) -> None:
    runner_id = domain.runner()

    def batch_of(n: int) -> int:
        ids = [domain.workflow(S.QUEUED, runner_id) for _ in range(n)]
        for workflow_id in ids:
            domain.request(workflow_id, Actor("api", f"customer-{workflow_id}", None))
        with statements(domain) as ran:
            outcomes = cancel.handle_batch(
                domain.ctx, [([w], Actor("api", f"customer-{w}", None)) for w in ids])
        assert outcomes == dict.fromkeys(ids, O.CANCELLED)
        for workflow_id in ids:
            (end,) = transition_to(domain, workflow_id, "cancelled")
            assert end.actor == f"customer-{workflow_id}"
        return len(ran)

    assert batch_of(3) == batch_of(30)


def test_a_running_cancel_signals_the_runner_and_is_escalated_once_its_deadline_passed(
    domain: Domain, make_sim: Callable[..., RunningSim], broker: Any,
    revokes: Callable[[], list[str]],
) -> None:
    sim = slow_sim(make_sim)
    running = domain.workflow(S.RUNNING, domain.runner(sim.url))
    prompt_id = start_prompt(domain, sim, running)
    domain.request(running)
    signalled = listen(domain)

    assert cancel.handle_many(domain.ctx, [running], API) == {running: None}

    row = domain.row(running)
    assert row.status == S.RUNNING.value and row.cancel_outcome is None
    assert row.cancel_taken_at is not None  # the deadline runs from here
    assert domain.signal(running) is SignalKind.CANCEL
    assert signalled() == [{"workflow_id": running, "kind": "cancel"}]
    assert broker(CANCEL_QUEUE) == []  # no message per deadline: the database holds it
    assert revokes() == []  # the runner's task runs: stopping it is the runner's own job
    assert domain.on_sim(sim).queue().running == [prompt_id]

    # A second request while the first is in flight keeps the first take (and deadline).
    cancel.handle_many(domain.ctx, [running], API)
    assert domain.row(running).cancel_taken_at == row.cancel_taken_at
    assert cancel.enforce_deadlines(domain.ctx) == {}  # within its grace period

    # The runner never acknowledged: past its deadline, the deadline pass escalates.
    overdue(domain, running)
    assert cancel.enforce_deadlines(domain.ctx) == {running: O.FORCED}
    assert cancel.enforce_deadlines(domain.ctx) == {}  # once
    row = domain.row(running)
    assert (row.status, row.cancel_outcome) == (S.CANCELLED.value, O.FORCED.value)
    kind, to, outcome = transitions(domain, running)[-1]
    assert (kind, to, outcome) == (EventKind.TRANSITION.value, "cancelled", "forced")
    with domain.ctx.db.transaction() as session:
        last = [e for e in manager.events_of(session, running)
                if e.kind == EventKind.TRANSITION.value][-1]
    # The requester's name on the audit row; the escalation is the worker's decision.
    assert (last.source, last.actor, last.reason) == ("api", "alice", API.reason)
    assert last.detail is not None and last.detail["escalated"] is True
    assert domain.signal(running) is SignalKind.TERMINATE
    assert revokes() == [row.runner_task_id]
    client = domain.on_sim(sim)
    wait_until(lambda: client.queue().running == [])  # the GPU is freed without the runner
    entry = wait_until(lambda: client.history(prompt_id))
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    # ... and the cancel worker's direct cancel saw ComfyUI let go: the GPU freed, confirmed.
    freed_at = wait_until(lambda: domain.row(running).freed_at)
    assert freed_at >= domain.row(running).cancel_finished_at
    with domain.ctx.db.transaction() as session:
        [freed] = [e for e in manager.events_of(session, running)
                   if e.kind == EventKind.GPU_FREED.value]
    assert freed.source == "cancel_worker" and freed.at == freed_at
    assert freed.detail is not None and freed.detail["seconds_since_request"] > 0


def test_a_deadline_check_after_the_runner_acknowledged_changes_nothing(domain: Domain) -> None:
    acknowledged = domain.workflow(S.RUNNING)
    domain.request(acknowledged)
    assert cancel.handle_many(domain.ctx, [acknowledged], API) == {acknowledged: None}
    with domain.ctx.db.transaction() as session:
        # the runner's ack
        assert status.cancel_if_active(session, acknowledged, API, from_=[S.RUNNING]).changed
    trail = domain.events(acknowledged)
    overdue(domain, acknowledged)

    assert cancel.enforce_deadlines(domain.ctx) == {}
    assert domain.row(acknowledged).cancel_outcome == O.CANCELLED.value
    assert domain.events(acknowledged) == trail
    assert domain.signal(acknowledged) is SignalKind.CANCEL  # no TERMINATE after the ack


def test_escalation_is_forced_or_runner_lost_by_the_age_of_the_heartbeat(
    domain: Domain, make_sim: Callable[..., RunningSim], broker: Any
) -> None:
    sim = slow_sim(make_sim)
    runner_id = domain.runner(sim.url)
    alive, lost = (domain.workflow(S.RUNNING, runner_id) for _ in range(2))
    timeout = domain.ctx.settings.heartbeat_timeout_seconds
    domain.age(alive, heartbeat_at=timeout - 5)
    domain.age(lost, heartbeat_at=timeout + 5, started_at=timeout + 60)
    lost_prompt = start_prompt(domain, sim, lost)
    for workflow_id in (alive, lost):
        domain.request(workflow_id)
        with domain.ctx.db.transaction() as session:
            status.mark_cancel_taken(session, [workflow_id])
        overdue(domain, workflow_id)

    outcomes = cancel.enforce_deadlines(domain.ctx)

    assert outcomes == {alive: O.FORCED, lost: O.RUNNER_LOST}
    for workflow_id, outcome in outcomes.items():
        row = domain.row(workflow_id)
        assert outcome is not None
        assert (row.status, row.cancel_outcome) == (S.CANCELLED.value, outcome.value)
        kind, to, recorded = transitions(domain, workflow_id)[-1]
        assert (kind, to, recorded) == (EventKind.TRANSITION.value, "cancelled", outcome.value)
    client = domain.on_sim(sim)
    wait_until(lambda: client.queue().running == [])
    assert wait_until(lambda: client.history(lost_prompt))["status"]["messages"][-1][0] == (
        "execution_interrupted")
    # Its runner is gone, so only the cancel worker's direct cancel can confirm the GPU
    # freed; the other never had a prompt on ComfyUI: nothing to confirm, null.
    assert wait_until(lambda: domain.row(lost).freed_at) is not None
    assert domain.row(alive).freed_at is None


def test_a_cancel_of_a_running_workflow_whose_runner_is_gone_ends_at_once(
    domain: Domain, broker: Any
) -> None:
    lost = domain.workflow(S.RUNNING)
    domain.age(lost, heartbeat_at=domain.ctx.settings.heartbeat_timeout_seconds + 1)
    domain.request(lost)

    assert cancel.handle_many(domain.ctx, [lost], API) == {lost: O.RUNNER_LOST}
    assert domain.row(lost).status == S.CANCELLED.value
    assert domain.signal(lost) is SignalKind.TERMINATE  # never a CANCEL nobody answers
    assert broker(CANCEL_QUEUE) == []  # no deadline to wait for


def test_a_cancel_handed_on_again_keeps_its_deadline_which_the_deadline_pass_enforces(
    domain: Domain, broker: Any
) -> None:
    late, in_grace = (domain.workflow(S.RUNNING) for _ in range(2))
    for workflow_id in (late, in_grace):
        domain.request(workflow_id)
        with domain.ctx.db.transaction() as session:
            status.mark_cancel_taken(session, [workflow_id])
    overdue(domain, late)
    domain.age(in_grace, cancel_taken_at=GRACE_SECONDS - 2)
    taken = {w: domain.row(w).cancel_taken_at for w in (late, in_grace)}

    # Handed on again (a duplicate message): signalled again, the first take kept.
    assert cancel.handle_many(domain.ctx, [late, in_grace], API) == {late: None, in_grace: None}
    assert {w: domain.row(w).cancel_taken_at for w in (late, in_grace)} == taken

    assert cancel.enforce_deadlines(domain.ctx) == {late: O.FORCED}
    assert domain.signal(late) is SignalKind.TERMINATE
    assert domain.signal(in_grace) is SignalKind.CANCEL
    assert domain.row(in_grace).status == S.RUNNING.value
    assert broker(CANCEL_QUEUE) == []


def test_the_deadline_pass_works_through_any_number_in_batches_for_their_own_requesters(
    domain: Domain, broker: Any, revokes: Callable[[], list[str]]
) -> None:
    domain.ctx.settings.cancel_batch_size = 3
    runner_id = domain.runner()
    requesters = [API, Actor("bulk", "ops", "maintenance"), Actor("sweep", "sweep", None)]
    ids = [domain.workflow(S.RUNNING, runner_id) for _ in range(7)]
    for n, workflow_id in enumerate(ids):
        domain.request(workflow_id, requesters[n % 3])
        with domain.ctx.db.transaction() as session:
            status.mark_cancel_taken(session, [workflow_id])
        overdue(domain, workflow_id, by=n)
    finished = domain.workflow(S.RUNNING, runner_id)  # acknowledged before its deadline
    domain.request(finished)
    with domain.ctx.db.transaction() as session:
        status.mark_cancel_taken(session, [finished])
        assert status.complete_if_running(session, finished, {}).changed
    overdue(domain, finished)

    assert cancel.enforce_deadlines(domain.ctx) == dict.fromkeys(ids, O.FORCED)

    for n, workflow_id in enumerate(ids):
        with domain.ctx.db.transaction() as session:
            ends = [e for e in manager.events_of(session, workflow_id)
                    if e.kind == EventKind.TRANSITION.value and e.to_status == "cancelled"]
        (end,) = ends
        by = requesters[n % 3]
        assert (end.source, end.actor, end.reason, end.outcome) == (
            by.source, by.actor, by.reason, "forced")
        assert domain.signal(workflow_id) is SignalKind.TERMINATE
    assert sorted(revokes()) == sorted(str(domain.row(w).runner_task_id) for w in ids)
    assert domain.row(finished).status == S.COMPLETED.value


def test_terminal_workflows_get_an_outcome_only_when_a_cancel_was_requested(
    domain: Domain, broker: Any, revokes: Callable[[], list[str]]
) -> None:
    runner_id = domain.runner()
    asked_done = domain.workflow(S.RUNNING, runner_id)
    domain.request(asked_done)
    with domain.ctx.db.transaction() as session:
        assert status.complete_if_running(session, asked_done, {}).changed  # won the race
    never_asked = domain.workflow(S.COMPLETED, runner_id)
    failed = domain.workflow(S.FAILED, runner_id)
    cancelled = domain.workflow(S.QUEUED, runner_id)
    domain.request(cancelled)
    assert cancel.handle_many(domain.ctx, [cancelled], API) == {cancelled: O.CANCELLED}
    revokes()
    trails = {w: domain.events(w) for w in (never_asked, failed, cancelled)}

    outcomes = cancel.handle_many(domain.ctx, [asked_done, never_asked, failed, cancelled], API)

    assert outcomes == {asked_done: O.TOO_LATE, never_asked: O.TOO_LATE, failed: O.TOO_LATE,
                        cancelled: O.ALREADY_CANCELLED}
    # Recorded only where a request was open; never a status change.
    assert domain.row(asked_done).cancel_outcome == O.TOO_LATE.value
    assert domain.row(asked_done).status == S.COMPLETED.value
    for workflow_id in (never_asked, failed):
        assert domain.row(workflow_id).cancel_outcome is None
        assert domain.events(workflow_id) == trails[workflow_id]
    row = domain.row(cancelled)
    assert (row.status, row.cancel_outcome) == (S.CANCELLED.value, O.CANCELLED.value)
    assert domain.events(cancelled) == trails[cancelled]  # its outcome is already closed
    assert revokes() == [] and broker(CANCEL_QUEUE) == []
    assert all(domain.signal(w) is None for w in (asked_done, never_asked, failed))


def test_accepted_and_unknown_workflows_are_left_alone(domain: Domain, broker: Any) -> None:
    accepted = domain.workflow(S.ACCEPTED)
    trail = domain.events(accepted)

    assert cancel.handle_many(domain.ctx, [accepted, "no-such-workflow"], API) == {
        accepted: None}
    assert domain.row(accepted).status == S.ACCEPTED.value
    assert domain.events(accepted) == trail and broker(CANCEL_QUEUE) == []


def test_a_comfyui_that_does_not_answer_does_not_stop_an_escalation(
    domain: Domain, broker: Any
) -> None:
    # The runner's endpoint is a closed port: the database write stands, the call is logged.
    stuck = domain.workflow(S.RUNNING)
    domain.set(stuck, prompt_id="p-1")
    domain.request(stuck)
    with domain.ctx.db.transaction() as session:
        status.mark_cancel_taken(session, [stuck])
    overdue(domain, stuck)

    assert cancel.enforce_deadlines(domain.ctx) == {stuck: O.FORCED}
    assert domain.row(stuck).status == S.CANCELLED.value



def test_a_direct_cancel_beside_the_deadline_pass_that_raises_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Nobody waits for the deadline pass's direct cancels: an unexpected error in one (a
    # database gone while it reads the runners, say) must reach the log, not vanish.
    def broken() -> None:
        raise RuntimeError("runners unreadable")

    with caplog.at_level(logging.ERROR, logger="comfy_cancel.cancel"):
        cancel._beside(broken)
        wait_until(lambda: any("direct cancel" in r.getMessage() for r in caplog.records))
    (record,) = [r for r in caplog.records if "direct cancel" in r.getMessage()]
    assert record.exc_info is not None and "runners unreadable" in str(record.exc_info[1])
