"""Bodies of the HTTP API, and the input checks the CLI shares with it.

Requests are validated here so that the API and the CLI refuse the same things with the
same words; responses are shaped here so that nothing secret (runner header values, URL
passwords) leaves by accident.
"""

from __future__ import annotations

import itertools
import json
import operator
import re
from datetime import datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    PlainSerializer,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticSerializationError, to_json

from comfy_cancel.models import (
    Runner,
    RunnerStatus,
    Workflow,
    WorkflowStatus,
    iso_utc,
    utcnow,
)
from comfy_cancel.redact import MASK, redact_url

UtcDatetime = Annotated[datetime, PlainSerializer(iso_utc, return_type=str, when_used="json")]


def error_message(exc: ValidationError) -> str:
    """One sentence naming the first bad field of a pydantic error."""
    first = exc.errors(include_url=False)[0]
    return field_message(first["loc"], first["msg"])


def field_message(loc: tuple[int | str, ...], msg: str) -> str:
    where = ""
    for part in loc:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    # Custom validators' messages are already sentences; pydantic prefixes them.
    msg = msg.removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


# --- raw JSON checks ----------------------------------------------------------------------

_ONE_KIND = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEPS = bytes.maketrans(b"[]", b"\x02\x00")  # an opening adds 2, every bracket takes 1


def json_too_deep(raw: bytes | str, limit: int) -> bool:
    """Whether JSON text nests objects and lists deeper than ``limit``, read from the raw
    text before it is parsed: a parser (and every later step) pays for depth, so too deep
    a body is refused before any of them runs. C-speed byte operations: about 0.1 s per
    million brackets, nothing for the strings and numbers that make up most workflows.
    """
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    # Drop string contents: escaped backslashes, then escaped quotes, then every other
    # quote-delimited run (what is left between pairs of quotes is outside any string).
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(unescaped.split(b'"')[::2])
    brackets = outside.translate(_ONE_KIND, _NOT_BRACKETS)
    if b"[" * (limit + 1) in brackets:  # the usual attack: one long run of openings
        return True
    # The depth after each bracket is (the sum of steps so far) - (brackets so far).
    depths = map(operator.sub, itertools.accumulate(brackets.translate(_STEPS)),
                 itertools.count(1))
    return max(depths, default=0) > limit


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def refuse_json_constant(name: str) -> Any:
    """For ``json.loads(parse_constant=...)``: NaN and Infinity are not JSON, and a stored
    one could not be answered again."""
    raise ValueError(f"{name} is not a JSON value")


