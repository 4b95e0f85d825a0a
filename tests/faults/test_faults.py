"""Faults an operator meets, injected into the whole running system (docs/RELIABILITY.md).

Each test puts work in flight on simulated ComfyUI servers (one workflow running on each,
more pending behind it), sends cancels, injects one fault, and then checks the promise:
every accepted cancel (200) lands — ``cancelled``, or ``too_late`` when the workflow
finished first — within 10 s of the fault's end; none is lost; each workflow has exactly
one terminal transition in ``workflow_events``; no workflow that nobody asked to cancel
ends ``cancelled``; and every workflow ends. Settings are the defaults.
"""

from __future__ import annotations

import signal
import time
from datetime import timedelta

import pytest

from tests.faults.harness import (
    COUNTS,
    POSTGRES_DOWN_SECONDS,
    REDIS_DOWN_SECONDS,
    SHORT_PROMPT,
    Fleet,
    Harness,
    Scenario,
    deaf_prompt,
    long_prompt,
    scenario,
    sleep_until,
)

pytestmark = [pytest.mark.faults, pytest.mark.acceptance, pytest.mark.redis,
              pytest.mark.postgres]

# Running well past the fault's end plus the 10 s budget: a cancel can only land by the
# system acting on it, not by the workflow finishing first (too_late).
RUNNING = long_prompt(20.0)


def canary(sc: Scenario, h: Harness) -> None:
    """New work right after the fault must run too (e.g. the broker's routes survived)."""
    sc.add([h.submit(SHORT_PROMPT, h.sim(), name="canary")])


def assert_all_accepted(codes: list[int], sc: Scenario) -> None:
    refused = [(w, code, text[:200]) for w, code, text in sc.responses if code != 200]
    assert all(code == 200 for code in codes), f"cancels refused: {refused}"


