"""Push and pull: copy projects between a local store and a server, sending only what is missing.

Runs keep their ids (so a second push updates, not duplicates), versions are committed in the
order they were made (a predictions table after the dataset it is bound to), and blobs travel
only when the destination lacks them. Both directions are idempotent. Version *numbers* are the
destination's: pushing into a project that already has versions continues its numbering.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tessera.backend.base import Backend
from tessera.errors import AuthError, NotFoundError
from tessera.store.catalog import VersionRecord


@dataclass
class SyncReport:
    projects: list[str] = field(default_factory=list)
    runs: int = 0
    versions: int = 0
    new_versions: int = 0
    blobs_sent: int = 0
    bytes_sent: int = 0


def sync(src: Backend, dst: Backend, projects: list[str] | None = None) -> SyncReport:
    report = SyncReport()
    names = projects or [p.name for p in src.projects()]
    all_versions = src.all_versions()
    for project in names:
        report.projects.append(project)
        runs = src.runs(project)
        for run in runs:
            dst.import_run(run)
            dst.replace_metrics(run.id, src.metric_history(run.id))
            report.runs += 1
        mapped: dict[int, int] = {}
        versions = sorted(
            (v for v in all_versions if v.project == project), key=lambda v: (v.created_at, v.id)
        )
        there = _DestinationVersions(dst, project)
        for version in versions:
            aliases = tuple(a for a in version.aliases if a != "latest")
            same = there.find(version)
            if same is not None and set(aliases) <= set(same.aliases):
                # Already there, with every alias: committing again would change nothing, and
                # asking for its blobs would cost a look-up per blob on the destination.
                mapped[version.id] = same.id
                report.versions += 1
                continue
            # A remote source downloads into its local cache (the manifest, then the blobs it
            # names, in parallel); the destination then takes what it lacks. What crossed the
            # network is the larger count: the downloads (pull: the cache is the destination,
            # which then lacks nothing) or the uploads (push).
            fetched, fetched_bytes = src.fetch([version.digest])
            manifest = src.read_manifest(version.digest)
            digests = sorted({version.digest, *manifest.stored_digests()})
            more, more_bytes = src.fetch(digests)
            fetched, fetched_bytes = fetched + more, fetched_bytes + more_bytes
            sizes = {f.digest: f.size for f in manifest.files.values() if f.stored}
            blobs, sent = dst.receive_blobs(project, digests, src.blob_path, sizes)
            report.blobs_sent += max(blobs, fetched)
            report.bytes_sent += max(sent, fetched_bytes)
            record, created = dst.commit_version(
                project=project,
                name=version.artifact,
                type=version.type,
                description=version.description,
                manifest=manifest,
                digest=version.digest,
                run_id=version.run_id,
                aliases=aliases,
            )
            mapped[version.id] = record.id
            report.versions += 1
            report.new_versions += int(created)
        for run in runs:
            for used in src.run_versions(run.id)["used"]:
                target = mapped.get(used.id)
                if target is None:  # a version of another project: find it by digest
                    found = [
                        v
                        for v in dst.all_versions()
                        if v.project == used.project
                        and v.artifact == used.artifact
                        and v.digest == used.digest
                    ]
                    target = found[0].id if found else None
                if target is not None:
                    dst.record_use(run.id, target)
    return report


class _DestinationVersions:
    """The destination's versions of each artifact of one project, fetched once per artifact."""

    def __init__(self, dst: Backend, project: str):
        self.dst = dst
        self.project = project
        self.by_artifact: dict[str, dict[str, VersionRecord]] = {}

    def find(self, version: VersionRecord) -> VersionRecord | None:
        """The destination's version with the same content, type and description, if any."""
        if version.artifact not in self.by_artifact:
            try:
                found = self.dst.versions(self.project, version.artifact)
            except (NotFoundError, AuthError):  # a new project or artifact there
                found = []
            self.by_artifact[version.artifact] = {v.digest: v for v in found}
        same = self.by_artifact[version.artifact].get(version.digest)
        if same is None or same.type != version.type:
            return None
        if version.description is not None and version.description != same.description:
            return None
        return same
