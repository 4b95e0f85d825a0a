"""The HTTP API: the product's ``/v1`` contract (DESIGN.md, "The HTTP contract").

Run it with ``comfy-cancel api``, or ``uvicorn comfy_cancel.api:app`` (the module-level
``app`` is built on first use from the environment's settings), or
``uvicorn --factory comfy_cancel.api:create_app``.

Handlers are thin: parse, call :mod:`manager` / :mod:`status` / :mod:`tasks`, shape the
answer. Every error body is ``{"status": <code>, "message": "<what went wrong, what to do>"}``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated, Any, TypeVar

import anyio
import redis
import redis.asyncio
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comfy_cancel import bulk, live, manager, metrics, ops, publish, status, streams
from comfy_cancel.config import Settings, get_settings
from comfy_cancel.context import Context
from comfy_cancel.db import Database
from comfy_cancel.egress import EgressDenied
from comfy_cancel.encryption import SecretKeyMissing
from comfy_cancel.gate import (
    CHALLENGE,
    DATABASE_ERRORS,
    ApiError,
    Gate,
    database_unavailable,
    error_response,
    operator_required,
    principal_of,
    too_deep,
    unknown_token,
    workflow_too_large,
)
from comfy_cancel.intake import Intake, Taken
from comfy_cancel.manager import Principal, WorkflowFilter
from comfy_cancel.models import (
    CANCELLABLE,
    TERMINAL,
    CancelSource,
    Runner,
    Workflow,
    WorkflowStatus,
)
from comfy_cancel.ratelimit import RateLimiter
from comfy_cancel.schemas import (
    MAX_TIMEOUT_SECONDS,
    BulkCancelRequest,
    CancelRequest,
    ErrorBody,
    RunnerCreate,
    RunnerUpdate,
    RunnerView,
    WorkflowList,
    WorkflowSubmission,
    WorkflowSummary,
    WorkflowView,
    check_stored_json,
    error_message,
    field_message,
    json_too_deep,
    refuse_json_constant,
)
from comfy_cancel.scrape import LiveState
from comfy_cancel.status import CallersCancel

log = logging.getLogger(__name__)

Model = TypeVar("Model", bound=BaseModel)


# The error answers every /v1 route can give, for the OpenAPI document.
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Invalid request; the message names the field."},
    401: {"model": ErrorBody, "description": "Missing, unknown or expired token."},
    404: {"model": ErrorBody, "description": "No such object (or another account's)."},
    408: {"model": ErrorBody, "description": "The body did not arrive in time."},
    413: {"model": ErrorBody, "description": "The body is larger than the route accepts."},
    429: {
        "model": ErrorBody,
        "description": "Too many requests for this token; retry after Retry-After seconds.",
        "headers": {"Retry-After": {"schema": {"type": "integer"},
                                    "description": "Seconds until the window ends."}},
    },
    500: {"model": ErrorBody, "description": "Could not be handed on; a retry is safe."},
}
OPERATOR_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    403: {"model": ErrorBody, "description": "The token is not an operator's."},
}


# --- dependencies -------------------------------------------------------------------------

bearer = HTTPBearer(auto_error=False, bearerFormat="cfc_...", description="An API token.")


# The dependencies below block on nothing: async, so FastAPI calls them on the event loop
# instead of handing each to a thread of its pool.


async def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


DB = Annotated[Database, Depends(get_db)]


async def require_principal(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The caller of a ``/v1`` route, admitted by the gate before the body was read
    (``bearer`` documents the scheme in the OpenAPI document)."""
    principal = principal_of(request.state)
    if principal is None:  # only a route outside /v1 could get here
        raise ApiError(401, "missing token: send the header 'Authorization: Bearer cfc_...'",
                       CHALLENGE)
    return principal


async def require_operator(
    principal: Annotated[Principal, Depends(require_principal)],
) -> Principal:
    """The caller of an operator-only route; 403 for a customer's token (the gate refuses
    it first, before the body; this keeps the rule next to the routes)."""
    if not principal.is_operator:
        raise operator_required()
    return principal


Caller = Annotated[Principal, Depends(require_principal)]
Operator = Annotated[Principal, Depends(require_operator)]