def two_batches(fleet: Fleet) -> tuple[list[str], list[str]]:
    """Cancels before the fault (the even servers' running and pending workflows) and
    after it (pending ones behind the odd servers' healthy running workflows, so still
    cancellable then), about COUNTS.cancels in all."""
    after = fleet.pending_behind(1)[: COUNTS.cancels // 2]
    before = (fleet.running_on(0) + fleet.pending_behind(0))[: COUNTS.cancels - len(after)]
    return before, after


def test_cancel_worker_sigkilled_right_after_accepted_cancels(harness: Harness) -> None:
    h = harness
    with scenario(h, f"cancel worker SIGKILLed after {COUNTS.cancels} accepted cancels") as sc:
        fleet = sc.launch([h.sim() for _ in range(COUNTS.sims)], COUNTS.per_sim, RUNNING)
        assert_all_accepted(sc.cancel(Scenario.pick(fleet, COUNTS.cancels)), sc)
        h.kill("cancel")
        h.restart("cancel")
        sc.fault_ended()
        canary(sc, h)
        sc.finish()


def test_cancels_accepted_with_no_cancel_worker_then_redis_flushall(harness: Harness) -> None:
    h = harness
    with scenario(h, "cancels with no cancel worker, then Redis FLUSHALL") as sc:
        fleet = sc.launch([h.sim() for _ in range(COUNTS.sims)], COUNTS.per_sim, RUNNING)
        h.stop_role("cancel")
        assert_all_accepted(sc.cancel(Scenario.pick(fleet, COUNTS.cancels)), sc)
        h.flushall()
        h.restart("cancel")
        sc.fault_ended()
        canary(sc, h)
        sc.finish()


def test_redis_restarted_with_tasks_in_flight(harness: Harness) -> None:
    h = harness
    with scenario(h, f"Redis restarted ({REDIS_DOWN_SECONDS:g} s down, AOF)") as sc:
        fleet = sc.launch([h.sim() for _ in range(COUNTS.sims)], COUNTS.per_sim, RUNNING)
        before, after = two_batches(fleet)
        assert_all_accepted(sc.cancel(before), sc)  # in flight when Redis goes
        h.shutdown_redis()
        sleep_until(time.monotonic() + REDIS_DOWN_SECONDS)  # the fault's stated duration
        h.start_redis_again()
        sc.fault_ended()
        # Cancels sent the moment Redis answers again must be accepted.
        assert_all_accepted(sc.cancel(after), sc)
        canary(sc, h)
        sc.finish()  # also fails if a worker exited


def test_postgres_down_for_ten_seconds(harness: Harness) -> None:
    h = harness
    with scenario(h, f"PostgreSQL down {POSTGRES_DOWN_SECONDS:g} s") as sc:
        # Running through the whole outage: the runner tasks must ride it out.
        fleet = sc.launch([h.sim() for _ in range(COUNTS.sims)], COUNTS.per_sim,
                          long_prompt(POSTGRES_DOWN_SECONDS + 15))
        before, after = two_batches(fleet)
        assert_all_accepted(sc.cancel(before), sc)
        down_at = time.monotonic()
        h.stop_postgres()
        during = sc.cancel(after[:2], recorded=False)  # nothing can be committed now
        refused = [(c, t) for w, c, t in sc.responses[-len(during):]]
        assert all(c == 500 and '"message"' in t for c, t in refused), (
            f"cancels during the outage should get a clear 500: {refused}")
        sleep_until(down_at + POSTGRES_DOWN_SECONDS)  # the fault's stated duration
        h.start_postgres_again()
        sc.fault_ended()
        assert_all_accepted(sc.cancel(after), sc)
        canary(sc, h)
        sc.finish()


def test_runner_worker_sigkilled_and_restarted(harness: Harness) -> None:
    h = harness
    with scenario(h, "runner worker SIGKILLed, restarted") as sc:
        fleet = sc.launch([h.sim() for _ in range(COUNTS.sims)], COUNTS.per_sim, RUNNING)
        h.kill("runner")
        # Every running workflow lost its runner: cancelled by its customer (forced or
        # runner_lost). Pending ones, cancelled or not, must not be left queued.
        targets = Scenario.pick(fleet, COUNTS.cancels, running="all")
        assert_all_accepted(sc.cancel(targets), sc)
        h.restart("runner")
        sc.fault_ended()
        canary(sc, h)
        sc.finish()


# ---- already handled: keep them green ----------------------------------------------------


def test_comfyui_killed_mid_run(harness: Harness) -> None:
    h = harness
    with scenario(h, "ComfyUI killed mid-run") as sc:
        doomed = h.sim(own_process=True)
        fleet = sc.launch([doomed, h.sim()], 3, RUNNING)
        assert doomed.process is not None
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait(10)
        # Its running one and one pending one are cancelled; the rest ends failed.
        targets = [fleet.running[0], *[w for w in fleet.queued if fleet.on[w] is doomed][:1]]
        targets += [w for w in fleet.queued if fleet.on[w] is not doomed][:1]
        assert_all_accepted(sc.cancel(targets), sc)
        # The server never comes back: the system takes over when the grace period ends.
        sc.fault_ended(max(sc.accepted.values())
                       + timedelta(seconds=h.settings.cancel_grace_seconds))
        sc.finish(healthy_complete=False)  # a dead server's pending work fails


def test_hung_comfyui_accepts_connections_and_never_answers(harness: Harness) -> None:
    h = harness
    with scenario(h, "hung ComfyUI (never answers)") as sc:
        hung = h.sim(own_process=True)
        fleet = sc.launch([hung, h.sim()], 3, RUNNING)
        assert hung.process is not None
        hung.process.send_signal(signal.SIGSTOP)  # the kernel still accepts connections
        try:
            # Everything on the hung server is cancelled (nothing there can end otherwise);
            # one pending workflow on the healthy server too.
            targets = [w for w in fleet.all if fleet.on[w] is hung]
            targets += [w for w in fleet.queued if fleet.on[w] is not hung][:1]
            assert_all_accepted(sc.cancel(targets), sc)
            sc.fault_ended(max(sc.accepted.values())
                           + timedelta(seconds=h.settings.cancel_grace_seconds))
            sc.finish()
        finally:
            hung.stop()


def test_comfyui_that_ignores_interrupts(harness: Harness) -> None:
    h = harness
    with scenario(h, "ComfyUI ignoring interrupts (14 s node)") as sc:
        # One node ComfyUI cannot interrupt, running longer than the grace period.
        deaf = h.sim(time_scale=1.3)
        fleet = sc.launch([deaf], 2, deaf_prompt())
        assert_all_accepted(sc.cancel(fleet.running), sc)
        sc.fault_ended(max(sc.accepted.values())
                       + timedelta(seconds=h.settings.cancel_grace_seconds))
        row = sc.finish()
        assert h.rows(fleet.running)[fleet.running[0]].cancel_outcome == "forced", row


def test_two_beats_do_the_work_once(harness: Harness) -> None:
    h = harness
    with scenario(h, "two beats; runner and cancel workers down") as sc:
        h.start_extra_beat()
        fleet = sc.launch([h.sim() for _ in range(COUNTS.sims)], COUNTS.per_sim, RUNNING)
        h.kill("runner")
        h.stop_role("cancel")
        assert_all_accepted(
            sc.cancel(Scenario.pick(fleet, COUNTS.cancels, running="all")), sc)
        # The cancel worker first: a running workflow whose runner is gone can only be
        # forced one grace period (10 s) after a cancel worker takes its request, so a
        # cancel worker that comes back last puts its cancels at the edge of the promise
        # (docs/RELIABILITY.md, "What it does not promise").
        h.restart("cancel")
        h.restart("runner")
        sc.fault_ended()
        sc.finish()
        # No duplicate work: every prompt went to ComfyUI once, whoever adopted it.
        submitted = {s.tag: s.prompts_submitted() for s in fleet.sims}
        expected = {s.tag: COUNTS.per_sim for s in fleet.sims}
        assert submitted == expected
