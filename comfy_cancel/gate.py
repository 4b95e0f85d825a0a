"""What every HTTP request passes before a handler sees it: the token, the rate limit, the
size of the body, and the time it may take to arrive.

An ASGI middleware, because FastAPI reads a route's body before it resolves the route's
dependencies: a token checked in a dependency is checked after a 60 MiB body was read. Here
the order is: a ``/v1`` call (or a read of the operator page's data, ``/ops/...``) without
a valid token is answered 401 (and an operator route called with a customer's token 403)
without reading a byte of its body; then the token's rate limit (429); then the body,
refused with 413 past its route's limit (by its ``Content-Length`` at once, else as it
arrives) and with 408 when it does not arrive whole within
``COMFY_CANCEL_BODY_READ_TIMEOUT_SECONDS``. Bodies of routes other than the workflow
upload are small: they are read here whole and their JSON depth checked before the route
parses them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comfy_cancel import auth, manager
from comfy_cancel.config import Settings
from comfy_cancel.db import Database
from comfy_cancel.manager import Principal
from comfy_cancel.models import utcnow
from comfy_cancel.ratelimit import RateLimiter
from comfy_cancel.schemas import json_too_deep

log = logging.getLogger(__name__)

# The database is down, locked past its timeout, or its pool is exhausted.
DATABASE_ERRORS: tuple[type[Exception], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
)

# Room for the form's other fields and the multipart framing around the workflow file.
FORM_OVERHEAD_BYTES = 64 * 1024

# A valid token is remembered this long, so a client's calls cost no database round trip
# each; an expiry is still honoured to the second (it is checked on every use).
TOKEN_CACHE_SECONDS = 5.0
_TOKEN_CACHE_SIZE = 10_000

CHALLENGE = {"WWW-Authenticate": "Bearer"}


class ApiError(Exception):
    """An error answered as ``{"status": code, "message": message}``."""

    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers


def error_response(code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"status": code, "message": message}, status_code=code, headers=headers)


def unknown_token() -> ApiError:
    return ApiError(
        401,
        "the token is unknown or expired: ask your operator for a new one "
        "(comfy-cancel token create)",
        CHALLENGE,
    )


def operator_required() -> ApiError:
    return ApiError(
        403,
        "this call needs an operator token "
        "(comfy-cancel token create --account NAME --operator)",
    )


# The operator page itself is a public shell with no data in it; what it shows comes from
# the operator-only JSON under /ops/ (comfy_cancel/ops.py).
OPS_PAGE_PATHS = frozenset({"/ops", "/ops/"})


def needs_token(path: str) -> bool:
    """Every ``/v1`` call, and the operator page's data."""
    if path == "/v1" or path.startswith("/v1/"):
        return True
    return path.startswith("/ops/") and path not in OPS_PAGE_PATHS


def operator_only(path: str) -> bool:
    return path.startswith(("/v1/admin/", "/ops/"))


def database_unavailable(method: str, path: str, exc: Exception) -> JSONResponse:
    # The driver's error only: SQLAlchemy's own text would add the statement's parameters.
    cause = getattr(exc, "orig", None) or exc
    log.error("database unavailable on %s %s: %s", method, path, cause)
    return error_response(
        500, "the database is unavailable right now; retrying in a moment is safe"
    )


def workflow_too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"the workflow is larger than this API accepts ({limit} bytes, "
        "COMFY_CANCEL_MAX_WORKFLOW_BYTES); nothing was stored",
    )


def too_deep(limit: int, what: str = "the body") -> ApiError:
    return ApiError(
        400,
        f"{what} nests objects and lists deeper than {limit} levels "
        "(COMFY_CANCEL_MAX_JSON_DEPTH); nothing was stored",
    )