def _parse_json(raw: bytes | str, what: str, max_depth: int) -> Any:
    """JSON from a client: depth checked on the raw text first, NaN and Infinity refused,
    nothing a later read could not answer again."""
    if json_too_deep(raw, max_depth):
        raise too_deep(max_depth, what)
    try:
        value = json.loads(raw, parse_constant=refuse_json_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"{what} is not valid JSON ({exc}); fix it and send it again") from exc
    try:
        check_stored_json(raw, value)
    except ValueError as exc:
        raise ApiError(400, f"{what}: {exc}; fix it and send it again") from exc
    return value


async def _parse_off_loop(raw: bytes | str, what: str, max_depth: int) -> Any:
    # Up to 20 MiB of JSON is seconds of CPU at worst: not on the event loop.
    return await anyio.to_thread.run_sync(_parse_json, raw, what, max_depth)


def _validate(model: type[Model], data: Any) -> Model:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, f"invalid {error_message(exc)}") from exc


async def read_submission(request: Request) -> WorkflowSubmission:
    """The product's multipart form (``workflow_json`` a file) or the same fields as JSON.

    The gate has checked the token, and counts and times the body as it arrives (413, 408).
    """
    settings = request.app.state.settings
    limit, depth = settings.max_workflow_bytes, settings.max_json_depth
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json" or content_type.endswith("+json"):
        body = b"".join([chunk async for chunk in request.stream()])
        data = await _parse_off_loop(body, "the body", depth)
        return _validate(WorkflowSubmission, data)
    if content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise ApiError(
            415,
            "send the workflow as multipart/form-data (name, workflow_json file, tags) "
            "or as application/json",
        )
    fields: dict[str, Any] = {}
    # Starlette spools files to disk past 1 MiB, so a chunked upload without a length
    # costs disk, not memory, until its size is checked below.
    async with request.form(max_part_size=limit) as form:
        if "name" in form:
            fields["name"] = form["name"]
        tags = [t for t in form.getlist("tags") if isinstance(t, str)]
        if tags:
            fields["tags"] = tags
        if "timeout_seconds" in form:
            fields["timeout_seconds"] = form["timeout_seconds"]
        upload = form.get("workflow_json")
        if isinstance(upload, UploadFile):
            if upload.size is not None and upload.size > limit:
                raise workflow_too_large(limit)
            fields["workflow_json"] = await _parse_off_loop(
                await upload.read(), "the workflow_json file", depth
            )
        elif isinstance(upload, str):
            fields["workflow_json"] = await _parse_off_loop(
                upload, "the workflow_json field", depth
            )
    return _validate(WorkflowSubmission, fields)


def _not_found(kind: str, object_id: str) -> ApiError:
    # The same words for a malformed id, an unknown one and another account's: an id
    # never tells its holder whether it exists.
    return ApiError(404, f"no {kind} {object_id[:100]}: check the id (GET /v1/{kind} lists yours)")


def _canonical_id(kind: str, object_id: str) -> str:
    """The id in its stored spelling; a 404 when it is no id at all."""
    try:
        return str(uuid.UUID(object_id))
    except ValueError:
        raise _not_found(kind, object_id) from None


def _own_workflow(session: Session, workflow_id: str, principal: Principal) -> Workflow:
    canonical = _canonical_id("workflow", workflow_id)
    workflow = manager.get_workflow(session, canonical, principal.account_id)
    if workflow is None:
        raise _not_found("workflow", workflow_id)
    return workflow


def _own_runner(session: Session, runner_id: str, principal: Principal) -> Runner:
    canonical = _canonical_id("runner", runner_id)
    runner = manager.get_runner(session, canonical, principal.account_id)
    if runner is None:
        raise _not_found("runner", runner_id)
    return runner


def _not_cancellable(workflow_id: str, current: str) -> ApiError:
    if current in TERMINAL:
        why = "only queued or running workflows can be cancelled"
    else:
        why = "it can be cancelled once it is queued"
    return ApiError(400, f"workflow {workflow_id} is {current}: {why}")


# --- /v1 ----------------------------------------------------------------------------------

