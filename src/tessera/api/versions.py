"""One place that turns a version record into the right object for its type."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tessera.api.artifact import ArtifactVersion
from tessera.backend.base import Backend
from tessera.store.catalog import VersionRecord
from tessera.store.manifest import Manifest

if TYPE_CHECKING:
    from tessera.api.run import Run


def version_object(
    backend: Backend,
    record: VersionRecord,
    manifest: Manifest | None = None,
    run: Run | None = None,
) -> ArtifactVersion:
    """An ``ArtifactVersion``, or a ``DatasetVersion`` / ``TableVersion`` for those types."""
    # Imported here: datasets and tables need numpy/pyarrow, plain artifacts do not.
    cls: type[ArtifactVersion] = ArtifactVersion
    if record.type == "dataset":
        from tessera.api.dataset import DatasetVersion as cls
    elif record.type in ("table", "predictions"):
        from tessera.api.table import TableVersion as cls
    return cls(backend, record, manifest, run=run)
