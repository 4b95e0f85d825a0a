"""The re-drive pass (sweeps.py) called directly, and the work it hands on carried out by
the domain code: an open cancel nobody took is published again and then ends the workflow;
an orphaned workflow whose prompt ComfyUI still runs is re-dispatched, and the new runner
task adopts that prompt instead of submitting another. (tests/integration/test_redrive.py
covers the same pass on PostgreSQL and real Redis, message by message.)"""

from __future__ import annotations

import time
from typing import Any

from comfy_cancel import cancel, runner, sweeps
from comfy_cancel.embedded.comfyui_sim import TINY_PROMPT, RunningSim
from comfy_cancel.models import CancelOutcome, WorkflowStatus
from comfy_cancel.status import Actor
from tests.unit.domain import Domain

S = WorkflowStatus


def test_an_open_cancel_nobody_took_is_published_again_and_then_handled(
    domain: Domain, broker: Any
) -> None:
    settings = domain.ctx.settings
    lost, fresh = domain.workflow(S.QUEUED), domain.workflow(S.QUEUED)
    for workflow_id in (lost, fresh):
        domain.request(workflow_id)
    wait = settings.redrive_after_seconds + 1
    domain.age(lost, cancel_requested_at=wait, cancel_published_at=wait)

    report = sweeps.redrive(domain.ctx)

    assert report.republished == [lost]
    ((_, task, args),) = broker("cancel")  # on the queue of its requester, the API
    assert task == "comfy_cancel.cancel_workflows" and args == [[lost], "api", "alice",
                                                                "no longer needed"]
    assert sweeps.redrive(domain.ctx).republished == []  # claimed: not again at once
    assert cancel.handle_many(domain.ctx, args[0], Actor(*args[1:])) == {
        lost: CancelOutcome.CANCELLED}
    assert domain.row(fresh).status == S.QUEUED.value  # its own message is still on its way


def test_an_orphan_is_redispatched_and_its_new_task_adopts_the_prompt_comfyui_has(
    domain: Domain, sim: RunningSim, broker: Any
) -> None:
    settings = domain.ctx.settings
    orphan = domain.workflow(S.QUEUED, domain.runner(sim.url))
    client = domain.on_sim(sim)
    # Its runner task submitted the prompt, then died: ComfyUI runs it with nobody watching.
    prompt_id = client.submit(TINY_PROMPT, "a-dead-runner").prompt_id
    domain.set(orphan, prompt_id=prompt_id)
    domain.age(orphan, heartbeat_at=settings.orphan_timeout_seconds + 1)
    old_task = str(domain.row(orphan).runner_task_id)
    # The sweeps have reached the database for a whole orphan timeout (no outage).
    domain.redis.set(sweeps.DATABASE_UP_KEY, time.time() - settings.orphan_timeout_seconds)

    assert sweeps.redrive(domain.ctx).orphans_redispatched == [orphan]

    ((task_id, task, args),) = broker("runner")
    assert task == "comfy_cancel.run_workflow" and args == [orphan]
    assert task_id == domain.row(orphan).runner_task_id != old_task
    assert runner.run(domain.ctx, orphan, old_task) is None  # the old task, if it returns
    assert runner.run(domain.ctx, orphan, task_id) == S.COMPLETED.value
    assert domain.row(orphan).prompt_id == prompt_id
    assert client.queue().pending == []
    assert client.history(prompt_id) is not None  # the one prompt, not a second submission
