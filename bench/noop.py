"""The baseline task: a no-op on the same Celery app, broker and worker settings.

Start its worker with ``celery -A bench.noop worker -Q bench.noop`` and the options of
:func:`worker_options`: the app is :data:`comfy_cancel.worker.app` (JSON, late acks and
prefetch as configured there), with one more task on one more queue, and the pool,
concurrency and prefetch are read from the running cancel worker. The task's only work is
one Redis ``INCR`` on the broker's server, so the benchmark can see that it ran; without a
side effect its completion would be invisible (the app keeps no results).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
from celery.concurrency import ALIASES
from celery.signals import celeryd_init
from kombu import Exchange, Queue

from comfy_cancel.config import get_settings
from comfy_cancel.worker import WorkerKind, app, transport_options

NOOP_QUEUE_NAME = "bench.noop"
NOOP_QUEUE = Queue(NOOP_QUEUE_NAME, Exchange(NOOP_QUEUE_NAME), routing_key=NOOP_QUEUE_NAME)
COUNTER_KEY = "bench:noop:done"

# The settings of a worker that shape a task's round trip, besides the pool, its size and
# the prefetch (which a worker reports in its stats): compared between the cancel worker
# and the no-op worker at every run.
ROUND_TRIP_CONF = ("task_acks_late", "task_reject_on_worker_lost", "worker_prefetch_multiplier",
                   "worker_disable_prefetch", "broker_transport_options", "task_serializer",
                   "worker_consumer")
# celery -P names by pool class; "prefork" before its alias "processes".
POOL_NAMES: dict[str, str] = {}
for _name, _implementation in ALIASES.items():
    if _implementation:
        POOL_NAMES.setdefault(_implementation, _name)

_client: redis.Redis | None = None
_lock = threading.Lock()


def _redis() -> redis.Redis:
    global _client
    with _lock:
        if _client is None:
            _client = redis.Redis.from_url(get_settings().redis_url)
        return _client


@app.task(name="bench.noop")
def noop(counter_key: str = COUNTER_KEY) -> None:
    _redis().incr(counter_key)


@celeryd_init.connect
def _as_a_cancel_worker(conf: Any, **_: Any) -> None:
    """The broker options of a cancel worker (its unacknowledged-message keys, visibility
    timeout and restore scan): comfy_cancel.worker gives a worker of any queue but the
    cancel queues a runner worker's. Connected after comfy_cancel.worker's own handler
    (imported above), so it runs after it."""
    conf.broker_transport_options = transport_options(get_settings(), WorkerKind.CANCEL)


def worker_settings(pid: int, timeout: float = 30.0) -> dict[str, Any]:
    """What the running worker process ``pid`` reports of itself (Celery's remote control):
    pool, concurrency, prefetch count and the :data:`ROUND_TRIP_CONF` settings."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for hostname, stats in (app.control.inspect(timeout=1.0).stats() or {}).items():
            if stats.get("pid") != pid:
                continue
            conf = (app.control.inspect([hostname], timeout=1.0, limit=1)
                    .conf(with_defaults=True) or {}).get(hostname)
            if conf is None:
                break  # no answer this time: ask again
            pool = stats["pool"]
            return {
                "pool": POOL_NAMES.get(pool["implementation"], pool["implementation"]),
                "concurrency": pool.get("max-concurrency", 1),
                "prefetch_count": stats.get("prefetch_count"),
                **{key: conf.get(key) for key in ROUND_TRIP_CONF},
            }
    raise RuntimeError(f"no Celery worker with pid {pid} answered in {timeout:g} s")


def worker_options(pid: int) -> list[str]:
    """``celery worker`` options for the pool, concurrency and prefetch of the running
    worker ``pid``; the rest of its settings come from the app, shared."""
    settings = worker_settings(pid)
    options = ["-P", settings["pool"], "-c", str(settings["concurrency"])]
    prefetch = settings["prefetch_count"]
    if isinstance(prefetch, int) and settings["concurrency"]:
        options += ["--prefetch-multiplier", str(prefetch // settings["concurrency"])]
    if settings["worker_disable_prefetch"]:
        options.append("--disable-prefetch")
    return options


celery = app
