"""Cancel signals from the cancel side to the runner that drives a workflow.

A signal is pushed, not polled: one Redis PUBLISH on a single channel that every
runner worker process listens to (one subscription per process, not per
workflow), plus a key with a TTL that a runner which subscribes late still finds.

Kinds:
- ``cancel``: interrupt your prompt and acknowledge when ComfyUI reports it;
- ``stop``: the database already says ``cancelled``; make sure your prompt is gone
  from ComfyUI and stop watching it;
- ``terminate``: the grace period is over and the cancel side wrote ``cancelled``;
  same as ``stop``, sent as an escalation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterable
from enum import StrEnum

import redis

log = logging.getLogger(__name__)

CHANNEL = "comfy_cancel:signals"
KEY_PREFIX = "comfy_cancel:signal:"


class SignalKind(StrEnum):
    CANCEL = "cancel"
    STOP = "stop"
    TERMINATE = "terminate"


def _key(workflow_id: str) -> str:
    return KEY_PREFIX + workflow_id


def send(
    client: redis.Redis, workflow_ids: Iterable[str], kind: SignalKind, ttl_seconds: int
) -> int:
    """Signal the runners of these workflows in one pipelined round trip; returns the count."""
    pipe = client.pipeline(transaction=False)
    count = 0
    for workflow_id in workflow_ids:
        payload = json.dumps({"workflow_id": workflow_id, "kind": kind.value})
        pipe.set(_key(workflow_id), kind.value, ex=ttl_seconds)
        pipe.publish(CHANNEL, payload)
        count += 1
    if count:
        pipe.execute()
    return count


def pending(client: redis.Redis, workflow_id: str) -> SignalKind | None:
    """The signal left for a workflow, for a runner that subscribed after it was sent."""
    value = client.get(_key(workflow_id))
    if value is None:
        return None
    return SignalKind(value.decode() if isinstance(value, bytes) else value)


Handler = Callable[[SignalKind], None]


class SignalListener:
    """One pub/sub subscription per process that routes signals to the runs it drives.

    Handlers run on the listener's thread and must return quickly (hand slow work to
    another thread). After a lost connection the listener re-subscribes and checks the
    keys of every registered run, since messages published meanwhile are gone.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._handlers: dict[str, Handler] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._subscribed = threading.Event()
        self._stopping = threading.Event()

    def register(self, workflow_id: str, handler: Handler) -> None:
        """Route this workflow's signals to ``handler``; a signal already left is delivered."""
        self.start()
        with self._lock:
            self._handlers[workflow_id] = handler
        left = pending(self._client, workflow_id)
        if left is not None:
            handler(left)

    def unregister(self, workflow_id: str, handler: Handler | None = None) -> None:
        """Stop routing this workflow's signals; with ``handler``, only if it is still the
        one registered (a superseded runner task must not unhook its successor)."""
        with self._lock:
            if handler is None or self._handlers.get(workflow_id) == handler:
                self._handlers.pop(workflow_id, None)

    def start(self, timeout: float = 10.0) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._subscribed.clear()
                self._thread = threading.Thread(
                    target=self._run, name="comfy-cancel-signals", daemon=True
                )
                self._thread.start()
        # Registering before the subscription is live would lose a signal in the gap;
        # the key check in register() covers what was sent before this point.
        self._subscribed.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            pubsub = self._client.pubsub()
            try:
                pubsub.subscribe(CHANNEL)
                # The server confirms a subscription once it is live; only then is it safe
                # to tell registrants that no signal can slip by unseen.
                confirmed = pubsub.get_message(timeout=5.0)
                if confirmed is None or confirmed.get("type") != "subscribe":
                    raise redis.ConnectionError("no subscription confirmation from Redis")
                if self._subscribed.is_set():
                    # A re-subscription: what was published while we were away is gone.
                    self._recover_missed()
                self._subscribed.set()
                backoff = 0.1
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._dispatch(message["data"])
            except redis.RedisError as exc:
                log.warning("signal subscription lost (%s); reconnecting", exc)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(redis.RedisError):
                    pubsub.close()

    def _recover_missed(self) -> None:
        with self._lock:
            registered = list(self._handlers.items())
        for workflow_id, handler in registered:
            left = pending(self._client, workflow_id)
            if left is not None:
                self._call(handler, left)

    def _dispatch(self, raw: bytes | str) -> None:
        try:
            message = json.loads(raw)
            workflow_id, kind = message["workflow_id"], SignalKind(message["kind"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed cancel signal: %r", raw[:200])
            return
        with self._lock:
            handler = self._handlers.get(workflow_id)
        if handler is not None:
            self._call(handler, kind)

    @staticmethod
    def _call(handler: Handler, kind: SignalKind) -> None:
        try:
            handler(kind)
        except Exception:  # a broken handler must not kill the listener of every other run
            log.exception("cancel signal handler failed")


_listener_lock = threading.Lock()
_listeners: dict[int, SignalListener] = {}


def listener_for(client: redis.Redis) -> SignalListener:
    """The process's listener on this Redis client (one per client object).

    Keyed by ``id(client)``: safe, because the listener holds the client, so the id
    cannot be reused while the entry exists.
    """
    with _listener_lock:
        listener = _listeners.get(id(client))
        if listener is None:
            listener = _listeners[id(client)] = SignalListener(client)
        return listener
