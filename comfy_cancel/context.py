"""What the domain code needs from the outside world, built once per process."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import redis

from comfy_cancel.comfyui import ComfyUIClient
from comfy_cancel.config import Settings, get_settings
from comfy_cancel.db import Database
from comfy_cancel.egress import EgressPolicy

_ClientKey = tuple[str, tuple[tuple[str, str], ...], float, str | None]


@dataclass
class Context:
    settings: Settings
    _clients: dict[_ClientKey, ComfyUIClient] = field(default_factory=dict, repr=False)
    _clients_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @cached_property
    def db(self) -> Database:
        return Database.from_url(self.settings.database_url)

    @cached_property
    def egress(self) -> EgressPolicy:
        return EgressPolicy.of(self.settings)

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_url, health_check_interval=30)

    def comfyui(
        self,
        endpoint_url: str,
        headers: Mapping[str, str] | None,
        timeout: float | None = None,
        runner_id: str | None = None,
    ) -> ComfyUIClient:
        """The process's client for one ComfyUI server (and headers and timeout), shared by
        its threads and never closed: building one costs about 25 ms (httpx loads the CA
        bundle), and a shared one keeps its connections and what it learned about the
        server. A runner whose endpoint or headers change gets a new one. ``runner_id``
        labels its failed calls in the metrics."""
        key = (endpoint_url, tuple(sorted((headers or {}).items())),
               timeout if timeout is not None else self.settings.comfyui_timeout_seconds,
               runner_id)
        with self._clients_lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = ComfyUIClient(
                    endpoint_url, headers, timeout=key[2], egress=self.egress,
                    runner_id=runner_id,
                )
            return client


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
