"""The metrics read when Prometheus scrapes the API: how things stand now, rather than what
was counted. Open cancel requests and the oldest one's age (one read through the partial
index of open intents), and the messages waiting on each queue (one pipelined Redis round
trip). Only the API shows these (once, however many workers count); a read is reused for
:data:`CACHE_SECONDS`, so scrapes in a burst cost one read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from comfy_cancel import broker, manager
from comfy_cancel.db import Database
from comfy_cancel.models import utcnow
from comfy_cancel.worker import ALL_QUEUES

log = logging.getLogger(__name__)

CACHE_SECONDS = 1.0


@dataclass(frozen=True)
class _Reading:
    at: float
    open_requests: int | None  # None: the database did not answer
    oldest_age: float
    queues: dict[str, int] | None  # None: Redis did not answer


class LiveState(Collector):
    def __init__(self, db: Database, redis_client: redis.Redis) -> None:
        self._db = db
        self._redis = redis_client
        self._lock = threading.Lock()
        self._last: _Reading | None = None

    def collect(self) -> Iterator[Metric]:
        reading = self._read()
        up = GaugeMetricFamily("comfy_cancel_state_up",
                               "Whether the API could read the state shown by the "
                               "comfy_cancel_open_* and _queue_* metrics, by part.",
                               labels=["part"])
        up.add_metric(["database"], float(reading.open_requests is not None))
        up.add_metric(["redis"], float(reading.queues is not None))
        yield up
        if reading.open_requests is not None:
            yield GaugeMetricFamily("comfy_cancel_open_cancel_requests",
                                    "Cancel requests with no outcome yet.",
                                    value=reading.open_requests)
            yield GaugeMetricFamily("comfy_cancel_open_cancel_oldest_age_seconds",
                                    "Age of the oldest cancel request with no outcome yet "
                                    "(0 when none is open).",
                                    value=reading.oldest_age)
        if reading.queues is not None:
            depth = GaugeMetricFamily("comfy_cancel_queue_messages",
                                      "Messages waiting on a Celery queue (not yet taken "
                                      "by a worker).", labels=["queue"])
            for queue, length in reading.queues.items():
                depth.add_metric([queue], length)
            yield depth

    def _read(self) -> _Reading:
        with self._lock:  # concurrent scrapes wait for one read instead of each reading
            now = time.monotonic()
            if self._last is None or now - self._last.at >= CACHE_SECONDS:
                self._last = self._read_now(now)
            return self._last

    def _read_now(self, at: float) -> _Reading:
        open_requests: int | None = None
        oldest_age = 0.0
        try:
            with self._db.reading() as session:
                open_requests, oldest = manager.open_cancel_requests(session)
            if oldest is not None:
                oldest_age = max(0.0, (utcnow() - oldest).total_seconds())
        except Exception as exc:  # a scrape shows what it can; the detail is for the log
            log.warning("metrics: the database did not answer: %s", type(exc).__name__)
        queues: dict[str, int] | None = None
        try:
            queues = broker.queue_lengths(self._redis, ALL_QUEUES)
        except redis.RedisError as exc:
            log.warning("metrics: Redis did not answer: %s", type(exc).__name__)
        return _Reading(at, open_requests, oldest_age, queues)
