"""The Celery app: Redis broker, JSON only, late acks, one queue per kind of work.

Start workers with the CLI (``comfy-cancel worker --queues runner``) or with Celery
itself: ``celery -A comfy_cancel.worker worker -Q runner``.

Queues:
- ``cancel``: customers' cancels, never behind bulk or sweep work;
- ``cancel.bulk``: operators' bulk cancels;
- ``cancel.sweep``: the periodic sweeps and the cancels they issue;
- ``runner``: one long task per workflow, driving it on its ComfyUI server.

Two kinds of worker, told apart by the queues they consume (:func:`kind_of`): a worker that
consumes only cancel queues is a *cancel* worker, any other (``runner``, or all queues) a
*runner* worker. Redis redelivers a message left unacknowledged for a visibility timeout, and
kombu keeps unacknowledged messages in one hash per set of keys, restored by *any* consumer
using those keys once older than *its* timeout. So each kind has its own keys and timeout
(:func:`transport_options`): short for cancel workers (a killed worker's cancels come back
within seconds), longer than the longest run for runner workers (a long workflow is never
started twice). Processes that only publish (API, beat) use the runner's options: they
restore nothing early.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger, celeryd_init
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu import Exchange, Queue

from comfy_cancel import broker, logs, metrics
from comfy_cancel.config import Settings, get_settings

CANCEL_QUEUE = "cancel"
BULK_QUEUE = "cancel.bulk"
SWEEP_QUEUE = "cancel.sweep"
RUNNER_QUEUE = "runner"
CANCEL_QUEUES = (CANCEL_QUEUE, BULK_QUEUE, SWEEP_QUEUE)
ALL_QUEUES = (*CANCEL_QUEUES, RUNNER_QUEUE)

# The tasks' names: producers (publish.py, beat) send by name and never import task code.
RUN_WORKFLOW_TASK = "comfy_cancel.run_workflow"
CANCEL_WORKFLOWS_TASK = "comfy_cancel.cancel_workflows"
# Sent by earlier versions only (one deadline check per batch of running cancels); still
# consumed (tasks.py) while one may be in flight.
ENFORCE_DEADLINE_TASK = "comfy_cancel.enforce_cancel_deadline"
SWEEP_TASK = "comfy_cancel.sweep"
REDRIVE_TASK = "comfy_cancel.redrive"

# Margin of the cancel queues' visibility timeout over the grace period: a message held
# unacknowledged until its ETA (a retry, or an earlier version's deadline check, due a grace
# period after it was sent) must not be handed out twice.
CANCEL_VISIBILITY_MARGIN_SECONDS = 20.0
# How often a cancel worker looks for messages past their visibility timeout.
CANCEL_RESTORE_INTERVAL_SECONDS = 1


# Between reconnection attempts after the broker went away: Celery's consumer uses kombu's
# defaults (2 s, growing by 2 s to 30 s), so a worker would come back up to 12 s after a
# 3-second Redis restart.
RECONNECT_INTERVAL_START = 0.5
RECONNECT_INTERVAL_STEP = 0.5
RECONNECT_INTERVAL_MAX = 1.0


class WorkerKind(StrEnum):
    CANCEL = "cancel"
    RUNNER = "runner"


def kind_of(queues: Iterable[str] | None) -> WorkerKind:
    """A worker consuming only cancel queues is a cancel worker; any other (the runner
    queue, or every queue when none is named) gets the runner's long timeout."""
    names = set(queues or ())
    return WorkerKind.CANCEL if names and names <= set(CANCEL_QUEUES) else WorkerKind.RUNNER


def cancel_visibility_timeout(settings: Settings) -> float:
    if settings.cancel_visibility_timeout_seconds is not None:
        return settings.cancel_visibility_timeout_seconds
    return settings.cancel_grace_seconds + CANCEL_VISIBILITY_MARGIN_SECONDS


