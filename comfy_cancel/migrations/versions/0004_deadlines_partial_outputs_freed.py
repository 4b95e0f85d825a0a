"""deadlines, partial outputs, GPU freed

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 14:30:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OPEN_DEADLINE = "deadline_at IS NOT NULL AND cancel_requested_at IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("workflows") as batch:
        # The customer's optional time limit (seconds from submission) and the instant it
        # ends: past it the workflow is cancelled with source "deadline".
        batch.add_column(sa.Column("timeout_seconds", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("deadline_at", sa.DateTime(), nullable=True))
        # What ComfyUI reported saved before a cancel stopped the prompt.
        batch.add_column(sa.Column("partial_outputs", sa.JSON(), nullable=True))
        # When the runner confirmed ComfyUI no longer holds the cancelled prompt.
        batch.add_column(sa.Column("freed_at", sa.DateTime(), nullable=True))
    # Only deadlines nobody has acted on yet are indexed: the deadline pass costs what it finds.
    op.create_index(
        "ix_workflows_open_deadline", "workflows", ["deadline_at"],
        postgresql_where=sa.text(_OPEN_DEADLINE), sqlite_where=sa.text(_OPEN_DEADLINE),
    )


def downgrade() -> None:
    op.drop_index("ix_workflows_open_deadline", table_name="workflows")
    with op.batch_alter_table("workflows") as batch:
        batch.drop_column("freed_at")
        batch.drop_column("partial_outputs")
        batch.drop_column("deadline_at")
        batch.drop_column("timeout_seconds")
