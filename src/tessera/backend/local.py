"""LocalBackend: the Backend protocol served straight from a store folder."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from tessera import runtime
from tessera.backend.base import Source
from tessera.backend.ingest import digest_sources
from tessera.errors import DigestMismatchError, MissingBlobsError
from tessera.names import VersionSpec, parse_version_spec
from tessera.parallel import map_chunked
from tessera.store import Store, derived
from tessera.store.catalog import (
    ArtifactRecord,
    ProjectRecord,
    RunRecord,
    SampleMatch,
    TableRow,
    VersionRecord,
)
from tessera.store.manifest import FileEntry, Manifest

# How long blobs an upload created are trusted to be there without asking: far below gc's
# grace period (1 hour by default), far above the time from an upload to its commit.
FRESH_SECONDS = 300.0


class LocalBackend:
    def __init__(self, store: Store):
        self.store = store
        self.catalog = store.catalog
        # Blobs this thread's uploads created since its last commit: the commit need not ask
        # the blob store about them again (one request per blob on S3). Per thread, because a
        # server shares one backend between requests.
        self._fresh = threading.local()

    @classmethod
    def open(cls, dir: str | os.PathLike[str] | None = None, create: bool = False) -> LocalBackend:
        return cls(Store.open(dir, create=create))

    def close(self) -> None:
        self.store.close()

    # -- runs --------------------------------------------------------------------------------

    def create_run(
        self,
        project: str,
        name: str | None,
        config: dict[str, Any],
        process: runtime.ProcessIdentity | None = None,
    ) -> RunRecord:
        """A new run, owned by ``process`` (default: this one; the server passes the client's,
        so that a run lives and dies with the process that logs it)."""
        me = process or runtime.this_process()
        return self.catalog.create_run(project, name, config, me.host, me.pid, me.started)

    def run(self, run_id: str) -> RunRecord:
        return self.catalog.run(run_id)

    def runs(self, project: str | None = None) -> list[RunRecord]:
        return self.catalog.runs(project)

    def import_run(self, record: RunRecord) -> None:
        self.catalog.import_run(record)

    def replace_metrics(self, run_id: str, rows: list[tuple[int, str, float | None]]) -> None:
        self.catalog.replace_metrics(run_id, rows)

    def log_metrics(
        self, run_id: str, step: int, values: dict[str, float | None], summary: dict[str, Any]
    ) -> None:
        self.catalog.log_metrics(run_id, step, values, summary)

    def set_summary(self, run_id: str, summary: dict[str, Any]) -> None:
        self.catalog.update_run(run_id, summary=summary)

    def heartbeat(self, run_id: str) -> None:
        self.catalog.update_run(run_id, heartbeat_at=time.time())

    def finish_run(self, run_id: str, status: str, only_if_running: bool = False) -> bool:
        return self.catalog.finish_run(run_id, status, only_if_running)

    def metric_history(self, run_id: str) -> list[tuple[int, str, float | None]]:
        return self.catalog.metric_history(run_id)

    def mark_stale_runs(self) -> list[RunRecord]:
        """Mark runs whose process is gone (or silent too long) as crashed; return them."""
        crashed = []
        for record in self.catalog.runs(status="running"):
            if not runtime.run_is_alive(record) and self.catalog.finish_run(
                record.id, "crashed", only_if_running=True
            ):
                crashed.append(record)
        return crashed

    # -- artifacts ---------------------------------------------------------------------------

    def upload(self, project: str, sources: list[Source]) -> list[FileEntry]:
        """Store the bytes of every source but references; return their entries.

        Written in one blob batch: durable with one sync, visible under digest names only once
        complete.
        """
        with self.store.blobs.batch() as batch:
            entries = digest_sources(sources, self.store.stat_cache, batch)
        self._fresh.digests = self._fresh_digests() | batch.new_digests
        self._fresh.at = time.monotonic()
        return entries

    def _fresh_digests(self) -> set[str]:
        """What this thread's uploads created since its last commit, if that was recent."""
        if time.monotonic() - getattr(self._fresh, "at", -FRESH_SECONDS) >= FRESH_SECONDS:
            return set()
        return getattr(self._fresh, "digests", set())

    def receive_blobs(
        self,
        project: str,
        digests: list[str],
        source: Callable[[str], Path],
        sizes: dict[str, int] | None = None,
    ) -> tuple[int, int]:
        """Copy in the blobs this store lacks from files ``source(digest)``; (count, bytes).
        ``sizes`` (what the manifest says) is not needed here: each file is read whole."""

        failed = threading.Event()  # after the first error, the queued blobs are skipped

        def receive(digest: str) -> int | None:  # bytes stored; None: the store had it
            if failed.is_set() or batch.reuse(digest):
                return None
            try:
                actual, n = batch.put_file(source(digest))
                if actual != digest:
                    raise DigestMismatchError(f"blob {digest} arrived as {actual}")
            except BaseException:
                failed.set()
                raise
            return n

        # In threads: a bucket's writes are round trips, a folder's are hashing and copying.
        with self.store.blobs.batch() as batch, ThreadPoolExecutor(batch.threads) as pool:
            stored = [n for n in map_chunked(pool, receive, digests, chunk=16) if n is not None]
        return len(stored), sum(stored)

    def put_manifest(self, project: str, manifest: Manifest) -> str:
        return self.store.blobs.put_bytes(manifest.to_bytes())

    def commit_version(
        self,
        *,
        project: str,
        name: str,
        type: str,
        description: str | None,
        manifest: Manifest,
        digest: str,
        run_id: str | None,
        aliases: tuple[str, ...] = (),
    ) -> tuple[VersionRecord, bool]:
        """Record a version whose blobs are stored; the sample index and table row it needs
        are derived here from the stored manifest (see store/derived.py)."""
        # Blobs just created by this thread are young, so gc leaves them alone (docs/decisions.md);
        # every other one is checked, as it may be an old blob that gc is deleting.
        fresh = self._fresh_digests()
        self._fresh.digests = set()
        missing = self.store.blobs.missing({digest, *manifest.stored_digests()} - fresh)
        if missing:
            raise MissingBlobsError(
                f"cannot commit {project}/{name}: {len(missing)} blobs it names are not stored "
                f"(e.g. {sorted(missing)[0]}); upload them first",
                sorted(missing),
            )
        samples = (
            derived.sample_rows(manifest, self.store.blobs.read) if type == "dataset" else None
        )
        table = derived.table_row(type, name, manifest, self._find_dataset)
        return self.catalog.commit_version(
            project=project,
            name=name,
            type=type,
            description=description,
            digest=digest,
            size=manifest.size,
            file_count=len(manifest.files),
            run_id=run_id,
            aliases=aliases,
            samples=samples,
            table=table,
            blob_digests=manifest.stored_digests(),
        )

    def resolve(self, spec: VersionSpec, default_project: str | None) -> VersionRecord:
        return self.catalog.resolve(spec, default_project)

    def _find_dataset(self, spec: str, digest: str) -> int | None:
        parsed = parse_version_spec(spec)
        if parsed.project is None:
            return None
        found = self.catalog.version_by_digest(parsed.project, parsed.name, digest)
        return found.id if found else None

    def version_by_id(self, version_id: int) -> VersionRecord:
        return self.catalog.version_by_id(version_id)

    def find_samples(
        self,
        digests: list[str],
        pixels: list[str],
        prefer: Sequence[int] = (),
        project: str | None = None,
    ) -> tuple[dict[str, SampleMatch], dict[str, SampleMatch]]:
        return self.catalog.find_samples(digests, pixels, prefer=prefer, project=project)

    def table_row(self, version_id: int) -> TableRow | None:
        return self.catalog.table_row(version_id)

    def run_tables(self, run_id: str) -> list[tuple[VersionRecord, TableRow]]:
        return self.catalog.run_tables(run_id)

    def table_versions(
        self,
        kind: str | None = None,
        name: str | None = None,
        dataset_version_ids: list[int] | None = None,
    ) -> list[tuple[RunRecord | None, VersionRecord, TableRow]]:
        return self.catalog.table_versions(kind, name, dataset_version_ids)

    def all_versions(self) -> list[VersionRecord]:
        return self.catalog.all_versions()

    def record_use(self, run_id: str, version_id: int) -> None:
        self.catalog.record_use(run_id, version_id)

    def read_manifest(self, digest: str) -> Manifest:
        return Manifest.from_bytes(self.store.blobs.read(digest), digest)

    def open_blob(self, digest: str) -> BinaryIO:
        return self.store.blobs.open(digest)

    def blob_path(self, digest: str) -> Path | None:
        return self.store.blobs.local_path(digest)

    def fetch(self, digests: list[str]) -> tuple[int, int]:
        """Make sure these blobs are readable as local files: downloaded into the cache from
        a bucket, copied out of pack files in a folder (nothing to do for a folder without
        packs). Returns (0, 0): such copies are not transfers to report (``HttpBackend.fetch``
        counts its downloads)."""
        blobs = self.store.blobs
        if blobs.local_root != self.store.root or blobs.has_packs():
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(blobs.local_path, set(digests)))
        return 0, 0

    def local_root(self) -> Path | None:
        """The folder whose ``blobs/ab/cd/<digest>`` files may be read directly (the store
        folder, or the local cache of a bucket)."""
        return self.store.blobs.local_root

    def duckdb_source(self, digest: str) -> str:
        return self.store.blobs.duckdb_path(digest)

    # -- browsing ----------------------------------------------------------------------------

    def projects(self) -> list[ProjectRecord]:
        return self.catalog.projects()

    def artifacts(self, project: str | None = None) -> list[ArtifactRecord]:
        return self.catalog.artifacts(project)

    def versions(self, project: str, artifact: str) -> list[VersionRecord]:
        return self.catalog.versions(project, artifact)

    def lineage(self, version_id: int) -> dict[str, list[RunRecord]]:
        return self.catalog.lineage(version_id)

    def run_versions(self, run_id: str) -> dict[str, list[VersionRecord]]:
        return self.catalog.run_versions(run_id)
