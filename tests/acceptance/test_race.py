"""A thousand cancels racing a thousand completions on PostgreSQL, by concurrent writers.

Real PostgreSQL, real Redis and two real Celery cancel-worker processes; the runners are
simulated in this process. Every workflow is brought to ``running`` through the status
writer, then:

- its simulated runner finishes it at a planned moment (``complete_if_running``, sometimes
  ``fail``), and reacts to the CANCEL signal on Redis pub/sub like a real runner: after a
  small delay (ComfyUI reporting the interrupt) it writes ``running -> cancelled``, unless it
  had already finished. Some runners never acknowledge: deaf ones finish about when the
  cancel worker's deadline escalates (``forced`` or ``too_late``, whichever CAS wins), hung
  ones never finish (``forced``), and lost ones have no heartbeat (``runner_lost``);
- it is cancelled exactly as the API does: ``request_cancel`` committed, then published on
  the ``cancel`` queue, then marked published. A workflow already terminal is skipped (the
  API would answer 400).

Which writer comes first is planned per responsive workflow (:class:`Race`), by the order
of events rather than by the clock, so that every direction of the race happens, by
construction, however loaded the machine: the runner acknowledges the signal and then tries
to finish; finishes on the signal and then tries to acknowledge; does both at once from one
barrier; or finishes and only then is cancelled. The rest race by the clock (a cancel at a
random moment around a planned finish), which adds the orders nobody planned.

Every writer attempts its compare-and-set whatever the others did, so completions land on
cancelled rows and cancels land on completed ones. Afterwards the database and what each
writer was told must agree: one terminal status each, nothing ever left a terminal status,
and the audit trail and the cancel outcome tell the same story as the status. These checks
hold always; the mix of outcomes is asserted only where the plan forces it.

``COMFY_CANCEL_RACE_SEED`` replays one run's plan.
"""

from __future__ import annotations

import heapq
import itertools
import os
import random
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select, update

from comfy_cancel import manager, publish, status, worker
from comfy_cancel.config import Settings
from comfy_cancel.db import Database
from comfy_cancel.embedded.celery_workers import CeleryWorker
from comfy_cancel.embedded.comfyui_sim import TINY_PROMPT
from comfy_cancel.embedded.processes import stop_all
from comfy_cancel.models import (
    CancelOutcome,
    EventKind,
    Workflow,
    WorkflowEvent,
    WorkflowStatus,
    utcnow,
)
from comfy_cancel.signals import SignalKind, SignalListener
from testbed.database import migrated
from testbed.stack import configured, start_worker, wait_workers_ready
from tests.helpers import PATH_TO, advance, make_account_and_runner

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres]

S = WorkflowStatus
TERMINAL = {S.COMPLETED.value, S.FAILED.value, S.CANCELLED.value}
CANCEL_WRITTEN = {CancelOutcome.CANCELLED.value, CancelOutcome.FORCED.value,
                  CancelOutcome.RUNNER_LOST.value}

WORKFLOWS = 1000
# Planned finishes are spread over this long. The simulated writers share two cores with
# the workers and PostgreSQL; at 12 s a busy CI box left them seconds late, which turned
# most planned acknowledgements into escalations and the race into no race.
WINDOW_SECONDS = 30.0
GRACE_SECONDS = 2.0  # the cancel worker escalates a cancel not acknowledged by then
HEARTBEAT_TIMEOUT_SECONDS = 120.0  # longer than the test: only the "lost" runners are lost
SETTLE_TIMEOUT_SECONDS = 20.0  # after the last simulated writer is done, all must have ended
DRAIN_TIMEOUT_SECONDS = 120.0  # the simulated writers must be done this long after the plan
CANCEL_WORKERS = 2
CANCEL_CONCURRENCY = 16
API = status.Actor("api", "acme#token1", "race test")


