"""Consuming a task's messages in batches, and periodic work on a worker's pool: the
cancel worker's hot path.

A :class:`BatchTask` is an ordinary Celery task (``delay``, ``apply``, its retry policy:
one message at a time) whose worker runs the messages that arrive together as one call of
:meth:`BatchTask.run_batch`. Its :meth:`~BatchTask.Strategy` (Celery's hook for how a
worker handles a task's messages) decides:

- a message to run now that is not a retry joins the waiting ones; they are handed to the
  pool as one batch at once while fewer than :meth:`~BatchTask.batches_in_flight` batches
  run (a lone message never waits), otherwise when a running batch ends, at most
  :meth:`~BatchTask.batch_size` of :meth:`~BatchTask.weight` per batch;
- a batch's messages are acknowledged after it returned (late acks: a worker that dies
  first leaves them unacknowledged, and Redis hands them out again);
- a batch that raised is handed back message by message: each is published again as its
  first retry (after the task's backoff) and then acknowledged, so the task's own retry
  policy applies to each and one bad message cannot hold up the others; if that publish
  fails too, the messages are rejected back onto their queue;
- messages with an ETA or an expiry, retries, and messages with callbacks run as Celery
  runs any task, one at a time.

Celery's bookkeeping of single tasks (``inspect active``) does not see the batches; task
events do: with ``worker_send_task_events`` each message of a batch is reported received,
started and succeeded (or retried, or rejected) as Celery reports a single task, so Flower
lists every cancel message. :func:`every` runs a function on the pool of the workers that
consume given queues, periodically and never twice at once.

Why not the ``celery-batches`` package: its 0.11 requires Celery < 5.7, it acknowledges a
batch that raised (its tracer logs the error, then acks: the requests would wait for the
re-drive pass), it has no retries (its issue #10), and it flushes on a fixed interval, so a
lone message waits for that interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from celery import Celery, Task, bootsteps
from celery.utils.time import get_exponential_backoff_interval
from celery.worker.strategy import default as default_strategy
from kombu.message import Message

log = logging.getLogger(__name__)

# What a batch's run tells the consumer to do with its messages.
ACK = "ack"
RETRIED = "retried"  # the batch failed; each message was published again as a retry: ack
REQUEUE = "requeue"

# Headers of a message Celery must run on its own: delayed, expiring, or a retry.
_SINGLE_HEADERS = ("eta", "expires", "retries")
# Parts of a message's embedded options that the batch path would drop.
_WORKFLOW_OPTIONS = ("callbacks", "errbacks", "chain", "chord")


@dataclass(frozen=True)
class Call:
    """One message's arguments, and the route it came by (a retry goes the same way)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    exchange: str
    routing_key: str


