"""Every database read and every write that is not a status change.

Status changes live in :mod:`comfy_cancel.status`; everything else that touches a
table is a function here, named for its intent. Each takes a session that the
caller opened with ``Database.transaction()``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, literal, select, update
from sqlalchemy.orm import Session

from comfy_cancel import auth
from comfy_cancel.models import (
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
) -> str:
    """Create a token and return it; only its hash is stored, so this is the one sight of it."""
    token = auth.generate_token()
    session.add(
        ApiToken(
            account_id=account.id,
            token_hash=auth.hash_token(token),
            display_prefix=auth.display_prefix(token),
            is_operator=operator,
            expires_at=expires_at,
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
    # Last-used is informational: write it at most once a minute to keep auth read-mostly.
    if api_token.last_used_at is None or now - api_token.last_used_at > timedelta(minutes=1):
        session.execute(
            update(ApiToken).where(ApiToken.id == api_token.id).values(last_used_at=now)
        )
    return Principal(api_token.account_id, account_name, api_token.id, api_token.is_operator)


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
) -> Runner:
    now = utcnow()
    runner = Runner(
        id=new_id(),
        account_id=account_id,
        name=name,
        endpoint_url=endpoint_url.rstrip("/"),
        headers=dict(headers or {}),
        tags=list(tags),
        status=status,
        created_at=now,
        updated_at=now,
    )
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


def update_runner(session: Session, runner: Runner, changes: Mapping[str, Any]) -> Runner:
    for field, value in changes.items():
        setattr(runner, field, value)
    runner.updated_at = utcnow()
    session.flush()
    return runner


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


def create_workflow(
    session: Session,
    account_id: int,
    *,
    name: str,
    workflow_json: Mapping[str, Any],
    tags: Sequence[str] = (),
) -> Workflow:
    now = utcnow()
    workflow = Workflow(
        id=new_id(),
        account_id=account_id,
        name=name,
        status=S.ACCEPTED.value,
        tags=list(tags),
        workflow_json=dict(workflow_json),
        runner_task_id=new_id(),  # known before publishing, so a cancel can always revoke it
        created_at=now,
        updated_at=now,
    )
    session.add(workflow)
    session.flush()
    if tags:
        session.execute(
            insert(WorkflowTag), [{"workflow_id": workflow.id, "tag": t} for t in set(tags)]
        )
    session.execute(
        insert(WorkflowEvent).values(
            workflow_id=workflow.id, at=now, kind="transition", to_status=S.ACCEPTED.value,
            source="api",
        )
    )
    return workflow


def get_workflow(
    session: Session, workflow_id: str, account_id: int | None = None
) -> Workflow | None:
    """A workflow by id, scoped to an account when one is given (another's is None)."""
    query = select(Workflow).where(Workflow.id == workflow_id)
    if account_id is not None:
        query = query.where(Workflow.account_id == account_id)
    return session.execute(query).scalar_one_or_none()


def list_workflows(
    session: Session,
    account_id: int,
    *,
    page: int = 1,
    per_page: int = 20,
    status: str | None = None,
) -> tuple[list[Workflow], int]:
    query = select(Workflow).where(Workflow.account_id == account_id)
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


def events_of(session: Session, workflow_id: str) -> list[WorkflowEvent]:
    return list(
        session.execute(
            select(WorkflowEvent)
            .where(WorkflowEvent.workflow_id == workflow_id)
            .order_by(WorkflowEvent.id)
        ).scalars()
    )


def record_prompt(
    session: Session, workflow_id: str, prompt_id: str, queue_number: int | None
) -> bool:
    """Attach the ComfyUI prompt to a still-queued workflow; False when it was cancelled first."""
    return (
        session.execute(
            update(Workflow)
            .where(Workflow.id == workflow_id, Workflow.status == S.QUEUED.value)
            .values(prompt_id=prompt_id, queue_number=queue_number, updated_at=utcnow())
            .returning(Workflow.id)
        ).first()
        is not None
    )


def heartbeat(
    session: Session, workflow_id: str, progress: Mapping[str, Any] | None = None
) -> bool:
    """Note that the runner is alive; False when the workflow is no longer queued or running."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = dict(progress)
    return (
        session.execute(
            update(Workflow)
            .where(
                Workflow.id == workflow_id,
                Workflow.status.in_([S.QUEUED.value, S.RUNNING.value]),
            )
            .values(**values)
            .returning(Workflow.id)
        ).first()
        is not None
    )
