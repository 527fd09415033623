"""Blob grants: which project proved it holds a blob's bytes (by uploading them).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "blob_grants",
        sa.Column("project_id", BigId, sa.ForeignKey("projects.id"), primary_key=True),
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("blob_grants")