v1 = APIRouter(prefix="/v1", responses=ERRORS)

SUBMIT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "workflow_json"],
                    "properties": {
                        "name": {"type": "string", "maxLength": 200},
                        "workflow_json": {
                            "type": "string",
                            "format": "binary",
                            "description": "A file with the ComfyUI API-format prompt.",
                        },
                        "tags": {
                            "type": "string",
                            "description": "Comma-separated, or repeat the field; at most 10.",
                        },
                        "timeout_seconds": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_TIMEOUT_SECONDS,
                            "description": "Optional: cancelled (cancel source 'deadline') "
                            "if still queued or running this long after submission.",
                        },
                    },
                }
            },
            "application/json": {"schema": WorkflowSubmission.model_json_schema()},
        },
    }
}


@v1.post(
    "/workflow",
    response_model=WorkflowView,
    openapi_extra=SUBMIT_BODY,
    responses={415: {"model": ErrorBody, "description": "Neither multipart nor JSON."}},
)
def submit_workflow(
    principal: Caller,
    submission: Annotated[WorkflowSubmission, Depends(read_submission)],
    db: DB,
) -> Response:
    """Accept a workflow and hand it to the runner queue (200, status ``accepted``)."""
    with db.transaction() as session:
        workflow = status.create_accepted(
            session,
            principal.account_id,
            name=submission.name,
            workflow_json=submission.workflow_json,
            tags=submission.tags,
            timeout_seconds=submission.timeout_seconds,
        )
    assert workflow.runner_task_id is not None  # create_accepted always assigns one
    try:
        publish.publish_run(workflow.id, workflow.runner_task_id)
    except publish.BROKER_ERRORS as exc:
        log.warning("workflow %s not dispatched: %s: %s", workflow.id, type(exc).__name__, exc)
        with db.transaction() as session:
            status.fail(
                session,
                workflow.id,
                exception_type="DispatchError",
                exception_message=f"the runner queue was unreachable: {type(exc).__name__}",
                by=status.Actor(CancelSource.API.value, principal.actor),
            )
        raise ApiError(
            500,
            f"workflow {workflow.id} could not be handed to the runner queue; submit again",
        ) from exc
    return _json(WorkflowView.of(workflow).to_json())


def _json(body: bytes) -> Response:
    # Serialised by the view itself, which shows a value it cannot serialise as null
    # rather than fail the whole answer.
    return Response(body, media_type="application/json")


@v1.get("/workflow/{workflow_id}", response_model=WorkflowView)
def get_workflow(workflow_id: str, principal: Caller, db: DB) -> Response:
    with db.transaction() as session:
        return _json(WorkflowView.of(_own_workflow(session, workflow_id, principal)).to_json())


@v1.get(
    "/workflow/{workflow_id}/subscribe",
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}},
              "description": "Server-sent events: `state` first (the workflow as GET shows "
              "it), then `status`, `cancel_requested`, `cancel_signalled`, "
              "`cancel_acknowledged`, `cancel_outcome` (each with its id) and `progress`, "
              "until the terminal status; a `: ping` comment on a quiet stream."},
        204: {"description": "Resumed (Last-Event-ID) on an ended workflow with nothing "
              "newer: nothing more will come."},
    },
)
async def subscribe_workflow(
    request: Request,
    workflow_id: str,
    principal: Caller,
    db: DB,
    last_event_id: Annotated[str | None, Header(
        description="Resume after this event id (sent by EventSource on reconnect): the "
        "events after it are replayed from the database, then the stream goes on live.",
    )] = None,
) -> Response:
    """Follow a workflow as it happens: every status change, every step of a cancel, and
    ComfyUI's progress while it runs; the stream ends after the terminal status."""
    canonical = _canonical_id("workflow", workflow_id)
    after_id = _event_id(last_event_id)
    hub: live.Hub = request.app.state.hub
    subscription = hub.open(canonical)  # before the read: nothing committed after it is lost
    try:
        start = await anyio.to_thread.run_sync(
            streams.snapshot, db, canonical, principal.account_id, after_id)
    except BaseException:
        subscription.close()
        raise
    if start is None:
        subscription.close()
        raise _not_found("workflow", workflow_id)
    if start.nothing_to_send:
        subscription.close()
        return Response(status_code=204)
    return EventSourceResponse(
        streams.events(subscription, start, db),
        ping=request.app.state.settings.stream_ping_seconds,
        ping_message_factory=lambda: streams.PING,
        background=BackgroundTask(subscription.close),  # a HEAD never starts the events
    )