class Kind(StrEnum):
    RESPONSIVE = "responsive"  # acknowledges a cancel signal after a short delay
    DEAF = "deaf"  # never acknowledges; finishes late, about when the deadline strikes
    HUNG = "hung"  # never acknowledges, never finishes, heartbeat recent: must end forced
    LOST = "lost"  # never acknowledges, never finishes, no heartbeat: must end runner_lost


class Race(StrEnum):
    """Who writes first, for a responsive runner (by the order of events, not the clock)."""

    NONE = "never cancelled"  # finishes at its moment; nobody cancels it
    CLOCK = "by the clock"  # cancelled at a random moment around its planned finish
    ACK_FIRST = "acknowledges, then finishes"  # on the signal: the cancel must win
    FINISH_FIRST = "finishes, then acknowledges"  # on the signal: the finish must win
    AT_ONCE = "both at once"  # on the signal, from one barrier: either may win
    CANCEL_AFTER = "cancelled after it finished"  # the API must refuse (400)


RACES = ([Race.NONE] * 15 + [Race.CLOCK] * 25 + [Race.ACK_FIRST] * 20
         + [Race.FINISH_FIRST] * 15 + [Race.AT_ONCE] * 10 + [Race.CANCEL_AFTER] * 15)
SIGNAL_DRIVEN = {Race.ACK_FIRST, Race.FINISH_FIRST, Race.AT_ONCE}


@dataclass(frozen=True)
class Plan:
    workflow_id: str
    kind: Kind
    race: Race | None  # responsive runners only
    finish_at: float | None  # seconds after the start; None: never, or on the signal
    fails: bool  # finishes with `failed` instead of `completed`
    cancel_at: float | None  # None: nobody cancels it
    ack_delay: float  # from the CANCEL signal to the runner's acknowledgement


def make_plans(ids: list[str], rng: random.Random) -> dict[str, Plan]:
    plans = {}
    kinds = [Kind.RESPONSIVE] * 85 + [Kind.DEAF] * 7 + [Kind.HUNG] * 5 + [Kind.LOST] * 3
    for workflow_id in ids:
        kind = rng.choice(kinds)
        start = rng.uniform(0.3, 0.3 + WINDOW_SECONDS)
        finish_at: float | None = start
        cancel_at: float | None = start
        race = rng.choice(RACES) if kind is Kind.RESPONSIVE else None
        if race is Race.CLOCK:
            # Cancelled a few hundred ms around the finish: some well before it (the runner
            # acknowledges first), some just before it (the finish wins), some after (400).
            cancel_at = start + rng.uniform(-0.8, 0.3)
        elif race in SIGNAL_DRIVEN:
            finish_at = None  # it finishes when the signal reaches it
        elif race is Race.NONE or race is Race.CANCEL_AFTER:
            cancel_at = None  # never, or right after its finish committed
        elif kind is Kind.DEAF:
            # Finishes around the moment the cancel worker's deadline escalates.
            finish_at = start + GRACE_SECONDS + rng.uniform(-0.4, 0.6)
        else:
            finish_at = None
        plans[workflow_id] = Plan(
            workflow_id=workflow_id,
            kind=kind,
            race=race,
            finish_at=finish_at,
            fails=rng.random() < 0.08,
            cancel_at=cancel_at,
            ack_delay=rng.uniform(0.02, 0.25),
        )
    return plans


