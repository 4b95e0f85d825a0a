"""runner header values encrypted at rest

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 04:00:00

Existing header values are sealed with COMFY_CANCEL_SECRET_KEY in this migration. A
database whose runners have headers cannot be migrated without the key: the migration
stops with a message, and nothing is left in clear or lost.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from comfy_cancel import encryption
from comfy_cancel.config import secret_keys

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _as_dict(value: Any) -> dict[str, str]:
    if isinstance(value, str):
        value = json.loads(value)
    return dict(value or {})


def upgrade() -> None:
    with op.batch_alter_table("runners") as batch:
        batch.add_column(sa.Column("sealed_headers", sa.Text(), nullable=True))
        batch.add_column(sa.Column("header_names", sa.JSON(), nullable=True))
    bind = op.get_bind()
    runners = sa.table(
        "runners", sa.column("id", sa.String), sa.column("headers", sa.JSON),
        sa.column("sealed_headers", sa.Text), sa.column("header_names", sa.JSON),
    )
    for runner_id, headers in bind.execute(sa.select(runners.c.id, runners.c.headers)).all():
        plain = _as_dict(headers)
        bind.execute(
            runners.update().where(runners.c.id == runner_id).values(
                sealed_headers=encryption.seal(plain, secret_keys()) if plain else None,
                header_names=list(plain),
            )
        )
    with op.batch_alter_table("runners") as batch:
        batch.alter_column("header_names", existing_type=sa.JSON(), nullable=False)
        batch.drop_column("headers")


def downgrade() -> None:
    with op.batch_alter_table("runners") as batch:
        batch.add_column(sa.Column("headers", sa.JSON(), nullable=True))
    bind = op.get_bind()
    runners = sa.table(
        "runners", sa.column("id", sa.String), sa.column("headers", sa.JSON),
        sa.column("sealed_headers", sa.Text),
    )
    for runner_id, sealed in bind.execute(
        sa.select(runners.c.id, runners.c.sealed_headers)
    ).all():
        plain = encryption.unseal(sealed, secret_keys()) if sealed else {}
        bind.execute(runners.update().where(runners.c.id == runner_id).values(headers=plain))
    with op.batch_alter_table("runners") as batch:
        batch.alter_column("headers", existing_type=sa.JSON(), nullable=False)
        batch.drop_column("sealed_headers")
        batch.drop_column("header_names")