class BatchTask(Task):
    """A task whose immediate messages a worker runs in batches (see the module)."""

    def batch_size(self) -> int:
        """Most weight (see :meth:`weight`) of one batch; a heavier message is a batch of
        its own."""
        return 100

    def batches_in_flight(self) -> int:
        """Batches one worker process runs at once."""
        return 2

    def run_batch(self, calls: Sequence[Call]) -> None:
        """Do what the messages ask, all at once; raise if it could not (none is acked)."""
        raise NotImplementedError

    def weight(self, call: Call) -> int:
        """What one message counts towards :meth:`batch_size`."""
        return 1

    def Strategy(self, task: Task, app: Celery, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
        # Celery calls this (Task.start_strategy) once per connection of the consumer.
        single = default_strategy(task, app, consumer, **kwargs)
        batcher = _Batcher(self, consumer)

        def on_message(message: Message, body: Any, ack: Any, reject: Any, callbacks: Any,
                       **kw: Any) -> Any:
            call = _batchable(message)
            if call is None:
                return single(message, body, ack, reject, callbacks, **kw)
            batcher.add(_Waiting(call, ack, reject, message.headers or {}))
            return None

        return on_message


def _batchable(message: Message) -> Call | None:
    """The call of a message the batch path may run, or None for Celery's own path."""
    headers = message.headers or {}
    if "task" not in headers or any(headers.get(name) for name in _SINGLE_HEADERS):
        return None  # protocol 1, or a message Celery must schedule or count
    try:
        args, kwargs, embed = message.decode()
    except Exception:  # Celery's path reports a body it cannot read, and rejects it
        return None
    if any((embed or {}).get(name) for name in _WORKFLOW_OPTIONS):
        return None
    info = message.delivery_info or {}
    return Call(tuple(args), dict(kwargs), str(info.get("exchange") or ""),
                str(info.get("routing_key") or ""))


@dataclass(frozen=True)
class _Waiting:
    call: Call
    ack: Any  # Celery's promises: ack(logger, errors), reject(logger, errors, requeue)
    reject: Any
    # The message's: its task id and arguments, for task events.
    headers: Mapping[str, Any] = field(default_factory=dict)


class _Batcher:
    """The waiting messages of one task on one consumer connection, and its batches.

    ``add`` and ``_next`` run on the consumer's thread (the event loop); a batch ends on
    a pool thread (threads pool) or the consumer's thread (prefork), and hands the start of
    the next back to the consumer's thread.
    """

    def __init__(self, task: BatchTask, consumer: Any) -> None:
        self._task = task
        self._pool = consumer.pool
        self._call_soon = consumer.call_soon
        self._errors = consumer.connection_errors
        self._size = max(1, task.batch_size())
        self._slots = max(1, task.batches_in_flight())
        self._waiting: list[_Waiting] = []
        self._running = 0
        eventer = getattr(consumer, "event_dispatcher", None)
        self._send_event: Callable[..., Any] | None = None
        if eventer is not None and eventer.enabled and task.send_events:
            self._send_event = eventer.send

    def add(self, waiting: _Waiting) -> None:
        self._event("task-received", [waiting], name=self._task.name,
                    args=waiting.headers.get("argsrepr"),
                    kwargs=waiting.headers.get("kwargsrepr"),
                    root_id=waiting.headers.get("root_id"),
                    parent_id=waiting.headers.get("parent_id"), retries=0)
        self._waiting.append(waiting)
        self._start()

    def _event(self, kind: str, batch: Sequence[_Waiting], **fields: Any) -> None:
        """Report ``kind`` for each message of ``batch``, as Celery reports single tasks
        (its worker buffers them and sends them in groups)."""
        if self._send_event is None:
            return
        for waiting in batch:
            self._send_event(kind, uuid=waiting.headers.get("id"), **fields)

    def _start(self) -> None:
        while self._waiting and self._running < self._slots:
            batch = self._take()
            self._running += 1
            self._event("task-started", batch)
            self._pool.apply_async(
                _run_batch, (self._task, [w.call for w in batch]),
                callback=partial(self._ended, batch, time.monotonic()),
                error_callback=partial(self._ended, batch, time.monotonic(), REQUEUE),
            )

    def _take(self) -> list[_Waiting]:
        weight = count = 0
        for waiting in self._waiting:
            weight += self._task.weight(waiting.call)
            if count and weight > self._size:
                break
            count += 1
        batch, self._waiting = self._waiting[:count], self._waiting[count:]
        return batch

    def _ended(self, batch: list[_Waiting], started: float, outcome: Any, *_: Any) -> None:
        # ``outcome`` is _run_batch's, or REQUEUE when the pool lost the batch (a prefork
        # child that died): its messages go back on their queues now.
        for waiting in batch:
            if outcome in (ACK, RETRIED):
                waiting.ack(log, self._errors)
            else:
                waiting.reject(log, self._errors, True)
        if outcome == ACK:
            self._event("task-succeeded", batch, result="None",
                        runtime=time.monotonic() - started)
        elif outcome == RETRIED:
            self._event("task-retried", batch, exception="the batch failed; retried on its own")
        else:
            self._event("task-rejected", batch, requeue=True)
        self._call_soon(self._next)

    def _next(self) -> None:
        self._running -= 1
        self._start()


def _run_batch(task: BatchTask, calls: list[Call]) -> str:
    """On the pool: run the batch; what to do with its messages (never raises, or the
    threads pool would swallow the error and the messages would never be acknowledged)."""
    try:
        task.run_batch(calls)
        return ACK
    except Exception:
        log.exception("a batch of %d %s messages failed; each is retried on its own",
                      len(calls), task.name)
    # The first retry's delay as Celery's autoretry computes it (these options and their
    # defaults are those of its add_autoretry_behaviour).
    if getattr(task, "retry_backoff", False):
        countdown = get_exponential_backoff_interval(
            factor=int(task.retry_backoff), retries=0,
            maximum=int(getattr(task, "retry_backoff_max", 600)),
            full_jitter=getattr(task, "retry_jitter", True))
    else:
        countdown = task.default_retry_delay
    try:
        for call in calls:
            task.apply_async(call.args, call.kwargs, countdown=countdown, retries=1,
                             **_route(call))
    except Exception as exc:
        log.warning("could not publish the retries of %d %s messages (%s); they go back on "
                    "their queues", len(calls), task.name, type(exc).__name__)
        return REQUEUE
    return RETRIED


def _route(call: Call) -> dict[str, str]:
    """Publishing options that send a message the way ``call`` came."""
    if not call.exchange:
        # The default exchange routes by queue name; Celery reads an empty exchange as
        # none given, and would route by the task's name (to the default queue).
        return {"queue": call.routing_key}
    return {"exchange": call.exchange, "routing_key": call.routing_key}


# --- periodic work on the pool ------------------------------------------------------------

_JOBS: dict[str, Callable[[], object]] = {}


def every(app: Celery, seconds: float, job: Callable[[], object], queues: Collection[str]) -> None:
    """Run ``job`` every ``seconds`` on the pool of each worker of ``app`` that consumes
    one of ``queues``; a run still going when the next is due makes it skip."""
    job_name = f"{job.__module__}.{job.__qualname__}"
    _JOBS[job_name] = job  # a prefork child finds it by name (it was forked after this)
    wanted = frozenset(queues)

    class Every(bootsteps.StartStopStep):
        name = f"every {job_name}"  # the blueprint tells steps apart by name
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self._timer: Any = None
            self._running = False

        def start(self, c: Any) -> None:
            consumed = set(c.app.amqp.queues.consume_from or c.app.amqp.queues)
            if consumed & wanted:
                self._timer = c.timer.call_repeatedly(seconds, self._tick, (c,))

        def stop(self, c: Any) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _tick(self, c: Any) -> None:
            if self._running:
                return
            self._running = True
            c.pool.apply_async(_run_job, (job_name,), callback=self._done,
                               error_callback=self._done)

        def _done(self, *_: Any) -> None:
            self._running = False  # from a pool thread: one store, no lock needed

    app.steps["consumer"].add(Every)


def _run_job(name: str) -> None:
    try:
        _JOBS[name]()
    except Exception:
        log.exception("periodic %s failed; it runs again at its next turn", name)
