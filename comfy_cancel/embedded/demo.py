"""``comfy-cancel demo``: every way a cancel can end, shown on a real stack in about a minute.

It starts :class:`~comfy_cancel.embedded.stack.EmbeddedStack`, then, over the HTTP API with the
stack's token, submits four workflows to the single simulated ComfyUI runner (which runs
one prompt at a time):

- ``completes``: left alone; ends ``completed``;
- ``cancel-queued``: cancelled while its prompt waits behind ``completes`` in ComfyUI's
  queue; ends ``cancelled``, the running one untouched;
- ``cancel-running``: cancelled a second into its run; ends ``cancelled``;
- ``race``: cancelled just before the moment ``completes`` took to finish; ends either
  ``cancelled`` or ``completed`` with outcome ``too_late``. Both are correct: exactly one of
  the runner's completion and the cancel wins the compare-and-set.

It prints what happened, stops the stack and exits 0; any other ending is an error.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from comfy_cancel.config import Settings
from comfy_cancel.embedded.dev import banner, say, sigterm_as_interrupt
from comfy_cancel.embedded.errors import StackError
from comfy_cancel.embedded.stack import EmbeddedStack, explicit_setting
from comfy_cancel.models import TERMINAL

SHORT_BLURS = 4  # about 3.5 s on the simulated ComfyUI at time scale 1
LONG_BLURS = 40  # about 32 s: always still running when it is cancelled
RUNNING_CANCEL_AFTER = 1.0
# The race's cancel is sent this long before the expected completion, plus the time the
# running cancel just took (the machine's current cancel latency), so either side can win.
# On an idle machine: mostly cancelled at 0.1 s, a mix at 0.05 s, refused as completed at 0.
RACE_LEAD_SECONDS = 0.06
POLL_SECONDS = 0.05


class DemoError(StackError):
    """The demo saw something other than the endings it shows."""


@dataclass
class Entry:
    name: str
    did: str
    prompt: dict[str, Any]
    workflow_id: str = ""
    final: dict[str, Any] = field(default_factory=dict)
    refused: str | None = None  # the API's message when the cancel came after the end

    @property
    def status(self) -> str:
        return str(self.final.get("status", "?"))

    @property
    def outcome(self) -> str | None:
        cancel = self.final.get("cancel")
        return str(cancel["outcome"]) if cancel and cancel.get("outcome") else None

    def cancel_seconds(self) -> float | None:
        """From the cancel request to its outcome, as the server recorded them."""
        cancel = self.final.get("cancel")
        if not cancel or not cancel.get("finished_at"):
            return None
        return (_when(cancel["finished_at"]) - _when(cancel["requested_at"])).total_seconds()


def _when(value: str) -> datetime:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Demo:
    def __init__(self, stack: EmbeddedStack, time_scale: float) -> None:
        from comfy_cancel.embedded.comfyui_sim import blur_workflow

        self.stack = stack
        self.time_scale = time_scale
        self.client = httpx.Client(
            base_url=stack.api_url,
            headers={"Authorization": f"Bearer {stack.token}"},
            timeout=15,
        )
        short = blur_workflow(768, SHORT_BLURS, filename_prefix="demo")
        self.completes = Entry("completes", "let it run", short)
        self.queued = Entry("cancel-queued", "cancelled while pending behind 'completes'", short)
        self.running = Entry(
            "cancel-running", f"cancelled {RUNNING_CANCEL_AFTER:.0f} s into its run",
            blur_workflow(768, LONG_BLURS, filename_prefix="demo-long"),
        )
        self.race = Entry("race", "cancelled just before its expected end", short)

    @property
    def entries(self) -> list[Entry]:
        return [self.completes, self.queued, self.running, self.race]

    def run(self) -> list[Entry]:
        try:
            self._run()
        except httpx.HTTPError as exc:
            raise DemoError(
                f"the API at {self.stack.api_url} failed: {exc}{self._see_logs()}"
            ) from exc
        finally:
            self.client.close()
        self._check_endings()
        return self.entries

    def _run(self) -> None:
        # One at a time, each handed to ComfyUI before the next: the runner worker's threads
        # would otherwise race to submit, and the order on the one ComfyUI server matters.
        for entry in self.entries:
            self._submit(entry)
            self._wait(entry, "handed to ComfyUI", lambda wf: wf["prompt_id"] is not None
                       or wf["status"] in TERMINAL | {"running"})
        say("submitted 4 workflows; ComfyUI runs one at a time, the others wait in its queue")

        self._wait(self.completes, "running", lambda wf: wf["status"] != "queued")
        self._wait(self.queued, "pending in ComfyUI's queue",
                   lambda wf: wf["status"] != "queued" or wf["queue_number"] is not None)
        self._cancel(self.queued)
        self._wait_end(self.queued)

        done = self._wait_end(self.completes)
        if done["status"] != "completed" or not done["started_at"]:
            raise DemoError(
                f"workflow 'completes' ended {done['status']}, not completed{self._see_logs()}"
            )
        run_time = _when(done["completed_at"]) - _when(done["started_at"])

        self._wait(self.running, "running", lambda wf: wf["status"] != "queued")
        time.sleep(RUNNING_CANCEL_AFTER)
        self._cancel(self.running)
        self._wait_end(self.running)

        lead = RACE_LEAD_SECONDS + (self.running.cancel_seconds() or 0.0)
        started = self._wait(self.race, "running", lambda wf: wf["status"] != "queued")
        if started["started_at"]:
            target = _when(started["started_at"]) + run_time
            pause = (target - datetime.now(UTC)).total_seconds() - lead
            time.sleep(max(0.0, pause))
            self.race.did = f"cancelled {lead:.2f} s before its expected end"
        self._cancel(self.race)
        self._wait_end(self.race)

    def _submit(self, entry: Entry) -> None:
        response = self.client.post(
            "/v1/workflow", json={"name": entry.name, "workflow_json": entry.prompt}
        )
        if response.status_code != 200:
            raise DemoError(
                f"submitting '{entry.name}' failed: {response.status_code} "
                f"{_message(response)}{self._see_logs()}"
            )
        entry.workflow_id = str(response.json()["id"])

    def _cancel(self, entry: Entry) -> None:
        say(f"cancelling '{entry.name}'")
        response = self.client.post(f"/v1/workflow/{entry.workflow_id}/cancel")
        if response.status_code == 400 and entry is self.race:
            # It finished before the request reached the API: too late, told at once.
            entry.refused = _message(response)
            return
        if response.status_code != 200:
            raise DemoError(
                f"cancelling '{entry.name}' failed: {response.status_code} "
                f"{_message(response)}{self._see_logs()}"
            )

    def _get(self, entry: Entry) -> dict[str, Any]:
        response = self.client.get(f"/v1/workflow/{entry.workflow_id}")
        response.raise_for_status()
        entry.final = dict(response.json())
        return entry.final

    def _wait(
        self, entry: Entry, what: str, reached: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        timeout = 20.0 + 60.0 * self.time_scale
        deadline = time.monotonic() + timeout
        while True:
            workflow = self._get(entry)
            if reached(workflow):
                return workflow
            if time.monotonic() > deadline:
                raise DemoError(
                    f"workflow '{entry.name}' was not {what} within {timeout:.0f}s "
                    f"(status {workflow['status']}){self._see_logs()}"
                )
            time.sleep(POLL_SECONDS)

    def _wait_end(self, entry: Entry) -> dict[str, Any]:
        def ended(wf: dict[str, Any]) -> bool:
            # A cancelled-too-late workflow gets its outcome with its completion, in one write.
            return wf["status"] in TERMINAL

        workflow = self._wait(entry, "finished", ended)
        say(f"'{entry.name}' ended {workflow['status']}")
        return workflow

    def _check_endings(self) -> None:
        expected: dict[str, set[tuple[str, str | None]]] = {
            "completes": {("completed", None)},
            "cancel-queued": {("cancelled", "cancelled")},
            "cancel-running": {("cancelled", "cancelled")},
            "race": {("cancelled", "cancelled"), ("completed", "too_late")},
        }
        for entry in self.entries:
            ending = (entry.status, entry.outcome)
            # A race cancel that reached the API after the completion was refused there.
            refused_late = entry.refused is not None and ending == ("completed", None)
            if ending not in expected[entry.name] and not refused_late:
                want = " or ".join(f"{s}/{o or 'no cancel'}" for s, o in expected[entry.name])
                raise DemoError(
                    f"workflow '{entry.name}' ended {ending[0]}/{ending[1] or 'no cancel'}, "
                    f"expected {want}{self._see_logs()}"
                )

    def _see_logs(self) -> str:
        return f"; see the logs in {self.stack.log_dir}"


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("message", response.text))
    except ValueError:
        return response.text[:200]


def explanation(entry: Entry) -> str:
    if entry.name == "completes":
        return "completed: nobody cancelled it; its outputs are in GET /v1/workflow/{id}."
    if entry.name == "cancel-queued":
        return ("cancelled: its prompt was taken out of ComfyUI's pending queue before it "
                "started; the prompt running ahead of it was not touched.")
    if entry.name == "cancel-running":
        return ("cancelled: its runner interrupted its own prompt between two steps, and "
                "ComfyUI confirmed before the grace period ran out.")
    if entry.status == "cancelled":
        return ("cancelled: the interrupt reached ComfyUI before its last step; the cancel "
                "won the race.")
    if entry.refused:
        return ("completed: it finished before the cancel reached the API, which refused it "
                "(400); a completed workflow stays completed.")
    return ("completed, outcome too_late: it finished before the interrupt landed; the "
            "runner's completion won the race and a completed workflow stays completed.")


def table(entries: list[Entry]) -> str:
    header = ("workflow", "what the demo did", "final status", "cancel outcome",
              "cancel -> outcome")
    rows = [header]
    for entry in entries:
        seconds = entry.cancel_seconds()
        outcome = entry.outcome or ("refused (400)" if entry.refused else "-")
        rows.append((entry.name, entry.did, entry.status, outcome,
                     "-" if seconds is None else f"{seconds:.2f} s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def main(args: argparse.Namespace, settings: Settings) -> int:
    """``comfy-cancel demo``: start, show, stop; 0 when every workflow ended as it should."""
    temporary = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="comfy-cancel-demo-")) if temporary \
        else Path(args.data_dir)
    if not explicit_setting("RATE_LIMIT_REQUESTS"):
        # The demo polls every POLL_SECONDS to time its cancels: more than a customer's
        # token may (40 requests per 10 s).
        settings = settings.model_copy(update={"rate_limit_requests": 0})
    stack = EmbeddedStack.from_environment(
        data_dir, settings, api_port=args.port, time_scale=args.time_scale, echo=say
    )
    say(f"starting the stack in {stack.data_dir}")
    succeeded = False
    with sigterm_as_interrupt():
        try:
            with stack:
                entries = Demo(stack, args.time_scale).run()
                say("")
                say(table(entries))
                say("")
                for entry in entries:
                    say(f"{entry.name}: {explanation(entry)}")
                succeeded = True
                if args.keep_running:
                    say(banner(stack, "The stack is still running; Ctrl-C stops it."))
                    stack.wait()
        except KeyboardInterrupt:
            say("stopped")
            return 0 if succeeded else 130
        finally:
            # A failed run keeps its logs: the error message points at them.
            if temporary and succeeded:
                shutil.rmtree(data_dir, ignore_errors=True)
    return 0