def transport_options(settings: Settings, kind: WorkerKind) -> dict[str, Any]:
    """kombu Redis transport options of a worker of ``kind``: its own unacked keys, its
    visibility timeout and how promptly it restores what is past it."""
    prefix = f"comfy_cancel:{kind.value}:"
    options: dict[str, Any] = {
        "unacked_key": prefix + "unacked",
        "unacked_index_key": prefix + "unacked_index",
        "unacked_mutex_key": prefix + "unacked_mutex",
    }
    if kind is WorkerKind.CANCEL:
        timeout = cancel_visibility_timeout(settings)
        options.update({
            "visibility_timeout": timeout,
            # A scan every second (the throttle of 1 makes the interval the only control):
            # a killed worker's messages are back within the timeout plus a second.
            "unacked_restore_interval": CANCEL_RESTORE_INTERVAL_SECONDS,
            "unacked_restore_throttle": 1,
            # Held by the worker restoring; it must not outlive a short timeout by much.
            "unacked_mutex_expire": max(1, int(timeout)),
        })
    else:
        # It must outlast the longest run, or a long workflow would be started twice.
        options["visibility_timeout"] = int(settings.max_run_seconds) + 3600
    return options


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.result_backend,
        "task_ignore_result": settings.result_backend is None,
        # JSON only: a pickle payload from the broker would be code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A message is acknowledged after its task ran, and given back if the worker dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # A cancel worker switches to its own options when it starts (on_worker_init).
        "broker_transport_options": transport_options(settings, WorkerKind.RUNNER),
        "worker_consumer": "comfy_cancel.worker:Consumer",
        # Each queue on its own exchange and key: a bare Queue(name) would bind every queue
        # to the default exchange with the default key, and one message would reach all.
        "task_queues": [Queue(name, Exchange(name), routing_key=name) for name in ALL_QUEUES],
        "task_default_queue": CANCEL_QUEUE,
        "task_routes": {
            RUN_WORKFLOW_TASK: {"queue": RUNNER_QUEUE},
            SWEEP_TASK: {"queue": SWEEP_QUEUE},
        },
        # Runner tasks mostly wait on sockets: threads let one process drive hundreds.
        "worker_pool": "threads",
        "worker_concurrency": settings.runner_concurrency,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        # Task events for Flower (and `celery events`): the worker's are buffered and sent
        # in groups. No sent events: each would be one more publish per API cancel, and
        # Flower lists a task from its received event on.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": False,
        "timezone": "UTC",
        "imports": ["comfy_cancel.tasks"],
        "beat_schedule": {
            "sweep": {
                "task": SWEEP_TASK,
                "schedule": settings.sweep_interval_seconds,
                "options": {"queue": SWEEP_QUEUE, "expires": settings.sweep_interval_seconds},
            },
            # Often and cheap: hands on the cancels nobody took and re-dispatches orphaned
            # runs; expiring, so passes never pile up behind a stopped worker.
            "redrive": {
                "task": REDRIVE_TASK,
                "schedule": settings.redrive_interval_seconds,
                "options": {"queue": SWEEP_QUEUE, "expires": settings.redrive_interval_seconds},
            },
        },
    }


class RevokeWithoutBackendFilter(logging.Filter):
    """Drops Celery's "Failed to mark task ... as revoked in backend: No result backend is
    configured", logged on every revoke when there is no result backend (by design here: the
    database keeps the outcomes). Any other failure to mark a revoke still gets through."""

    MESSAGE = "Failed to mark task %s as revoked in backend: %s"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self.MESSAGE or not isinstance(record.args, tuple):
            return True
        error = record.args[-1] if record.args else None
        return not (isinstance(error, NotImplementedError)
                    and "No result backend is configured" in str(error))


class Consumer(CeleryConsumer):
    """Celery's consumer, reconnecting to the broker about once a second."""

    def ensure_connected(self, conn: Any) -> Any:
        # Celery passes no intervals to ensure_connection and has no setting for them.
        conn.ensure_connection = functools.partial(
            conn.ensure_connection,
            interval_start=RECONNECT_INTERVAL_START,
            interval_step=RECONNECT_INTERVAL_STEP,
            interval_max=RECONNECT_INTERVAL_MAX,
        )
        return super().ensure_connected(conn)


REVOKE_LOGGER = "celery.worker.control"
_revoke_filter = RevokeWithoutBackendFilter()


@celeryd_init.connect
def on_worker_init(conf: Any, options: dict[str, Any], **_: Any) -> None:
    """Before the worker connects: the transport options of its kind, no revoke noise, and
    its metrics port (the threads pool does all of its work in this process)."""
    settings = get_settings()
    if settings.metrics_port is not None:
        try:
            metrics.serve(settings.metrics_port, settings.metrics_host)
        except OSError as exc:  # cancels matter more than their metrics: run on, and say so
            logging.getLogger(__name__).error(
                "no metrics: cannot serve them on %s:%d (%s); set another "
                "COMFY_CANCEL_METRICS_PORT", settings.metrics_host, settings.metrics_port, exc)
    queues = options.get("queues")
    if isinstance(queues, str):
        queues = [q.strip() for q in queues.split(",") if q.strip()]
    kind = kind_of(queues)
    conf.broker_transport_options = transport_options(settings, kind)
    if conf.result_backend is None:
        logging.getLogger(REVOKE_LOGGER).addFilter(_revoke_filter)


@after_setup_logger.connect
@after_setup_task_logger.connect
def on_logging_set_up(logger: logging.Logger, **_: Any) -> None:
    """Celery set up the logging of a worker or beat: JSON lines if so configured."""
    if get_settings().log_format == "json":
        logs.use_json(logger)


# kombu's Redis transport with our repairs, for every redis:// URL of this process.
broker.register()


def create_app(settings: Settings | None = None) -> Celery:
    app = Celery("comfy_cancel")
    app.conf.update(celery_config(settings or get_settings()))
    return app


def configure(settings: Settings) -> None:
    """Point the process's app at other settings (tests, the embedded stack), dropping
    connections made with the old ones."""
    app.conf.update(celery_config(settings))
    # Celery caches its broker pools on first use and has no public way to drop them.
    # They are left to the garbage collector, not closed: kombu's global producer pools
    # may still hand them out for an equal URL.
    app._pool = None
    app.amqp._producer_pool = None


app = create_app()
celery = app  # `celery -A comfy_cancel.worker` finds either name
