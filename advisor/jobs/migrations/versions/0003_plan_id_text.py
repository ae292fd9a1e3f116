"""Plan ids as text: a /v1/recommend plan id encodes its plan (``plan_v2.<base64url>``, about 150 characters and
longer as plan fields are appended), which the baseline's VARCHAR(64) refused on PostgreSQL (SQLite ignores the
length), so launching a recommended plan by its id failed there with a 500.

Revision ID: 0003_plan_id_text
Revises: 0002_replica_leases
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_plan_id_text"
down_revision = "0002_replica_leases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ft_jobs") as b:
        b.alter_column("plan_id", existing_type=sa.String(length=64), type_=sa.Text(), existing_nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("ft_jobs") as b:
        b.alter_column("plan_id", existing_type=sa.Text(), type_=sa.String(length=64), existing_nullable=True)
