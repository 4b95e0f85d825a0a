"""Per-token rate limits of the HTTP API, counted in Redis so every API process shares them.

Fixed windows: a token may make ``limit`` requests per window of ``window`` seconds
(aligned to the clock, the same in every process); one pipelined ``INCR`` + ``EXPIRE``
per request. A burst that straddles two windows can reach twice the limit within one
window's length; that is the price of one round trip and an exact ``Retry-After``.

When Redis cannot be reached the limiter fails open: requests are served unlimited, one
warning is logged, and Redis is not asked again for a few seconds, so an outage costs no
request more than one timeout.

The client is asyncio's: the gate counts a request on the event loop, without handing it
to a thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

import redis
import redis.asyncio

log = logging.getLogger(__name__)

KEY_PREFIX = "comfy_cancel:ratelimit"
# After Redis failed, requests go unlimited this long before it is tried again.
RETRY_REDIS_AFTER_SECONDS = 5.0


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int  # whole seconds until the window ends (0 when allowed)


ALLOWED = Verdict(True, 0)


class RateLimiter:
    def __init__(self, redis_url: str, window_seconds: int) -> None:
        self.redis_url = redis_url
        self.window = window_seconds
        self._down_until = 0.0
        self._client: tuple[asyncio.AbstractEventLoop, redis.asyncio.Redis] | None = None

    def _redis(self) -> redis.asyncio.Redis:
        # An asyncio client's connections belong to the loop that opened them: one client
        # per loop (a server has one; a test client may start another).
        loop = asyncio.get_running_loop()
        if self._client is None or self._client[0] is not loop:
            client = redis.asyncio.Redis.from_url(
                self.redis_url, socket_connect_timeout=2, socket_timeout=2
            )
            self._client = (loop, client)
        return self._client[1]

    async def hit(self, token_id: int, limit: int) -> Verdict:
        """Count one request of the token; refused once it made ``limit`` in this window.

        ``limit`` 0 means unlimited (nothing is counted).
        """
        if limit <= 0 or time.monotonic() < self._down_until:
            return ALLOWED
        now = time.time()
        window_index = int(now // self.window)
        key = f"{KEY_PREFIX}:{token_id}:{window_index}"
        try:
            async with self._redis().pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, self.window + 1)
                count, _ = await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self._down_until = time.monotonic() + RETRY_REDIS_AFTER_SECONDS
            log.warning(
                "rate limits not enforced for %.0f s: Redis unreachable (%s)",
                RETRY_REDIS_AFTER_SECONDS, type(exc).__name__,
            )
            return ALLOWED
        if int(count) <= limit:
            return ALLOWED
        window_end = (window_index + 1) * self.window
        return Verdict(False, max(1, math.ceil(window_end - now)))