class Scheduler:
    """Runs calls at their moment on thread pools; remembers every exception raised."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, ThreadPoolExecutor, Callable[[], Any]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._running = 0
        self._stopping = False
        self.errors: list[str] = []
        self.lateness: list[float] = []  # seconds each call started after its moment
        self._thread = threading.Thread(target=self._run, name="race-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(10)

    def at(self, when: float, pool: ThreadPoolExecutor, call: Callable[[], Any]) -> None:
        """Run ``call`` on ``pool`` at monotonic time ``when``."""
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), pool, call))
            self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            return not self._heap and self._running == 0

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (
                    not self._heap or self._heap[0][0] > time.monotonic()
                ):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._stopping:
                    return
                when, _, pool, call = heapq.heappop(self._heap)
                self._running += 1
            try:
                pool.submit(self._timed, when, call).add_done_callback(self._done)
            except RuntimeError:  # the pool was shut down: the test is ending
                self._done(None)

    def _timed(self, when: float, call: Callable[[], Any]) -> None:
        self.lateness.append(time.monotonic() - when)
        call()

    def _done(self, future: Future[Any] | None) -> None:
        error = None if future is None else future.exception()
        with self._cond:
            self._running -= 1
            if error is not None:
                self.errors.append("".join(traceback.format_exception(error)))


class SimulatedRunners:
    """The runner side: finishes workflows and acknowledges cancel signals, by CAS."""

    def __init__(
        self, db: Database, plans: dict[str, Plan], scheduler: Scheduler,
        pool: ThreadPoolExecutor, api: SimulatedApi,
    ) -> None:
        self.db, self.plans, self.scheduler, self.pool = db, plans, scheduler, pool
        self.api = api
        self._lock = threading.Lock()
        self._finished: set[str] = set()
        self._acknowledging: set[str] = set()
        self.signals: dict[str, list[SignalKind]] = defaultdict(list)
        # What each runner's CAS was told, per workflow: (verb, Change, when it committed).
        self.writes: dict[str, list[tuple[str, status.Change, float]]] = defaultdict(list)

    def handler(self, workflow_id: str) -> Callable[[SignalKind], None]:
        return lambda kind: self.on_signal(workflow_id, kind)

    def on_signal(self, workflow_id: str, kind: SignalKind) -> None:
        """On the listener's thread, like the real runner: note it, act off the thread."""
        plan = self.plans[workflow_id]
        with self._lock:
            self.signals[workflow_id].append(kind)
            if (
                kind is not SignalKind.CANCEL
                or plan.kind is not Kind.RESPONSIVE
                or workflow_id in self._finished  # its run is over: nobody listens
                or workflow_id in self._acknowledging
            ):
                return
            self._acknowledging.add(workflow_id)
        now = time.monotonic()
        if plan.race is Race.ACK_FIRST:
            self.scheduler.at(now + plan.ack_delay, self.pool,
                              partial(self.in_order, workflow_id, self.acknowledge, self.finish))
        elif plan.race is Race.FINISH_FIRST:
            self.scheduler.at(now, self.pool,
                              partial(self.in_order, workflow_id, self.finish, self.acknowledge))
        elif plan.race is Race.AT_ONCE:
            self.scheduler.at(now, self.pool, partial(self.at_once, workflow_id))
        else:
            self.scheduler.at(now + plan.ack_delay, self.pool,
                              partial(self.acknowledge, workflow_id))

    @staticmethod
    def in_order(workflow_id: str, *writes: Callable[[str], None]) -> None:
        for write in writes:
            write(workflow_id)

    def at_once(self, workflow_id: str) -> None:
        """Acknowledge and finish on two threads released by one barrier."""
        barrier = threading.Barrier(2, timeout=10)
        errors: list[BaseException] = []

        def write(verb: Callable[[str], None]) -> None:
            try:
                barrier.wait()
                verb(workflow_id)
            except BaseException as exc:  # re-raised below, so the scheduler records it
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(verb,))
                   for verb in (self.acknowledge, self.finish)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def finish_then_cancel(self, workflow_id: str) -> None:
        """Finish, and only then have the API asked to cancel (it must refuse)."""
        self.finish(workflow_id)
        self.api.cancel(workflow_id)

    def acknowledge(self, workflow_id: str) -> None:
        """ComfyUI reported the interrupt: write the cancel, as runner._interrupted does."""
        with self.db.transaction() as session:
            workflow = manager.get_workflow(session, workflow_id)
            assert workflow is not None
            by = status.Actor(
                workflow.cancel_source or "runner", workflow.cancel_actor, workflow.cancel_reason
            )
            change = status.cancel_if_active(
                session, workflow_id, by, CancelOutcome.CANCELLED, workflow.cancel_timing(),
                from_=[S.RUNNING],
            )
        self._record(workflow_id, "cancel", change)

    def finish(self, workflow_id: str) -> None:
        with self._lock:
            self._finished.add(workflow_id)
        with self.db.transaction() as session:
            if self.plans[workflow_id].fails:
                verb = "fail"
                change = status.fail(
                    session, workflow_id, exception_type="RuntimeError",
                    exception_message="simulated node error", error_node="3",
                )
            else:
                verb = "complete"
                change = status.complete_if_running(session, workflow_id, {"3": {"images": []}})
        self._record(workflow_id, verb, change)

    def _record(self, workflow_id: str, verb: str, change: status.Change) -> None:
        with self._lock:
            self.writes[workflow_id].append((verb, change, time.monotonic()))