def check_stored_json(raw: bytes | str, value: Any) -> None:
    """Refuse parsed JSON the database or a later answer could not take: a lone UTF-16
    surrogate (``\\ud800``). Checked only when the raw text has such an escape at all."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if _SURROGATE_ESCAPE.search(raw) is None:
        return
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            "contains a lone UTF-16 surrogate (e.g. \\ud800), which is not text"
        ) from exc


# --- every string of a request ------------------------------------------------------------


def _bad_string(where: str, value: str) -> str | None:
    if "\x00" in value:
        return f"{where}: contains a NUL character (\\u0000), which is not allowed"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{where}: contains a lone UTF-16 surrogate, which is not text"
    return None


def _first_bad_string(data: Any, skip: frozenset[str]) -> str | None:
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        problem = None
        if isinstance(value, str):
            problem = _bad_string(where or "body", value)
        elif isinstance(value, dict):
            for key, item in value.items():
                if not where and key in skip:
                    continue
                if isinstance(key, str):
                    problem = problem or _bad_string(f"{where}.{key}" if where else key, key)
                    stack.append((f"{where}.{key}" if where else key, item))
        elif isinstance(value, list | tuple):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
        if problem:
            return problem
    return None


class RequestBody(BaseModel):
    """A request body: no string in it may hold a NUL character or a lone surrogate
    (PostgreSQL cannot store either; SQLite and the encoders fail on the second), so
    either is a 400 naming the field rather than a database error."""

    # Fields not stored as text (a prompt is stored as JSON, where NUL is escaped).
    not_text: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        problem = _first_bad_string(data, cls.not_text)
        if problem:
            raise ValueError(problem)
        return data


# --- shared field checks ------------------------------------------------------------------

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Tag = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]


def _split_tags(value: Any) -> Any:
    # The product's form sends "a,b" or repeats the field; JSON clients send a list.
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [t.strip() for v in value for t in v.split(",") if t.strip()]
    return value


Tags = Annotated[list[Tag], BeforeValidator(_split_tags), Field(max_length=10)]


def check_endpoint_url(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    value = value.strip()
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{value!r} is not an http(s) URL; give the ComfyUI server's address, "
            "e.g. http://127.0.0.1:8188"
        )
    return value.rstrip("/")


EndpointUrl = Annotated[
    str, BeforeValidator(check_endpoint_url), StringConstraints(min_length=1, max_length=2000)
]

_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}$")


def check_headers(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    for name, header_value in value.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid HTTP header name")
        # A line break in a value would let it smuggle further headers into every call.
        if isinstance(header_value, str) and ("\r" in header_value or "\n" in header_value):
            raise ValueError(f"the value of header {name!r} contains a line break")
    return value


Headers = Annotated[dict[str, str], BeforeValidator(check_headers)]


def check_prompt(value: Any) -> Any:
    """A ComfyUI API-format prompt: ``{node_id: {"class_type": str, "inputs": {...}}}``."""
    hint = "export the workflow with ComfyUI's 'Export (API)'"
    if not isinstance(value, dict) or not value:
        raise ValueError(f"must be a non-empty JSON object of nodes; {hint}")
    if isinstance(value.get("nodes"), list):
        raise ValueError(f"this is a UI-format workflow (it has a 'nodes' list); {hint}")
    for node_id, node in value.items():
        if not isinstance(node, dict):
            raise ValueError(f"node {node_id!r} is not an object; {hint}")
        if not isinstance(node.get("class_type"), str) or not node["class_type"]:
            raise ValueError(f"node {node_id!r} has no 'class_type' string; {hint}")
        if not isinstance(node.get("inputs"), dict):
            raise ValueError(f"node {node_id!r} has no 'inputs' object; {hint}")
    return value


Prompt = Annotated[dict[str, Any], BeforeValidator(check_prompt)]


# The longest timeout a workflow may ask for: a week, far past any sane run (the sweep's
# max_run_seconds still ends a run that goes on longer).
MAX_TIMEOUT_SECONDS = 7 * 86400


def check_timeout(value: Any) -> Any:
    """A timeout: whole seconds from 1 to :data:`MAX_TIMEOUT_SECONDS`, an integer in JSON or
    its digits in a form field; no fractions, booleans (pydantic would take ``true`` as 1)
    or other strings. One message for every refusal, saying what is accepted."""
    if value is None:
        return None
    digits = value.strip() if isinstance(value, str) else ""
    if digits.isascii() and digits.isdigit() and len(digits) <= 12:
        value = int(digits)
    if isinstance(value, bool) or not isinstance(value, int) or not (
            1 <= value <= MAX_TIMEOUT_SECONDS):
        raise ValueError(f"must be a whole number of seconds from 1 to {MAX_TIMEOUT_SECONDS} "
                         "(7 days), or left out for no timeout")
    return value


# The bounds are checked by the validator; Field puts them in the OpenAPI document.
TimeoutSeconds = Annotated[
    int, Field(ge=1, le=MAX_TIMEOUT_SECONDS), BeforeValidator(check_timeout)
]


# --- requests -----------------------------------------------------------------------------


class WorkflowSubmission(RequestBody):
    not_text: ClassVar[frozenset[str]] = frozenset({"workflow_json"})

    name: Name
    workflow_json: Prompt = Field(description="The ComfyUI API-format prompt.")
    tags: Tags = Field(
        default_factory=list, description="At most 10; a list, or one comma-separated string."
    )
    timeout_seconds: TimeoutSeconds | None = Field(
        None,
        description="Optional: cancel the workflow (cancel source 'deadline') if it is still "
        f"queued or running this many seconds after submission; 1 to {MAX_TIMEOUT_SECONDS} "
        "(7 days).",
    )


class CancelRequest(RequestBody):
    reason: str | None = Field(None, max_length=1000, description="Why; kept in the audit trail.")


# The furthest back a bulk cancel's age filter reaches: a bigger number would only
# overflow the date arithmetic.
MAX_AGE_SECONDS = 100 * 366 * 86400


class BulkCancelRequest(RequestBody):
    """An operator's bulk cancel: a filter, or a list of ids (then only ``account`` narrows)."""

    account: str | None = Field(None, max_length=200, description="Only this account's.")
    statuses: tuple[Literal["queued", "running"], ...] = Field(("queued", "running"), min_length=1)
    older_than_seconds: float | None = Field(
        None, ge=0, le=MAX_AGE_SECONDS, allow_inf_nan=False, description="Created longer ago."
    )
    runner: str | None = Field(None, max_length=200, description="A runner id or name.")
    tag: str | None = Field(None, max_length=100)
    ids: list[Annotated[str, StringConstraints(max_length=100)]] | None = Field(
        None, max_length=100_000, description="Workflow ids."
    )
    reason: str | None = Field(None, max_length=1000, description="Kept in the audit trail.")
    dry_run: bool = Field(False, description="Count by status and sample; change nothing.")


