"""What the domain code needs from the outside world, built once per process."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cached_property

import redis

from comfy_cancel.config import Settings, get_settings
from comfy_cancel.db import Database


@dataclass
class Context:
    settings: Settings

    @cached_property
    def db(self) -> Database:
        return Database.from_url(self.settings.database_url)

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_url, health_check_interval=30)


_lock = threading.Lock()
_current: Context | None = None


def current() -> Context:
    """The process's context; created on first use so forked workers build their own."""
    global _current
    with _lock:
        if _current is None:
            _current = Context(get_settings())
        return _current


def reset() -> None:
    """Forget the process's context (tests, after changing the environment)."""
    global _current
    with _lock:
        _current = None
        get_settings.cache_clear()
