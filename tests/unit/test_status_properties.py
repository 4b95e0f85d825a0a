"""A stateful property test: runner and cancel operations interleaved at random.

Whatever the order, the status writer keeps the lifecycle: nothing leaves a terminal
status, every change is audited, and the cancel outcome agrees with the final status.
"""

from __future__ import annotations

import tempfile
from itertools import pairwise
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from comfy_cancel import manager, status
from comfy_cancel.models import TERMINAL, CancelOutcome, WorkflowStatus
from testbed.database import migrated
from tests.helpers import make_account_and_runner

S = WorkflowStatus
CANCEL_OUTCOMES_OF_CANCELLED = {
    CancelOutcome.CANCELLED.value,
    CancelOutcome.FORCED.value,
    CancelOutcome.RUNNER_LOST.value,
}
API = status.Actor("api", "customer", "no longer needed")
SWEEP = status.Actor("sweep", None, "heartbeat lost")


class StatusWriterMachine(RuleBasedStateMachine):
    @initialize(count=st.integers(min_value=1, max_value=4))
    def setup(self, count: int) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.db = migrated(f"sqlite:///{Path(self.tmp.name) / 'p.db'}")
        account_id, self.runner_id = make_account_and_runner(self.db)
        self.ids: list[str] = []
        for n in range(count):
            with self.db.transaction() as session:
                wf = status.create_accepted(session, account_id, name=f"w{n}",
                                            workflow_json={"1": {}})
                self.ids.append(wf.id)
        self.terminal_seen: dict[str, str] = {}

    def teardown(self) -> None:
        if hasattr(self, "db"):
            self.db.engine.dispose()
            self.tmp.cleanup()

    def _pick(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(self.ids))

    @rule(data=st.data())
    def runner_advances(self, data: st.DataObject) -> None:
        wid = self._pick(data)
        with self.db.transaction() as session:
            wf = manager.get_workflow(session, wid)
            assert wf is not None
            step = {
                S.ACCEPTED.value: lambda: status.mark_uploaded(session, wid, self.runner_id),
                S.UPLOADED.value: lambda: status.mark_queued(session, wid),
                S.QUEUED.value: lambda: status.mark_running(session, wid),
                S.RUNNING.value: lambda: status.complete_if_running(session, wid, {"o": 1}),
            }.get(wf.status)
            if step is not None:
                assert step().changed

    @rule(data=st.data())
    def runner_completes(self, data: st.DataObject) -> None:
        wid = self._pick(data)
        with self.db.transaction() as session:
            before = manager.get_workflow(session, wid)
            assert before is not None
            before_status = before.status  # the ORM object follows the update below
            change = status.complete_if_running(session, wid, {"o": 1})
        assert change.changed == (before_status == S.RUNNING.value)

    @rule(data=st.data())
    def runner_fails(self, data: st.DataObject) -> None:
        wid = self._pick(data)
        with self.db.transaction() as session:
            before = manager.get_workflow(session, wid)
            assert before is not None
            before_status = before.status  # the ORM object follows the update below
            change = status.fail(session, wid, exception_type="E", exception_message="x")
        assert change.changed == (before_status not in TERMINAL)

    @rule(data=st.data())
    def customer_requests_cancel(self, data: st.DataObject) -> None:
        wid = self._pick(data)
        with self.db.transaction() as session:
            status.request_cancel(session, wid, API)

    @rule(data=st.data(), outcome=st.sampled_from(sorted(CANCEL_OUTCOMES_OF_CANCELLED)))
    def cancel_worker_cancels(self, data: st.DataObject, outcome: str) -> None:
        wid = self._pick(data)
        with self.db.transaction() as session:
            before = manager.get_workflow(session, wid)
            assert before is not None
            before_status = before.status  # the ORM object follows the update below
            change = status.cancel_if_active(session, wid, API, CancelOutcome(outcome))
        assert change.changed == (before_status in (S.QUEUED.value, S.RUNNING.value))

    @rule(data=st.data())
    def sweep_cancels_running(self, data: st.DataObject) -> None:
        wid = self._pick(data)
        with self.db.transaction() as session:
            status.cancel_if_active(
                session, wid, SWEEP, CancelOutcome.RUNNER_LOST, from_=[S.RUNNING]
            )

    @rule()
    def operator_bulk_cancels_queued(self) -> None:
        with self.db.transaction() as session:
            status.cancel_queued_many(session, self.ids, status.Actor("bulk", "op"))

    @precondition(lambda self: hasattr(self, "db"))
    @invariant()
    def lifecycle_holds(self) -> None:
        with self.db.transaction() as session:
            for wid in self.ids:
                wf = manager.get_workflow(session, wid)
                assert wf is not None
                # Nothing leaves a terminal status.
                if wid in self.terminal_seen:
                    assert wf.status == self.terminal_seen[wid]
                elif wf.status in TERMINAL:
                    self.terminal_seen[wid] = wf.status
                transitions = [e for e in manager.events_of(session, wid)
                               if e.kind == "transition"]
                # The audit trail is a path through the lifecycle ending in the status.
                assert transitions[-1].to_status == wf.status
                for prev, nxt in pairwise(transitions):
                    assert nxt.from_status == prev.to_status
                    assert nxt.from_status is not None and nxt.to_status is not None
                    assert S(nxt.to_status) in status.ALLOWED[S(nxt.from_status)]
                # The outcome agrees with the status.
                if wf.status == S.CANCELLED.value:
                    assert wf.cancel_outcome in CANCEL_OUTCOMES_OF_CANCELLED
                    assert transitions[-1].outcome == wf.cancel_outcome
                elif wf.cancel_outcome is not None:
                    assert wf.status in (S.COMPLETED.value, S.FAILED.value)
                    assert wf.cancel_outcome == CancelOutcome.TOO_LATE.value
                if wf.status in (S.COMPLETED.value, S.FAILED.value) and wf.cancel_requested_at:
                    assert wf.cancel_outcome == CancelOutcome.TOO_LATE.value


# The number of examples comes from the Hypothesis profile (tests/conftest.py): a quick
# run by default, many more with --hypothesis-profile=thorough.
StatusWriterMachine.TestCase.settings = settings(
    stateful_step_count=25,
    deadline=None,
    # The explain phase traces every line; through SQLAlchemy that is far too slow.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)
TestStatusWriter = StatusWriterMachine.TestCase