class RunnerCreate(RequestBody):
    name: Name
    endpoint_url: EndpointUrl = Field(description="The ComfyUI server, http(s)://host:port.")
    headers: Headers = Field(
        default_factory=dict, description="Sent on every call to the server; never echoed."
    )
    tags: Tags = Field(default_factory=list)
    status: RunnerStatus = RunnerStatus.ACTIVE


class RunnerUpdate(RequestBody):
    """A partial update: fields left out keep their value; ``headers`` replaces the whole map."""

    name: Name | None = None
    endpoint_url: EndpointUrl | None = None
    headers: Headers | None = None
    tags: Tags | None = None
    status: RunnerStatus | None = None

    @model_validator(mode="after")
    def _no_nulls(self) -> RunnerUpdate:
        for field in self.model_fields_set:
            if getattr(self, field) is None:
                raise ValueError(f"{field} cannot be null; leave it out to keep its value")
        return self

    def changes(self) -> dict[str, Any]:
        """The given fields as column values (the status as its plain string)."""
        return self.model_dump(exclude_unset=True, mode="json")


# --- responses ----------------------------------------------------------------------------


class ErrorBody(BaseModel):
    status: int
    message: str


class CancelView(BaseModel):
    requested_at: UtcDatetime
    source: str | None
    actor: str | None
    reason: str | None
    outcome: str | None
    finished_at: UtcDatetime | None
    freed_at: UtcDatetime | None = Field(
        description="When ComfyUI was seen holding the prompt no more (neither running nor "
        "pending: the GPU is free). Null means not confirmed: not yet, ComfyUI unreachable, "
        "the runner gone (runner_lost), or no prompt ever reached ComfyUI (prompt_id null)."
    )
    age_seconds: float = Field(description="Seconds since the cancel was requested.")


