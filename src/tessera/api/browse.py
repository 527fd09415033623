"""Read-only browsing of a store: projects, runs, artifacts, versions and lineage."""

from __future__ import annotations

from typing import Any

from tessera.api.artifact import ArtifactVersion
from tessera.api.versions import version_object
from tessera.backend.base import Backend
from tessera.names import check_name, parse_version_spec
from tessera.store.catalog import ArtifactRecord, ProjectRecord, RunRecord


class StoreBrowser:
    """What ``tessera.open_store()`` returns. Nothing here writes to the store."""

    def __init__(self, backend: Backend):
        self._backend = backend

    def __enter__(self) -> StoreBrowser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._backend.close()

    def projects(self) -> list[ProjectRecord]:
        return self._backend.projects()

    def runs(self, project: str | None = None) -> list[RunRecord]:
        if project is not None:
            check_name(project, "project")
        return self._backend.runs(project)

    def run(self, run_id: str) -> RunRecord:
        return self._backend.run(run_id)

    def history(self, run_id: str) -> dict[str, list[tuple[int, float | None]]]:
        out: dict[str, list[tuple[int, float | None]]] = {}
        for step, key, value in self._backend.metric_history(run_id):
            out.setdefault(key, []).append((step, value))
        return out

    def artifacts(self, project: str | None = None) -> list[ArtifactRecord]:
        return self._backend.artifacts(project)

    def versions(self, project: str, artifact: str) -> list[ArtifactVersion]:
        return [
            version_object(self._backend, record)
            for record in self._backend.versions(project, artifact)
        ]

    def artifact(self, spec: str, project: str | None = None) -> ArtifactVersion:
        """``project/name:v1`` (or ``name:v1`` with ``project=``), without recording lineage."""
        record = self._backend.resolve(parse_version_spec(spec), project)
        return version_object(self._backend, record)

    def lineage(self, spec: str, project: str | None = None) -> dict[str, list[RunRecord]]:
        return self.artifact(spec, project).lineage()

    def inputs_outputs(self, run_id: str) -> dict[str, list[ArtifactVersion]]:
        """``{"used": [...], "logged": [...]}``: the versions a run read and wrote."""
        found = self._backend.run_versions(run_id)
        return {
            direction: [version_object(self._backend, r) for r in records]
            for direction, records in found.items()
        }

    def describe(self) -> dict[str, Any]:
        return {
            "projects": len(self.projects()),
            "runs": len(self.runs()),
            "artifacts": len(self.artifacts()),
        }
