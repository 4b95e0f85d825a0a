"""Cancel signals across a dropped subscription, on a real Redis server.

redis-py's pub/sub reconnects and re-subscribes by itself when its connection drops; a
signal published in that gap reached nobody. The listener must notice the re-subscription
and look at the signal keys of the runs it drives, or a cancel waits for its deadline.
"""

from __future__ import annotations

import threading
import time

import redis

from comfy_cancel import signals


def _kill_pubsub_connections(client: redis.Redis) -> int:
    return int(client.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))


def test_a_signal_missed_while_the_subscription_reconnected_is_delivered(
    redis_client: redis.Redis,
) -> None:
    listener = signals.SignalListener(redis.Redis(connection_pool=redis_client.connection_pool))
    received: list[signals.SignalKind] = []
    delivered = threading.Event()

    def handler(kind: signals.SignalKind) -> None:
        received.append(kind)
        delivered.set()

    try:
        listener.register("wf-1", handler)
        assert received == []
        # The cancel side left its key, and its PUBLISH fell in the gap (simulated by not
        # publishing at all): only the re-subscription can tell the listener to look.
        redis_client.set(signals.KEY_PREFIX + "wf-1", signals.SignalKind.CANCEL.value, ex=60)
        deadline = time.monotonic() + 5
        while _kill_pubsub_connections(redis_client) == 0:
            assert time.monotonic() < deadline, "the listener never subscribed"
            time.sleep(0.05)
        assert delivered.wait(10), "the missed signal was not recovered after the reconnect"
        assert received[0] is signals.SignalKind.CANCEL
    finally:
        listener.stop()