class WorkflowSummary(BaseModel):
    """A workflow as lists show it: everything but the prompt (``GET /v1/workflow/{id}``
    has that)."""

    id: str
    user_id: int = Field(description="The account the workflow belongs to.")
    name: str
    status: WorkflowStatus
    runner_id: str | None
    tags: list[str]
    prompt_id: str | None
    queue_number: int | None
    outputs: dict[str, Any] | None = Field(description="A completed workflow's outputs.")
    partial_outputs: dict[str, Any] | None = Field(
        description="A cancelled workflow's: what ComfyUI reported saved before it stopped "
        "({node_id: {\"images\": [...]}}, as outputs); null when nothing was saved, and for "
        "every other status."
    )
    progress: dict[str, Any] | None
    error_node: str | None = Field(description="Set when failed, else null (so are exception_*).")
    exception_type: str | None
    exception_message: str | None
    created_at: UtcDatetime
    updated_at: UtcDatetime
    started_at: UtcDatetime | None
    completed_at: UtcDatetime | None
    timeout_seconds: int | None = Field(description="The timeout given at submission, or null.")
    deadline_at: UtcDatetime | None = Field(
        description="Submission + timeout_seconds: still queued or running then, it is "
        "cancelled (cancel source 'deadline'); null without a timeout."
    )
    cancel: CancelView | None = Field(description="The cancel request, null when none was made.")
    unreadable: str | None = Field(
        None,
        description="Null, unless a stored JSON value (workflow_json, outputs, "
        "partial_outputs, progress) cannot be shown, e.g. nested deeper than the API can "
        "answer: then that value is null and this says which and why.",
    )

    @classmethod
    def fields_of(cls, wf: Workflow, now: datetime | None = None) -> dict[str, Any]:
        failed = wf.status == WorkflowStatus.FAILED
        cancel = None
        if wf.cancel_requested_at is not None:
            cancel = CancelView(
                requested_at=wf.cancel_requested_at,
                source=wf.cancel_source,
                actor=wf.cancel_actor,
                reason=wf.cancel_reason,
                outcome=wf.cancel_outcome,
                finished_at=wf.cancel_finished_at,
                freed_at=wf.freed_at,
                age_seconds=round(
                    ((now or utcnow()) - wf.cancel_requested_at).total_seconds(), 3
                ),
            )
        return {
            "id": wf.id,
            "user_id": wf.account_id,
            "name": wf.name,
            "status": WorkflowStatus(wf.status),
            "runner_id": wf.runner_id,
            "tags": list(wf.tags or []),
            "prompt_id": wf.prompt_id,
            "queue_number": wf.queue_number,
            "outputs": wf.outputs,
            "partial_outputs": (
                wf.partial_outputs if wf.status == WorkflowStatus.CANCELLED else None),
            "progress": wf.progress,
            "error_node": wf.error_node if failed else None,
            "exception_type": wf.exception_type if failed else None,
            "exception_message": wf.exception_message if failed else None,
            "created_at": wf.created_at,
            "updated_at": wf.updated_at,
            "started_at": wf.started_at,
            "completed_at": wf.completed_at,
            "timeout_seconds": wf.timeout_seconds,
            # From created_at, not the column: the status writer clears that once the
            # workflow ends (it is the timeout pass's index), the deadline stays the same.
            "deadline_at": None if wf.timeout_seconds is None
            else wf.created_at + timedelta(seconds=wf.timeout_seconds),
            "cancel": cancel,
        }

    @classmethod
    def of(cls, wf: Workflow, now: datetime | None = None) -> WorkflowSummary:
        return cls(**cls.fields_of(wf, now))

    def to_json(self) -> bytes:
        """The JSON answer; a stored value that cannot be serialised (a row stored before
        the depth limit, outputs a server sent) is shown as null with a note, never a 500."""
        try:
            return self.model_dump_json().encode()
        except (PydanticSerializationError, ValueError, RecursionError):
            return self.readable().model_dump_json().encode()

    def readable(self) -> WorkflowSummary:
        """This view with every JSON value that cannot be serialised set to null."""
        changes: dict[str, Any] = {}
        for name in ("workflow_json", "outputs", "partial_outputs", "progress"):
            try:
                to_json(getattr(self, name, None))
            except (PydanticSerializationError, ValueError, RecursionError):
                changes[name] = None
        if changes:
            changes["unreadable"] = (
                f"{', '.join(changes)} stored but cannot be shown (nested too deep or not "
                "serialisable JSON); shown as null"
            )
        return self.model_copy(update=changes)


class WorkflowView(WorkflowSummary):
    """A workflow with its prompt."""

    workflow_json: dict[str, Any] | None = Field(
        description="The prompt as submitted; null only when it cannot be shown "
        "(see unreadable)."
    )

    @classmethod
    def of(cls, wf: Workflow, now: datetime | None = None) -> WorkflowView:
        return cls(**cls.fields_of(wf, now), workflow_json=wf.workflow_json)


class WorkflowList(BaseModel):
    workflows: list[WorkflowSummary] = Field(description="Without workflow_json.")
    total: int = Field(description="All of the account's workflows that match, across pages.")

    def to_json(self) -> bytes:
        try:
            return self.model_dump_json().encode()
        except (PydanticSerializationError, ValueError, RecursionError):
            readable = [w.readable() for w in self.workflows]
            return self.model_copy(update={"workflows": readable}).model_dump_json().encode()


class RunnerView(BaseModel):
    id: str
    user_id: int
    name: str
    endpoint_url: str = Field(description="Passwords and query values masked as ***.")
    headers: dict[str, str] = Field(description="Header names only; values are never shown.")
    tags: list[str]
    status: RunnerStatus
    created_at: UtcDatetime
    updated_at: UtcDatetime

    @classmethod
    def of(cls, runner: Runner) -> RunnerView:
        return cls(
            id=runner.id,
            user_id=runner.account_id,
            name=runner.name,
            endpoint_url=redact_url(runner.endpoint_url),
            headers=dict.fromkeys(runner.header_names or [], MASK),
            tags=list(runner.tags or []),
            status=RunnerStatus(runner.status),
            created_at=runner.created_at,
            updated_at=runner.updated_at,
        )