class SimulatedApi:
    """``POST /v1/workflow/{id}/cancel`` minus HTTP: record, commit, publish."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()
        self.requested: set[str] = set()
        self.refused: set[str] = set()

    def cancel(self, workflow_id: str) -> None:
        handed = publish.request_cancels(self.db, [workflow_id], API)
        with self._lock:
            (self.requested if handed.recorded else self.refused).add(workflow_id)


@contextmanager
def cancel_workers(settings: Settings, log_dir: Path) -> Iterator[list[CeleryWorker]]:
    workers: list[CeleryWorker] = []
    try:
        for n in range(CANCEL_WORKERS):
            workers.append(start_worker(settings, worker.CANCEL_QUEUES,
                                        log_dir / f"worker-cancel{n}.log", CANCEL_CONCURRENCY))
        yield workers
    finally:
        stop_all(workers)


@contextmanager
def listening(client: redis.Redis) -> Iterator[SignalListener]:
    listener = SignalListener(client)
    try:
        yield listener
    finally:
        listener.stop()  # waits for its thread


def seed_running(db: Database, account_id: int, runner_id: str, count: int) -> list[str]:
    """``count`` workflows at ``running``, every step through the status writer."""
    with db.transaction() as session:
        ids = [
            status.create_accepted(
                session, account_id, name=f"race-{n}", workflow_json=TINY_PROMPT
            ).id
            for n in range(count)
        ]

    def advance_all(chunk: list[str]) -> None:
        with db.transaction() as session:
            for workflow_id in chunk:
                for step in PATH_TO[S.RUNNING]:
                    change = advance(session, workflow_id, step, runner_id)
                    assert change.changed, f"seeding {workflow_id} to {step}: {change}"

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(advance_all, [ids[n::2] for n in range(2)]))
    return ids


def lose_heartbeats(db: Database, workflow_ids: list[str]) -> None:
    """These runners died long ago (not a status write: only the heartbeat's time)."""
    long_ago = utcnow() - timedelta(seconds=10 * HEARTBEAT_TIMEOUT_SECONDS)
    with db.transaction() as session:
        session.execute(
            update(Workflow)
            .where(Workflow.id.in_(workflow_ids))
            .values(heartbeat_at=long_ago, started_at=long_ago)
        )


def unsettled(db: Database) -> list[tuple[str, str, str | None]]:
    """Workflows not terminal yet, or with a cancel request still without an outcome."""
    with db.transaction() as session:
        rows = session.execute(
            select(Workflow.id, Workflow.status, Workflow.cancel_outcome).where(
                Workflow.status.not_in(TERMINAL)
                | (Workflow.cancel_requested_at.is_not(None) & Workflow.cancel_outcome.is_(None))
            )
        ).all()
    return [(r.id, r.status, r.cancel_outcome) for r in rows]


def worker_logs(log_dir: Path) -> str:
    parts = []
    for path in sorted(log_dir.glob("worker-*.log")):
        lines = path.read_text(errors="replace").splitlines()[-30:]
        parts.append(f"--- {path.name}\n" + "\n".join(lines))
    return "\n".join(parts)


def test_a_thousand_cancels_racing_completions_leave_one_consistent_end_each(
    pg_database_url: str, redis_db_url: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("COMFY_CANCEL_RACE_SEED") or random.SystemRandom().getrandbits(32))
    print(f"race seed {seed} (COMFY_CANCEL_RACE_SEED={seed} replays this plan)")
    rng = random.Random(seed)
    began = time.monotonic()
    settings = Settings(
        database_url=pg_database_url,
        redis_url=redis_db_url,
        cancel_grace_seconds=GRACE_SECONDS,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECONDS,
    )
    db = migrated(pg_database_url)
    signal_client = redis.Redis.from_url(redis_db_url)
    scheduler = Scheduler()
    with ExitStack() as stack:
        stack.callback(db.engine.dispose)
        stack.callback(signal_client.close)
        stack.enter_context(configured(settings))
        processes = stack.enter_context(cancel_workers(settings, tmp_path))  # start early
        account_id, runner_id = make_account_and_runner(db)
        ids = seed_running(db, account_id, runner_id, WORKFLOWS)
        plans = make_plans(ids, rng)
        lose_heartbeats(db, [w for w, p in plans.items() if p.kind is Kind.LOST])
        seeded = time.monotonic()

        # Few threads each: more only fight over the GIL and make every writer late.
        runner_pool = stack.enter_context(ThreadPoolExecutor(8, thread_name_prefix="runner"))
        api_pool = stack.enter_context(ThreadPoolExecutor(8, thread_name_prefix="api"))
        scheduler.start()
        stack.callback(scheduler.stop)  # runs before the pools shut down
        api = SimulatedApi(db)
        runners = SimulatedRunners(db, plans, scheduler, runner_pool, api)
        listener = stack.enter_context(listening(signal_client))
        for workflow_id in ids:
            listener.register(workflow_id, runners.handler(workflow_id))
        wait_workers_ready(settings, processes)

        start = time.monotonic()
        last = 0.0
        for plan in plans.values():
            wid = plan.workflow_id
            if plan.finish_at is not None:
                finish = runners.finish_then_cancel if plan.race is Race.CANCEL_AFTER else (
                    runners.finish)
                scheduler.at(start + plan.finish_at, runner_pool, partial(finish, wid))
                last = max(last, plan.finish_at)
            if plan.cancel_at is not None:
                scheduler.at(start + plan.cancel_at, api_pool, partial(api.cancel, wid))
                last = max(last, plan.cancel_at)

        # The writers run late on a loaded machine, so the wait is counted from when the
        # last of them is done, not from the planned moments (a bound catches a hang).
        hang_deadline = start + last + DRAIN_TIMEOUT_SECONDS
        idle_since: float | None = None
        while True:
            assert not scheduler.errors, "a simulated writer failed:\n" + scheduler.errors[0]
            stuck = None
            if scheduler.idle():
                idle_since = idle_since or time.monotonic()
                stuck = unsettled(db)
                if stuck == []:
                    break
            now = time.monotonic()
            if now > hang_deadline or (idle_since and now > idle_since + SETTLE_TIMEOUT_SECONDS):
                pytest.fail(
                    f"not settled {SETTLE_TIMEOUT_SECONDS}s after the last writer was done: "
                    f"{len(stuck or [])} workflows (id, status, cancel outcome) "
                    f"{(stuck or [])[:20]}; scheduler idle: {scheduler.idle()}\n"
                    f"{worker_logs(tmp_path)}"
                )
            time.sleep(0.2)
        settled = time.monotonic()
        # Cancel messages still in flight (retries, redeliveries) can only add audit rows for
        # terminal workflows; let them run, then stop every writer before the snapshot.
        time.sleep(GRACE_SECONDS + 0.5)
        stop_all(processes)

        with db.transaction() as session:
            workflows = {w.id: w for w in session.execute(select(Workflow)).scalars()}
            events: dict[str, list[WorkflowEvent]] = defaultdict(list)
            for event in session.execute(
                select(WorkflowEvent).order_by(WorkflowEvent.id)
            ).scalars():
                events[event.workflow_id].append(event)

    counts = check_invariants(ids, plans, workflows, events, runners, api)
    lateness = sorted(scheduler.lateness)
    print(
        f"{WORKFLOWS} workflows: seeded in {seeded - began:.1f}s, settled "
        f"{settled - start:.1f}s after the start (last planned event at {last:.1f}s), "
        f"{time.monotonic() - began:.1f}s in all; simulated writers late by "
        f"{lateness[len(lateness) // 2]:.3f}s (median), "
        f"{lateness[int(len(lateness) * 0.99)]:.3f}s (p99), {lateness[-1]:.3f}s (max)"
    )
    for key, value in sorted(counts.items()):
        print(f"  {key}: {value}")
    late = f"writers late by {lateness[len(lateness) // 2]:.3f}s median; {dict(counts)}"

    # The race really happened, in every direction: each is forced by the plan's order of
    # events, so these hold however late the writers run. A runner planned to acknowledge
    # first may still lose to an escalation if its reaction to the signal takes longer than
    # the grace period (consistent, and checked above, but not the planned direction):
    # hence "at least half" for the two signal-driven directions.
    planned = Counter(p.race for p in plans.values())
    ack_first = counts[f"race {Race.ACK_FIRST}: cancelled/cancelled"]
    finish_first = (counts[f"race {Race.FINISH_FIRST}: completed/too_late"]
                    + counts[f"race {Race.FINISH_FIRST}: failed/too_late"])
    assert ack_first >= planned[Race.ACK_FIRST] // 2 >= 25, late
    assert finish_first >= planned[Race.FINISH_FIRST] // 2 >= 25, late
    assert counts["end completed/never requested"] >= 50, late
    assert counts["end cancelled/forced"] >= 10, late
    assert counts["end cancelled/runner_lost"] >= 5, late
    assert counts["race: cancel refused (the API's 400), terminal already"] >= 20, late
    assert counts["race: completion or failure refused, cancelled first"] >= 20, late
    assert counts["race: acknowledgement refused, ended first"] >= 20, late


def check_invariants(
    ids: list[str],
    plans: dict[str, Plan],
    workflows: dict[str, Workflow],
    events: dict[str, list[WorkflowEvent]],
    runners: SimulatedRunners,
    api: SimulatedApi,
) -> Counter[str]:
    counts: Counter[str] = Counter()
    problems: list[str] = []
    assert set(workflows) == set(ids)
    for workflow_id in ids:
        wf, plan, trail = workflows[workflow_id], plans[workflow_id], events[workflow_id]
        found = _check_one(wf, plan, trail, runners, api)
        problems += [f"{workflow_id} ({plan.kind}): {p}" for p in found]
        ending = f"{wf.status}/{wf.cancel_outcome or 'never requested'}"
        counts[f"end {ending}"] += 1
        counts[f"runner {plan.kind}: {ending}"] += 1
        if plan.race is not None:
            counts[f"race {plan.race}: {ending}"] += 1
        writes = runners.writes[workflow_id]
        for verb, change, _ in writes:
            if not change.changed:
                counts["race: acknowledgement refused, ended first" if verb == "cancel"
                       else "race: completion or failure refused, cancelled first"] += 1
        acks = [at for verb, _, at in writes if verb == "cancel"]
        finishes = [at for verb, _, at in writes if verb != "cancel"]
        if acks and finishes and abs(acks[0] - finishes[0]) < 0.02:
            counts["race: acknowledgement and finish within 20 ms"] += 1
        outcome_rows = sum(e.outcome is not None for e in trail)
        counts["audit: outcome rows that changed nothing"] += max(outcome_rows - 1, 0)
    counts["race: cancel refused (the API's 400), terminal already"] = len(api.refused)
    assert not problems, f"{len(problems)} problems, first ones:\n" + "\n".join(problems[:30])
    return counts


TARGET_OF_VERB = {"complete": S.COMPLETED.value, "fail": S.FAILED.value,
                  "cancel": S.CANCELLED.value}


def _check_one(
    wf: Workflow,
    plan: Plan,
    trail: list[WorkflowEvent],
    runners: SimulatedRunners,
    api: SimulatedApi,
) -> list[str]:
    problems = []
    transitions = [e for e in trail if e.kind == EventKind.TRANSITION.value]
    path = [(e.from_status, e.to_status) for e in transitions]

    # Exactly one terminal status, reached once along the lifecycle, never left.
    if wf.status not in TERMINAL:
        problems.append(f"ends {wf.status}, not terminal")
    expected = [(None, S.ACCEPTED.value), (S.ACCEPTED.value, S.UPLOADED.value),
                (S.UPLOADED.value, S.QUEUED.value), (S.QUEUED.value, S.RUNNING.value),
                (S.RUNNING.value, wf.status)]
    if path != expected:
        problems.append(f"transitions {path}, expected {expected}")
    into_terminal = [t for t in transitions if t.to_status in TERMINAL]
    out_of_terminal = [t for t in transitions if t.from_status in TERMINAL]
    if len(into_terminal) != 1 or out_of_terminal:
        problems.append(f"{len(into_terminal)} transitions into a terminal status, "
                        f"{len(out_of_terminal)} out of one")
    if transitions and transitions[-1].to_status != wf.status:
        problems.append(f"status {wf.status} but last transition to {transitions[-1].to_status}")

    # What each runner write was told agrees with the end: one winner at most, and every
    # loser re-read the status that won.
    writes = runners.writes[wf.id]
    winners = [verb for verb, change, _ in writes if change.changed]
    if len(winners) > 1:
        problems.append(f"several writes won: {writes}")
    if winners and TARGET_OF_VERB[winners[0]] != wf.status:
        problems.append(f"{winners[0]} was told it won, but the workflow is {wf.status}")
    for verb, change, _ in writes:
        if not change.changed and change.status != wf.status:
            problems.append(f"{verb} lost and read {change.status}, but it ends {wf.status}")
    if wf.status == S.COMPLETED.value and winners != ["complete"]:
        problems.append(f"completed, but the runner's completion did not win: {writes}")
    if wf.status == S.FAILED.value and winners != ["fail"]:
        problems.append(f"failed, but the runner's failure did not win: {writes}")
    if (wf.cancel_outcome == CancelOutcome.CANCELLED.value) != (winners == ["cancel"]):
        problems.append(f"outcome {wf.cancel_outcome}, runner writes {writes}")

    # The cancel request and its outcome beside the status.
    requested = wf.cancel_requested_at is not None
    if requested != (wf.id in api.requested):
        problems.append(f"cancel_requested_at {wf.cancel_requested_at}, "
                        f"API recorded it: {wf.id in api.requested}")
    requests = [e for e in trail if e.kind == EventKind.CANCEL_REQUESTED.value]
    if len(requests) != int(requested):
        problems.append(f"{len(requests)} cancel_requested events, requested: {requested}")
    if requested and (wf.cancel_source, wf.cancel_actor, wf.cancel_reason) != (
        API.source, API.actor, API.reason
    ):
        problems.append(f"cancel request by {wf.cancel_source}/{wf.cancel_actor}")
    if wf.status == S.CANCELLED.value:
        if wf.cancel_outcome not in CANCEL_WRITTEN:
            problems.append(f"cancelled with outcome {wf.cancel_outcome}")
        if not requested:
            problems.append("cancelled without a cancel request")
        if wf.outputs is not None:
            problems.append("cancelled, yet a completion's outputs are attached")
        terminal = into_terminal[-1] if into_terminal else None
        if terminal is None or terminal.outcome != wf.cancel_outcome:
            problems.append(f"outcome {wf.cancel_outcome}, terminal transition says "
                            f"{terminal.outcome if terminal else None}")
        elif terminal.source != API.source:
            problems.append(f"cancelled by source {terminal.source}, requested by the API")
    elif requested and wf.cancel_outcome != CancelOutcome.TOO_LATE.value:
        problems.append(f"{wf.status} after a cancel request, outcome {wf.cancel_outcome}")
    elif not requested and wf.cancel_outcome is not None:
        problems.append(f"outcome {wf.cancel_outcome} without a cancel request")
    if (wf.cancel_outcome is None) != (wf.cancel_finished_at is None):
        problems.append(f"outcome {wf.cancel_outcome}, finished at {wf.cancel_finished_at}")

    # The audit trail tells the same story: the first outcome after the request is the one
    # recorded; later attempts that changed nothing may be audited, but only with an
    # outcome that matches the end (too_late on completed/failed, already_cancelled on
    # cancelled).
    outcomes = [e for e in trail if e.outcome is not None]
    if not requested and outcomes:
        problems.append(f"outcome events {[e.outcome for e in outcomes]} without a request")
    if requested:
        if not outcomes or outcomes[0].outcome != wf.cancel_outcome:
            problems.append(f"first outcome event {outcomes[0].outcome if outcomes else None}, "
                            f"recorded outcome {wf.cancel_outcome}")
        if outcomes and requests and outcomes[0].id < requests[0].id:
            problems.append("an outcome was audited before the request")
        late = (CancelOutcome.ALREADY_CANCELLED if wf.status == S.CANCELLED.value
                else CancelOutcome.TOO_LATE).value
        wrong = [e.outcome for e in outcomes[1:] if e.outcome != late]
        if wrong:
            problems.append(f"later outcome events {wrong} on a {wf.status} workflow")
        transition_outcomes = [e for e in outcomes if e.kind == EventKind.TRANSITION.value]
        if len(transition_outcomes) != int(wf.status == S.CANCELLED.value):
            problems.append(f"{len(transition_outcomes)} transitions carrying an outcome")

    # Escalation: a runner that never answers is ended by the cancel worker.
    if plan.kind is Kind.HUNG and (wf.status, wf.cancel_outcome) != ("cancelled", "forced"):
        problems.append(f"a hung runner ended {wf.status}/{wf.cancel_outcome}, not forced")
    if plan.kind is Kind.LOST and (wf.status, wf.cancel_outcome) != ("cancelled", "runner_lost"):
        problems.append(f"a lost runner ended {wf.status}/{wf.cancel_outcome}, not runner_lost")
    problems += _check_race(wf, plan, writes, api)
    deaf_ends = {CancelOutcome.FORCED.value, CancelOutcome.TOO_LATE.value}
    if plan.kind is Kind.DEAF and wf.id in api.requested and wf.cancel_outcome not in deaf_ends:
        problems.append(f"a deaf runner ended {wf.status}/{wf.cancel_outcome}")
    return problems


def _check_race(
    wf: Workflow, plan: Plan, writes: list[tuple[str, status.Change, float]], api: SimulatedApi
) -> list[str]:
    """The end each planned order allows (an escalation may overtake a slow runner)."""
    ending = (wf.status, wf.cancel_outcome)
    forced = (S.CANCELLED.value, CancelOutcome.FORCED.value)
    finished = {S.COMPLETED.value, S.FAILED.value}
    if plan.race in (Race.NONE, Race.CANCEL_AFTER):
        refused = wf.id in api.refused
        if wf.status not in finished or wf.cancel_requested_at is not None:
            return [f"{plan.race}: ended {ending}, requested {wf.cancel_requested_at}"]
        if refused != (plan.race is Race.CANCEL_AFTER):
            return [f"{plan.race}: the API refused its cancel: {refused}"]
    if plan.race is Race.ACK_FIRST:
        if ending not in ((S.CANCELLED.value, CancelOutcome.CANCELLED.value), forced):
            return [f"acknowledged first, yet ended {ending}"]
        if [verb for verb, change, _ in writes if verb != "cancel" and change.changed]:
            return [f"acknowledged first, yet its finish won: {writes}"]
    if plan.race is Race.FINISH_FIRST and not (
        (wf.status in finished and wf.cancel_outcome == CancelOutcome.TOO_LATE.value)
        or ending == forced
    ):
        return [f"finished first, yet ended {ending}"]
    return []
