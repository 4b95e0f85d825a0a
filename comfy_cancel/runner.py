"""The runner: drives one workflow on its ComfyUI server, and obeys cancel signals.

One call of :func:`run` is one Celery task on the ``runner`` queue. It spends its
life waiting on a WebSocket, so a runner worker process runs hundreds of them on
threads (see worker.py); signals reach them through the process's one
:class:`~comfy_cancel.signals.SignalListener`.

The database decides: every step is a compare-and-set through ``status``, and a
step that finds the workflow cancelled first makes sure the prompt is gone from
ComfyUI and leaves quietly.

A database outage does not end a run: each step's transaction is retried with backoff
(``retries``) while the prompt is still watched, a heartbeat that fails is written at
the next beat, and only a heartbeat gone for ``heartbeat_timeout_seconds`` means lost.
A task that finds another runner task owns its workflow now (the orphan sweep
re-dispatched it) leaves without touching the prompt: its successor follows it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from comfy_cancel import live, logs, manager, retries, status
from comfy_cancel.comfyui import (
    ComfyUIClient,
    ComfyUIError,
    Event,
    EventStream,
    PromptRejected,
    error_from_history,
    outputs_from_history,
    was_interrupted,
)
from comfy_cancel.context import Context
from comfy_cancel.encryption import SecretKeyError
from comfy_cancel.models import (
    CANCELLABLE,
    TERMINAL,
    CancelOutcome,
    Runner,
    Workflow,
    WorkflowStatus,
)
from comfy_cancel.signals import SignalKind, listener_for

log = logging.getLogger(__name__)
S = WorkflowStatus
T = TypeVar("T")

# After ComfyUI reported success, the history entry is written just before the final
# `executing` event; a few short retries cover a server that is slower to show it.
HISTORY_ATTEMPTS = 20
HISTORY_RETRY_SECONDS = 0.1


@dataclass
class Run:
    """One workflow being driven: what the signal handler needs to reach its prompt."""

    workflow_id: str
    client: ComfyUIClient
    retry_attempts: int
    task_id: str | None = None  # None: driven outside Celery (tests), owns it regardless
    prompt_id: str | None = None
    stream: EventStream | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    stop_requested: threading.Event = field(default_factory=threading.Event)
    progress: dict[str, Any] | None = None
    progress_published_at: float = 0.0  # monotonic time of the last live progress update
    # What ComfyUI reported saved so far (``executed`` events), by node: kept as partial
    # outputs if the run ends cancelled.
    outputs: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def on_signal(self, kind: SignalKind) -> None:
        """Runs on the listener thread: note the request and deliver it off that thread."""
        self.cancel_requested.set()
        if kind is not SignalKind.CANCEL:
            self.stop_requested.set()
        threading.Thread(
            target=self._deliver, args=(kind,), name=f"cancel-{self.workflow_id[:8]}", daemon=True
        ).start()

    def _deliver(self, kind: SignalKind) -> None:
        with self._lock:
            prompt_id = self.prompt_id
        with logs.bound(workflow_id=self.workflow_id):  # a thread starts with no context
            if prompt_id is not None:
                self.cancel_prompt(prompt_id)
        if kind is not SignalKind.CANCEL and self.stream is not None:
            # The database already says cancelled: nothing more will come that matters.
            self.stream.close()

    def cancel_prompt(self, prompt_id: str) -> bool:
        """Cancel our own prompt on ComfyUI (never another's), retrying with backoff."""
        try:
            for attempt in retries.comfyui_retrying(self.retry_attempts):
                with attempt:
                    try:
                        self.client.cancel(prompt_id)
                    except ComfyUIError as exc:
                        log.warning("cancel of prompt %s failed (attempt %d/%d): %s", prompt_id,
                                    attempt.retry_state.attempt_number, self.retry_attempts, exc)
                        raise
        except ComfyUIError:
            return False
        return True

    def set_prompt(self, prompt_id: str) -> None:
        with self._lock:
            self.prompt_id = prompt_id
        # A signal that arrived before the prompt existed could not cancel it: do it now.
        if self.cancel_requested.is_set():
            self.cancel_prompt(prompt_id)


def _db(ctx: Context, what: str, work: Callable[[Session], T]) -> T:
    """One unit of the run's database work, retried through a database outage (for as
    long as a run may last: the sweeps end the workflow meanwhile if it is really lost,
    and the retried compare-and-set then changes nothing)."""
    return retries.in_transaction(
        ctx.db, work, what=what, give_up_after=ctx.settings.max_run_seconds
    )


@dataclass
class _Start:
    """What a run needs once it has claimed its workflow."""

    runner: Runner
    prompt: Mapping[str, Any]
    prompt_id: str | None


def run(ctx: Context, workflow_id: str, task_id: str | None = None) -> str | None:
    """Drive a workflow to a terminal status; returns the status it ended in, if it ran.
    Every line logged meanwhile (the ComfyUI client's too) carries its ``workflow_id``."""
    with logs.bound(workflow_id=workflow_id):
        return _run(ctx, workflow_id, task_id)


def _run(ctx: Context, workflow_id: str, task_id: str | None) -> str | None:
    start = _db(ctx, f"claim of {workflow_id}", lambda s: _start(s, workflow_id, task_id))
    if not isinstance(start, _Start):
        return start

    try:
        client = ctx.comfyui(start.runner.endpoint_url, start.runner.headers,
                             runner_id=start.runner.id)
    except SecretKeyError as exc:
        # An operator's misconfiguration: the detail (which setting) is for the log; the
        # workflow ends with a message that a customer can act on, instead of hanging queued.
        log.error("workflow %s cannot run: %s", workflow_id, exc)
        return _fail(ctx, workflow_id, "RunnerUnavailable",
                     "the platform could not use this runner's credentials; contact support")
    handle = Run(workflow_id, client, ctx.settings.comfyui_retry_attempts, task_id)
    listener = listener_for(ctx.redis)
    try:
        ended = _drive(ctx, handle, start.prompt, start.prompt_id, listener)
    finally:
        listener.unregister(workflow_id, handle.on_signal)
        if handle.stream is not None:
            handle.stream.close()
    if ended == S.CANCELLED.value and handle.prompt_id is not None:
        _confirm_release(ctx, handle, handle.prompt_id)
    return ended


def _confirm_release(ctx: Context, handle: Run, prompt_id: str) -> None:
    """The run ended cancelled: watch ComfyUI let go of the prompt (neither running nor
    pending: the GPU is free), then record ``freed_at`` and the outputs its history entry
    lists (the fuller account of what was saved before it stopped). Not confirmed within
    ``freed_confirm_timeout_seconds`` (ComfyUI unreachable, a node that will not stop):
    ``freed_at`` stays null."""
    workflow_id = handle.workflow_id
    released = handle.client.wait_released(
        [prompt_id], ctx.settings.freed_confirm_timeout_seconds)
    entry = released.get(prompt_id)
    outputs = {**handle.outputs, **(outputs_from_history(entry) if entry else {})}
    if prompt_id not in released:
        log.warning("workflow %s: ComfyUI still holds prompt %s after %g s (or did not "
                    "answer); GPU freed not confirmed", workflow_id, prompt_id,
                    ctx.settings.freed_confirm_timeout_seconds)

    def record(session: Session) -> None:
        status.record_partial_outputs(session, workflow_id, outputs)
        if prompt_id in released:
            status.record_freed(session, [workflow_id])

    _db(ctx, f"release of {workflow_id}", record)


def _start(session: Session, workflow_id: str, task_id: str | None) -> _Start | str | None:
    """Claim the workflow for this task: a ``_Start``, or the status to return at once."""
    workflow = manager.get_workflow(session, workflow_id)
    if workflow is None:
        log.warning("run of unknown workflow %s ignored", workflow_id)
        return None
    if workflow.status in TERMINAL:
        return workflow.status  # cancelled (or swept) before it started: nothing to do
    if task_id is not None and workflow.runner_task_id not in (None, task_id):
        # A sweep re-dispatched it under a new task id: that task owns it now.
        log.info("runner task %s of %s superseded; leaving", task_id, workflow_id)
        return None
    runner = _claim(session, workflow)
    if runner is None:
        return S.FAILED.value
    if workflow.status == S.RUNNING.value:
        # A redelivered task whose prompt is already running: adopt it, don't resubmit.
        log.info("workflow %s redelivered while running; following its prompt", workflow_id)
    # The first heartbeat of this task (a re-dispatched one finds its workflow queued).
    manager.heartbeat(session, workflow_id)
    return _Start(runner, workflow.workflow_json, workflow.prompt_id)


def _claim(session: Any, workflow: Workflow) -> Runner | None:
    """Move an accepted workflow onto a runner (uploaded -> queued); None when it failed."""
    if workflow.status == S.ACCEPTED.value:
        runner = manager.choose_runner(session, workflow.account_id, workflow.tags or [])
        if runner is None:
            status.fail(
                session,
                workflow.id,
                exception_type="NoRunnerAvailable",
                exception_message=(
                    f"no active runner carries the tags {sorted(workflow.tags or [])}; "
                    "add or enable a runner, then submit again"
                ),
            )
            return None
        status.mark_uploaded(session, workflow.id, runner.id)
        workflow.runner_id = runner.id
    if workflow.status in (S.ACCEPTED.value, S.UPLOADED.value):
        status.mark_queued(session, workflow.id)
    runner_row = manager.get_runner(session, workflow.runner_id) if workflow.runner_id else None
    if runner_row is None:
        status.fail(
            session,
            workflow.id,
            exception_type="RunnerGone",
            exception_message="the workflow's runner was deleted before it could run",
        )
    return runner_row


def _drive(
    ctx: Context,
    handle: Run,
    prompt: Mapping[str, Any],
    existing_prompt_id: str | None,
    listener: Any,
) -> str | None:
    settings, workflow_id = ctx.settings, handle.workflow_id
    client_id = f"comfy-cancel-{workflow_id}"
    # Subscribe before anything can be submitted, so no signal falls in a gap.
    listener.register(workflow_id, handle.on_signal)
    try:
        handle.stream = handle.client.watch(client_id)
    except ComfyUIError as exc:
        return _fail(ctx, workflow_id, "RunnerUnavailable", str(exc))

    if existing_prompt_id is None:
        prompt_id = str(uuid.uuid4())
        # Claim the prompt id before submitting: a cancel that lands now can always find
        # and remove it, and a cancel that landed already makes this write fail.
        if not _db(ctx, f"prompt claim of {workflow_id}",
                   lambda s: manager.claim_prompt(s, workflow_id, prompt_id)):
            return _status(ctx, workflow_id)
        ended = _submit(ctx, handle, prompt, client_id, prompt_id)
    elif _known_to_comfyui(handle, existing_prompt_id):
        # A redelivered task: adopt the prompt ComfyUI already has instead of resubmitting.
        handle.set_prompt(existing_prompt_id)
        ended = _reconcile(ctx, handle)
    else:
        # Claimed but never submitted (the worker died in between): submit it now.
        ended = _submit(ctx, handle, prompt, client_id, existing_prompt_id)
    if ended is not None:
        return ended

    last_beat = time.monotonic()
    while True:
        if handle.stop_requested.is_set():
            return _status(ctx, workflow_id)
        try:
            event = handle.stream.next_event(timeout=settings.heartbeat_interval_seconds)
        except ComfyUIError as exc:
            return _fail(ctx, workflow_id, "RunnerUnavailable", str(exc))
        if time.monotonic() - last_beat >= settings.heartbeat_interval_seconds:
            last_beat = time.monotonic()
            alive = _heartbeat(ctx, handle)
            if alive is False:
                return _left(ctx, handle)
        if event is None:
            continue
        result = _on_event(ctx, handle, event)
        if result is not None:
            return result


def _heartbeat(ctx: Context, handle: Run) -> bool | None:
    """One attempt: True written, False the workflow is not ours to drive any more, None
    the database did not answer (the next beat tries again; the prompt is still watched)."""
    try:
        with ctx.db.transaction() as session:
            return manager.heartbeat(session, handle.workflow_id, handle.progress,
                                     task_id=handle.task_id)
    except Exception as exc:
        if not retries.is_transient_database_error(exc):
            raise
        log.warning("heartbeat of %s not written (database unavailable: %s); next beat tries "
                    "again", handle.workflow_id, type(exc).__name__)
        return None


def _left(ctx: Context, handle: Run) -> str | None:
    """The heartbeat found the workflow gone from this task: ended elsewhere (a forced
    cancel, a sweep), so make sure ComfyUI stops too; or owned by a newer runner task,
    which follows the prompt, so leave it be."""
    workflow_id = handle.workflow_id
    row = _db(ctx, f"read of {workflow_id}",
              lambda s: manager.get_workflow(s, workflow_id))
    if row is not None and row.status in CANCELLABLE and row.runner_task_id != handle.task_id:
        log.info("runner task %s of %s superseded by %s; leaving its prompt to it",
                 handle.task_id, workflow_id, row.runner_task_id)
        return None
    if handle.prompt_id is not None:
        handle.cancel_prompt(handle.prompt_id)
    return row.status if row is not None else None


def _submit(
    ctx: Context, handle: Run, prompt: Mapping[str, Any], client_id: str, prompt_id: str
) -> str | None:
    """Submit the claimed prompt; a status string when the run ended here."""
    workflow_id = handle.workflow_id
    if handle.stop_requested.is_set():
        return _status(ctx, workflow_id)
    try:
        submitted = handle.client.submit(dict(prompt), client_id, prompt_id=prompt_id)
    except PromptRejected as exc:
        return _fail_rejected(ctx, workflow_id, exc)
    except ComfyUIError as exc:
        return _fail(ctx, workflow_id, "RunnerUnavailable", str(exc))
    handle.set_prompt(submitted.prompt_id)
    still_queued = _db(ctx, f"submission of {workflow_id}", lambda s: manager.record_submission(
        s, workflow_id, prompt_id, submitted.prompt_id, submitted.number
    ))
    if not still_queued:
        handle.cancel_prompt(submitted.prompt_id)  # cancelled while we submitted
        return _status(ctx, workflow_id)
    return None


def _known_to_comfyui(handle: Run, prompt_id: str) -> bool:
    try:
        return handle.client.queue().contains(prompt_id) or bool(handle.client.history(prompt_id))
    except ComfyUIError:
        return True  # cannot tell: follow it and let reconciliation decide on reconnect


def _on_event(ctx: Context, handle: Run, event: Event) -> str | None:
    """Handle one event; a status string when the run is over."""
    workflow_id = handle.workflow_id
    if event.type == "closed":
        return _status(ctx, workflow_id)
    if event.type == "reconnected":
        return _reconcile(ctx, handle)
    if event.prompt_id != handle.prompt_id:
        return None
    if event.type == "execution_start":
        change = _db(ctx, f"start of {workflow_id}",
                     lambda s: status.mark_running(s, workflow_id))
        if not change.changed and change.status == S.CANCELLED.value:
            handle.cancel_prompt(handle.prompt_id or "")  # cancelled while it was pending
            return change.status
        return None
    if event.type == "executed":
        node, output = event.data.get("node"), event.data.get("output")
        if node is not None and isinstance(output, dict):
            handle.outputs[str(node)] = output
        return None
    if event.type == "progress" or (event.type == "executing" and event.data.get("node")):
        # Kept in memory and written with the next heartbeat: progress events come many
        # times a second, and hundreds of runs writing each one would swamp the database.
        # Subscribers get it live (not stored), at most every progress_interval_seconds
        # but at once when a node starts or ends.
        previous = handle.progress or {}
        handle.progress = {
            "node": event.data.get("node"),
            "value": event.data.get("value"),
            "max": event.data.get("max"),
        }
        _publish_progress(ctx, handle, previous)
        return None
    if event.type == "execution_error":
        data = event.data
        return _fail(
            ctx, workflow_id,
            str(data.get("exception_type") or "ExecutionError"),
            str(data.get("exception_message") or "ComfyUI reported an execution error"),
            error_node=_str_or_none(data.get("node_id")),
        )
    if event.type == "execution_interrupted":
        return _interrupted(ctx, handle)
    if event.type == "executing" and event.data.get("node") is None:
        # The prompt is done and its history entry written (COMFYUI_API.md, "Events").
        return _finish_from_history(ctx, handle)
    return None


def _publish_progress(ctx: Context, handle: Run, previous: Mapping[str, Any]) -> None:
    progress = handle.progress or {}
    now = time.monotonic()
    turning_point = (progress.get("node") != previous.get("node")
                     or progress.get("value") == progress.get("max"))
    if not turning_point and now - handle.progress_published_at < (
            ctx.settings.progress_interval_seconds):
        return
    handle.progress_published_at = now
    live.publish([live.progress_update(handle.workflow_id, progress.get("node"),
                                       progress.get("value"), progress.get("max"))])


def _interrupted(ctx: Context, handle: Run) -> str | None:
    """ComfyUI acknowledged an interrupt: write the cancel, or a failure if nobody asked."""
    workflow_id = handle.workflow_id
    asked = handle.cancel_requested.is_set()
    cancelled_by: str | None = None  # the source of the cancel this wrote, if it wrote one

    def write(session: Session) -> str | None:
        nonlocal cancelled_by
        cancelled_by = None
        workflow = manager.get_workflow(session, workflow_id)
        if workflow is None:
            return None
        if workflow.cancel_requested_at is None and not asked:
            # Someone interrupted ComfyUI directly: not a cancel of ours.
            return status.fail(
                session, workflow_id,
                exception_type="Interrupted",
                exception_message="the prompt was interrupted on the ComfyUI server",
            ).status
        by = status.Actor(
            workflow.cancel_source or status.RUNNER.source,
            workflow.cancel_actor,
            workflow.cancel_reason,
        )
        status.acknowledge_cancel(session, workflow_id, by, workflow.cancel_timing())
        change = status.cancel_if_active(
            session, workflow_id, by, CancelOutcome.CANCELLED, workflow.cancel_timing(),
            partial_outputs=handle.outputs,
        )
        if change.changed:
            cancelled_by = by.source
        return change.status

    ended = _db(ctx, f"cancel acknowledgement of {workflow_id}", write)
    if cancelled_by is not None:
        log.info("workflow %s cancelled: ComfyUI stopped its prompt", workflow_id,
                 extra={"cancel_source": cancelled_by, "outcome": CancelOutcome.CANCELLED.value})
    return ended


def _finish_from_history(ctx: Context, handle: Run) -> str | None:
    assert handle.prompt_id is not None
    entry = None
    for _ in range(HISTORY_ATTEMPTS):
        try:
            entry = handle.client.history(handle.prompt_id)
        except ComfyUIError as exc:
            log.warning("history of %s not readable yet: %s", handle.prompt_id, exc)
        if entry:
            break
        time.sleep(HISTORY_RETRY_SECONDS)
    if not entry:
        return _fail(
            ctx, handle.workflow_id, "HistoryMissing",
            f"ComfyUI finished prompt {handle.prompt_id} but has no history entry for it",
        )
    return _settle(ctx, handle, entry)


def _settle(ctx: Context, handle: Run, entry: Mapping[str, Any]) -> str | None:
    """Write the terminal status a finished prompt's history entry tells."""
    workflow_id = handle.workflow_id
    if was_interrupted(entry):
        handle.outputs.update(outputs_from_history(entry))
        return _interrupted(ctx, handle)
    error = error_from_history(entry)
    if error is not None:
        return _fail(
            ctx, workflow_id, error.get("exception_type") or "ExecutionError",
            error.get("exception_message") or "ComfyUI reported an error",
            error_node=error.get("error_node"),
        )
    outputs = outputs_from_history(entry)

    def complete(session: Session) -> status.Change:
        change = status.complete_if_running(session, workflow_id, outputs)
        if not change.changed and change.status == S.QUEUED.value:
            # We missed execution_start (a reconnect): it did run, so record both steps.
            status.mark_running(session, workflow_id)
            change = status.complete_if_running(session, workflow_id, outputs)
        return change

    change = _db(ctx, f"completion of {workflow_id}", complete)
    if not change.changed and change.status == S.CANCELLED.value:
        # Cancelled first: what ComfyUI wrote is kept as partial outputs, never as the
        # outputs of a completed workflow (README, "Partial outputs"); run() records them.
        handle.outputs.update(outputs)
        log.info("workflow %s was cancelled before it completed; its outputs are kept as "
                 "partial outputs", workflow_id)
    return change.status


def _reconcile(ctx: Context, handle: Run) -> str | None:
    """After a reconnect, learn from /history and /queue what the socket may have missed."""
    prompt_id = handle.prompt_id
    if prompt_id is None:
        return None
    try:
        entry = handle.client.history(prompt_id)
        if entry:
            return _settle(ctx, handle, entry)
        queue = handle.client.queue()
    except ComfyUIError as exc:
        return _fail(ctx, handle.workflow_id, "RunnerUnavailable", str(exc))
    if prompt_id in queue.running:
        _db(ctx, f"start of {handle.workflow_id}",
            lambda s: status.mark_running(s, handle.workflow_id))
        return None
    if prompt_id in queue.pending:
        return None
    # Neither queued, running nor finished: removed from ComfyUI's queue (by our cancel, or
    # by someone on the server). The database says which.
    current = _status(ctx, handle.workflow_id)
    if current in CANCELLABLE and not handle.cancel_requested.is_set():
        return _fail(
            ctx, handle.workflow_id, "PromptLost",
            f"prompt {prompt_id} vanished from the ComfyUI server's queue",
        )
    if current in CANCELLABLE:
        return _interrupted(ctx, handle)
    return current


def _fail(
    ctx: Context,
    workflow_id: str,
    exception_type: str,
    exception_message: str,
    *,
    error_node: str | None = None,
) -> str | None:
    return _db(ctx, f"failure of {workflow_id}", lambda s: status.fail(
        s, workflow_id,
        exception_type=exception_type,
        exception_message=exception_message,
        error_node=error_node,
    ).status)


def _fail_rejected(ctx: Context, workflow_id: str, exc: PromptRejected) -> str | None:
    error = exc.error or {}
    node_id = next(iter(exc.node_errors), None) if exc.node_errors else None
    message = str(error.get("message") or "prompt rejected")
    if error.get("details"):
        message = f"{message}: {error['details']}"
    return _fail(
        ctx, workflow_id, str(error.get("type") or "invalid_prompt"), message, error_node=node_id
    )


def _status(ctx: Context, workflow_id: str) -> str | None:
    def read(session: Session) -> str | None:
        workflow = manager.get_workflow(session, workflow_id)
        return workflow.status if workflow else None

    return _db(ctx, f"read of {workflow_id}", read)


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
