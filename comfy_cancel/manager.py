"""Every database read and every write that is not a status change.

Status changes and the cancel request's columns live in :mod:`comfy_cancel.status`;
everything else that touches a table is a function here, named for its intent. Each
takes a session that the caller opened with ``Database.transaction()``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, func, insert, literal, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session, defer

from comfy_cancel import auth, encryption
from comfy_cancel.config import Settings, get_settings, secret_keys
from comfy_cancel.egress import EgressPolicy
from comfy_cancel.models import (
    CANCELLABLE,
    TERMINAL,
    Account,
    ApiToken,
    Runner,
    RunnerStatus,
    Workflow,
    WorkflowEvent,
    WorkflowStatus,
    WorkflowTag,
    new_id,
    utcnow,
)

S = WorkflowStatus


# --- health ------------------------------------------------------------------------------


def ping(session: Session) -> None:
    """One round trip to the database (readiness checks); raises when it is unreachable."""
    session.execute(select(literal(1))).scalar_one()


# --- accounts and tokens -----------------------------------------------------------------


def get_or_create_account(session: Session, name: str) -> Account:
    account = session.execute(select(Account).where(Account.name == name)).scalar_one_or_none()
    if account is None:
        account = Account(name=name, created_at=utcnow())
        session.add(account)
        session.flush()
    return account


def get_account(session: Session, name: str) -> Account | None:
    return session.execute(select(Account).where(Account.name == name)).scalar_one_or_none()


def create_token(
    session: Session,
    account: Account,
    *,
    operator: bool = False,
    expires_at: datetime | None = None,
    rate_limit: int | None = None,
) -> str:
    """Create a token and return it; only its hash is stored, so this is the one sight of it.

    ``rate_limit``: requests per rate-limit window for this token (0: unlimited); None
    follows ``COMFY_CANCEL_RATE_LIMIT_REQUESTS``.
    """
    token = auth.generate_token()
    session.add(
        ApiToken(
            account_id=account.id,
            token_hash=auth.hash_token(token),
            display_prefix=auth.display_prefix(token),
            is_operator=operator,
            expires_at=expires_at,
            rate_limit=rate_limit,
            created_at=utcnow(),
        )
    )
    session.flush()
    return token


@dataclass(frozen=True)
class Principal:
    """Who is calling: the account a token belongs to, and whether it may act as an operator."""

    account_id: int
    account_name: str
    token_id: int
    is_operator: bool
    rate_limit: int | None = None  # this token's own limit; None: the configured default
    expires_at: datetime | None = None

    @property
    def actor(self) -> str:
        return f"{self.account_name}#token{self.token_id}"


def authenticate(session: Session, token: str) -> Principal | None:
    """The principal of a valid, unexpired token (and its last-used time updated), else None."""
    if not token.startswith(auth.TOKEN_PREFIX):
        return None
    row = session.execute(
        select(ApiToken, Account.name)
        .join(Account, Account.id == ApiToken.account_id)
        .where(ApiToken.token_hash == auth.hash_token(token))
    ).first()
    if row is None:
        return None
    api_token, account_name = row
    now = utcnow()
    if api_token.expires_at is not None and api_token.expires_at <= now:
        return None
    # Last-used is informational: written at most once a minute, and only by a request that
    # gets the row without waiting, so concurrent requests on one token never queue on it.
    if api_token.last_used_at is None or now - api_token.last_used_at > timedelta(minutes=1):
        free = session.execute(
            select(ApiToken.id)
            .where(ApiToken.id == api_token.id)
            .with_for_update(skip_locked=True)
        ).first()
        if free is not None:
            session.execute(
                update(ApiToken).where(ApiToken.id == api_token.id).values(last_used_at=now)
            )
    return Principal(api_token.account_id, account_name, api_token.id, api_token.is_operator,
                     api_token.rate_limit, api_token.expires_at)


def token_is_valid(session: Session, token_id: int) -> bool:
    """Whether the token still exists and has not expired."""
    return session.execute(
        select(ApiToken.id).where(
            ApiToken.id == token_id,
            ApiToken.expires_at.is_(None) | (ApiToken.expires_at > utcnow()),
        )
    ).first() is not None


# --- runners -----------------------------------------------------------------------------


def add_runner(
    session: Session,
    account_id: int,
    *,
    name: str,
    endpoint_url: str,
    headers: Mapping[str, str] | None = None,
    tags: Sequence[str] = (),
    status: str = RunnerStatus.ACTIVE,
    settings: Settings | None = None,
) -> Runner:
    """Register a runner. Raises :class:`~comfy_cancel.egress.EgressDenied` when the URL
    leads where runners may not go, and :class:`~comfy_cancel.encryption.SecretKeyMissing`
    for headers without a key (both by ``settings``, default the environment's)."""
    settings = settings or get_settings()
    EgressPolicy.of(settings).check_url(endpoint_url)
    now = utcnow()
    runner = Runner(
        id=new_id(),
        account_id=account_id,
        name=name,
        endpoint_url=endpoint_url.rstrip("/"),
        tags=list(tags),
        status=status,
        created_at=now,
        updated_at=now,
    )
    runner.set_headers(headers, settings.secret_key or "")
    session.add(runner)
    session.flush()
    return runner


def get_runner(session: Session, runner_id: str, account_id: int | None = None) -> Runner | None:
    query = select(Runner).where(Runner.id == runner_id)
    if account_id is not None:
        query = query.where(Runner.account_id == account_id)
    return session.execute(query).scalar_one_or_none()


def list_runners(session: Session, account_id: int) -> list[Runner]:
    return list(
        session.execute(
            select(Runner).where(Runner.account_id == account_id).order_by(Runner.created_at)
        ).scalars()
    )


def update_runner(
    session: Session,
    runner: Runner,
    changes: Mapping[str, Any],
    settings: Settings | None = None,
) -> Runner:
    """Change the given fields; a new ``endpoint_url`` is checked as :func:`add_runner`
    checks it, and new ``headers`` replace the old ones (sealed)."""
    settings = settings or get_settings()
    if "endpoint_url" in changes:
        EgressPolicy.of(settings).check_url(changes["endpoint_url"])
    for field, value in changes.items():
        if field == "headers":
            runner.set_headers(value, settings.secret_key or "")
        else:
            setattr(runner, field, value)
    runner.updated_at = utcnow()
    session.flush()
    return runner


def reseal_runner_headers(session: Session) -> tuple[int, list[str]]:
    """Seal every runner's headers again under the newest key (key rotation): how many
    were resealed, and the ids of those no configured key opens."""
    resealed, unreadable = 0, []
    rows = session.execute(select(Runner).where(Runner.sealed_headers.is_not(None))).scalars()
    for runner in rows:
        try:
            runner.sealed_headers = encryption.reseal(runner.sealed_headers or "", secret_keys())
        except encryption.SecretKeyWrong:
            unreadable.append(runner.id)
            continue
        resealed += 1
    session.flush()
    return resealed, unreadable


def choose_runner(session: Session, account_id: int, tags: Sequence[str]) -> Runner | None:
    """An active runner of the account that carries every tag of the workflow, at random.

    An untagged workflow or an untagged runner matches any (DESIGN.md, "Scheduling").
    """
    candidates = session.execute(
        select(Runner).where(
            Runner.account_id == account_id, Runner.status == RunnerStatus.ACTIVE.value
        )
    ).scalars()
    wanted = set(tags)
    matching = [r for r in candidates if not r.tags or wanted <= set(r.tags)]
    return random.choice(matching) if matching else None


# --- workflows ---------------------------------------------------------------------------


def add_tags(session: Session, workflow_id: str, tags: Sequence[str]) -> None:
    """Index a new workflow's tags (bulk cancels filter by tag through them)."""
    if tags:
        session.execute(
            insert(WorkflowTag), [{"workflow_id": workflow_id, "tag": t} for t in set(tags)]
        )


def get_workflow(
    session: Session, workflow_id: str, account_id: int | None = None
) -> Workflow | None:
    """A workflow by id, scoped to an account when one is given (another's is None)."""
    query = select(Workflow).where(Workflow.id == workflow_id)
    if account_id is not None:
        query = query.where(Workflow.account_id == account_id)
    return session.execute(query).scalar_one_or_none()


def workflow_status(session: Session, workflow_id: str, account_id: int) -> str | None:
    """The status of an account's workflow; None if it has no workflow of that id."""
    return session.execute(
        select(Workflow.status).where(Workflow.id == workflow_id, Workflow.account_id == account_id)
    ).scalar_one_or_none()


def _lean_workflows() -> Select[Workflow]:
    """Workflows without their large JSON columns (loaded on access)."""
    return select(Workflow).options(defer(Workflow.workflow_json), defer(Workflow.outputs),
                                    defer(Workflow.partial_outputs))


def workflows_by_ids(session: Session, workflow_ids: Sequence[str]) -> list[Workflow]:
    """The workflows among these ids, without their large JSON columns (loaded on access):
    the cancel path needs statuses and ids, not prompts."""
    if not workflow_ids:
        return []
    query = _lean_workflows().where(Workflow.id.in_(list(workflow_ids)))
    return list(session.execute(query).scalars())


def list_workflows(
    session: Session,
    account_id: int,
    *,
    page: int = 1,
    per_page: int = 20,
    status: str | None = None,
) -> tuple[list[Workflow], int]:
    """A page of the account's workflows, newest first, and the total that match.

    The prompt column is never loaded (a page of 100 prompts of 20 MiB each was a 2 GB
    read); touching it on a returned row raises instead of loading it quietly.
    """
    query = (
        select(Workflow)
        .options(defer(Workflow.workflow_json, raiseload=True))
        .where(Workflow.account_id == account_id)
    )
    count = select(func.count()).select_from(Workflow).where(Workflow.account_id == account_id)
    if status is not None:
        query = query.where(Workflow.status == status)
        count = count.where(Workflow.status == status)
    rows = session.execute(
        query.order_by(Workflow.created_at.desc(), Workflow.id)
        .offset((page - 1) * per_page)
        .limit(per_page)
    ).scalars()
    return list(rows), int(session.execute(count).scalar_one())


def running_on_runner(session: Session, runner_id: str, account_id: int) -> list[str]:
    """The account's workflows running on this runner now (what its interrupt stops),
    through the (runner, status) index."""
    return list(session.execute(
        select(Workflow.id).where(
            Workflow.runner_id == runner_id,
            Workflow.status == S.RUNNING.value,
            Workflow.account_id == account_id,
        )
    ).scalars())


def events_of(session: Session, workflow_id: str, after_id: int = 0) -> list[WorkflowEvent]:
    """The workflow's audit rows in order, those numbered above ``after_id``."""
    return list(
        session.execute(
            select(WorkflowEvent)
            .where(WorkflowEvent.workflow_id == workflow_id, WorkflowEvent.id > after_id)
            .order_by(WorkflowEvent.id)
        ).scalars()
    )


def last_event_id(session: Session, workflow_id: str) -> int:
    """The number of the workflow's latest audit row (0 when it has none)."""
    found = session.execute(
        select(func.max(WorkflowEvent.id)).where(WorkflowEvent.workflow_id == workflow_id)
    ).scalar()
    return int(found or 0)


def claim_prompt(session: Session, workflow_id: str, prompt_id: str) -> bool:
    """Reserve the prompt id a runner task is about to submit.

    False when the workflow is no longer queued (cancelled first) or another runner task
    already claimed it (a re-dispatch racing the original): then nothing may be submitted.
    Claiming the same id again is True (a retry whose first commit landed unseen).
    """
    return _update_queued(
        session,
        workflow_id,
        Workflow.prompt_id.is_(None) | (Workflow.prompt_id == prompt_id),
        prompt_id=prompt_id,
    )


def record_submission(
    session: Session, workflow_id: str, claimed_prompt_id: str, prompt_id: str, queue_number: int
) -> bool:
    """Note what ComfyUI answered to a submission (a server that ignores the requested
    prompt id picks its own); False when the workflow was cancelled first. Idempotent."""
    return _update_queued(
        session,
        workflow_id,
        Workflow.prompt_id.in_([claimed_prompt_id, prompt_id]),
        prompt_id=prompt_id,
        queue_number=queue_number,
    )


def _update_queued(
    session: Session, workflow_id: str, prompt_matches: ColumnElement[bool], **values: Any
) -> bool:
    """Set ``values`` on the workflow if it is still queued and its prompt id matches, and
    stamp it alive (the orphan sweeps leave it be); False when it is not (cancelled first,
    or another runner task's prompt)."""
    now = utcnow()
    query = update(Workflow).where(
        Workflow.id == workflow_id, Workflow.status == S.QUEUED.value, prompt_matches
    )
    updated = query.values(updated_at=now, heartbeat_at=now, **values).returning(Workflow.id)
    return session.execute(updated).first() is not None


def heartbeat(
    session: Session,
    workflow_id: str,
    progress: Mapping[str, Any] | None = None,
    task_id: str | None = None,
) -> bool:
    """Note that the runner is alive; False when the workflow is no longer queued or running,
    or (given ``task_id``) another runner task owns it now (a re-dispatch)."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = dict(progress)
    query = update(Workflow).where(
        Workflow.id == workflow_id,
        Workflow.status.in_(sorted(CANCELLABLE)),
    )
    if task_id is not None:
        query = query.where(Workflow.runner_task_id == task_id)
    return (
        session.execute(
            query.values(**values)
            .returning(Workflow.id)
        ).first()
        is not None
    )


# --- bulk cancels --------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkflowFilter:
    """Which workflows an operator's bulk cancel is about; every field narrows the match."""

    account: str | None = None
    statuses: tuple[str, ...] = tuple(sorted(CANCELLABLE))
    older_than_seconds: float | None = None
    runner: str | None = None  # a runner id or name
    tag: str | None = None

    def where(self) -> list[Any]:
        clauses: list[Any] = [Workflow.status.in_(list(self.statuses))]
        if self.account is not None:
            clauses.append(
                Workflow.account_id == select(Account.id)
                .where(Account.name == self.account)
                .scalar_subquery()
            )
        if self.older_than_seconds is not None:
            cutoff = utcnow() - timedelta(seconds=self.older_than_seconds)
            clauses.append(Workflow.created_at < cutoff)
        if self.runner is not None:
            clauses.append(
                Workflow.runner_id.in_(
                    select(Runner.id).where(
                        (Runner.id == self.runner) | (Runner.name == self.runner)
                    )
                )
            )
        if self.tag is not None:
            clauses.append(
                Workflow.id.in_(select(WorkflowTag.workflow_id).where(WorkflowTag.tag == self.tag))
            )
        return clauses


@dataclass(frozen=True)
class Target:
    """What a bulk cancel needs of one matched workflow (the clean-up of a cancelled one
    comes back from its compare-and-set)."""

    id: str
    status: str


_TARGET_COLUMNS = (Workflow.id, Workflow.status)


def count_by_status(session: Session, flt: WorkflowFilter) -> dict[str, int]:
    rows = session.execute(
        select(Workflow.status, func.count()).where(*flt.where()).group_by(Workflow.status)
    ).all()
    return {status_: int(count) for status_, count in rows}


def sample_ids(session: Session, flt: WorkflowFilter, limit: int) -> list[str]:
    return list(
        session.execute(
            select(Workflow.id).where(*flt.where()).order_by(Workflow.id).limit(limit)
        ).scalars()
    )


def targets_after(
    session: Session, flt: WorkflowFilter, after_id: str | None, limit: int
) -> list[Target]:
    """The next chunk of matches in id order (keyset paging: memory stays flat)."""
    query = select(*_TARGET_COLUMNS).where(*flt.where())
    if after_id is not None:
        query = query.where(Workflow.id > after_id)
    rows = session.execute(query.order_by(Workflow.id).limit(limit)).all()
    return [Target(*row) for row in rows]


def targets_by_ids(
    session: Session, workflow_ids: Sequence[str], account: str | None = None
) -> list[Target]:
    """The workflows among these ids (of this account, if given); missing ids are absent."""
    query = select(*_TARGET_COLUMNS).where(Workflow.id.in_(list(workflow_ids)))
    if account is not None:
        query = query.where(
            Workflow.account_id
            == select(Account.id).where(Account.name == account).scalar_subquery()
        )
    return [Target(*row) for row in session.execute(query).all()]


def outcomes_of(session: Session, workflow_ids: Sequence[str]) -> dict[str, int]:
    """How many of these workflows have each cancel outcome (None: still open)."""
    counts: dict[str, int] = {}
    for outcome, count in session.execute(
        select(Workflow.cancel_outcome, func.count())
        .where(Workflow.id.in_(list(workflow_ids)))
        .group_by(Workflow.cancel_outcome)
    ).all():
        key = outcome or "pending"
        counts[key] = counts.get(key, 0) + int(count)
    return counts


def runner_endpoints(session: Session, runner_ids: Sequence[str]) -> dict[str, Runner]:
    rows = session.execute(select(Runner).where(Runner.id.in_(list(runner_ids)))).scalars()
    return {runner.id: runner for runner in rows}


# --- sweeps: each finds its rows through an index, so its cost follows what it finds ------


def _open_intent() -> list[ColumnElement[bool]]:
    """A cancel request without its outcome yet: the rows of the partial index
    ``ix_workflows_open_cancel``."""
    return [Workflow.cancel_requested_at.is_not(None), Workflow.cancel_outcome.is_(None)]


def redrive_due(published_before: datetime) -> list[Any]:
    """An open cancel intent to hand on again: published (or requested) before
    ``published_before`` and taken by no cancel worker (one taken is the deadline
    check's: :func:`overdue_cancel_ids`)."""
    return [
        *_open_intent(),
        # Implied by the next clause (a publish follows its request); it bounds the range
        # scan of the partial index.
        Workflow.cancel_requested_at < published_before,
        func.coalesce(Workflow.cancel_published_at, Workflow.cancel_requested_at)
        < published_before,
        Workflow.cancel_taken_at.is_(None),
    ]


def intents_to_redrive(session: Session, published_before: datetime, limit: int) -> list[str]:
    """Open cancel intents due to be handed on again (:func:`redrive_due`), oldest first,
    read through the partial index of open intents (``ix_workflows_open_cancel``)."""
    return list(
        session.execute(
            select(Workflow.id)
            .where(*redrive_due(published_before))
            .order_by(Workflow.cancel_requested_at)
            .limit(limit)
        ).scalars()
    )


def _past_deadline(grace_seconds: float) -> list[Any]:
    """An open cancel request whose deadline passed: the one definition of a cancel's
    deadline, ``cancel_taken_at + grace_seconds`` (taken: a cancel worker signalled the
    runner). Read through the partial index of open intents."""
    return [
        *_open_intent(),
        Workflow.cancel_taken_at <= utcnow() - timedelta(seconds=grace_seconds),
    ]


def open_cancel_requests(session: Session) -> tuple[int, datetime | None]:
    """How many cancel requests have no outcome yet, and when the oldest was made: read
    through the partial index of open intents (its cost follows what is open)."""
    count, oldest = session.execute(
        select(func.count(), func.min(Workflow.cancel_requested_at)).where(*_open_intent())
    ).one()
    return int(count), oldest


def overdue_cancel_ids(session: Session, grace_seconds: float, limit: int) -> list[str]:
    """Open cancel requests whose deadline passed (:func:`_past_deadline`), oldest first."""
    return list(session.execute(
        select(Workflow.id).where(*_past_deadline(grace_seconds))
        .order_by(Workflow.cancel_taken_at).limit(limit)
    ).scalars())


def lock_overdue_cancels(
    session: Session, workflow_ids: Sequence[str], grace_seconds: float
) -> list[Workflow]:
    """Those of these workflows whose cancel's deadline still passed, locked for the
    caller's transaction, skipping rows another transaction holds: on PostgreSQL two
    cancel workers split the work instead of waiting for each other (SQLite, which has one
    writer at a time, ignores the clause)."""
    if not workflow_ids:
        return []
    query = (
        _lean_workflows()
        .where(Workflow.id.in_(list(workflow_ids)), *_past_deadline(grace_seconds))
        .with_for_update(skip_locked=True)
    )
    return list(session.execute(query).scalars())


def timed_out_ids(session: Session, limit: int) -> list[str]:
    """Queued or running workflows past their deadline (``timeout_seconds`` after
    submission) that nobody asked to cancel yet, the earliest deadline first.

    Read through the partial index of open deadlines (``ix_workflows_open_deadline``):
    a cancel request takes a workflow out of it, and so does its end (the status writer
    clears ``deadline_at`` on ``completed`` and ``failed``). Accepted and uploaded ones wait
    until they are queued: the lifecycle cannot cancel them before.
    """
    return list(session.execute(
        select(Workflow.id)
        .where(
            Workflow.deadline_at.is_not(None),
            Workflow.cancel_requested_at.is_(None),
            Workflow.deadline_at <= utcnow(),
            Workflow.status.in_(sorted(CANCELLABLE)),
        )
        .order_by(Workflow.deadline_at)
        .limit(limit)
    ).scalars())


def _oldest_first(
    session: Session,
    query: Select[Any],
    clock: InstrumentedAttribute[Any],
    cutoff: datetime,
    limit: int,
) -> list[Any]:
    """The rows of ``query`` whose ``clock`` column is before ``cutoff``, the oldest first,
    at most ``limit``: each sweep's read, so that it walks its (status, clock) index in order."""
    return list(
        session.execute(query.where(clock < cutoff).order_by(clock).limit(limit)).scalars()
    )


def running_without_heartbeat(session: Session, cutoff: datetime, limit: int) -> list[Workflow]:
    query = select(Workflow).where(Workflow.status == S.RUNNING.value)
    return _oldest_first(session, query, Workflow.heartbeat_at, cutoff, limit)


def running_since_before(session: Session, cutoff: datetime, limit: int) -> list[str]:
    """Running workflows started before ``cutoff`` with no cancel requested yet."""
    query = select(Workflow.id).where(
        Workflow.status == S.RUNNING.value, Workflow.cancel_requested_at.is_(None)
    )
    return _oldest_first(session, query, Workflow.started_at, cutoff, limit)


def queued_since_before(session: Session, cutoff: datetime, limit: int) -> list[Workflow]:
    """Queued workflows untouched since ``cutoff`` with no cancel requested yet."""
    query = select(Workflow).where(
        Workflow.status == S.QUEUED.value, Workflow.cancel_requested_at.is_(None)
    )
    return _oldest_first(session, query, Workflow.updated_at, cutoff, limit)


def queued_without_heartbeat(session: Session, cutoff: datetime, limit: int) -> list[Workflow]:
    """Queued workflows whose runner task wrote no heartbeat since ``cutoff`` (nor claimed
    them since: the claim stamps one) and that nobody asked to cancel."""
    query = _lean_workflows().where(
        Workflow.status == S.QUEUED.value, Workflow.cancel_requested_at.is_(None)
    )
    return _oldest_first(session, query, Workflow.heartbeat_at, cutoff, limit)


def never_claimed(session: Session, cutoff: datetime, limit: int) -> list[Workflow]:
    """Accepted (or uploaded) workflows no runner task moved on since ``cutoff``."""
    query = _lean_workflows().where(Workflow.status.in_([S.ACCEPTED.value, S.UPLOADED.value]))
    return _oldest_first(session, query, Workflow.updated_at, cutoff, limit)


@dataclass(frozen=True)
class Redispatch:
    """A claimed re-dispatch: the workflow's new runner task id and how many it has had."""

    task_id: str
    count: int


def claim_redispatch(
    session: Session, workflow: Workflow, *, stale_before: datetime | None = None
) -> Redispatch | None:
    """Give a workflow that is not running yet a new runner task id, if it is still as the
    caller read it (same status, runner task and prompt id; with ``stale_before``, still no
    heartbeat since then). The old task finds itself superseded and leaves; the new one
    adopts a prompt ComfyUI still has, or submits it.

    None when another sweep (or the runner) got there first.
    """
    new_task_id = new_id()
    now = utcnow()
    query = update(Workflow).where(
        Workflow.id == workflow.id,
        Workflow.status == workflow.status,
        Workflow.status.in_([S.ACCEPTED.value, S.UPLOADED.value, S.QUEUED.value]),
        Workflow.runner_task_id == workflow.runner_task_id
        if workflow.runner_task_id is not None
        else Workflow.runner_task_id.is_(None),
        Workflow.prompt_id == workflow.prompt_id
        if workflow.prompt_id is not None
        else Workflow.prompt_id.is_(None),
    )
    if stale_before is not None:
        query = query.where(Workflow.heartbeat_at < stale_before)
    # The new task gets a whole orphan timeout (heartbeat_at, updated_at) to show up.
    count = session.execute(
        query.values(runner_task_id=new_task_id, updated_at=now, heartbeat_at=now,
                     redispatch_count=Workflow.redispatch_count + 1)
        .returning(Workflow.redispatch_count)
    ).scalar_one_or_none()
    return None if count is None else Redispatch(new_task_id, int(count))


# --- the operator page: reads only, each through an index ------------------------------------


@dataclass(frozen=True)
class OpenCancels:
    """The cancel requests still without an outcome: how many, and the oldest of them."""

    count: int
    oldest: list[Workflow]


def open_cancels(session: Session, limit: int) -> OpenCancels:
    """How many cancel requests are open, and the ``limit`` oldest (partial index of open
    intents: the cost follows the open requests, not the table)."""
    count = session.execute(
        select(func.count()).select_from(Workflow).where(*_open_intent())
    ).scalar_one()
    oldest = session.execute(
        _lean_workflows().where(*_open_intent())
        .order_by(Workflow.cancel_requested_at).limit(limit)
    ).scalars()
    return OpenCancels(int(count), list(oldest))


@dataclass(frozen=True)
class FinishedCancel:
    """One cancel request with its outcome."""

    id: str
    source: str | None
    outcome: str | None  # never None here: the query asks for an outcome (and a request)
    actor: str | None
    requested_at: datetime | None
    finished_at: datetime | None


def cancels_finished_since(session: Session, since: datetime, limit: int) -> list[FinishedCancel]:
    """Cancel requests made since ``since`` that have their outcome, the last finished
    first, at most ``limit``.

    Read through ``ix_workflows_status_updated``: recording a request stamps ``updated_at``
    and nothing sets it back, so a request made since ``since`` whose outcome is in sits on
    a terminal row updated since then.
    """
    rows = session.execute(
        select(Workflow.id, Workflow.cancel_source, Workflow.cancel_outcome,
               Workflow.cancel_actor, Workflow.cancel_requested_at, Workflow.cancel_finished_at)
        .where(
            Workflow.status.in_(sorted(s.value for s in TERMINAL)),
            Workflow.updated_at >= since,
            Workflow.cancel_requested_at >= since,
            Workflow.cancel_outcome.is_not(None),
        )
        .order_by(Workflow.cancel_finished_at.desc(), Workflow.id)
        .limit(limit)
    ).all()
    return [FinishedCancel(*row) for row in rows]