def is_workflow_upload(scope: Scope) -> bool:
    return bool(scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/workflow")


class _ClientGone(Exception):
    """The client disconnected while sending its body: nobody to answer."""


class TokenCache:
    """Valid tokens' principals by token hash, for a few seconds (unknown tokens are never
    kept: they would let anyone fill memory)."""

    def __init__(self, seconds: float = TOKEN_CACHE_SECONDS) -> None:
        self.seconds = seconds
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Principal | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or time.monotonic() - entry[0] > self.seconds:
            return None
        principal = entry[1]
        if principal.expires_at is not None and principal.expires_at <= utcnow():
            return None
        return principal

    def put(self, key: str, principal: Principal) -> None:
        with self._lock:
            if len(self._entries) >= _TOKEN_CACHE_SIZE:
                self._entries.clear()
            self._entries[key] = (time.monotonic(), principal)


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
            return None
    return None


class Gate:
    def __init__(
        self, app: ASGIApp, *, settings: Settings, db: Database, limiter: RateLimiter
    ) -> None:
        self.app = app
        self.settings = settings
        self.db = db
        self.limiter = limiter
        self.tokens = TokenCache()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        try:
            if needs_token(path):
                principal = await self._admit(scope)
                scope.setdefault("state", {})["principal"] = principal
            receive = await self._body(scope, receive)
        except ApiError as exc:
            await error_response(exc.code, exc.message, exc.headers)(scope, receive, send)
            return
        except DATABASE_ERRORS as exc:
            await database_unavailable(scope["method"], path, exc)(scope, receive, send)
            return
        except _ClientGone:
            return
        await self.app(scope, receive, send)

    # --- who is calling ------------------------------------------------------------------

    async def _admit(self, scope: Scope) -> Principal:
        token = bearer_token(scope)
        if token is None:
            raise ApiError(
                401, "missing token: send the header 'Authorization: Bearer cfc_...'", CHALLENGE
            )
        key = auth.hash_token(token)
        principal = self.tokens.get(key)
        if principal is None:
            # The database client blocks: off the event loop (a cached token needs none).
            principal = await anyio.to_thread.run_sync(self._authenticate, token, key)
        if operator_only(scope["path"]) and not principal.is_operator:
            raise operator_required()
        limit = principal.rate_limit
        if limit is None:
            limit = self.settings.rate_limit_requests
        verdict = await self.limiter.hit(principal.token_id, limit)
        if not verdict.allowed:
            raise ApiError(
                429,
                f"too many requests: this token may make {limit} every "
                f"{self.settings.rate_limit_window_seconds} s; retry after "
                f"{verdict.retry_after} s",
                {"Retry-After": str(verdict.retry_after)},
            )
        return principal

    def _authenticate(self, token: str, key: str) -> Principal:
        with self.db.transaction() as session:
            principal = manager.authenticate(session, token)
        if principal is None:
            raise unknown_token()
        self.tokens.put(key, principal)
        return principal

    # --- the body ------------------------------------------------------------------------

    async def _body(self, scope: Scope, receive: Receive) -> Receive:
        """The ``receive`` the route gets: the workflow upload streams through, counted
        and timed; any other body is read here whole, its depth checked, and replayed."""
        declared = _content_length(scope)
        if not _has_body(scope, declared):
            return receive  # nothing to read, time or check (every GET, a bare cancel)
        settings = self.settings
        upload = is_workflow_upload(scope)
        if upload:
            limit = settings.max_workflow_bytes + FORM_OVERHEAD_BYTES
            too_large = workflow_too_large(settings.max_workflow_bytes)
        else:
            admin = scope["path"].startswith("/v1/admin/")
            limit = settings.max_admin_body_bytes if admin else settings.max_body_bytes
            too_large = ApiError(
                413,
                f"the request body is larger than this route accepts ({limit} bytes, "
                f"{'COMFY_CANCEL_MAX_ADMIN_BODY_BYTES' if admin else 'COMFY_CANCEL_MAX_BODY_BYTES'}"
                "); nothing was done",
            )
        if declared is not None and declared > limit:
            raise too_large
        deadline = anyio.current_time() + settings.body_read_timeout_seconds
        timed = _timed(receive, deadline, settings.body_read_timeout_seconds)
        if upload:
            return _counted(timed, limit, too_large)
        body = await _read_whole(timed, limit, too_large)
        if body and _is_json(scope):
            depth = settings.max_json_depth
            # An operator's megabytes of ids are checked off the event loop.
            too_deep_ = (
                json_too_deep(body, depth) if len(body) <= 65536
                else await anyio.to_thread.run_sync(json_too_deep, body, depth)
            )
            if too_deep_:
                raise too_deep(depth)
        return _replay(body, receive)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _has_body(scope: Scope, declared: int | None) -> bool:
    """Whether the request may have a body. In HTTP/1.x it has one only when it declares a
    length above 0 or is sent in chunks (the server reads nothing else as its body); a
    later version may send one without either."""
    if declared is not None:
        return declared > 0
    if scope.get("http_version") not in ("1.0", "1.1"):
        return True
    return any(name == b"transfer-encoding" for name, _ in scope["headers"])


def _is_json(scope: Scope) -> bool:
    """Whether FastAPI would parse the body as JSON (it does without a content type, too)."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            kind = value.decode("latin-1").split(";")[0].strip().lower()
            return kind == "application/json" or kind.endswith("+json")
    return True


def _timed(receive: Receive, deadline: float, seconds: float) -> Receive:
    """``receive`` that raises 408 when the body is not whole by ``deadline`` (once it is,
    later calls wait as long as they like: they wait for a disconnect)."""
    done = False

    async def receive_by_deadline() -> Message:
        nonlocal done
        if done:
            return await receive()
        try:
            with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                message = await receive()
        except TimeoutError:
            raise ApiError(
                408,
                f"the request body did not arrive within {seconds:g} s "
                "(COMFY_CANCEL_BODY_READ_TIMEOUT_SECONDS); send it again",
                {"Connection": "close"},
            ) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            done = True
        return message

    return receive_by_deadline


def _counted(receive: Receive, limit: int, too_large: ApiError) -> Receive:
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise too_large
        return message

    return counted


async def _read_whole(receive: Receive, limit: int, too_large: ApiError) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Callable[[], Awaitable[Message]]:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def principal_of(state: Any) -> Principal | None:
    """The caller the gate admitted for this request (``request.state``)."""
    principal = getattr(state, "principal", None)
    return principal if isinstance(principal, Principal) else None
