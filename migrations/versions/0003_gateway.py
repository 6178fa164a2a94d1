"""gateway: callbacks (per-tenant signing secret, URL, attempts) and cancel requests

Revision ID: 0003
Revises: 0002
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("callback_secret", sa.String(length=64), nullable=True))
    op.add_column("invocations", sa.Column("callback_url", sa.Text(), nullable=True))
    op.add_column("invocations", sa.Column("callback_state", sa.String(length=16), nullable=True))
    op.add_column("invocations", sa.Column("callback_attempts", sa.JSON(), nullable=True))
    op.add_column("invocations", sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True))
    # The dispatcher resumes undelivered callbacks after a restart by this state.
    op.create_index("ix_invocations_callback_state", "invocations", ["callback_state"])


def downgrade() -> None:
    op.drop_index("ix_invocations_callback_state", table_name="invocations")
    op.drop_column("invocations", "cancel_requested_at")
    op.drop_column("invocations", "callback_attempts")
    op.drop_column("invocations", "callback_state")
    op.drop_column("invocations", "callback_url")
    op.drop_column("tenants", "callback_secret")
