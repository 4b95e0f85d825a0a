"""``python -m testbed.preflight [redis|postgres|all]``: start, check and stop each local
server the tests need, printing what it found (CI runs it before the suite)."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

from comfy_cancel.embedded import processes
from comfy_cancel.embedded.redis_server import start_redis
from testbed.postgres import start_postgres


@contextlib.contextmanager
def _timed(label: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    print(f"{label} in {time.monotonic() - started:.2f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Start, check and stop each requested server; prints what it found."""
    wanted = (argv if argv is not None else sys.argv[1:]) or ["all"]
    if not set(wanted) <= {"redis", "postgres", "all"}:
        print("usage: python -m testbed.preflight [redis|postgres|all]", file=sys.stderr)
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
    except processes.ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(main())
