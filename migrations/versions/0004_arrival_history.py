"""arrival history: an index for counting accepted invocations per function and time bucket

The scheduler's demand predictors read per-function arrival counts per time bucket from the
invocations table (``controlplane/scheduler/history.py``); this index makes each count an
index-only range scan on ``accepted_at``, also after a control-plane restart.

Revision ID: 0004
Revises: 0003
"""
from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_invocations_accepted", "invocations", ["accepted_at"], postgresql_include=["function_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_invocations_accepted", table_name="invocations")
