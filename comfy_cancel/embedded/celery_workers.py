"""Celery worker processes, and the ping that says they are ready.

For the embedded stack, the tests and the benchmark: a worker is a supervised
:class:`~comfy_cancel.embedded.processes.Child` known to the broker by a node name of its
own, and it is ready when a ping to that node name is answered.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from comfy_cancel.config import Settings
from comfy_cancel.embedded.processes import Child, Probe

if TYPE_CHECKING:
    from celery import Celery

WORKER_APP = "comfy_cancel.worker"
PING_TIMEOUT = 0.5


class CeleryWorker(Child):
    """``celery worker`` of ``app`` for ``queues``, its node name unique to this process:
    two stacks may share one Redis, and a ping must find ours. ``options``: more worker
    options (a pool, a concurrency)."""

    def __init__(
        self,
        name: str,
        queues: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        loglevel: str = "INFO",
        app: str = WORKER_APP,
        options: Sequence[str] = (),
        cwd: Path | None = None,
    ) -> None:
        self.node = f"{name}-{os.getpid()}@{socket.gethostname()}"
        argv = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", ",".join(queues),
                "-n", self.node, f"--loglevel={loglevel}", "--without-mingle",
                "--without-gossip", *options]
        # Celery's SIGTERM is a warm shutdown that waits for the tasks in hand: should we
        # die, the kernel sends SIGKILL.
        super().__init__(name, argv, log_path, env=env, cwd=cwd, death_signal=signal.SIGKILL)


class Pinger:
    """Pings workers by node name through a Celery app of its own (the process-wide one may
    point at other settings). After a broker error the next ping connects anew: the broker
    may just have come back."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app: Celery | None = None

    def answers(self, node: str) -> bool:
        if self._app is None:
            from comfy_cancel.worker import create_app

            self._app = create_app(self._settings)
        try:
            replies = self._app.control.ping(destination=[node], timeout=PING_TIMEOUT)
        except Exception:  # the broker is still connecting; the caller's deadline bounds it
            self.close()
            return False
        return any(node in reply for reply in replies or [])

    def probe(self, worker: CeleryWorker) -> Probe:
        """A readiness probe for :func:`~comfy_cancel.embedded.processes.wait_ready`."""
        return partial(self.answers, worker.node)

    def close(self) -> None:
        if self._app is not None:
            app, self._app = self._app, None
            with contextlib.suppress(Exception):  # a connection the broker already dropped
                app.close()

