"""cancel re-drive stamp and per-token rate limits

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 02:30:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workflows") as batch:
        # When a cancel worker took the request: the re-publish sweep hands on again only
        # what nobody took (or what a worker took and then died on).
        batch.add_column(sa.Column("cancel_taken_at", sa.DateTime(), nullable=True))
        # How often the orphan sweep gave the workflow a new runner task (bounded).
        batch.add_column(
            sa.Column("redispatch_count", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("api_tokens") as batch:
        # Requests per rate-limit window for this token; NULL means the configured default.
        batch.add_column(sa.Column("rate_limit", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("rate_limit")
    with op.batch_alter_table("workflows") as batch:
        batch.drop_column("redispatch_count")
        batch.drop_column("cancel_taken_at")
