"""The Redis broker transport: kombu's, with three repairs the workers need.

:func:`register` makes it the transport of ``redis://`` and ``rediss://`` URLs in this process
(worker.py calls it on import), so URLs, TLS and Celery's settings stay as they are.

1. **A channel keeps its connection parameters.** On a lost broker connection Celery 5.7's
   consumer calls ``Connection.collect()`` (which detaches the transport from the
   connection: ``transport.client = None``) and then ``Connection.close()``, which closes the
   still-open default channel. Closing a Redis channel drops its connection pools and then
   restores its unacknowledged messages through a *new* pool, built by ``_connparams`` from
   ``transport.client``, now None: ``AttributeError: 'NoneType' object has no attribute
   'hostname'``. That is not a connection error, so Celery calls it unrecoverable and the
   worker exits (only a worker holding unacknowledged messages: late acks, ETA tasks). Tasks
   still running on pool threads after the reconnect also ack through that old channel and
   hit the same wall. Here the parameters are computed once, while the channel is attached,
   and reused for every pool the channel builds later. Upstream: kombu #582 (same trace on a
   channel close after the connection dropped), kombu #659, celery #9250, celery #4652.

2. **Garbage on a queue is set aside, not fatal.** kombu decodes a popped list item with
   ``json.loads`` and builds a message from it inside the consumer's event loop; raw bytes, or
   JSON that is not a kombu envelope, raise there, and Celery exits. Here such an item is
   logged (queue, size, error and a digest; never its content, which may carry secrets) and
   pushed onto the Redis list :data:`DEAD_LETTER_KEY` with where it came from.

3. **One Redis client per channel, not one per command.** kombu builds a new
   ``redis.Redis`` for every command it sends outside the event loop (``conn_or_acquire``:
   the unacknowledged-message bookkeeping of each delivery, each ack, each publish), and in
   redis-py 8 building one costs about 0.1 ms: a tenth of what a cancel worker spends on a
   message. Here one client (thread-safe; pipelines are made per call) serves the
   channel's pool, and a new one is made with a new pool (after a reconnect).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import kombu.transport
import redis
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

log = logging.getLogger(__name__)

#: Redis list of messages no worker could read, newest first; one JSON record each:
#: ``{"queue", "error", "at" (unix time), "size", "sha256", "raw_b64"}``.
DEAD_LETTER_KEY = "comfy_cancel:dead_letter"
#: The list keeps this many records (a flood of garbage must not fill Redis).
DEAD_LETTER_MAX = 10_000

TRANSPORT = "comfy_cancel.broker:Transport"


class Channel(kombu_redis.Channel):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Set before kombu's __init__, which already connects (a PING) through a pool.
        self._pool_params: dict[bool, dict[str, Any]] = {}
        self._shared_client: Any = None
        super().__init__(*args, **kwargs)
        self._params_for(asynchronous=False)

    def _params_for(self, asynchronous: bool) -> dict[str, Any]:
        params = self._pool_params.get(asynchronous)
        if params is None:
            params = self._pool_params[asynchronous] = self._connparams(asynchronous=asynchronous)
        return params

    def _get_pool(self, asynchronous: bool = False) -> redis.ConnectionPool:
        params = self._params_for(asynchronous)
        self.keyprefix_fanout = self.keyprefix_fanout.format(db=params["db"])
        return redis.ConnectionPool(**params)

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self._shared_client
        if shared is None or shared.connection_pool is not self.pool:
            shared = self._shared_client = self._create_client()
        yield shared

    # --- reading messages -------------------------------------------------------------------

    def _brpop_read(self, **options: Any) -> bool:
        # kombu 5.7's _brpop_read, except that the popped item goes through _decode.
        try:
            try:
                dest__item = self.client.parse_response(
                    self.client.connection, "BRPOP", **options
                )
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payload = self._decode(item, dest)
            if payload is None:
                raise Empty()
            self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        # The polling path (drain_events without an event loop): the same check.
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item:
                    self._maybe_update_queues_expire(client, queue)
                    payload = self._decode(item, queue)
                    if payload is None:
                        raise Empty()
                    return payload
            self._maybe_update_queues_expire(client, queue)
            raise Empty()

    def _decode(self, item: bytes, queue: str) -> dict[str, Any] | None:
        """The kombu envelope in ``item``, or None once it went to the dead-letter list."""
        try:
            payload = loads(bytes_to_str(item))
            # What delivery does next: build the message and record it for late acks.
            message = self.Message(payload, channel=self)
            if not {"exchange", "routing_key"} <= set(message.delivery_info):
                raise KeyError("delivery_info")
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, UnicodeError,
                DecodeError, ContentDisallowed) as exc:
            self._dead_letter(item, queue, exc)
            return None
        return dict(payload)

    def _dead_letter(self, item: bytes, queue: str, exc: Exception) -> None:
        raw = item if isinstance(item, bytes) else str(item).encode()
        digest = hashlib.sha256(raw).hexdigest()[:16]
        record = json.dumps({
            "queue": queue,
            "error": type(exc).__name__,
            "at": time.time(),
            "size": len(raw),
            "sha256": digest,
            "raw_b64": base64.b64encode(raw).decode(),
        })
        try:
            with self.conn_or_acquire() as client:
                client.pipeline().lpush(DEAD_LETTER_KEY, record).ltrim(
                    DEAD_LETTER_KEY, 0, DEAD_LETTER_MAX - 1
                ).execute()
        except redis.RedisError as push_error:
            log.error("unreadable message on queue %r (%d bytes, sha256 %s, %s) dropped: the "
                      "dead-letter list %s is unreachable (%s)", queue, len(raw), digest,
                      type(exc).__name__, DEAD_LETTER_KEY, type(push_error).__name__)
            return
        log.error("unreadable message on queue %r (%d bytes, sha256 %s, %s) moved to the "
                  "Redis list %s", queue, len(raw), digest, type(exc).__name__, DEAD_LETTER_KEY)


class Transport(kombu_redis.Transport):
    Channel = Channel


def queue_lengths(client: redis.Redis, queues: Sequence[str]) -> dict[str, int]:
    """Messages waiting on each of ``queues`` (every priority's list), in one round trip:
    what ``queue_declare`` counts, without a kombu connection."""
    keys = {queue: [queue if not step else f"{queue}{Channel.sep}{step}"
                    for step in Channel.priority_steps] for queue in queues}
    pipe = client.pipeline(transaction=False)
    for names in keys.values():
        for name in names:
            pipe.llen(name)
    lengths = iter(pipe.execute())
    return {queue: sum(int(next(lengths)) for _ in names) for queue, names in keys.items()}


def register() -> None:
    """Make :class:`Transport` the one kombu picks for redis:// and rediss:// URLs."""
    for scheme in ("redis", "rediss"):
        kombu.transport.TRANSPORT_ALIASES[scheme] = TRANSPORT
        # kombu caches the class it resolved for a name.
        kombu.transport._transport_cache.pop(scheme, None)
