"""The Celery app: Redis broker, JSON only, late acks, one queue per kind of work.

Start workers with the CLI (``comfy-cancel worker --queues runner``) or with Celery
itself: ``celery -A comfy_cancel.worker worker -Q runner``.

Queues:
- ``cancel``: customers' cancels, never behind bulk or sweep work;
- ``cancel.bulk``: operators' bulk cancels;
- ``cancel.sweep``: the periodic sweeps and the cancels they issue;
- ``runner``: one long task per workflow, driving it on its ComfyUI server.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from comfy_cancel.config import Settings, get_settings

CANCEL_QUEUE = "cancel"
BULK_QUEUE = "cancel.bulk"
SWEEP_QUEUE = "cancel.sweep"
RUNNER_QUEUE = "runner"
ALL_QUEUES = (CANCEL_QUEUE, BULK_QUEUE, SWEEP_QUEUE, RUNNER_QUEUE)


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
        # Redis redelivers an unacknowledged message after the visibility timeout: it must
        # outlast the longest run, or a long workflow would be started twice.
        "broker_transport_options": {
            "visibility_timeout": int(settings.max_run_seconds) + 3600,
        },
        # Each queue on its own exchange and key: a bare Queue(name) would bind every queue
        # to the default exchange with the default key, and one message would reach all.
        "task_queues": [Queue(name, Exchange(name), routing_key=name) for name in ALL_QUEUES],
        "task_default_queue": CANCEL_QUEUE,
        "task_routes": {
            "comfy_cancel.run_workflow": {"queue": RUNNER_QUEUE},
            "comfy_cancel.sweep": {"queue": SWEEP_QUEUE},
        },
        # Runner tasks mostly wait on sockets: threads let one process drive hundreds.
        "worker_pool": "threads",
        "worker_concurrency": settings.runner_concurrency,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
        "imports": ["comfy_cancel.tasks"],
        "beat_schedule": {
            "sweep": {
                "task": "comfy_cancel.sweep",
                "schedule": settings.sweep_interval_seconds,
                "options": {"queue": SWEEP_QUEUE, "expires": settings.sweep_interval_seconds},
            },
        },
    }


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
