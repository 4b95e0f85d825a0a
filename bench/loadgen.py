"""A small load generator that runs in its own process, so it does not share the API's GIL.

HTTP mode sends ``METHOD URL`` requests on loopback only, with a fixed number of
concurrent clients (aiohttp, one event loop), either closed-loop (each client sends its
next request when the last one answered) or open-loop at a fixed offered rate (request
``i`` is due at ``start + i / rate``; when every client is busy it goes late, and its due
time is kept so the lag shows). It stops by itself after ``--count`` requests or
``--duration`` seconds, whichever comes first.

No-op mode publishes ``--count`` :func:`bench.noop.noop` tasks as fast as one producer
can, the baseline of the cancel throughput.

Results go to ``--out`` as JSON: per request ``[item, due, sent, done, status]`` with
wall-clock times (``time.time()``, comparable to the database's timestamps on the same
machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _items(path: Path | None, count: int) -> Iterator[str]:
    if path is None:
        for n in range(count):
            yield str(n)
        return
    for n, line in enumerate(path.read_text().split()):
        if n >= count:
            return
        yield line


async def _http(args: argparse.Namespace) -> dict[str, Any]:
    host = urlsplit(args.url).hostname or ""
    if host not in LOOPBACK and not host.startswith("127."):
        raise SystemExit(f"loadgen: refusing {args.url}: load goes to loopback only")
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    items = list(_items(args.ids, args.count))
    records: list[list[Any]] = []
    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    started = time.time()
    deadline = time.monotonic() + args.duration
    async with aiohttp.ClientSession(
        headers=headers, connector=connector, timeout=timeout
    ) as session:

        async def send(item: str, due: float) -> None:
            url = args.url.replace("{id}", item)
            sent = time.time()
            code: int | str
            try:
                async with session.request(args.method, url) as response:
                    await response.read()
                    code = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                code = f"error: {type(exc).__name__}"
            records.append([item, due, sent, time.time(), code])

        if args.rate:
            slots = asyncio.Semaphore(args.concurrency)
            pending: set[asyncio.Task[None]] = set()
            t0 = time.monotonic()
            wall0 = time.time()

            async def paced(item: str, due: float) -> None:
                try:
                    await send(item, due)
                finally:
                    slots.release()

            for n, item in enumerate(items):
                offset = n / args.rate
                delay = t0 + offset - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if time.monotonic() > deadline:
                    break
                await slots.acquire()
                task = asyncio.create_task(paced(item, wall0 + offset))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*pending)
        else:
            queue = iter(items)

            async def client() -> None:
                for item in queue:
                    if time.monotonic() > deadline:
                        return
                    await send(item, time.time())

            await asyncio.gather(*(client() for _ in range(args.concurrency)))
    return {"started": started, "finished": time.time(), "requests": records}


def _noop(args: argparse.Namespace) -> dict[str, Any]:
    from bench.noop import NOOP_QUEUE, noop
    from comfy_cancel.worker import app

    started, cpu_started = time.time(), time.process_time()
    with app.producer_or_acquire() as producer:
        for _ in range(args.count):
            noop.apply_async(args=[args.counter_key], queue=NOOP_QUEUE, producer=producer)
    # The publishing's own CPU, without the interpreter's start and imports.
    return {"started": started, "finished": time.time(), "published": args.count,
            "publish_cpu_seconds": round(time.process_time() - cpu_started, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    http = sub.add_parser("http", help="HTTP requests to a loopback server")
    http.add_argument("--url", required=True, help="may contain {id}, filled from --ids")
    http.add_argument("--method", default="GET")
    http.add_argument("--token")
    http.add_argument("--ids", type=Path, help="one item a line (e.g. workflow ids)")
    http.add_argument("--concurrency", type=int, default=32)
    http.add_argument("--rate", type=float, help="offered requests a second (open loop)")
    http.add_argument("--count", type=int, default=1000)
    http.add_argument("--duration", type=float, default=60.0)
    noop = sub.add_parser("noop", help="publish no-op Celery tasks")
    noop.add_argument("--count", type=int, default=1000)
    noop.add_argument("--counter-key", default="bench:noop:done")
    for each in (http, noop):
        each.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = asyncio.run(_http(args)) if args.mode == "http" else _noop(args)
    result["cpu_seconds"] = round(time.process_time(), 3)
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
