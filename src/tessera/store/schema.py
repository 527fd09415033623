"""The catalog's tables (SQLAlchemy Core). The same definitions serve SQLite and PostgreSQL.

Changes to these tables need an Alembic migration in ``tessera/store/migrations/versions``; the
migrations, not this module, create the tables (``tests/test_catalog.py`` checks they agree).
Timestamps are float seconds since the epoch (UTC), which every engine stores and sorts the same.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData()

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

projects = sa.Table(
    "projects",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("project_id", BigId, sa.ForeignKey("projects.id"), nullable=False, index=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("config", Json, nullable=False),
    sa.Column("summary", Json, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("pid_started", sa.String(32), nullable=False),
)

metrics = sa.Table(
    "metrics",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id"), nullable=False),
    sa.Column("step", sa.BigInteger, nullable=False),
    sa.Column("key", sa.String(256), nullable=False),
    sa.Column("value", sa.Float),
    sa.Column("logged_at", sa.Float, nullable=False),
    sa.Index("ix_metrics_run_key_step", "run_id", "key", "step"),
)

artifacts = sa.Table(
    "artifacts",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("project_id", BigId, sa.ForeignKey("projects.id"), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("type", sa.String(128), nullable=False),
    sa.Column("description", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    # Incremented in the same transaction that inserts a version: numbers stay contiguous
    # under concurrent writers on SQLite and PostgreSQL alike.
    sa.Column("version_count", sa.Integer, nullable=False, server_default="0"),
    sa.UniqueConstraint("project_id", "name", name="uq_artifacts_project_name"),
)

versions = sa.Table(
    "versions",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("artifact_id", BigId, sa.ForeignKey("artifacts.id"), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False, index=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("file_count", sa.Integer, nullable=False),
    sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id")),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("artifact_id", "number", name="uq_versions_artifact_number"),
    sa.UniqueConstraint("artifact_id", "digest", name="uq_versions_artifact_digest"),
)

aliases = sa.Table(
    "aliases",
    metadata,
    sa.Column("artifact_id", BigId, sa.ForeignKey("artifacts.id"), primary_key=True),
    sa.Column("alias", sa.String(128), primary_key=True),
    sa.Column("version_id", BigId, sa.ForeignKey("versions.id"), nullable=False),
)

lineage = sa.Table(
    "lineage",
    metadata,
    sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id"), primary_key=True),
    sa.Column("version_id", BigId, sa.ForeignKey("versions.id"), primary_key=True),
    sa.Column("direction", sa.String(8), primary_key=True),  # "used" or "logged"
    sa.Column("at", sa.Float, nullable=False),
    sa.Index("ix_lineage_version", "version_id"),
)

# Every image of every dataset version, by content digest and by pixel digest: how an Image
# cell logged later finds the stored original (migration 0002).
samples_index = sa.Table(
    "samples_index",
    metadata,
    sa.Column("version_id", BigId, sa.ForeignKey("versions.id"), primary_key=True),
    sa.Column("sample_id", sa.String(512), primary_key=True),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("pixels", sa.String(64), nullable=False),
    sa.Index("ix_samples_index_digest", "digest"),
    sa.Index("ix_samples_index_pixels", "pixels"),
)

# What a table version is: its name, kind, row count and the dataset version it is bound to.
tables = sa.Table(
    "tables",
    metadata,
    sa.Column("version_id", BigId, sa.ForeignKey("versions.id"), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # "table" or "predictions"
    sa.Column("dataset_version_id", BigId, sa.ForeignKey("versions.id"), index=True),
    sa.Column("num_rows", sa.BigInteger, nullable=False),
)

# Every blob each version needs (its manifest and the stored files it lists): the reverse index
# that lets a server answer "may this caller read this digest?" with one indexed query, and
# lets gc mark without reading manifests (migration 0003).
version_blobs = sa.Table(
    "version_blobs",
    metadata,
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Column("version_id", BigId, sa.ForeignKey("versions.id"), primary_key=True),
    sa.Index("ix_version_blobs_version", "version_id"),
)

# Users, their API tokens (stored as SHA-256 of the token: tokens are random, 256 bits) and
# project membership with roles reader < writer < admin (migration 0003).
users = sa.Table(
    "users",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("is_admin", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.Float, nullable=False),
)

tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("user_id", BigId, sa.ForeignKey("users.id"), nullable=False, index=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
)

# A project that uploaded a blob's bytes may name it in its versions (migration 0004): a digest
# alone is not a capability, so a blob only other projects hold must be uploaded again.
blob_grants = sa.Table(
    "blob_grants",
    metadata,
    sa.Column("project_id", BigId, sa.ForeignKey("projects.id"), primary_key=True),
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

members = sa.Table(
    "members",
    metadata,
    sa.Column("project_id", BigId, sa.ForeignKey("projects.id"), primary_key=True),
    sa.Column("user_id", BigId, sa.ForeignKey("users.id"), primary_key=True),
    sa.Column("role", sa.String(16), nullable=False),
)