def _event_id(header: str | None) -> int | None:
    if header is None or not header.strip():
        return None
    if not header.strip().isdigit() or len(header.strip()) > 18:
        raise ApiError(400, "Last-Event-ID must be the id of an event of this stream "
                       "(a number); leave it out to start with the current state")
    return int(header)


# Deeper pages would only make the database skip more rows (and overflow its offset).
MAX_PAGE = 1_000_000


@v1.get("/workflow", response_model=WorkflowList)
def list_workflows(
    principal: Caller,
    db: DB,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
    per_page: Annotated[int, Query(ge=1, le=100)] = 20,
    status_filter: Annotated[WorkflowStatus | None, Query(alias="status")] = None,
) -> Response:
    """The caller's workflows, newest first; cancelled ones stay in the history.

    Without ``workflow_json`` (``GET /v1/workflow/{id}`` has it): a page of large prompts
    would be one huge answer.
    """
    with db.transaction() as session:
        rows, total = manager.list_workflows(
            session,
            principal.account_id,
            page=page,
            per_page=per_page,
            status=status_filter.value if status_filter else None,
        )
        views = [WorkflowSummary.of(w) for w in rows]
    return _json(WorkflowList(workflows=views, total=total).to_json())


@v1.post(
    "/workflow/{workflow_id}/cancel",
    response_class=Response,
    responses={200: {"description": "Cancel accepted; the body is empty."}},
)
async def cancel_workflow(
    request: Request, workflow_id: str, principal: Caller, body: CancelRequest | None = None
) -> Response:
    """Request the cancel of a queued or running workflow (DESIGN.md, "Flow of one cancel").

    The request is committed before it is published, so a lost message loses no cancel:
    the sweep re-publishes open requests. A repeat while it is in flight is accepted again.

    The hot path, on the event loop: the gate admitted the token (usually from its cache),
    then the process's :class:`~comfy_cancel.intake.Intake` records the request with
    those that arrived beside it (the token checked again, scoped to the caller's account,
    audited) and publishes it; a second read only explains a refusal.
    """
    by = status.Actor(CancelSource.API.value, principal.actor, body.reason if body else None)
    canonical = _canonical_id("workflow", workflow_id)
    intake: Intake = request.app.state.intake
    cancel = CallersCancel(canonical, principal.account_id, principal.token_id, by)
    while (taken := await intake.cancel(cancel)) is Taken.REFUSED:
        await anyio.to_thread.run_sync(
            _explain_refusal, intake.db, workflow_id, canonical, principal)
    if taken is Taken.UNPUBLISHED:
        raise ApiError(
            500,
            "the cancel request is recorded but could not be handed to the cancel queue; "
            "retrying is safe",
        )
    return Response(status_code=200)


def _explain_refusal(db: Database, workflow_id: str, canonical: str, principal: Principal) -> None:
    """Raise the answer to a cancel that was not recorded; return when the workflow has
    become cancellable since (it was queued in between), so the caller tries again."""
    with db.transaction() as session:
        if not manager.token_is_valid(session, principal.token_id):
            raise unknown_token()
        current = manager.workflow_status(session, canonical, principal.account_id)
    if current is None:
        raise _not_found("workflow", workflow_id)
    if current not in CANCELLABLE:
        raise _not_cancellable(canonical, current)


@contextmanager
def _runner_refusals() -> Iterator[None]:
    """A runner URL the egress policy refuses, or headers with no key to seal them: 400
    with the reason (the customer can change the URL or leave the headers out)."""
    try:
        yield
    except EgressDenied as exc:
        raise ApiError(400, f"invalid endpoint_url: {exc}") from None
    except SecretKeyMissing as exc:
        raise ApiError(400, str(exc)) from None


