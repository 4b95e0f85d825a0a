"""Simulated runners for many running workflows, in a process of their own.

The real runner drives one ComfyUI prompt per workflow; a thousand running workflows
would need a thousand ComfyUI servers. This process stands in for their runners: it
subscribes to the cancel signals exactly like a runner worker does (one
:class:`~comfy_cancel.signals.SignalListener`), and on a ``cancel`` signal either

- ``--mode ack``: waits ``--ack-delay`` seconds (ComfyUI noticing the interrupt at its
  next step) and writes ``running -> cancelled`` the way ``runner._interrupted`` does
  (read the request, compare-and-set through :mod:`comfy_cancel.status`), or
- ``--mode deaf``: never answers, so only the cancel worker's deadline ends the
  workflow (outcome ``forced``).

It prints ``ready`` once subscribed and every handler is registered, and runs until its
standard input closes; then it writes what it saw to ``--out``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from comfy_cancel import manager, status
from comfy_cancel.config import get_settings
from comfy_cancel.db import Database
from comfy_cancel.models import CancelOutcome
from comfy_cancel.signals import SignalKind, SignalListener


class Runners:
    def __init__(self, db: Database, mode: str, ack_delay: float, threads: int) -> None:
        self.db, self.mode, self.ack_delay = db, mode, ack_delay
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="ack")
        self._due: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._acked: set[str] = set()
        self.signals = 0
        self.acks = 0
        self.lost_races = 0
        self.errors: list[str] = []
        threading.Thread(target=self._schedule, name="ack-scheduler", daemon=True).start()

    def handler(self, workflow_id: str) -> object:
        return lambda kind: self.on_signal(workflow_id, kind)

    def on_signal(self, workflow_id: str, kind: SignalKind) -> None:
        with self._cond:
            self.signals += 1
            if self.mode != "ack" or kind is not SignalKind.CANCEL or workflow_id in self._acked:
                return
            self._acked.add(workflow_id)
            heapq.heappush(self._due, (time.monotonic() + self.ack_delay, workflow_id))
            self._cond.notify()

    def _schedule(self) -> None:
        while True:
            with self._cond:
                while not self._due or self._due[0][0] > time.monotonic():
                    wait = self._due[0][0] - time.monotonic() if self._due else None
                    self._cond.wait(wait)
                _, workflow_id = heapq.heappop(self._due)
            self.pool.submit(self._acknowledge, workflow_id)

    def _acknowledge(self, workflow_id: str) -> None:
        try:
            with self.db.transaction() as session:
                workflow = manager.get_workflow(session, workflow_id)
                if workflow is None:
                    return
                by = status.Actor(
                    workflow.cancel_source or "runner", workflow.cancel_actor,
                    workflow.cancel_reason,
                )
                change = status.cancel_if_active(
                    session, workflow_id, by, CancelOutcome.CANCELLED, workflow.cancel_timing()
                )
            with self._cond:
                if change.changed:
                    self.acks += 1
                else:
                    self.lost_races += 1
        except Exception as exc:  # reported in the results, not fatal to the others
            with self._cond:
                self.errors.append(f"{workflow_id}: {type(exc).__name__}: {exc}")


def _heartbeat(db: Database, ids: list[str], stop: threading.Event) -> None:
    """Keep the runs alive, as their runners' heartbeats would (one statement for all of
    them here; real runners write one row each, every ``heartbeat_interval_seconds``)."""
    interval = get_settings().heartbeat_interval_seconds
    while not stop.wait(interval):
        try:
            with db.transaction() as session:
                session.execute(
                    text("UPDATE workflows SET heartbeat_at = (now() AT TIME ZONE 'utc') "
                         "WHERE id = ANY(:ids) AND status IN ('queued', 'running')"),
                    {"ids": ids},
                )
        except OperationalError as exc:  # e.g. a deadlock with a batch writer: next beat
            print(f"fake runner: heartbeat skipped: {exc.orig}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fake_runner", description=__doc__)
    parser.add_argument("--ids", type=Path, required=True, help="one workflow id a line")
    parser.add_argument("--mode", choices=("ack", "deaf"), default="ack")
    parser.add_argument("--ack-delay", type=float, default=0.035)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    settings = get_settings()
    db = Database.from_url(settings.database_url)
    client = redis.Redis.from_url(settings.redis_url)
    runners = Runners(db, args.mode, args.ack_delay, args.threads)
    listener = SignalListener(client)
    for workflow_id in args.ids.read_text().split():
        listener.register(workflow_id, runners.handler(workflow_id))  # type: ignore[arg-type]
    ids = args.ids.read_text().split()
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(db, ids, stop), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    stop.set()
    listener.stop()
    runners.pool.shutdown(wait=True)
    args.out.write_text(json.dumps({
        "mode": args.mode, "signals": runners.signals, "acks": runners.acks,
        "lost_races": runners.lost_races, "errors": runners.errors[:20],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
