"""Sample index (image digests and pixel digests of every dataset version) and table info.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "samples_index",
        sa.Column("version_id", BigId, sa.ForeignKey("versions.id"), primary_key=True),
        sa.Column("sample_id", sa.String(512), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("pixels", sa.String(64), nullable=False),
    )
    op.create_index("ix_samples_index_digest", "samples_index", ["digest"])
    op.create_index("ix_samples_index_pixels", "samples_index", ["pixels"])
    op.create_table(
        "tables",
        sa.Column("version_id", BigId, sa.ForeignKey("versions.id"), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("dataset_version_id", BigId, sa.ForeignKey("versions.id")),
        sa.Column("num_rows", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_tables_dataset_version_id", "tables", ["dataset_version_id"])


def downgrade() -> None:
    op.drop_table("tables")
    op.drop_table("samples_index")
