"""The runner's client for one ComfyUI server: HTTP calls and the WebSocket event stream.

It speaks ComfyUI's API as ``COMFYUI_API.md`` describes it and nothing else, so it
drives a real ComfyUI server and the simulated one (:mod:`comfy_cancel.embedded.comfyui_sim`)
alike. The runner's extra headers go on every call, the WebSocket included.

Cancelling never uses a bare ``POST /interrupt``: on a shared server that stops
whatever runs, possibly another workflow's prompt. :meth:`ComfyUIClient.cancel`
prefers the jobs API (``POST /api/jobs/{id}/cancel``, newer ComfyUI) and falls
back to removing the prompt from the pending queue, then the targeted interrupt
(``{"prompt_id": ...}``, ComfyUI v0.3.56 and later) only if ``/queue`` shows it
running, so an older server that ignores the prompt id is never asked to stop
someone else's prompt.

The client does not retry: each method makes its calls once and raises
:class:`ComfyUIError` when the server is unreachable or answers something
unexpected. Retry policy belongs to the caller. One :class:`ComfyUIClient` may be
shared by threads; one :class:`EventStream` is read by one thread at a time (and
closed from any).

Error messages and logs name a server by :func:`redact_url`: a runner's endpoint may
carry credentials (``user:pass@host``, ``?token=``), and those messages end up in a
workflow's ``exception_message`` and in log files.

Every connection, HTTP and WebSocket, goes through an :class:`~comfy_cancel.egress.EgressPolicy`:
the address connected to is the address checked (a customer's URL must not lead a worker
to Redis or the cloud's metadata service). A failure to connect, for whatever reason
(refused, timed out, reset, blocked), reads the same to the customer, so that a runner URL
cannot be used to scan the operator's network; the detail goes to the worker's log.

A call that fails is counted by runner id and call (:func:`metrics.comfyui_error`): once,
by the outermost call (a cancel that reads ``/queue`` and fails there is one failed cancel).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar, cast
from urllib.parse import quote, urlsplit, urlunsplit

import httpcore
import httpx
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from comfy_cancel import metrics
from comfy_cancel.config import get_settings
from comfy_cancel.egress import EgressDenied, EgressPolicy
from comfy_cancel.redact import redact_url

log = logging.getLogger(__name__)

# Polling /queue for a cancelled prompt to be let go: quick at first (an acknowledged
# interrupt is usually released within milliseconds), at most this far apart after.
RELEASE_FIRST_WAIT_SECONDS = 0.02
RELEASE_MAX_WAIT_SECONDS = 0.5
# Statuses a WebSocket reconnect cannot fix by waiting.
_FATAL_WS_STATUSES = frozenset({400, 401, 403, 404})
# websockets 17 warns unless asked for a plain connection; older releases lack the flag.
_WS_LEGACY: dict[str, Any] = (
    {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}
)

F = TypeVar("F", bound=Callable[..., Any])
_counting = threading.local()


def _counted(call: str) -> Callable[[F], F]:
    """Count a :class:`ComfyUIError` out of this method as a failed ``call`` of the
    object's runner, unless an outer counted call of this thread counts it. A prompt that
    ComfyUI rejected is an answer, not a failed call."""

    def wrap(method: F) -> F:
        @functools.wraps(method)
        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(_counting, "active", False):
                return method(self, *args, **kwargs)
            _counting.active = True
            try:
                return method(self, *args, **kwargs)
            except PromptRejected:
                raise
            except ComfyUIError:
                metrics.comfyui_error(self.runner_id, call)
                raise
            finally:
                _counting.active = False

        return cast(F, counted)

    return wrap


class ComfyUIError(Exception):
    """ComfyUI was unreachable or gave an unexpected answer; the message says which URL
    and what happened. ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None):
        super().__init__(message)
        self.url = url
        self.status = status


