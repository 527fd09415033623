"""One place that turns a version record into the right object for its type."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tessera.api.artifact import ArtifactVersion
from tessera.api.dataset import DatasetVersion
from tessera.api.table import TableVersion
from tessera.backend.base import Backend
from tessera.store.catalog import VersionRecord
from tessera.store.manifest import Manifest

if TYPE_CHECKING:
    from tessera.api.run import Run

_BY_TYPE: dict[str, type[ArtifactVersion]] = {
    "dataset": DatasetVersion,
    "table": TableVersion,
    "predictions": TableVersion,
}


def version_object(
    backend: Backend,
    record: VersionRecord,
    manifest: Manifest | None = None,
    run: Run | None = None,
) -> ArtifactVersion:
    """An ``ArtifactVersion``, or a ``DatasetVersion`` / ``TableVersion`` for those types."""
    cls = _BY_TYPE.get(record.type, ArtifactVersion)
    return cls(backend, record, manifest, run=run)
