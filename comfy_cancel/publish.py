"""Handing work on: every message this package sends to the broker, and no task code.

Producers (the API, bulk cancels, the sweeps, the cancel domain) send tasks by *name*
(``app.send_task``), so nothing that publishes imports the task bodies in tasks.py, and
tasks.py can import the domain at top level without an import cycle.

:func:`request_cancels` records cancels and hands them on; a broker that is
down is one of :data:`BROKER_ERRORS`, caught in one place (:func:`hand_on`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import redis
from kombu import exceptions as kombu_errors

from comfy_cancel import status
from comfy_cancel.db import Database
from comfy_cancel.models import CancelSource
from comfy_cancel.status import Actor
from comfy_cancel.worker import (
    BULK_QUEUE,
    CANCEL_QUEUE,
    CANCEL_WORKFLOWS_TASK,
    RUN_WORKFLOW_TASK,
    RUNNER_QUEUE,
    SWEEP_QUEUE,
    app,
)

log = logging.getLogger(__name__)

# What a publish raises when the broker is down: kombu wraps most connection errors, but a
# refused socket or a Redis error can surface unwrapped.
BROKER_ERRORS: tuple[type[Exception], ...] = (
    kombu_errors.OperationalError,
    kombu_errors.ConnectionError,
    kombu_errors.ChannelError,
    redis.RedisError,
    OSError,
)

QUEUE_OF_SOURCE: dict[str, str] = {
    CancelSource.API: CANCEL_QUEUE,
    CancelSource.BULK: BULK_QUEUE,
    CancelSource.SWEEP: SWEEP_QUEUE,
    # A runner interrupt is a customer's own action, and a timeout the customer's own
    # limit: both ride with the customers' cancels.
    CancelSource.RUNNER_INTERRUPT: CANCEL_QUEUE,
    CancelSource.DEADLINE: CANCEL_QUEUE,
}

# Cancel requests per message, unless the caller says otherwise.
CHUNK_SIZE = 1000


def queue_of(by: Actor) -> str:
    """Customers' cancels never wait behind bulk or sweep work: each source has its queue."""
    return QUEUE_OF_SOURCE.get(by.source, CANCEL_QUEUE)


# --- the producers -----------------------------------------------------------------------


def publish_run(workflow_id: str, task_id: str) -> None:
    """Hand a workflow to the runner side; raises :data:`BROKER_ERRORS` when the broker is
    down."""
    app.send_task(RUN_WORKFLOW_TASK, args=[workflow_id], task_id=task_id, queue=RUNNER_QUEUE)


def publish_cancels(
    workflow_ids: Sequence[str], by: Actor, chunk_size: int = CHUNK_SIZE
) -> None:
    """Publish cancel requests on the queue of their source, one message per chunk of ids.

    Raises :data:`BROKER_ERRORS` when the broker is unreachable (no retry: the requests are
    recorded in the database, and the re-drive pass hands them on later).
    """
    queue = queue_of(by)
    with app.producer_or_acquire() as producer:
        for start in range(0, len(workflow_ids), chunk_size):
            app.send_task(
                CANCEL_WORKFLOWS_TASK,
                args=[list(workflow_ids[start : start + chunk_size]), by.source, by.actor,
                      by.reason],
                queue=queue,
                producer=producer,
                retry=False,
            )


def revoke_runner_tasks(task_ids: Sequence[str]) -> None:
    """One broadcast for many runner tasks. A fast path only (see cancel.py): a runner
    task re-checks the database before it submits anything, so a broker that is down
    costs nothing but this log line, and must not undo the caller's work after it."""
    if not task_ids:
        return
    try:
        app.control.revoke(list(task_ids))
    except BROKER_ERRORS as exc:
        log.warning("could not revoke %d runner tasks (%s); they will find their workflows "
                    "cancelled", len(task_ids), type(exc).__name__)


def runner_backlog() -> int:
    """Messages waiting in the runner queue (not yet taken by a runner worker)."""
    with app.connection_for_read() as connection:
        return int(connection.default_channel.queue_declare(queue=RUNNER_QUEUE).message_count)


# --- record, then publish ----------------------------------------------------------------


def hand_on(workflow_ids: Sequence[str], by: Actor, chunk_size: int = CHUNK_SIZE) -> bool:
    """Publish recorded cancel requests; False (logged) when the broker is down, in which
    case the re-drive pass hands them on later."""
    if not workflow_ids:
        return True
    try:
        publish_cancels(workflow_ids, by, chunk_size)
    except BROKER_ERRORS as exc:
        fields: dict[str, object] = {"cancel_source": by.source, "workflows": len(workflow_ids)}
        if len(workflow_ids) == 1:
            fields["workflow_id"] = workflow_ids[0]
        log.warning("%d cancels (%s) recorded, not handed to the %s queue: %s: %s; the "
                    "re-drive pass will", len(workflow_ids), by.source, queue_of(by),
                    type(exc).__name__, exc, extra=fields)
        return False
    return True


@dataclass(frozen=True)
class Handed:
    """What :func:`request_cancels` did: the requests it recorded, and whether they are on
    the broker (False: the broker was down; the re-drive pass hands them on)."""

    recorded: list[str]
    published: bool


def request_cancels(
    db: Database,
    workflow_ids: Sequence[str],
    by: Actor,
    *,
    only_new: bool = False,
    skip_locked: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> Handed:
    """Record cancel requests on the cancellable ones of ``workflow_ids``, commit, then
    publish them: how bulk cancels, the sweeps, runner interrupts and timeouts hand cancels
    on (the API's one cancel has its own statement, :func:`status.request_cancel_as_caller`,
    then :func:`hand_on`).

    The request is committed before it is published, so a lost message loses no cancel.
    It is stamped as published with the request (``cancel_published_at``): the re-drive
    pass hands on an open request ``redrive_after_seconds`` after that stamp, whether the
    publish then worked or not, so a failed publish costs no extra write. ``only_new`` and
    ``skip_locked`` as in :func:`status.request_cancel_many`.
    """
    if not workflow_ids:
        return Handed([], published=True)
    with db.transaction() as session:
        recorded = status.request_cancel_many(
            session, workflow_ids, by, only_new=only_new, skip_locked=skip_locked,
            publishing=True,
        )
    return Handed(recorded, published=hand_on(recorded, by, chunk_size))