class PromptRejected(ComfyUIError):
    """``POST /prompt`` answered 400: the prompt failed ComfyUI's validation."""

    def __init__(self, url: str, error: dict[str, Any], node_errors: dict[str, Any]) -> None:
        super().__init__(_describe_rejection(url, error, node_errors), url=url, status=400)
        self.error = error
        self.node_errors = node_errors


@dataclass(frozen=True)
class Submitted:
    prompt_id: str
    number: int


@dataclass(frozen=True)
class QueueState:
    """Prompt ids in ComfyUI's queue; ``pending`` in the order they will run."""

    running: list[str]
    pending: list[str]

    def contains(self, prompt_id: str) -> bool:
        return prompt_id in self.running or prompt_id in self.pending

    def is_running(self, prompt_id: str) -> bool:
        return prompt_id in self.running

    def position(self, prompt_id: str) -> int | None:
        """How many pending prompts run before this one (0: it runs next), or None
        when it is not pending."""
        try:
            return self.pending.index(prompt_id)
        except ValueError:
            return None


@dataclass(frozen=True)
class Event:
    """One WebSocket event. Besides ComfyUI's types, :class:`EventStream` makes two:
    ``reconnected`` (events may have been missed: reconcile from ``/queue`` and
    ``/history``) and ``closed`` (the stream was closed by :meth:`EventStream.close`)."""

    type: str
    data: dict[str, Any]

    @property
    def prompt_id(self) -> str | None:
        value = self.data.get("prompt_id")
        return value if isinstance(value, str) else None


RECONNECTED = "reconnected"
CLOSED = "closed"


def unreachable_message(shown_url: str, timeout: float) -> str:
    """What a customer is told about any failure to talk to a server: one sentence for
    refused, timed out, reset or blocked, so that it tells nothing about the network."""
    return (f"ComfyUI at {shown_url} is unreachable or did not answer within {timeout:g} s; "
            "check the runner's endpoint_url and that the server is up")


