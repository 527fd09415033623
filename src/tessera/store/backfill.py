"""Data migrations that need the blob store (run from Alembic revisions)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from tessera.store.manifest import Manifest


def backfill_version_blobs(conn: sa.Connection, versions: list[Any], blobs: Any) -> None:
    """Fill ``version_blobs`` for versions committed before revision 0003."""
    if blobs is None:
        raise RuntimeError("upgrading to revision 0003 needs the blob store to read manifests")
    for version_id, digest in versions:
        manifest = Manifest.from_bytes(blobs.read(digest), digest)
        digests = sorted({digest, *manifest.stored_digests()})
        conn.execute(
            sa.text("INSERT INTO version_blobs (digest, version_id) VALUES (:d, :v)"),
            [{"d": d, "v": version_id} for d in digests],
        )
