"""Bodies of the HTTP API, and the input checks the CLI shares with it.

Requests are validated here so that the API and the CLI refuse the same things with the
same words; responses are shaped here so that nothing secret (runner header values, URL
passwords) leaves by accident.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
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

from comfy_cancel.models import Runner, RunnerStatus, Workflow, WorkflowStatus, utcnow
from comfy_cancel.redact import MASK, redact_url


def iso_utc(value: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``, the one time format of the API."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


UtcDatetime = Annotated[datetime, PlainSerializer(iso_utc, return_type=str, when_used="json")]


# The one masking rule (comfy_cancel.redact), under the name the CLI and dev use.
mask_password = redact_url


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
    str, BeforeValidator(check_endpoint_url), StringConstraints(max_length=2000)
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


# --- requests -----------------------------------------------------------------------------


class WorkflowSubmission(BaseModel):
    name: Name
    workflow_json: Prompt = Field(description="The ComfyUI API-format prompt.")
    tags: Tags = Field(
        default_factory=list, description="At most 10; a list, or one comma-separated string."
    )


class CancelRequest(BaseModel):
    reason: str | None = Field(None, max_length=1000, description="Why; kept in the audit trail.")


class BulkCancelRequest(BaseModel):
    """An operator's bulk cancel: a filter, or a list of ids (then only ``account`` narrows)."""

    account: str | None = Field(None, max_length=200, description="Only this account's.")
    statuses: tuple[Literal["queued", "running"], ...] = Field(("queued", "running"), min_length=1)
    older_than_seconds: float | None = Field(None, ge=0, description="Created longer ago.")
    runner: str | None = Field(None, max_length=200, description="A runner id or name.")
    tag: str | None = Field(None, max_length=100)
    ids: list[str] | None = Field(None, max_length=100_000, description="Workflow ids.")
    reason: str | None = Field(None, max_length=1000, description="Kept in the audit trail.")
    dry_run: bool = Field(False, description="Count by status and sample; change nothing.")


class RunnerCreate(BaseModel):
    name: Name
    endpoint_url: EndpointUrl = Field(description="The ComfyUI server, http(s)://host:port.")
    headers: Headers = Field(
        default_factory=dict, description="Sent on every call to the server; never echoed."
    )
    tags: Tags = Field(default_factory=list)
    status: RunnerStatus = RunnerStatus.ACTIVE


class RunnerUpdate(BaseModel):
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
    age_seconds: float = Field(description="Seconds since the cancel was requested.")


class WorkflowView(BaseModel):
    id: str
    user_id: int = Field(description="The account the workflow belongs to.")
    name: str
    status: WorkflowStatus
    runner_id: str | None
    tags: list[str]
    workflow_json: dict[str, Any]
    prompt_id: str | None
    queue_number: int | None
    outputs: dict[str, Any] | None
    progress: dict[str, Any] | None
    error_node: str | None = Field(description="Set when failed, else null (so are exception_*).")
    exception_type: str | None
    exception_message: str | None
    created_at: UtcDatetime
    updated_at: UtcDatetime
    started_at: UtcDatetime | None
    completed_at: UtcDatetime | None
    cancel: CancelView | None = Field(description="The cancel request, null when none was made.")

    @classmethod
    def of(cls, wf: Workflow, now: datetime | None = None) -> WorkflowView:
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
                age_seconds=round(
                    ((now or utcnow()) - wf.cancel_requested_at).total_seconds(), 3
                ),
            )
        return cls(
            id=wf.id,
            user_id=wf.account_id,
            name=wf.name,
            status=WorkflowStatus(wf.status),
            runner_id=wf.runner_id,
            tags=list(wf.tags or []),
            workflow_json=wf.workflow_json,
            prompt_id=wf.prompt_id,
            queue_number=wf.queue_number,
            outputs=wf.outputs,
            progress=wf.progress,
            error_node=wf.error_node if failed else None,
            exception_type=wf.exception_type if failed else None,
            exception_message=wf.exception_message if failed else None,
            created_at=wf.created_at,
            updated_at=wf.updated_at,
            started_at=wf.started_at,
            completed_at=wf.completed_at,
            cancel=cancel,
        )


class WorkflowList(BaseModel):
    workflows: list[WorkflowView]
    total: int = Field(description="All of the account's workflows that match, across pages.")


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
