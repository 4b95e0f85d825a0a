"""The live feed of workflow updates: Redis pub/sub from the writers to the API's streams.

Two kinds of update travel here, each a JSON object with the workflow's id and a ``kind``:

- an audit row (``workflow_events``: a status change or a step of a cancel), with the
  row's ``id``: published by the status writer *after* its transaction commits (a
  subscriber never sees a change that then rolls back), and replayable from the database
  by that id;
- ComfyUI's progress (``kind: progress``, no id): published by the runner as it comes,
  rate-limited, never stored and never replayed.

Publishing (:class:`Publisher`, sync, used by every process that writes statuses) sends one
message per transaction, whatever its size: a JSON list of its updates on the one channel
:data:`CHANNEL`. Every API process receives every update anyway, so channels of their own
per workflow would filter nothing; they only made a bulk cancel of 100,000 workflows cost
100,000 messages to send, route and parse instead of one per chunk. It never fails a write:
a Redis that does not answer is logged, publishing pauses for :data:`OUTAGE_PAUSE_SECONDS`,
and the first publish after the outage tells every subscriber to catch up from the database.

Subscribing (:class:`Hub`, asyncio, one per API process) is one subscription to that channel,
split by workflow id and fanned out to the streams watching them, in the order published: a
thousand open streams are a thousand queues, not a thousand Redis connections. A process
with no stream open decodes nothing. After its connection is lost the hub tells every stream
to catch up from the database (what was published meanwhile is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import redis
import redis.asyncio
from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from comfy_cancel.config import get_settings
from comfy_cancel.models import WorkflowEvent, iso_utc, utcnow

log = logging.getLogger(__name__)

Update = dict[str, Any]

PREFIX = "comfy_cancel:live:"
CHANNEL = PREFIX + "updates"  # every workflow's: one JSON list of updates per transaction
RESYNC_CHANNEL = PREFIX + "resync"  # "events were lost: catch up from the database"

PROGRESS = "progress"
# After a failed publish, updates are dropped (and logged once) for this long, so a Redis
# that does not answer costs a status writer one short timeout, not one per write.
OUTAGE_PAUSE_SECONDS = 5.0
# A publish waits at most this long for Redis: a status write has already committed.
PUBLISH_TIMEOUT_SECONDS = 1.0
_PENDING = "comfy_cancel.live.pending"  # the updates of a session's open transaction


def audit_update(
    event_id: int,
    workflow_id: str,
    kind: str,
    at: datetime,
    *,
    from_status: str | None = None,
    to_status: str | None = None,
    source: str | None = None,
    actor: str | None = None,
    reason: str | None = None,
    outcome: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> Update:
    """The update of one audit row: the same fields live and replayed."""
    return {
        "id": event_id, "workflow_id": workflow_id, "kind": kind, "at": iso_utc(at),
        "from_status": from_status, "to_status": to_status, "source": source,
        "actor": actor, "reason": reason, "outcome": outcome,
        "detail": dict(detail) if detail else None,
    }


def audit_updates(
    rows: Iterable[tuple[int, str, str | None, str | None, str | None]],
    kind: str,
    at: datetime,
    **columns: Any,
) -> list[Update]:
    """The updates of audit rows alike but for (id, workflow_id, source, actor, reason), as
    one insert writes them: the common part is built once (a bulk cancel's chunk is
    thousands of rows, and formatting ``at`` each time cost more than the rest)."""
    common = audit_update(0, "", kind, at, **columns)
    return [{**common, "id": event_id, "workflow_id": workflow_id, "source": source,
             "actor": actor, "reason": reason}
            for event_id, workflow_id, source, actor, reason in rows]


def update_of_row(row: WorkflowEvent) -> Update:
    return audit_update(
        row.id, row.workflow_id, row.kind, row.at, from_status=row.from_status,
        to_status=row.to_status, source=row.source, actor=row.actor, reason=row.reason,
        outcome=row.outcome, detail=row.detail,
    )


def progress_update(workflow_id: str, node: Any, value: Any, maximum: Any) -> Update:
    return {"workflow_id": workflow_id, "kind": PROGRESS, "at": iso_utc(utcnow()),
            "node": node, "value": value, "max": maximum}


# --- publishing ----------------------------------------------------------------------------


class Publisher:
    """Publishes updates, one message per call; never raises."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._paused_until = 0.0
        self._missed = False  # updates were dropped: subscribers must catch up

    def publish(self, updates: Iterable[Update]) -> None:
        batch = list(updates)
        if not batch:
            return
        with self._lock:
            if time.monotonic() < self._paused_until:
                self._missed = True
                return
            missed = self._missed
        try:
            # orjson: a bulk cancel's chunk is 2,000 updates, serialized on its path (0.4 ms
            # instead of 4); non-str keys as the json module (and the JSON column) take them.
            payload = orjson.dumps(batch, option=orjson.OPT_NON_STR_KEYS)
            if not missed:
                self.client.publish(CHANNEL, payload)
            else:
                pipe = self.client.pipeline(transaction=False)
                pipe.publish(CHANNEL, payload)
                pipe.publish(RESYNC_CHANNEL, "1")
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                first = not self._missed
                self._missed = True
                self._paused_until = time.monotonic() + OUTAGE_PAUSE_SECONDS
            if first:
                log.warning("live updates not published for %g s: Redis unreachable (%s); "
                            "subscribers catch up from the database afterwards",
                            OUTAGE_PAUSE_SECONDS, type(exc).__name__)
            return
        if missed:
            with self._lock:
                self._missed = False
            log.info("live updates published again")


