"""A simulated ComfyUI server: the same HTTP and WebSocket API, no GPU, no models.

It is the embedded default runner, the demo's runner and the tests' runner. It
follows ``COMFYUI_API.md`` (ComfyUI v0.3.64 plus the newer jobs API), so the
runner client cannot tell it from a real ComfyUI server. Every route is also
served under ``/api``.

What it simulates:

- ``POST /prompt`` validates like ComfyUI (unknown ``class_type``, missing
  required inputs, out-of-range or out-of-list values, bad or dangling links,
  no output node) and answers with ComfyUI's 400 shape; ``number`` advances
  even when validation fails.
- A real pending queue, executed one prompt at a time by a background task in
  dependency order. The no-model node types (``EmptyImage``, ``ImageScale``,
  ``ImageScaleBy``, ``ImageInvert``, ``ImageBlur``, ``SaveImage``,
  ``PreviewImage``, ``EmptyLatentImage``, ``LatentUpscale``) do no pixel work:
  each sleeps for a duration derived from its size (``ImageBlur`` at radius 31
  takes about 0.35 s at 512x512 and 0.8 s at 768x768, like a 2-core CPU),
  multiplied by ``time_scale``.
- Cooperative interruption like ComfyUI: the interrupt flag is checked before
  each node and at each progress step (``ImageBlur`` runs in 10 steps and sends
  ``progress`` events); the flag is reset when the next prompt starts.
- Events over ``/ws?clientId=...``, to the submitting client only, in
  ComfyUI's order: ``execution_success`` before the history entry is written,
  ``executing`` with ``node: null`` after it.
- ``POST /queue`` (delete, clear), ``POST /interrupt`` (targeted and bare),
  ``/history``, ``/system_stats`` (``comfyui_version`` ``0.3.64-sim``), and
  the newer ``POST /api/jobs/{prompt_id}/cancel`` and ``POST /api/jobs/cancel``,
  which ``jobs_api=False`` (``--no-jobs-api``) removes to emulate v0.3.64.

Test hooks (neither exists in ComfyUI; the runner must never rely on them):

- Error injection: a ``SaveImage`` whose ``filename_prefix`` starts with
  ``"fail"`` (``fail_prefix``; ``None`` turns it off) raises ``RuntimeError``
  at that node, which produces a real ``execution_error`` and an error history
  entry. A node input is used because it needs nothing outside the prompt.
- Sim-only routes under ``/sim`` (never under ``/api``, never checked against
  ``required_headers``): ``GET /sim/calls`` returns the cancel-related calls
  received (``interrupt``, ``queue_delete``, ``queue_clear``, ``jobs_cancel``,
  each with ``prompt_id``, the prompt running at the time, whether it took
  effect, and wall-clock ``at`` plus ``monotonic`` timestamps) and the log of
  every API request (method, path, status); ``POST /sim/reset`` empties both
  logs; ``POST /sim/drop_websockets`` closes every WebSocket, as a network
  drop or a restart would.
- ``required_headers``: when set, any API request (the WebSocket included)
  without these exact header values gets 401, so tests can prove the runner
  sends its extra headers on every call.

Run it with ``python -m comfy_cancel.embedded.comfyui_sim --port 8188 --time-scale 1.0``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from comfy_cancel.embedded.comfyui_sim.nodes import NODE_TYPES, Tensor, plan
from comfy_cancel.embedded.comfyui_sim.validation import (
    comfy_error,
    execution_order,
    validate_prompt,
)

log = logging.getLogger(__name__)
SIM_VERSION = "0.3.64-sim"
HISTORY_LIMIT = 10_000
REQUEST_LOG_LIMIT = 10_000


@dataclass
class _QueueItem:
    number: int | float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs_to_execute: list[str]
    seq: int

    def as_list(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs_to_execute]

    @property
    def client_id(self) -> str | None:
        client = self.extra_data.get("client_id")
        return client if isinstance(client, str) and client else None


class _Interrupted(Exception):
    pass


def _now_ms() -> int:
    return int(time.time() * 1000)


class SimComfyUI:
    """The simulated server's state and routes. One instance serves one app on one
    event loop; all state is touched from that loop only."""

    def __init__(
        self,
        *,
        time_scale: float = 1.0,
        jobs_api: bool = True,
        required_headers: Mapping[str, str] | None = None,
        fail_prefix: str | None = "fail",
        history_limit: int = HISTORY_LIMIT,
    ) -> None:
        if time_scale < 0:
            raise ValueError("time_scale must be zero or more")
        self.time_scale = time_scale
        self.jobs_api = jobs_api
        self.required_headers = dict(required_headers or {})
        self.fail_prefix = fail_prefix
        self.history_limit = history_limit

        self._number = 0
        self._seq = 0
        self._pending: list[_QueueItem] = []
        self._running: _QueueItem | None = None
        self._executing_node: str | None = None
        self._interrupt_flag = False
        self._history: dict[str, dict[str, Any]] = {}
        self._cancelled: set[str] = set()
        self._save_counters: dict[str, int] = {}
        self._sockets: dict[str, web.WebSocketResponse] = {}
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._calls: list[dict[str, Any]] = []
        self._requests: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG_LIMIT)

    # ----------------------------------------------------------------- app wiring

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
            ("GET", "/ws", self._websocket),
            ("POST", "/prompt", self._post_prompt),
            ("GET", "/prompt", self._get_prompt),
            ("GET", "/queue", self._get_queue),
            ("POST", "/queue", self._post_queue),
            ("POST", "/interrupt", self._post_interrupt),
            ("GET", "/history", self._get_history),
            ("GET", "/history/{prompt_id}", self._get_history_item),
            ("POST", "/history", self._post_history),
            ("GET", "/system_stats", self._system_stats),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
            app.router.add_route(method, "/api" + path, handler)
        if self.jobs_api:
            app.router.add_post("/api/jobs/cancel", self._jobs_cancel_many)
            app.router.add_post("/api/jobs/{prompt_id}/cancel", self._jobs_cancel)
        app.router.add_get("/sim/calls", self._sim_calls)
        app.router.add_post("/sim/reset", self._sim_reset)
        app.router.add_post("/sim/drop_websockets", self._sim_drop_websockets)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self._wakeup = asyncio.Event()
        self._worker = asyncio.create_task(self._run_queue(), name="sim-comfyui-queue")

    async def _on_shutdown(self, app: web.Application) -> None:
        # Open WebSockets would otherwise hold the shutdown for its whole timeout.
        await self.drop_websockets()

    async def _on_cleanup(self, app: web.Application) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    @web.middleware
    async def _middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if request.path.startswith("/sim/"):
            return await handler(request)
        status = 500
        try:
            missing = [
                name
                for name, value in self.required_headers.items()
                if request.headers.get(name) != value
            ]
            if missing:
                status = 401
                return web.json_response(
                    {"error": f"missing or wrong header(s): {', '.join(missing)}"}, status=401
                )
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            self._requests.append(
                {"method": request.method, "path": request.path, "status": status, **_stamp()}
            )

    # ----------------------------------------------------------------- events

    async def _send(self, event: str, data: Mapping[str, Any], sid: str | None) -> None:
        """To one client, or to every client when ``sid`` is None (ComfyUI's broadcast)."""
        text = json.dumps({"type": event, "data": data})
        targets = list(self._sockets.items()) if sid is None else [(sid, self._sockets.get(sid))]
        for target_sid, ws in targets:
            if ws is None or ws.closed:
                continue
            try:
                await ws.send_str(text)
            except Exception as exc:  # a socket that died mid-send is just gone
                log.debug("dropping WebSocket %s: %s", target_sid, exc)
                if self._sockets.get(target_sid) is ws:
                    del self._sockets[target_sid]

    def _queue_info(self) -> dict[str, Any]:
        remaining = len(self._pending) + (1 if self._running is not None else 0)
        return {"exec_info": {"queue_remaining": remaining}}

    async def _queue_updated(self) -> None:
        await self._send("status", {"status": self._queue_info()}, None)

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        # Like ComfyUI, a new connection with the same clientId takes over the old one.
        self._sockets[sid] = ws
        try:
            await self._send("status", {"status": self._queue_info(), "sid": sid}, sid)
            running = self._running
            if running is not None and running.client_id == sid and self._executing_node:
                # ComfyUI tells a reconnecting client which node of its prompt is running.
                node = self._executing_node
                await self._send(
                    "executing",
                    {"node": node, "display_node": node, "prompt_id": running.prompt_id},
                    sid,
                )
            async for _message in ws:
                pass  # clients have nothing to say that the simulation uses
        finally:
            if self._sockets.get(sid) is ws:
                del self._sockets[sid]
        return ws

    async def drop_websockets(self) -> int:
        """Close every WebSocket, as a network drop or a restart would. Returns how many."""
        sockets = list(self._sockets.values())
        self._sockets.clear()
        for ws in sockets:
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"simulated drop")
        return len(sockets)

    # ----------------------------------------------------------------- submitting

    async def _post_prompt(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        if not isinstance(body, dict):
            error = comfy_error("invalid_prompt", "Invalid request body", "expected a JSON object")
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        if "number" in body:
            try:
                number: int | float = float(body["number"])
            except (TypeError, ValueError):
                error = comfy_error(
                    "invalid_prompt", "Invalid number", f"number: {body['number']!r}"
                )
                return web.json_response({"error": error, "node_errors": {}}, status=400)
        else:
            number = self._number
            if body.get("front"):
                number = -number
            self._number += 1
        prompt = copy.deepcopy(body.get("prompt"))
        validation = validate_prompt(prompt)
        if validation.error is not None:
            log.info("invalid prompt: %s", validation.error["message"])
            return web.json_response(
                {"error": validation.error, "node_errors": validation.node_errors}, status=400
            )
        assert isinstance(prompt, dict)
        extra_data = body.get("extra_data")
        extra_data = dict(extra_data) if isinstance(extra_data, dict) else {}
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        self._seq += 1
        item = _QueueItem(number, prompt_id, prompt, extra_data, validation.outputs, self._seq)
        self._pending.append(item)
        self._pending.sort(key=lambda queued: (queued.number, queued.seq))
        await self._queue_updated()
        self._wake()
        return web.json_response(
            {"prompt_id": prompt_id, "number": number, "node_errors": validation.node_errors}
        )

    async def _get_prompt(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._queue_info())

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    # ----------------------------------------------------------------- the queue

    async def _get_queue(self, request: web.Request) -> web.StreamResponse:
        running = [self._running.as_list()] if self._running is not None else []
        pending = [item.as_list() for item in self._pending]
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def _post_queue(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        if isinstance(body, dict):
            if body.get("clear"):
                self._record("queue_clear", None, effective=bool(self._pending))
                self._cancelled.update(item.prompt_id for item in self._pending)
                self._pending.clear()
                await self._queue_updated()
            to_delete = body.get("delete")
            if isinstance(to_delete, list):
                for prompt_id in to_delete:
                    removed = self._remove_pending(prompt_id)
                    self._record("queue_delete", prompt_id, effective=removed)
                    if removed:
                        await self._queue_updated()
        return web.Response(status=200)

    def _remove_pending(self, prompt_id: Any) -> bool:
        for index, item in enumerate(self._pending):
            if item.prompt_id == prompt_id:
                del self._pending[index]
                self._cancelled.add(item.prompt_id)
                return True
        return False

    # ----------------------------------------------------------------- cancelling

    async def _post_interrupt(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        if prompt_id:
            # Targeted: only if that prompt is the one running; otherwise nothing.
            effective = self._running is not None and self._running.prompt_id == prompt_id
        else:
            # Bare: whatever runs (and, like ComfyUI, a flag nobody clears until the next start).
            effective = self._running is not None
            prompt_id = None
        if effective or prompt_id is None:
            self._interrupt_flag = True
        self._record("interrupt", prompt_id, effective=effective)
        return web.Response(status=200)

    async def _cancel_job(self, prompt_id: str) -> bool:
        if self._running is not None and self._running.prompt_id == prompt_id:
            self._interrupt_flag = True
            cancelled = True
        elif self._remove_pending(prompt_id):
            await self._queue_updated()
            cancelled = True
        else:
            # Idempotent: a job removed or interrupted before still counts as cancelled;
            # one that finished (or that nobody knows) does not.
            cancelled = prompt_id in self._cancelled or self._was_interrupted(prompt_id)
        self._record("jobs_cancel", prompt_id, effective=cancelled)
        return cancelled

    def _was_interrupted(self, prompt_id: str) -> bool:
        entry = self._history.get(prompt_id)
        messages = entry["status"]["messages"] if entry is not None else []
        return bool(messages) and messages[-1][0] == "execution_interrupted"

    async def _jobs_cancel(self, request: web.Request) -> web.StreamResponse:
        cancelled = await self._cancel_job(request.match_info["prompt_id"])
        return web.json_response({"cancelled": cancelled})

    async def _jobs_cancel_many(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        job_ids = body.get("job_ids") if isinstance(body, dict) else None
        if not isinstance(job_ids, list) or not all(isinstance(j, str) for j in job_ids):
            return web.json_response({"error": "job_ids must be a list of strings"}, status=400)
        results = {job_id: await self._cancel_job(job_id) for job_id in job_ids}
        return web.json_response({"cancelled": results})

    def _record(self, kind: str, prompt_id: str | None, *, effective: bool) -> None:
        running = self._running.prompt_id if self._running is not None else None
        self._calls.append(
            {
                "kind": kind,
                "prompt_id": prompt_id,
                "running": running,
                "effective": effective,
                **_stamp(),
            }
        )

    # ----------------------------------------------------------------- results

    async def _get_history(self, request: web.Request) -> web.StreamResponse:
        entries = list(self._history.items())
        max_items = request.query.get("max_items")
        if max_items is not None and max_items.isdigit():
            entries = entries[-int(max_items) :] if int(max_items) else []
        return web.json_response(dict(entries))

    async def _get_history_item(self, request: web.Request) -> web.StreamResponse:
        prompt_id = request.match_info["prompt_id"]
        entry = self._history.get(prompt_id)
        return web.json_response({} if entry is None else {prompt_id: entry})

    async def _post_history(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        if isinstance(body, dict):
            if body.get("clear"):
                self._history.clear()
            for prompt_id in body.get("delete") or []:
                self._history.pop(prompt_id, None)
        return web.Response(status=200)

    async def _system_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "system": {
                    "os": os.name,
                    "ram_total": _ram_bytes(),
                    "ram_free": _ram_bytes("SC_AVPHYS_PAGES"),
                    "comfyui_version": SIM_VERSION,
                    "python_version": sys.version,
                    "pytorch_version": "none (simulated)",
                    "embedded_python": False,
                    "argv": sys.argv,
                },
                "devices": [
                    {
                        "name": "cpu",
                        "type": "cpu",
                        "index": None,
                        "vram_total": 0,
                        "vram_free": 0,
                        "torch_vram_total": 0,
                        "torch_vram_free": 0,
                    }
                ],
            }
        )

    # ----------------------------------------------------------------- sim-only routes

    async def _sim_calls(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"calls": self._calls, "requests": list(self._requests)})

    async def _sim_reset(self, request: web.Request) -> web.StreamResponse:
        self._calls = []
        self._requests.clear()
        return web.Response(status=200)

    async def _sim_drop_websockets(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"dropped": await self.drop_websockets()})

    # ----------------------------------------------------------------- execution

    async def _run_queue(self) -> None:
        assert self._wakeup is not None
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            item = self._pending.pop(0)
            self._running = item
            await self._queue_updated()
            try:
                result = await self._execute(item)
            except Exception:  # a sim bug must not kill the queue
                log.exception("simulated execution of %s failed", item.prompt_id)
                result = {"outputs": {}, "meta": {}, "status": _status(False, [])}
            if len(self._history) >= self.history_limit:
                self._history.pop(next(iter(self._history)))
            self._history[item.prompt_id] = {"prompt": item.as_list(), **result}
            self._running = None
            self._executing_node = None
            await self._queue_updated()
            # Only now is the result readable from /history: ComfyUI's "done" signal.
            await self._send(
                "executing",
                {"node": None, "display_node": None, "prompt_id": item.prompt_id},
                item.client_id,
            )

    async def _execute(self, item: _QueueItem) -> dict[str, Any]:
        prompt_id = item.prompt_id
        client = item.client_id
        self._interrupt_flag = False  # reset when a prompt starts, like ComfyUI
        messages: list[list[Any]] = []

        async def add_message(event: str, data: dict[str, Any], broadcast: bool = False) -> None:
            data = {**data, "timestamp": _now_ms()}
            messages.append([event, data])
            if client is not None or broadcast:
                await self._send(event, data, client)

        await add_message("execution_start", {"prompt_id": prompt_id})
        await add_message("execution_cached", {"nodes": [], "prompt_id": prompt_id})
        values: dict[str, tuple[Tensor, ...]] = {}
        executed: list[str] = []
        outputs: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        success = False
        for node_id in execution_order(item.prompt, item.outputs_to_execute):
            class_type = item.prompt[node_id]["class_type"]
            args: dict[str, Any] = {}
            try:
                self._check_interrupt()
                self._executing_node = node_id
                await self._send(
                    "executing",
                    {"node": node_id, "display_node": node_id, "prompt_id": prompt_id},
                    client,
                )
                args = _resolve_inputs(item.prompt[node_id], values)
                values[node_id], ui = await self._run_node(
                    prompt_id, node_id, class_type, args, client
                )
            except _Interrupted:
                await add_message(
                    "execution_interrupted",
                    {
                        "prompt_id": prompt_id,
                        "node_id": node_id,
                        "node_type": class_type,
                        "executed": list(executed),
                    },
                    broadcast=True,
                )
                break
            except Exception as exc:
                await add_message(
                    "execution_error",
                    {
                        "prompt_id": prompt_id,
                        "node_id": node_id,
                        "node_type": class_type,
                        "executed": list(executed),
                        "exception_message": f"{exc}\n",
                        "exception_type": _full_type_name(type(exc)),
                        "traceback": traceback.format_tb(exc.__traceback__),
                        "current_inputs": {name: [repr(v)] for name, v in args.items()},
                        "current_outputs": list(executed),
                    },
                )
                break
            executed.append(node_id)
            if ui is not None:
                outputs[node_id] = ui
                meta[node_id] = {
                    "node_id": node_id,
                    "display_node": node_id,
                    "parent_node": None,
                    "real_node_id": node_id,
                }
                await self._send(
                    "executed",
                    {
                        "node": node_id,
                        "display_node": node_id,
                        "output": ui,
                        "prompt_id": prompt_id,
                    },
                    client,
                )
        else:
            success = True
            await add_message("execution_success", {"prompt_id": prompt_id})
        return {"outputs": outputs, "meta": meta, "status": _status(success, messages)}

    def _check_interrupt(self) -> None:
        if self._interrupt_flag:
            raise _Interrupted

    async def _run_node(
        self,
        prompt_id: str,
        node_id: str,
        class_type: str,
        args: dict[str, Any],
        client: str | None,
    ) -> tuple[tuple[Tensor, ...], dict[str, Any] | None]:
        if (
            class_type == "SaveImage"
            and self.fail_prefix is not None
            and str(args["filename_prefix"]).startswith(self.fail_prefix)
        ):
            raise RuntimeError(
                f"Simulated failure: SaveImage filename_prefix {args['filename_prefix']!r} "
                f"starts with {self.fail_prefix!r}"
            )
        work = plan(class_type, args)
        step_seconds = work.seconds * self.time_scale / work.steps
        for step in range(1, work.steps + 1):
            await asyncio.sleep(step_seconds)
            if work.steps > 1:
                self._check_interrupt()
                await self._send(
                    "progress",
                    {"value": step, "max": work.steps, "prompt_id": prompt_id, "node": node_id},
                    client,
                )
        return work.outputs, self._ui_output(class_type, args)

    def _ui_output(self, class_type: str, args: dict[str, Any]) -> dict[str, Any] | None:
        if class_type not in ("SaveImage", "PreviewImage"):
            return None
        images: Tensor = args["images"]
        if class_type == "SaveImage":
            subfolder, _, name = str(args["filename_prefix"]).rpartition("/")
            kind = "output"
        else:
            subfolder, name, kind = "", "ComfyUI_temp_" + uuid.uuid4().hex[:5], "temp"
        files = []
        for _ in range(images.batch):
            # Numbered per prefix, like ComfyUI's SaveImage.
            key = f"{subfolder}/{name}"
            self._save_counters[key] = self._save_counters.get(key, 0) + 1
            filename = f"{name}_{self._save_counters[key]:05}_.png"
            files.append({"filename": filename, "subfolder": subfolder, "type": kind})
        return {"images": files}


def _resolve_inputs(
    node: Mapping[str, Any], values: Mapping[str, tuple[Tensor, ...]]
) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for name in NODE_TYPES[node["class_type"]].inputs:
        value = node["inputs"][name]
        if isinstance(value, list):
            value = values[value[0]][value[1]]
        args[name] = value
    return args


def _status(success: bool, messages: list[list[Any]]) -> dict[str, Any]:
    return {
        "status_str": "success" if success else "error",
        "completed": success,
        "messages": messages,
    }


def _stamp() -> dict[str, float]:
    return {"at": time.time(), "monotonic": time.monotonic()}


def _full_type_name(kind: type) -> str:
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def _ram_bytes(pages: str = "SC_PHYS_PAGES") -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf(pages)
    except (AttributeError, ValueError, OSError):
        return 0  # no sysconf (Windows): the health check does not need it


async def _json_body(request: web.Request) -> Any:
    """The JSON body, or {} when there is none or it does not parse (as ComfyUI does)."""
    raw = await request.read()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return {}


@dataclass
class RunningSim:
    """A simulated server running in a background thread (for tests and the embedded stack)."""

    url: str
    host: str
    port: int
    sim: SimComfyUI
    _loop: asyncio.AbstractEventLoop
    _thread: threading.Thread
    _runner: web.AppRunner

    def drop_websockets(self) -> int:
        """Close every WebSocket from the server side; returns how many were open."""
        return asyncio.run_coroutine_threadsafe(self.sim.drop_websockets(), self._loop).result(5)

    def stop(self, timeout: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        try:
            future.result(timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> RunningSim:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


async def _start_site(sim: SimComfyUI, host: str, port: int) -> tuple[web.AppRunner, str, int]:
    runner = web.AppRunner(sim.make_app(), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    return runner, str(bound_host), int(bound_port)


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def start_in_thread(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    time_scale: float = 1.0,
    jobs_api: bool = True,
    required_headers: Mapping[str, str] | None = None,
    fail_prefix: str | None = "fail",
) -> RunningSim:
    """Start a simulated server on its own event loop in a daemon thread; port 0
    picks a free port (read it from ``.url``). Raises OSError if it cannot bind."""
    sim = SimComfyUI(
        time_scale=time_scale,
        jobs_api=jobs_api,
        required_headers=required_headers,
        fail_prefix=fail_prefix,
    )
    loop = asyncio.new_event_loop()
    started: dict[str, Any] = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started["result"] = loop.run_until_complete(_start_site(sim, host, port))
        except BaseException as exc:
            started["error"] = exc
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name=f"sim-comfyui-{port}", daemon=True)
    thread.start()
    ready.wait()
    if "error" in started:
        thread.join()
        raise started["error"]
    runner, bound_host, bound_port = started["result"]
    return RunningSim(
        _url(bound_host, bound_port), bound_host, bound_port, sim, loop, thread, runner
    )


async def serve(
    host: str = "127.0.0.1",
    port: int = 8188,
    *,
    time_scale: float = 1.0,
    jobs_api: bool = True,
    required_headers: Mapping[str, str] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (or the task is cancelled)."""
    sim = SimComfyUI(time_scale=time_scale, jobs_api=jobs_api, required_headers=required_headers)
    runner, bound_host, bound_port = await _start_site(sim, host, port)
    jobs = "on" if jobs_api else "off (emulating v0.3.64)"
    log.info(
        "Simulated ComfyUI listening on %s (time scale %s, jobs API %s)",
        _url(bound_host, bound_port),
        time_scale,
        jobs,
    )
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m comfy_cancel.embedded.comfyui_sim",
        description="Run the simulated ComfyUI server (ComfyUI's HTTP and WebSocket API, "
        "no-model nodes, simulated time).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8188, help="port (default 8188; 0 picks one)")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiplies every node's simulated duration (default 1.0; 0.1 is ten times faster)",
    )
    parser.add_argument(
        "--no-jobs-api",
        action="store_true",
        help="serve no /api/jobs routes, like ComfyUI v0.3.64",
    )
    args = parser.parse_args(argv)
    if args.time_scale < 0:
        parser.error("--time-scale must be zero or more")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
                loop.add_signal_handler(signum, stop.set)
        await serve(
            args.host,
            args.port,
            time_scale=args.time_scale,
            jobs_api=not args.no_jobs_api,
            stop=stop,
        )

    try:
        asyncio.run(run())
    except OSError as exc:
        print(
            f"Cannot listen on {args.host}:{args.port}: {exc.strerror or exc}. "
            "Pick another --port, or stop the process that uses it.",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        pass
    log.info("Simulated ComfyUI stopped")
    return 0
