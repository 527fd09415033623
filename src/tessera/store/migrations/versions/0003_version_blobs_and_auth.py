"""Blob reverse index; users, tokens and project members.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "version_blobs",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("version_id", BigId, sa.ForeignKey("versions.id"), primary_key=True),
    )
    op.create_index("ix_version_blobs_version", "version_blobs", ["version_id"])
    op.create_table(
        "users",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("is_admin", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("user_id", BigId, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
    )
    op.create_index("ix_tokens_user_id", "tokens", ["user_id"])
    op.create_table(
        "members",
        sa.Column("project_id", BigId, sa.ForeignKey("projects.id"), primary_key=True),
        sa.Column("user_id", BigId, sa.ForeignKey("users.id"), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
    )
    # Versions committed before this revision: index their blobs from their manifests.
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, digest FROM versions")).fetchall()
    if rows:
        from tessera.store.backfill import backfill_version_blobs

        backfill_version_blobs(conn, rows, op.get_context().config.attributes.get("blobs"))


def downgrade() -> None:
    for table in ("members", "tokens", "users", "version_blobs"):
        op.drop_table(table)