_publishers: dict[str, Publisher] = {}
_publishers_lock = threading.Lock()
_override: Publisher | None = None


def publisher() -> Publisher:
    """The process's publisher on the settings' Redis (or the one :func:`use` set)."""
    if _override is not None:
        return _override
    url = get_settings().redis_url
    found = _publishers.get(url)
    if found is None:
        with _publishers_lock:
            found = _publishers.get(url)
            if found is None:
                found = _publishers[url] = Publisher(redis.Redis.from_url(
                    url, socket_connect_timeout=PUBLISH_TIMEOUT_SECONDS,
                    socket_timeout=PUBLISH_TIMEOUT_SECONDS))
    return found


@contextlib.contextmanager
def publishing_to(client: redis.Redis) -> Iterator[Publisher]:
    """Publish through ``client`` inside the block (tests: a fakeredis server)."""
    global _override
    previous, _override = _override, Publisher(client)
    try:
        yield _override
    finally:
        _override = previous


def publish(updates: Sequence[Update]) -> None:
    """Publish now: for a writer whose statement has committed already."""
    if updates:
        publisher().publish(updates)


def publish_after_commit(session: Session, updates: Iterable[Update]) -> None:
    """Publish these once the session's transaction commits; nothing if it rolls back."""
    session.info.setdefault(_PENDING, []).extend(updates)


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    pending = session.info.pop(_PENDING, None)
    if pending:
        publisher().publish(pending)


@event.listens_for(Session, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    # A root transaction that ended without a commit (rolled back): its updates never were.
    if transaction.parent is None:
        session.info.pop(_PENDING, None)


# --- subscribing (the API) --------------------------------------------------------------------

# The marker a stream receives when updates may have been lost: catch up from the database.
RESYNC = "resync"
Item = list[Update] | str
# Updates a slow stream may have waiting; past that it is told to catch up instead.
QUEUE_SIZE = 1000
# The hub's Redis connection's name (CLIENT LIST shows one per API process).
HUB_CLIENT_NAME = "comfy-cancel-live"
# Silence this long on the subscription is a dead connection (a PING is sent before).
SILENCE_SECONDS = 30.0


@dataclass(eq=False)
class Subscription:
    """One stream's updates of one workflow, in the order published."""

    workflow_id: str
    hub: Hub
    queue: asyncio.Queue[Item] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))

    def deliver(self, item: Item) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            # A slow reader: what it missed is in the database; live progress is lost.
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(RESYNC)

    async def get(self) -> Item:
        return await self.queue.get()

    def close(self) -> None:
        self.hub.discard(self)


class Hub:
    """The API process's one subscription, fanned out to its streams."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self._streams: dict[str, set[Subscription]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def open(self, workflow_id: str) -> Subscription:
        """Register a stream, on the event loop; it receives every update published from
        now on (once the hub is connected; until then it is told to catch up)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="live-hub")
        subscription = Subscription(workflow_id, self)
        self._streams[workflow_id].add(subscription)
        return subscription

    def discard(self, subscription: Subscription) -> None:
        streams = self._streams.get(subscription.workflow_id)
        if streams is not None:
            streams.discard(subscription)
            if not streams:
                del self._streams[subscription.workflow_id]

    @property
    def stream_count(self) -> int:
        return sum(len(s) for s in self._streams.values())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.client.aclose()

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.client.pubsub()
            try:
                # Redis subscribes both before it confirms the first.
                await pubsub.subscribe(CHANNEL, RESYNC_CHANNEL)
                confirmed = await pubsub.get_message(timeout=5.0)
                if confirmed is None or confirmed.get("type") != "subscribe":
                    raise redis.ConnectionError("no subscription confirmation from Redis")
                self.connected.set()
                backoff = 0.1
                # Whatever was published before now (or while disconnected) may be lost.
                self._tell_all(RESYNC)
                await self._listen(pubsub)
            except (redis.RedisError, OSError) as exc:
                self.connected.clear()
                log.warning("live updates subscription lost (%s); reconnecting",
                            type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _listen(self, pubsub: redis.asyncio.client.PubSub) -> None:
        quiet_since = time.monotonic()
        while True:
            message = await pubsub.get_message(timeout=SILENCE_SECONDS / 3)
            if message is None:
                if time.monotonic() - quiet_since > SILENCE_SECONDS:
                    raise redis.ConnectionError("Redis went silent")
                await pubsub.ping()  # its answer counts as a sign of life
                continue
            quiet_since = time.monotonic()
            if message.get("type") == "message":
                self._dispatch(message["channel"], message["data"])

    def _dispatch(self, channel: bytes | str, data: bytes | str) -> None:
        if channel in (RESYNC_CHANNEL, RESYNC_CHANNEL.encode()):
            self._tell_all(RESYNC)
            return
        if not self._streams:
            return  # nobody watches: nothing to decode
        try:
            updates = orjson.loads(data)
            # Split by workflow, in the order published; only the watched ones.
            watched: dict[str, list[Update]] = {}
            for update in updates:
                workflow_id = update["workflow_id"]
                if workflow_id in self._streams:
                    watched.setdefault(workflow_id, []).append(update)
        except (ValueError, TypeError, KeyError):
            log.warning("ignored a malformed live update")
            return
        for workflow_id, batch in watched.items():
            for subscription in list(self._streams.get(workflow_id, ())):
                subscription.deliver(batch)

    def _tell_all(self, item: Item) -> None:
        for streams in list(self._streams.values()):
            for subscription in list(streams):
                subscription.deliver(item)
