"""The embedded stack's five child processes: what each runs, how each is known to be
ready, and the order they stop in.

No orphans: each child runs in its own process group (a Ctrl-C meant for us must not kill
it before we stop it in order) and is asked by the kernel to die with us (PR_SET_PDEATHSIG,
Linux) should we be killed outright (:mod:`comfy_cancel.embedded.processes`).
"""

from __future__ import annotations

import os
import signal
import site
import sys
from collections.abc import Callable
from pathlib import Path

import comfy_cancel
from comfy_cancel import worker
from comfy_cancel.config import ENV_PREFIX, Settings, child_environment
from comfy_cancel.embedded import processes
from comfy_cancel.embedded.celery_workers import CeleryWorker, Pinger
from comfy_cancel.embedded.data_dir import DataDir
from comfy_cancel.embedded.errors import StackError
from comfy_cancel.embedded.processes import Child, Probe

SIM, API, CANCEL_WORKER, RUNNER_WORKER, BEAT = (
    "sim-comfyui", "api", "worker-cancel", "worker-runner", "beat")
# Stopped in this order, each group together: nothing is left to publish work or cancels
# when the workers go, and the sim outlives the runner that talks to it.
STOP_ORDER = ((BEAT,), (CANCEL_WORKER, RUNNER_WORKER), (API,), (SIM,))


def _package_root_for_children() -> str | None:
    """The folder holding ``comfy_cancel`` when it runs from a source tree, not site-packages:
    the children start in the data dir and would not find it otherwise."""
    root = Path(comfy_cancel.__file__).resolve().parent.parent
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    return None if root in installed else str(root)


def _environment(settings: Settings) -> dict[str, str]:
    env = child_environment(settings)
    env["PYTHONUNBUFFERED"] = "1"
    root = _package_root_for_children()
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


class Children:
    """The simulated ComfyUI, the API, a cancel worker, a runner worker and beat, started
    together and stopped in :data:`STOP_ORDER`; ``echo`` hears each one get ready and each
    slow stop."""

    def __init__(
        self,
        settings: Settings,
        data_dir: DataDir,
        *,
        api_url: str,
        comfyui_url: str,
        comfyui_port: int,
        time_scale: float,
        echo: Callable[[str], None],
    ) -> None:
        env = _environment(settings)
        cli = [sys.executable, "-m", "comfy_cancel.cli"]

        def child(name: str, argv: list[str], death_signal: int = signal.SIGTERM) -> Child:
            return Child(name, argv, data_dir.log_path(name), env=env, cwd=data_dir.path,
                         death_signal=death_signal)

        # Each worker process serves its Prometheus metrics on a port of its own.
        self.metrics_ports = {CANCEL_WORKER: processes.free_port(),
                              RUNNER_WORKER: processes.free_port()}

        def celery_worker(name: str, queues: tuple[str, ...]) -> CeleryWorker:
            return CeleryWorker(
                name, queues, data_dir.log_path(name),
                env=env | {f"{ENV_PREFIX}METRICS_PORT": str(self.metrics_ports[name])},
                loglevel=settings.log_level, cwd=data_dir.path,
            )

        self._pinger = Pinger(settings)
        self._echo = echo
        sim = child(SIM, [*cli, "sim-comfyui", "--port", str(comfyui_port),
                          "--time-scale", str(time_scale)])
        # One API process is plenty on a developer's machine, and leaves no orphan if
        # this supervisor is killed.
        api = child(API, [*cli, "api", "--workers", "1", "--port", str(settings.api_port)])
        cancel_worker = celery_worker(CANCEL_WORKER, worker.CANCEL_QUEUES)
        runner_worker = celery_worker(RUNNER_WORKER, (worker.RUNNER_QUEUE,))
        # Celery's SIGTERM is a warm shutdown: should we die, beat gets SIGKILL too.
        beat = child(BEAT, [*cli, "beat", f"--schedule={data_dir.path / 'celerybeat-schedule'}"],
                     death_signal=signal.SIGKILL)
        # Each child by name, with the probe that says it is ready.
        self._children: dict[str, tuple[Child, Probe]] = {
            SIM: (sim, lambda: processes.http_ok(f"{comfyui_url}/system_stats")),
            API: (api, lambda: processes.http_ok(f"{api_url}/healthz")),
            CANCEL_WORKER: (cancel_worker, self._pinger.probe(cancel_worker)),
            RUNNER_WORKER: (runner_worker, self._pinger.probe(runner_worker)),
            BEAT: (beat, lambda: "beat: Starting" in beat.new_log()),
        }
        self._started: list[Child] = []

    def start(self, timeout: float) -> None:
        """Start them all and wait until each is ready; :class:`StackError` if one cannot
        start, exits or is not ready within ``timeout`` (the caller stops the rest)."""
        try:
            for child, _probe in self._children.values():
                self._started.append(child.start())
            processes.wait_ready(self._children.values(), timeout, on_ready=self._say_ready)
        except processes.ServiceError as exc:
            raise StackError(str(exc)) from exc

    def _say_ready(self, child: Child) -> None:
        self._echo(f"{child.name}: ready (pid {child.pid}, log {child.log_path})")

    def check(self) -> None:
        """:class:`StackError` if a child has exited."""
        try:
            for child in self._started:
                child.check("unexpectedly")
        except processes.ServiceError as exc:
            raise StackError(str(exc)) from exc

    def running(self) -> list[str]:
        """The names of those still running, in the order they stop."""
        return [name for group in STOP_ORDER for name in group
                if self._children[name][0].running]

    def stop(self) -> None:
        """Stop them in :data:`STOP_ORDER`, each group together. Idempotent."""
        for group in STOP_ORDER:
            processes.stop_all([self._children[name][0] for name in group],
                               on_slow=self._say_slow)
        self._pinger.close()

    def _say_slow(self, child: Child) -> None:
        # Celery's warm shutdown lets a runner finish the workflow in hand; unacknowledged,
        # a task killed after the grace is redelivered by Redis after the visibility
        # timeout, and the heartbeat sweep ends its workflow before that.
        self._echo(f"waiting up to {processes.STOP_GRACE:.0f}s for the {child.name} to "
                   "finish its tasks in hand")