@v1.post(
    "/runner/{runner_id}/interrupt",
    response_class=Response,
    responses={200: {"description": "What ran on the runner is being cancelled (or nothing "
                     "ran); the body is empty."}},
)
def interrupt_runner(
    runner_id: str, principal: Caller, db: DB, body: CancelRequest | None = None
) -> Response:
    """Stop what runs on this runner now: each of the caller's workflows ``running`` on it
    is cancelled through the same path as ``POST /v1/workflow/{id}/cancel`` (cancel source
    ``runner_interrupt``). Work queued on the runner is left alone and the runner stays in
    service (a disabled one can be interrupted too); 200 also when nothing runs."""
    with db.transaction() as session:
        runner = _own_runner(session, runner_id, principal)
        running = manager.running_on_runner(session, runner.id, principal.account_id)
    by = status.Actor(CancelSource.RUNNER_INTERRUPT.value, principal.actor,
                      body.reason if body else None)
    if not publish.request_cancels(db, running, by).published:
        raise ApiError(
            500,
            "the interrupt is recorded but could not be handed to the cancel queue; "
            "retrying is safe",
        )
    return Response(status_code=200)


@v1.post("/runner", response_model=RunnerView)
def add_runner(request: Request, principal: Caller, db: DB, body: RunnerCreate) -> RunnerView:
    """Register a ComfyUI server. Its URL must lead to a public address (or a network the
    operator allows); header values are stored encrypted and never shown again."""
    with _runner_refusals(), db.transaction() as session:
        runner = manager.add_runner(
            session,
            principal.account_id,
            name=body.name,
            endpoint_url=body.endpoint_url,
            headers=body.headers,
            tags=body.tags,
            status=body.status.value,
            settings=request.app.state.settings,
        )
        return RunnerView.of(runner)


@v1.get("/runner", response_model=list[RunnerView])
def list_runners(principal: Caller, db: DB) -> list[RunnerView]:
    with db.transaction() as session:
        return [RunnerView.of(r) for r in manager.list_runners(session, principal.account_id)]


@v1.get("/runner/{runner_id}", response_model=RunnerView)
def get_runner(runner_id: str, principal: Caller, db: DB) -> RunnerView:
    with db.transaction() as session:
        return RunnerView.of(_own_runner(session, runner_id, principal))


@v1.put("/runner/{runner_id}", response_model=RunnerView)
def update_runner(
    request: Request, runner_id: str, principal: Caller, db: DB, body: RunnerUpdate
) -> RunnerView:
    """Change the fields given; ``headers``, when given, replaces the whole map."""
    with _runner_refusals(), db.transaction() as session:
        runner = _own_runner(session, runner_id, principal)
        return RunnerView.of(manager.update_runner(
            session, runner, body.changes(), settings=request.app.state.settings
        ))


# --- health -------------------------------------------------------------------------------

health = APIRouter()


@health.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up (no dependencies checked)."""
    return {"status": "ok"}


@health.get("/readyz", responses={503: {"description": "the database or Redis is unreachable"}})
def readyz(request: Request, db: DB) -> JSONResponse:
    """Ready to serve: the database answers ``SELECT 1`` and Redis answers ``PING``."""
    checks: dict[str, str] = {}
    try:
        with db.transaction() as session:
            manager.ping(session)
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready; the details go to the log only
        log.warning("readyz: database: %s", exc)
        checks["database"] = f"unreachable ({type(exc).__name__})"
    try:
        request.app.state.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        log.warning("readyz: redis: %s", exc)
        checks["redis"] = f"unreachable ({type(exc).__name__})"
    failed = [name for name, result in checks.items() if result != "ok"]
    if not failed:
        return JSONResponse(checks)
    message = f"not ready: {' and '.join(failed)} unreachable; see the server log"
    return JSONResponse({"status": 503, "message": message, **checks}, status_code=503)


@health.get("/metrics", include_in_schema=False)
def prometheus_metrics(request: Request) -> Response:
    """Prometheus metrics, without a token (COMFY_CANCEL_API_METRICS): what this API's
    processes counted, and the state read now (open cancels, queue depths)."""
    shown = request.app.state.metrics
    if shown is None:
        raise StarletteHTTPException(404)
    return Response(metrics.exposition(shown), media_type=metrics.CONTENT_TYPE)


# --- errors -------------------------------------------------------------------------------


async def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.code, exc.message, exc.headers)


async def _validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    # 400, not FastAPI's 422: the contract has one code for a request the client must fix.
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return error_response(
            400, f"the body is not valid JSON ({detail}); fix it and send it again"
        )
    # ("body", "name") names a field of the body, ("query", "per_page") a query parameter.
    where, *field = first.get("loc") or ("body",)
    msg = first.get("msg", "")
    if not field:
        return error_response(400, f"invalid {where}: {msg}")
    kind = "query parameter " if where == "query" else ""
    return error_response(400, f"invalid {kind}{field_message(tuple(field), msg)}")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; see /docs for the API"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; see /docs for the API"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, getattr(exc, "headers", None))


async def _database_error(request: Request, exc: Exception) -> Response:
    return database_unavailable(request.method, request.url.path, exc)


class CatchAll:
    """Answers an unexpected exception with a generic 500 body and logs it once.

    Starlette's own catch-all re-raises after answering, which logs every traceback twice;
    this middleware ends the exception here.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            response = error_response(
                500, "an unexpected error occurred on the server; try again later, and tell "
                "the operator if it persists"
            )
            await response(scope, receive, send)