class _GuardedBackend(httpcore.SyncBackend):
    """httpcore's socket backend that connects only to addresses the policy allows: it
    resolves and checks the name itself and hands httpcore the checked address, so the
    connection goes where the check looked (TLS still verifies the URL's host name)."""

    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = self._policy.resolve(host, port)
        except EgressDenied as exc:
            raise httpcore.ConnectError(f"blocked by the egress policy: {exc}") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        last: Exception | None = None
        for ip, _ in addresses:
            try:
                return super().connect_tcp(str(ip), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last


def guarded_transport(policy: EgressPolicy) -> httpx.HTTPTransport:
    """An httpx transport whose connections pass ``policy``. httpx has no parameter for
    httpcore's network backend, so the pool is rebuilt with the same defaults and ours."""
    ssl_context = httpx.create_ssl_context()  # loading the CA bundle is the costly part
    transport = httpx.HTTPTransport(verify=ssl_context)
    transport._pool = httpcore.ConnectionPool(
        ssl_context=ssl_context,
        max_connections=100,
        max_keepalive_connections=20,
        keepalive_expiry=5.0,
        network_backend=_GuardedBackend(policy),
    )
    return transport


class _ClosedOnExit:
    """A ``with`` block closes it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ComfyUIClient(_ClosedOnExit):
    """HTTP calls to one ComfyUI server. ``base_url`` is the server's root
    (``http://host:8188``, or a proxy path in front of it)."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        egress: EgressPolicy | None = None,
        runner_id: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.runner_id = runner_id  # the label of its failed calls
        self.shown_url = redact_url(self.base_url)  # for messages and logs
        self.timeout = timeout
        self.egress = egress if egress is not None else EgressPolicy.of(get_settings())
        self._headers = dict(headers or {})
        # No proxy from the environment: the egress check must see the address connected to.
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._headers, timeout=timeout,
            transport=guarded_transport(self.egress), trust_env=False,
        )
        # None until the first cancel tells whether the server has the jobs API.
        self._jobs_api: bool | None = None

    @property
    def jobs_api_supported(self) -> bool | None:
        """Whether the server has ``/api/jobs/.../cancel``; None until a cancel found out."""
        return self._jobs_api

    # ------------------------------------------------------------------ calls

    @_counted("system_stats")
    def system_stats(self) -> dict[str, Any]:
        """A cheap health check: the server's versions and devices."""
        return _expect_dict(self._call("GET", "/system_stats"))

    @_counted("submit")
    def submit(
        self, prompt: dict[str, Any], client_id: str, prompt_id: str | None = None
    ) -> Submitted:
        """Queue ``prompt``; events about it go to the WebSocket of ``client_id``.
        Raises :class:`PromptRejected` when ComfyUI's validation refuses it."""
        body: dict[str, Any] = {"prompt": prompt, "client_id": client_id}
        if prompt_id is not None:
            body["prompt_id"] = prompt_id
        response = self._send("POST", "/prompt", body)
        if response.status_code == 400:
            answer = _json_or_none(response)
            if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
                node_errors = answer.get("node_errors")
                raise PromptRejected(
                    redact_url(str(response.request.url)),
                    answer["error"],
                    node_errors if isinstance(node_errors, dict) else {},
                )
        answer = _expect_dict(self._checked(response))
        try:
            return Submitted(prompt_id=str(answer["prompt_id"]), number=int(answer["number"]))
        except (KeyError, TypeError, ValueError):
            raise _unexpected(response, "no prompt_id and number in the answer") from None

    @_counted("queue")
    def queue(self) -> QueueState:
        answer = _expect_dict(self._call("GET", "/queue"))
        return QueueState(
            running=[item[1] for item in _queue_items(answer.get("queue_running"))],
            pending=[item[1] for item in _queue_items(answer.get("queue_pending"))],
        )

    @_counted("delete_pending")
    def delete_pending(self, prompt_ids: Sequence[str]) -> None:
        """Remove these prompts from the pending queue; never touches the running one."""
        if prompt_ids:
            self._call("POST", "/queue", {"delete": list(prompt_ids)})

    @_counted("interrupt")
    def interrupt(self, prompt_id: str) -> None:
        """Interrupt ``prompt_id`` if, and only if, it is the prompt running."""
        # An empty id would make ComfyUI interrupt whatever runs.
        _require_id(prompt_id)
        self._call("POST", "/interrupt", {"prompt_id": prompt_id})

    @_counted("cancel")
    def cancel(self, prompt_id: str) -> None:
        """Cancel ``prompt_id`` wherever it is: removed if pending, interrupted if
        running, nothing if it already finished. Idempotent."""
        _require_id(prompt_id)
        if self._jobs_api is not False:
            response = self._send("POST", f"/api/jobs/{quote(prompt_id, safe='')}/cancel", {})
            if not self._jobs_api_missing(response):
                self._checked(response)
                self._jobs_api = True
                return
        self._cancel_by_queue([prompt_id])

    @_counted("cancel_many")
    def cancel_many(self, prompt_ids: Sequence[str]) -> None:
        """:meth:`cancel` for several prompts, in as few calls as the server allows."""
        ids = list(prompt_ids)
        for prompt_id in ids:
            _require_id(prompt_id)
        if not ids:
            return
        if self._jobs_api is not False:
            response = self._send("POST", "/api/jobs/cancel", {"job_ids": ids})
            if not self._jobs_api_missing(response):
                self._checked(response)
                self._jobs_api = True
                return
        self._cancel_by_queue(ids)

    def _cancel_by_queue(self, ids: list[str]) -> None:
        """Without the jobs API: delete the pending ones, interrupt the running one."""
        # Delete first: after it none of them can start, so whichever of them runs now
        # is the only one left to interrupt. Interrupt only a prompt ``/queue`` shows
        # running: before v0.3.56 ComfyUI ignores the targeted form's prompt_id and
        # would stop whatever runs, possibly another workflow's prompt.
        self.delete_pending(ids)
        for prompt_id in self.queue().running:
            if prompt_id in ids:
                self.interrupt(prompt_id)

    @_counted("history")
    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of ``prompt_id``, or None while ComfyUI has none (queued,
        running, or unknown). Read it after ``executing`` with ``node: null``."""
        _require_id(prompt_id)
        answer = _expect_dict(self._call("GET", f"/history/{quote(prompt_id, safe='')}"))
        entry = answer.get(prompt_id)
        return entry if isinstance(entry, dict) else None

    def wait_released(
        self, prompt_ids: Sequence[str], timeout: float, *, history: bool = True
    ) -> dict[str, dict[str, Any] | None]:
        """Wait up to ``timeout`` seconds until the server holds none of ``prompt_ids``
        (``/queue`` shows each neither running nor pending), polling with backoff (20 ms,
        doubling, at most 0.5 s apart): after an interrupt, a prompt leaves the running
        slot only once its node has stopped and its history entry is written.

        Returns the prompts seen released, each with its history entry when ``history``
        (None when ComfyUI has none: a prompt removed while pending, or never known). A
        prompt still held at the deadline, or all of them when the server did not answer,
        is left out: not confirmed. Never raises :class:`ComfyUIError`.
        """
        wanted = list(dict.fromkeys(prompt_ids))
        deadline = time.monotonic() + timeout
        wait = RELEASE_FIRST_WAIT_SECONDS
        released: dict[str, dict[str, Any] | None] = {}
        while True:
            try:
                queue = self.queue()
                for prompt_id in wanted:
                    if prompt_id not in released and not queue.contains(prompt_id):
                        released[prompt_id] = self.history(prompt_id) if history else None
            except ComfyUIError as exc:
                log.info("release of %d prompts not confirmed yet on %s: %s", len(wanted),
                         self.shown_url, exc)
            if len(released) == len(wanted) or time.monotonic() + wait > deadline:
                return released
            time.sleep(wait)
            wait = min(wait * 2, RELEASE_MAX_WAIT_SECONDS)

    @_counted("watch")
    def watch(self, client_id: str, *, reconnect_timeout: float = 30.0) -> EventStream:
        """Open the event stream of ``client_id`` (submit with the same id).
        Raises :class:`ComfyUIError` if the WebSocket cannot be opened."""
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        path = parts.path.rstrip("/") + "/ws"
        url = urlunsplit((scheme, parts.netloc, path, f"clientId={quote(client_id)}", ""))
        return EventStream(
            url, self._headers, open_timeout=self.timeout, reconnect_timeout=reconnect_timeout,
            egress=self.egress, runner_id=self.runner_id,
        )

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ plumbing

    def _send(self, method: str, path: str, body: Any = None) -> httpx.Response:
        url = self.shown_url + path
        try:
            return self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            log.warning("%s %s failed: %s: %s", method, url, type(exc).__name__, exc)
            raise ComfyUIError(unreachable_message(url, self.timeout), url=url) from None

    def _call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return self._checked(self._send(method, path, body))

    @staticmethod
    def _checked(response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        hint = " (check the runner's extra headers)" if response.status_code in (401, 403) else ""
        raise _unexpected(response, f"HTTP {response.status_code}{hint}")

    def _jobs_api_missing(self, response: httpx.Response) -> bool:
        if response.status_code in (404, 405):
            log.info("%s has no jobs API; cancelling by queue delete and interrupt", self.shown_url)
            self._jobs_api = False
            return True
        return False


class EventStream(_ClosedOnExit):
    """ComfyUI's event WebSocket for one client id.

    :meth:`next_event` returns the next event, or None on timeout; binary frames
    (previews) are skipped. When the socket drops it reconnects with backoff for
    up to ``reconnect_timeout`` seconds, then returns ``Event("reconnected", {})``:
    events may have been missed, so the caller reconciles from ``/queue`` and
    ``/history``. If it cannot reconnect it raises :class:`ComfyUIError`.

    :meth:`close` may be called from another thread: a :meth:`next_event` in
    progress (reconnecting included) then returns ``Event("closed", {})``, and so
    does every later call.
    """

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str] | None = None,
        *,
        open_timeout: float = 10.0,
        reconnect_timeout: float = 30.0,
        egress: EgressPolicy | None = None,
        runner_id: str | None = None,
    ) -> None:
        self.url = url
        self.runner_id = runner_id
        self.shown_url = redact_url(url)  # for messages and logs
        self.egress = egress if egress is not None else EgressPolicy.of(get_settings())
        self.reconnect_timeout = reconnect_timeout
        self._headers = dict(headers or {})
        self._open_timeout = open_timeout
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._ws: ClientConnection | None = self._open(open_timeout)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @_counted("events")
    def next_event(self, timeout: float) -> Event | None:
        """Wait up to ``timeout`` seconds for an event. A reconnect can take longer,
        up to ``reconnect_timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            ws = self._ws
            if ws is None or self._closed.is_set():
                return Event(CLOSED, {})
            try:
                message = ws.recv(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return None
            except ConnectionClosed:
                if self._closed.is_set():
                    return Event(CLOSED, {})
                log.info("WebSocket %s dropped; reconnecting", self.shown_url)
                return self._reconnect()
            if isinstance(message, str):
                event = _parse_event(message)
                if event is not None:
                    return event

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            ws = self._ws
        if ws is not None:
            try:
                ws.close()
            except Exception as exc:  # closing a dead socket has nothing left to report
                log.debug("closing %s: %s", self.shown_url, exc)

    def _reconnect(self) -> Event:
        started = time.monotonic()
        delay = 0.1
        last_error: ComfyUIError | None = None
        while True:
            remaining = self.reconnect_timeout - (time.monotonic() - started)
            if remaining <= 0:
                raise ComfyUIError(
                    f"Lost the ComfyUI event stream {self.shown_url} and could not reconnect "
                    f"within {self.reconnect_timeout:g} s",
                    url=self.shown_url,
                    status=last_error.status if last_error else None,
                )
            try:
                ws = self._open(min(self._open_timeout, remaining))
            except ComfyUIError as exc:
                if exc.status in _FATAL_WS_STATUSES:
                    raise
                last_error = exc
            else:
                with self._lock:
                    if not self._closed.is_set():
                        self._ws = ws
                        return Event(RECONNECTED, {})
                ws.close()
                return Event(CLOSED, {})
            # Waiting on the close flag lets close() cut the backoff short.
            if self._closed.wait(min(delay, max(0.0, remaining))):
                return Event(CLOSED, {})
            delay = min(delay * 2, 2.0)

    def _open(self, timeout: float) -> ClientConnection:
        # The socket is opened here, to an address the egress policy checked, and handed
        # to websockets: it would otherwise resolve the name again and connect itself.
        started = time.monotonic()
        try:
            sock = self._connect(timeout)
        except (OSError, EgressDenied) as exc:
            log.warning("WebSocket %s: cannot connect: %s: %s", self.shown_url,
                        type(exc).__name__, exc)
            raise ComfyUIError(
                unreachable_message(self.shown_url, timeout), url=self.shown_url
            ) from None
        try:
            return connect(
                self.url,
                sock=sock,
                additional_headers=self._headers,
                open_timeout=max(0.1, timeout - (time.monotonic() - started)),
                close_timeout=2.0,
                max_size=None,  # preview images arrive as large binary frames
                **_WS_LEGACY,
            )
        except InvalidStatus as exc:
            sock.close()
            status = exc.response.status_code
            hint = " (check the runner's extra headers)" if status in (401, 403) else ""
            raise ComfyUIError(
                f"ComfyUI refused the WebSocket {self.shown_url}: HTTP {status}{hint}",
                url=self.shown_url,
                status=status,
            ) from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            sock.close()
            log.warning("WebSocket %s: cannot open: %s: %s", self.shown_url,
                        type(exc).__name__, exc)
            raise ComfyUIError(
                unreachable_message(self.shown_url, timeout), url=self.shown_url
            ) from None

    def _connect(self, timeout: float) -> socket.socket:
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        sock = self.egress.connect(parts.hostname or "", port, timeout)
        sock.settimeout(None)
        return sock


# ---------------------------------------------------------------------- history helpers


def outputs_from_history(entry: Mapping[str, Any]) -> dict[str, Any]:
    """``{node_id: {"images": [{"filename", "subfolder", "type"}, ...]}}`` of a history
    entry. ``type`` is ``output`` for saved images and ``temp`` for previews."""
    outputs = entry.get("outputs")
    return dict(outputs) if isinstance(outputs, dict) else {}


def error_from_history(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """Where and why the prompt failed (``error_node``, ``node_type``,
    ``exception_type``, ``exception_message``), or None if it did not fail."""
    for event, data in reversed(_messages(entry)):
        if event == "execution_error":
            message = data.get("exception_message")
            return {
                "error_node": data.get("node_id"),
                "node_type": data.get("node_type"),
                "exception_type": data.get("exception_type"),
                "exception_message": message.strip() if isinstance(message, str) else message,
            }
    return None


def was_interrupted(entry: Mapping[str, Any]) -> bool:
    """True when the prompt was interrupted (its messages end with
    ``execution_interrupted``)."""
    messages = _messages(entry)
    return bool(messages) and messages[-1][0] == "execution_interrupted"


def _messages(entry: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    status = entry.get("status")
    raw = status.get("messages") if isinstance(status, dict) else None
    messages: list[tuple[str, dict[str, Any]]] = []
    for item in raw if isinstance(raw, list) else []:
        if isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[1], dict):
            messages.append((str(item[0]), item[1]))
    return messages


# ---------------------------------------------------------------------- parsing


def _require_id(prompt_id: str) -> None:
    if not isinstance(prompt_id, str) or not prompt_id:
        raise ValueError("a prompt id is required")


def _parse_event(text: str) -> Event | None:
    try:
        message = json.loads(text)
    except ValueError:
        log.debug("skipping a WebSocket frame that is not JSON: %.80s", text)
        return None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return None
    data = message.get("data")
    return Event(message["type"], data if isinstance(data, dict) else {})


def _queue_items(raw: Any) -> list[list[Any]]:
    """Queue items ``[number, prompt_id, ...]`` sorted by number: ComfyUI lists its
    pending heap in heap order, not in the order it will run."""
    items = [
        item
        for item in (raw if isinstance(raw, list) else [])
        if isinstance(item, list)
        and len(item) >= 2
        and isinstance(item[0], int | float)
        and isinstance(item[1], str)
    ]
    return sorted(items, key=lambda item: item[0])


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _expect_dict(response: httpx.Response) -> dict[str, Any]:
    answer = _json_or_none(response)
    if not isinstance(answer, dict):
        raise _unexpected(response, "the answer is not a JSON object")
    return answer


def _unexpected(response: httpx.Response, what: str) -> ComfyUIError:
    url = redact_url(str(response.request.url))
    body = response.text.strip()[:200]
    detail = f": {body}" if body else ""
    return ComfyUIError(
        f"Unexpected answer from ComfyUI at {response.request.method} {url}: {what}{detail}",
        url=url,
        status=response.status_code,
    )


def _describe_rejection(url: str, error: Mapping[str, Any], node_errors: Mapping[str, Any]) -> str:
    lines = [f"ComfyUI at {url} rejected the prompt: {error.get('message', 'invalid prompt')}"]
    details = error.get("details")
    if details and not node_errors:
        lines[0] += f" ({details})"
    for node_id, node_error in node_errors.items():
        if not isinstance(node_error, dict):
            continue
        for reason in node_error.get("errors") or []:
            if isinstance(reason, dict):
                lines.append(
                    f"node {node_id} ({node_error.get('class_type', '?')}): "
                    f"{reason.get('message', '')}: {reason.get('details', '')}"
                )
    return "\n".join(lines)
