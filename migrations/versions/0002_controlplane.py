"""control plane: backbone defaults and aliases, tenant suspension time, worker death, quota index, functions.artifact_id foreign key

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 03:00:00.000000
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('backbones', sa.Column('default_max_tokens', sa.Integer(), nullable=True))
    op.add_column('backbones', sa.Column('default_max_queue', sa.Integer(), nullable=True))
    op.add_column('backbones', sa.Column('aliases', sa.JSON(), server_default='[]', nullable=False))
    op.add_column('tenants', sa.Column('suspended_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('workers', sa.Column('dead_at', sa.DateTime(timezone=True), nullable=True))
    # Quota checks count a tenant's in-flight invocations on every accept.
    op.create_index('ix_invocations_tenant_state', 'invocations', ['tenant_id', 'state'], unique=False)
    # 0001 declared this use_alter foreign key inside create_table, where Alembic skips it.
    op.create_foreign_key('fk_functions_artifact', 'functions', 'adapter_artifacts', ['artifact_id'], ['id'])


def downgrade() -> None:
    op.drop_constraint('fk_functions_artifact', 'functions', type_='foreignkey')
    op.drop_index('ix_invocations_tenant_state', table_name='invocations')
    op.drop_column('workers', 'dead_at')
    op.drop_column('tenants', 'suspended_at')
    op.drop_column('backbones', 'aliases')
    op.drop_column('backbones', 'default_max_queue')
    op.drop_column('backbones', 'default_max_tokens')
