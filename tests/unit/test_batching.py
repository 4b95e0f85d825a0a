"""The batch consumer (batching.py) without a worker process: which messages it batches,
when it hands a batch to the pool, that it acknowledges after the batch, and what it does
with a batch that failed (kombu's memory transport for the messages)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from comfy_cancel import batching, cancel, tasks
from comfy_cancel.batching import (
    ACK,
    REQUEUE,
    RETRIED,
    Call,
    _batchable,
    _Batcher,
    _run_batch,
    _Waiting,
)
from comfy_cancel.worker import CANCEL_WORKFLOWS_TASK, SWEEP_TASK
from tests.apitest import take_all, worker_app


class Weighted(batching.BatchTask):
    """Weighs a message by its first argument; batches of at most 5, two at once."""

    def batch_size(self) -> int:
        return 5

    def weight(self, call: Call) -> int:
        return int(call.args[0])


@dataclass
class Started:
    args: tuple[Any, ...]
    callback: Callable[..., None]
    error_callback: Callable[..., None]

    @property
    def weights(self) -> list[int]:
        return [int(call.args[0]) for call in self.args[1]]


@dataclass
class Pool:
    """Records what the batcher hands it; the test ends each batch."""

    started: list[Started] = field(default_factory=list)

    def apply_async(self, target: Any, args: tuple[Any, ...], callback: Callable[..., None],
                    error_callback: Callable[..., None]) -> None:
        assert target is _run_batch
        self.started.append(Started(args, callback, error_callback))


@dataclass
class Consumer:
    pool: Pool = field(default_factory=Pool)
    connection_errors: tuple[type[Exception], ...] = ()

    def call_soon(self, callback: Callable[[], None]) -> None:
        callback()


@dataclass
class Message:
    """One waiting message: what was done with it."""

    weight: int
    done: list[str] = field(default_factory=list)

    def waiting(self) -> _Waiting:
        call = Call((self.weight,), {}, "cancel", "cancel")
        return _Waiting(call, lambda *_: self.done.append("ack"),
                        lambda _log, _errors, requeue: self.done.append(f"reject {requeue}"))


def batcher() -> tuple[_Batcher, Pool]:
    consumer = Consumer()
    return _Batcher(Weighted(), consumer), consumer.pool


def test_a_lone_message_goes_at_once_and_is_acknowledged_after_its_batch() -> None:
    batches, pool = batcher()
    message = Message(1)

    batches.add(message.waiting())

    (started,) = pool.started
    assert started.weights == [1] and message.done == []  # running: not acknowledged yet
    started.callback(ACK)
    assert message.done == ["ack"]


def test_messages_wait_while_every_batch_slot_is_taken_then_go_together_up_to_the_size(
) -> None:
    batches, pool = batcher()
    first, second = Message(1), Message(1)
    batches.add(first.waiting())
    batches.add(second.waiting())
    waiting = [Message(w) for w in (2, 2, 2, 9, 1)]
    for message in waiting:
        batches.add(message.waiting())
    assert [s.weights for s in pool.started] == [[1], [1]]  # two in flight; the rest wait

    pool.started[0].callback(ACK)
    assert [s.weights for s in pool.started[2:]] == [[2, 2]]  # at most 5
    pool.started[1].callback(ACK)
    pool.started[2].callback(ACK)
    # A message heavier than a batch goes alone, and nothing is left behind.
    assert [s.weights for s in pool.started[3:]] == [[2], [9]]
    pool.started[3].callback(ACK)
    assert [s.weights for s in pool.started[5:]] == [[1]]
    for started in pool.started[4:]:
        started.callback(ACK)
    assert all(m.done == ["ack"] for m in [first, second, *waiting])


def test_a_batch_the_pool_lost_goes_back_on_its_queue_and_frees_its_slot() -> None:
    batches, pool = batcher()
    lost, later = Message(1), Message(1)
    batches.add(lost.waiting())
    batches.add(Message(1).waiting())
    batches.add(later.waiting())

    pool.started[0].error_callback(RuntimeError("a prefork child died"))

    assert lost.done == ["reject True"]
    assert pool.started[2].weights == [1]  # the next batch took the freed slot


def sent(args: tuple[Any, ...] = (["w1"], "api", "alice", None), queue: str = "cancel",
         **options: Any) -> Any:
    """A cancel message as a producer sends it (with Celery's ``options``), as received."""
    worker_app.send_task(CANCEL_WORKFLOWS_TASK, args=list(args), queue=queue, **options)
    (message,) = take_all(queue)
    return message


def test_only_first_deliveries_to_run_now_are_batched(broker: Any) -> None:
    call = _batchable(sent())
    assert call is not None
    assert (call.args, call.kwargs, call.routing_key) == ((["w1"], "api", "alice", None), {},
                                                          "cancel")
    # Celery runs these itself: scheduled, a retry, or with work chained behind.
    assert _batchable(sent(countdown=30)) is None
    assert _batchable(sent(retries=1)) is None
    assert _batchable(sent(link=worker_app.signature(SWEEP_TASK))) is None


def failing(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """cancel.handle_batch fails (the database is away); returns what it was asked."""
    asked: list[Any] = []

    def handle_batch(_ctx: Any, requests: Any) -> None:
        asked.append(requests)
        raise OperationalError("UPDATE workflows ...", {}, Exception("the database is away"))

    monkeypatch.setattr(cancel, "handle_batch", handle_batch)
    return asked


def test_a_failed_batch_is_retried_message_by_message_on_their_own_queues(
    broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = failing(monkeypatch)
    calls = [_batchable(sent()),
             _batchable(sent((["w2", "w3"], "bulk", "ops", "maintenance"), "cancel.bulk"))]
    assert None not in calls

    # Acknowledged: each message goes on as its retry.
    assert _run_batch(tasks.cancel_workflows, calls) == RETRIED  # type: ignore[arg-type]

    assert len(asked) == 1 and len(asked[0]) == 2  # one batch for both
    for queue, call in (("cancel", calls[0]), ("cancel.bulk", calls[1])):
        (retry,) = take_all(queue)
        assert retry.headers["task"] == CANCEL_WORKFLOWS_TASK
        assert call is not None and retry.payload[0] == list(call.args)
        # Its first retry (after the task's backoff, 0 or 1 s): the task's own retry
        # policy takes it from here, one message at a time.
        assert retry.headers["retries"] == 1 and _batchable(retry) is None


def test_a_failed_batch_whose_retries_cannot_be_published_goes_back_on_its_queue(
    broker_down: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing(monkeypatch)
    calls = [Call((["w1"], "api", "alice", None), {}, "cancel", "cancel")]
    assert _run_batch(tasks.cancel_workflows, calls) == REQUEUE


def test_the_cancel_task_weighs_a_message_by_its_workflow_ids() -> None:
    task = tasks.cancel_workflows
    assert task.weight(Call((["a", "b", "c"], "bulk", "ops", None), {}, "", "")) == 3
    assert task.weight(Call((), {"workflow_ids": ["a"], "source": "api"}, "", "")) == 1
    assert task.weight(Call(("not", "the", "right", "shape", "at all"), {}, "", "")) == 1


@dataclass
class Events:
    """Celery's event dispatcher, recording what it is asked to send."""

    enabled: bool = True
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def send(self, kind: str, **fields: Any) -> None:
        self.sent.append((kind, fields))


@dataclass
class EventConsumer(Consumer):
    event_dispatcher: Events = field(default_factory=Events)


def sent_message(task_id: str) -> _Waiting:
    call = Call((1,), {}, "cancel", "cancel")
    return _Waiting(call, lambda *_: None, lambda *_: None,
                    {"id": task_id, "argsrepr": "(['w1'], 'api')", "kwargsrepr": "{}"})


def test_each_message_of_a_batch_is_reported_to_task_events_as_a_single_task_is() -> None:
    """What Flower shows: received, started, then succeeded, retried or rejected."""
    consumer = EventConsumer()
    batches = _Batcher(Weighted(), consumer)
    events = consumer.event_dispatcher

    for task_id in ("t1", "t2", "t3"):
        batches.add(sent_message(task_id))
    first, second = consumer.pool.started[0], consumer.pool.started[1]
    first.callback(ACK)
    second.callback(RETRIED)
    third = consumer.pool.started[2]
    third.error_callback(RuntimeError("the pool lost it"))

    kinds = [(kind, fields["uuid"]) for kind, fields in events.sent]
    assert kinds == [
        ("task-received", "t1"), ("task-started", "t1"), ("task-received", "t2"),
        ("task-started", "t2"), ("task-received", "t3"),  # waits: two batches in flight
        ("task-succeeded", "t1"), ("task-started", "t3"), ("task-retried", "t2"),
        ("task-rejected", "t3"),
    ]
    received = events.sent[0][1]
    assert received["name"] == Weighted.name and received["args"] == "(['w1'], 'api')"
    assert events.sent[5][1]["runtime"] >= 0


def test_no_task_events_unless_the_worker_sends_them() -> None:
    consumer = EventConsumer(event_dispatcher=Events(enabled=False))
    batches = _Batcher(Weighted(), consumer)
    batches.add(sent_message("t1"))
    consumer.pool.started[0].callback(ACK)
    assert consumer.event_dispatcher.sent == []
