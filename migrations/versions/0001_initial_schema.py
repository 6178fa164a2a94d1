"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-24 01:51:21.479282
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('backbones',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('uri', sa.Text(), nullable=False),
    sa.Column('shape', sa.JSON(), nullable=False),
    sa.Column('max_context', sa.Integer(), nullable=False),
    sa.Column('default_price_input_micros_per_1m', sa.BigInteger(), nullable=False),
    sa.Column('default_price_output_micros_per_1m', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('tenants',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('tokens_per_minute', sa.BigInteger(), nullable=True),
    sa.Column('max_concurrency', sa.Integer(), nullable=True),
    sa.Column('monthly_spend_cap_picousd', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('workers',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('backbone', sa.String(length=128), nullable=False),
    sa.Column('device', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_heartbeat_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('api_keys',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('tenant_id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('secret_hash', sa.String(length=64), nullable=False),
    sa.Column('scopes', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('secret_hash')
    )
    op.create_index(op.f('ix_api_keys_tenant_id'), 'api_keys', ['tenant_id'], unique=False)
    op.create_table('functions',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('tenant_id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('backbone_id', sa.String(length=32), nullable=False),
    sa.Column('artifact_id', sa.String(length=32), nullable=True),
    sa.Column('price_input_micros_per_1m', sa.BigInteger(), nullable=False),
    sa.Column('price_output_micros_per_1m', sa.BigInteger(), nullable=False),
    sa.Column('max_tokens', sa.Integer(), nullable=True),
    sa.Column('max_queue', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('price_input_micros_per_1m >= 0 AND price_output_micros_per_1m >= 0', name='ck_functions_prices'),
    sa.ForeignKeyConstraint(['artifact_id'], ['adapter_artifacts.id'], name='fk_functions_artifact', use_alter=True),
    sa.ForeignKeyConstraint(['backbone_id'], ['backbones.id'], ),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('tenant_id', 'name', name='uq_functions_tenant_name')
    )
    op.create_index(op.f('ix_functions_tenant_id'), 'functions', ['tenant_id'], unique=False)
    op.create_table('adapter_artifacts',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('function_id', sa.String(length=32), nullable=False),
    sa.Column('tenant_id', sa.String(length=32), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('bucket', sa.String(length=128), nullable=False),
    sa.Column('prefix', sa.Text(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('target_modules', sa.JSON(), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['function_id'], ['functions.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('function_id', 'version', name='uq_artifacts_function_version')
    )
    op.create_index(op.f('ix_adapter_artifacts_function_id'), 'adapter_artifacts', ['function_id'], unique=False)
    op.create_index(op.f('ix_adapter_artifacts_tenant_id'), 'adapter_artifacts', ['tenant_id'], unique=False)
    op.create_table('invocations',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('tenant_id', sa.String(length=32), nullable=False),
    sa.Column('function_id', sa.String(length=32), nullable=False),
    sa.Column('artifact_id', sa.String(length=32), nullable=False),
    sa.Column('mode', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('request', sa.JSON(), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=True),
    sa.Column('idempotency_key', sa.String(length=256), nullable=True),
    sa.Column('price_input_micros_per_1m', sa.BigInteger(), nullable=False),
    sa.Column('price_output_micros_per_1m', sa.BigInteger(), nullable=False),
    sa.Column('accepted_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('first_token_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('prompt_tokens', sa.Integer(), nullable=True),
    sa.Column('completion_tokens', sa.Integer(), nullable=True),
    sa.Column('result_text', sa.Text(), nullable=True),
    sa.Column('finish_reason', sa.String(length=32), nullable=True),
    sa.Column('timings', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('worker_id', sa.String(length=128), nullable=True),
    sa.ForeignKeyConstraint(['artifact_id'], ['adapter_artifacts.id'], ),
    sa.ForeignKeyConstraint(['function_id'], ['functions.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('tenant_id', 'idempotency_key', name='uq_invocations_idempotency')
    )
    op.create_index('ix_invocations_function_state', 'invocations', ['function_id', 'state'], unique=False)
    op.create_index('ix_invocations_tenant_accepted', 'invocations', ['tenant_id', 'accepted_at'], unique=False)
    op.create_table('usage_records',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('invocation_id', sa.String(length=32), nullable=False),
    sa.Column('tenant_id', sa.String(length=32), nullable=False),
    sa.Column('function_id', sa.String(length=32), nullable=False),
    sa.Column('input_tokens', sa.Integer(), nullable=False),
    sa.Column('output_tokens', sa.Integer(), nullable=False),
    sa.Column('price_input_micros_per_1m', sa.BigInteger(), nullable=False),
    sa.Column('price_output_micros_per_1m', sa.BigInteger(), nullable=False),
    sa.Column('amount_picousd', sa.BigInteger(), nullable=False),
    sa.Column('device_ns', sa.BigInteger(), nullable=False),
    sa.Column('worker_id', sa.String(length=128), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['function_id'], ['functions.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['invocation_id'], ['invocations.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('invocation_id')
    )
    op.create_index(op.f('ix_usage_records_function_id'), 'usage_records', ['function_id'], unique=False)
    op.create_index('ix_usage_tenant_time', 'usage_records', ['tenant_id', 'recorded_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_usage_tenant_time', table_name='usage_records')
    op.drop_index(op.f('ix_usage_records_function_id'), table_name='usage_records')
    op.drop_table('usage_records')
    op.drop_index('ix_invocations_tenant_accepted', table_name='invocations')
    op.drop_index('ix_invocations_function_state', table_name='invocations')
    op.drop_table('invocations')
    op.drop_index(op.f('ix_adapter_artifacts_tenant_id'), table_name='adapter_artifacts')
    op.drop_index(op.f('ix_adapter_artifacts_function_id'), table_name='adapter_artifacts')
    op.drop_table('adapter_artifacts')
    op.drop_index(op.f('ix_functions_tenant_id'), table_name='functions')
    op.drop_table('functions')
    op.drop_index(op.f('ix_api_keys_tenant_id'), table_name='api_keys')
    op.drop_table('api_keys')
    op.drop_table('workers')
    op.drop_table('tenants')
    op.drop_table('backbones')