# --- /v1/admin: operators only -------------------------------------------------------------

admin = APIRouter(prefix="/v1/admin", responses=OPERATOR_ERRORS)


@admin.post("/workflow/cancel")
def bulk_cancel(request: Request, principal: Operator, body: BulkCancelRequest) -> dict[str, Any]:
    """Cancel many workflows by filter or id list; ``dry_run`` counts first.

    Answers once the queued ones are cancelled and the running ones' runners signalled;
    the running ones' outcomes follow on their workflows (``pending`` counts them).
    """
    ctx = _context(request)
    flt = WorkflowFilter(
        account=body.account,
        statuses=tuple(body.statuses),
        older_than_seconds=body.older_than_seconds,
        runner=body.runner,
        tag=body.tag,
    )
    if body.dry_run:
        return bulk.plan(ctx, flt, body.ids).to_dict()
    by = status.Actor(CancelSource.BULK.value, principal.actor, body.reason)
    return bulk.execute(ctx, flt, by, body.ids).to_dict()


def _context(request: Request) -> Context:
    ctx: Context = request.app.state.context  # built with the app; it connects on first use
    return ctx


# --- the app ------------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API on the given settings (default: the environment's).

    Publishing goes through the process's Celery app (:mod:`comfy_cancel.worker`), which
    is configured from the environment's settings, not from ``settings``.
    """
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await app.state.hub.close()

    app = FastAPI(
        title="comfy-cancel",
        version="0.1.0",
        description="Submit ComfyUI workflows, follow them, and cancel them.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.context = Context(settings)
    app.state.db = Database.from_url(settings.database_url)
    app.state.intake = Intake(app.state.db)
    # Neither connects until first used; short timeouts keep /readyz fast when Redis is down.
    app.state.redis = redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=2, socket_timeout=2
    )
    # The process's one subscription to live updates, shared by all its streams.
    app.state.hub = live.Hub(redis.asyncio.Redis.from_url(
        settings.redis_url, socket_connect_timeout=2, client_name=live.HUB_CLIENT_NAME))
    app.state.metrics = (
        metrics.registry(LiveState(app.state.db, app.state.redis)) if settings.api_metrics
        else None
    )
    app.include_router(v1)
    app.include_router(admin)
    app.include_router(health)
    app.include_router(ops.router)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for error in DATABASE_ERRORS:
        app.add_exception_handler(error, _database_error)
    # The last added runs first: the catch-all around the gate around the routes.
    app.add_middleware(
        Gate,
        settings=settings,
        db=app.state.db,
        limiter=RateLimiter(settings.redis_url, settings.rate_limit_window_seconds),
    )
    app.add_middleware(CatchAll)
    return app


_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    # ``comfy_cancel.api:app`` for uvicorn, built on first access rather than at import,
    # so importing this module never reads settings or opens anything.
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
