"""Replicas: a lease table (per replica and for the reconciler) and the owning replica of each job.

Why nullable columns: jobs finished before this revision have no owner; an active job without one
is taken over by the reconciler like a job whose replica died.

Revision ID: 0002_replica_leases
Revises: 0001_baseline
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_replica_leases"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ft_leases",
        sa.Column("name", sa.String(length=160), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("acquired_at", sa.Float(), nullable=False),
        sa.Column("renewed_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_index(op.f("ix_ft_leases_expires_at"), "ft_leases", ["expires_at"], unique=False)
    op.add_column("ft_jobs", sa.Column("owner_replica", sa.String(length=128), nullable=True))
    op.add_column("ft_jobs", sa.Column("owner_host", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ft_jobs") as b:
        b.drop_column("owner_host")
        b.drop_column("owner_replica")
    op.drop_index(op.f("ix_ft_leases_expires_at"), table_name="ft_leases")
    op.drop_table("ft_leases")
