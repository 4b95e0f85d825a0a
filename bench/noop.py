"""The baseline task: a no-op on the same Celery app, broker and worker settings.

Start its worker with ``celery -A bench.noop worker -Q bench.noop``: the app is
:data:`comfy_cancel.worker.app` (JSON, late acks, prefetch 1, threads), with one more
task on one more queue. The task's only work is one Redis ``INCR`` on the broker's
server, so the benchmark can see that it ran; without a side effect its completion
would be invisible (the app keeps no results).
"""

from __future__ import annotations

import threading

import redis
from kombu import Exchange, Queue

from comfy_cancel.config import get_settings
from comfy_cancel.worker import app

NOOP_QUEUE_NAME = "bench.noop"
NOOP_QUEUE = Queue(NOOP_QUEUE_NAME, Exchange(NOOP_QUEUE_NAME), routing_key=NOOP_QUEUE_NAME)
COUNTER_KEY = "bench:noop:done"

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


celery = app
