"""HttpBackend: the Backend protocol over the server's HTTP API.

Uploads send only what the server lacks: digests are computed locally (with the stat cache),
the server is asked which it is missing, small blobs travel packed many to a request, large
ones streamed; transient failures are retried with backoff, and an interrupted upload resumes
by asking again what is missing. Downloads land in a local store folder that doubles as a
cache, so a version already present locally costs no bytes from the server.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from tessera import progress, wire
from tessera.backend.base import Source
from tessera.backend.ingest import digest_sources
from tessera.errors import DigestMismatchError, MissingBlobsError, TesseraError
from tessera.files import read_small
from tessera.names import VersionSpec
from tessera.runtime import this_process
from tessera.store import Store
from tessera.store.blobs import BlobWriter
from tessera.store.catalog import (
    ArtifactRecord,
    ProjectRecord,
    RunRecord,
    SampleMatch,
    TableRow,
    VersionRecord,
)
from tessera.store.hashing import CHUNK_SIZE, file_pieces
from tessera.store.manifest import FileEntry, Manifest
from tessera.store.packs import FRAME_HEADER, TruncatedPackError, read_frames

API = wire.API
PACK_LIMIT = 16 * 1024 * 1024  # bytes per pack request
SMALL_BLOB = 4 * 1024 * 1024  # smaller blobs travel in packs
RETRIES = 6
UPLOAD_THREADS = 4
FETCH_THREADS = 8
FETCH_GROUP = 256  # blobs per POST /blobs/fetch: enough to hide per-request costs


class ServerUnavailableError(TesseraError, ConnectionError):
    """The server could not be reached, even after retrying."""


class HttpBackend:
    def __init__(self, url: str, token: str | None, cache: Store):
        self.url = url
        self.cache = cache
        self._headers = {"User-Agent": "tessera"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._client = self._new_client()
        self._client_lock = threading.Lock()

    def _new_client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers=self._headers,
            # Plain http never uses TLS (and redirects are not followed): skip loading the CA
            # bundle, which took longer than a whole push of unchanged data.
            verify=not self.url.startswith("http://"),
            timeout=httpx.Timeout(120.0, connect=10.0),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
        )

    @property
    def client(self) -> httpx.Client:
        """The connection pool; opened again if the backend was closed, so that versions read
        through a finished run or a closed browser stay readable (as a local store's do)."""
        with self._client_lock:
            if self._client.is_closed:
                self._client = self._new_client()
                # Nobody will call close() again: close this pool when the backend goes.
                weakref.finalize(self, self._client.close)
            return self._client

    @classmethod
    def open(cls, url: str, token: str | None, dir: str | os.PathLike[str] | None) -> HttpBackend:
        return cls(url, token, Store.open(dir, create=True, local_only=True))

    def close(self) -> None:
        self._client.close()
        self.cache.close()

    # -- transport ---------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        content_factory: Callable[[], Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """One API call, retried with exponential backoff on connection errors and 502-504.

        ``content_factory`` makes a fresh request body for each attempt (streams cannot be
        replayed)."""
        delay = 0.2
        for attempt in range(RETRIES):
            try:
                if content_factory is not None:
                    kwargs["content"] = content_factory()
                response = self.client.request(method, path, **kwargs)
            except httpx.TransportError as e:
                if attempt == RETRIES - 1:
                    raise ServerUnavailableError(
                        f"cannot reach the Tessera server at {self.url} ({e}); is it running?"
                    ) from None
            else:
                if response.status_code not in (502, 503, 504):
                    return self._result(response)
                if attempt == RETRIES - 1:
                    return self._result(response)
            time.sleep(delay * (1 + random.random() / 2))
            delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    def _result(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"message": response.text[:500]}
            wire.raise_error(response.status_code, body)
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.content

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    # -- runs --------------------------------------------------------------------------------

    def create_run(self, project: str, name: str | None, config: dict[str, Any]) -> RunRecord:
        data = self.request(
            "POST",
            f"{API}/projects/{project}/runs",
            json={"name": name, "config": config, "process": dataclasses.asdict(this_process())},
        )
        return wire.load(RunRecord, data)

    def run(self, run_id: str) -> RunRecord:
        return wire.load(RunRecord, self.get(f"{API}/runs/{run_id}"))

    def runs(self, project: str | None = None) -> list[RunRecord]:
        path = f"{API}/projects/{project}/runs" if project else f"{API}/runs"
        return [wire.load(RunRecord, r) for r in self.get(path)]

    def log_metrics(
        self, run_id: str, step: int, values: dict[str, float | None], summary: dict[str, Any]
    ) -> None:
        self.request(
            "POST",
            f"{API}/runs/{run_id}/metrics",
            json={"step": step, "values": values, "summary": summary},
        )

    def set_summary(self, run_id: str, summary: dict[str, Any]) -> None:
        self.request("PATCH", f"{API}/runs/{run_id}", json={"summary": summary})

    def heartbeat(self, run_id: str) -> None:
        self.request("PATCH", f"{API}/runs/{run_id}", json={"heartbeat": True})

    def finish_run(self, run_id: str, status: str, only_if_running: bool = False) -> bool:
        data = self.request(
            "PATCH",
            f"{API}/runs/{run_id}",
            json={"status": status, "only_if_running": only_if_running},
        )
        return bool(data["changed"])

    def metric_history(self, run_id: str) -> list[tuple[int, str, float | None]]:
        return [tuple(row) for row in self.get(f"{API}/runs/{run_id}/metrics")]  # type: ignore[misc]

    def mark_stale_runs(self) -> list[RunRecord]:
        return []  # the server marks stale runs itself when it lists them

    def import_run(self, record: RunRecord) -> None:
        self.request(
            "PUT",
            f"{API}/projects/{record.project}/runs/{record.id}",
            json={"record": wire.dump(record)},
        )

    def replace_metrics(self, run_id: str, rows: list[tuple[int, str, float | None]]) -> None:
        record = self.run(run_id)
        self.request(
            "PUT",
            f"{API}/projects/{record.project}/runs/{run_id}",
            json={"record": wire.dump(record), "metrics": [list(r) for r in rows]},
        )

    # -- blobs -------------------------------------------------------------------------------

    def missing(self, project: str, digests: list[str]) -> set[str]:
        out: set[str] = set()
        unique = sorted(set(digests))
        for start in range(0, len(unique), 50_000):
            data = self.request(
                "POST",
                f"{API}/blobs/missing",
                json={"project": project, "digests": unique[start : start + 50_000]},
            )
            out.update(data["missing"])
        return out

    def send_blobs(
        self,
        project: str,
        source: Callable[[str], Callable[[], Iterator[bytes]] | bytes],
        sizes: dict[str, int],
        missing: set[str] | None = None,
    ) -> int:
        """Upload the blobs of ``sizes`` that the server lacks (``missing``, when the caller has
        just asked); return how many bytes were sent. ``source(digest)``: the blob's bytes, or
        a function that reads them (called in the upload threads, as its pack is sent).

        One round is enough: the server answers a request only once its blobs are verified and
        stored, each request is retried on transient failures, and past that the error is
        raised; a later push or commit resumes by asking again what is missing."""
        if missing is None:
            missing = self.missing(project, list(sizes))
        if not missing:
            return 0
        small = [d for d in missing if sizes[d] <= SMALL_BLOB]
        large = [d for d in missing if sizes[d] > SMALL_BLOB]
        packs: list[list[str]] = []
        current: list[str] = []
        current_size = 0
        for digest in sorted(small):
            if current and current_size + sizes[digest] > PACK_LIMIT:
                packs.append(current)
                current, current_size = [], 0
            current.append(digest)
            current_size += sizes[digest] + FRAME_HEADER.size
        if current:
            packs.append(current)
        total = sum(sizes[d] for d in missing)
        show = total > 64 * 1024 * 1024 or len(missing) > 2000

        def send_pack(pack: list[str]) -> int:
            length = sum(FRAME_HEADER.size + sizes[d] for d in pack)

            def frames() -> Iterator[bytes]:
                # Read as sent: the first bytes leave at once, and no 16 MiB body is joined
                # (its fresh pages cost more than the copy) while the connection idles.
                for digest in pack:
                    data = _as_bytes(source(digest))
                    if len(data) != sizes[digest]:
                        raise DigestMismatchError(
                            f"blob {digest} has {len(data):,} bytes where {sizes[digest]:,} "
                            "were announced: a file changed while it was being logged, or the "
                            "store is damaged (`tessera verify` tells); nothing was committed"
                        )
                    yield FRAME_HEADER.pack(digest.encode(), len(data)) + data

            self.request(
                "POST",
                f"{API}/blobs/pack",
                params={"project": project},
                headers={"Content-Length": str(length)},
                content_factory=frames,
            )
            bar.advance(sum(sizes[d] for d in pack))
            return length

        def send_large(digest: str) -> int:
            blob = source(digest)
            self.request(
                "PUT",
                f"{API}/blobs/{digest}",
                params={"project": project},
                headers={"Content-Length": str(sizes[digest])},
                content_factory=(lambda: blob()) if callable(blob) else (lambda: blob),
            )
            bar.advance(sizes[digest])
            return sizes[digest]

        with (
            progress.bar("uploading", total, bytes=True, show=show) as bar,
            ThreadPoolExecutor(UPLOAD_THREADS) as pool,
        ):
            # Large blobs first: they take longest, and the packs fill the gaps around them.
            results = [pool.submit(send_large, d) for d in sorted(large, key=lambda d: -sizes[d])]
            results += [pool.submit(send_pack, p) for p in packs]
            return sum(f.result() for f in results)

    def upload(self, project: str, sources: list[Source]) -> list[FileEntry]:
        entries = digest_sources(sources, self.cache.stat_cache, None)
        payload: dict[str, Callable[[], Iterator[bytes]] | bytes] = {}
        sizes: dict[str, int] = {}
        for entry, source in zip(entries, sources, strict=True):
            if entry.ref is not None:
                continue
            sizes[entry.digest] = entry.size
            if source.data is not None:
                payload[entry.digest] = source.data
            elif source.local is not None:
                payload[entry.digest] = _file_chunks(source.local)
        self.send_blobs(project, payload.__getitem__, sizes)
        return entries

    def receive_blobs(
        self,
        project: str,
        digests: list[str],
        source: Callable[[str], Path],
        sizes: dict[str, int] | None = None,
    ) -> tuple[int, int]:
        """Upload the blobs the server lacks from files ``source(digest)``; (count, bytes).

        With ``sizes`` (from the manifest), packs are planned without a ``stat`` per blob, and
        each file is found only when its pack is built, in the upload threads: for 10,000 small
        blobs that serial look-up took 0.3 s before the first byte was sent."""
        missing = self.missing(project, digests)
        if not missing:
            return 0, 0
        known = sizes or {}
        size_of = {d: known[d] if d in known else source(d).stat().st_size for d in missing}

        def read(digest: str) -> Callable[[], Iterator[bytes]]:
            return _file_chunks(functools.partial(source, digest))

        return len(missing), self.send_blobs(project, read, size_of, missing)

    def put_manifest(self, project: str, manifest: Manifest) -> str:
        data = manifest.to_bytes()
        digest = self.cache.blobs.put_bytes(data)
        self.send_blobs(project, lambda _digest: data, {digest: len(data)})
        return digest

    def blob_path(self, digest: str) -> Path:
        """The blob in the local cache, downloaded (and verified) first if needed."""
        path = self.cache.blobs.path_of(digest)
        if not path.exists():
            with self.cache.blobs.batch() as batch:
                self._download_group([digest], batch)
        return path

    def fetch(self, digests: list[str]) -> tuple[int, int]:
        """Download the blobs the local cache lacks, made durable together: one file-system
        sync for the lot, not one per blob. They come in groups of ``FETCH_GROUP`` per request
        (``POST /blobs/fetch``), several requests at once. Returns (blobs, bytes) downloaded."""
        wanted = sorted(d for d in set(digests) if not self.cache.blobs.has(d))
        if not wanted:
            return 0, 0
        # Every connection gets work: a few large blobs travel one per request, in parallel.
        size = max(1, min(FETCH_GROUP, -(-len(wanted) // FETCH_THREADS)))
        groups = [wanted[i : i + size] for i in range(0, len(wanted), size)]
        with self.cache.blobs.batch() as batch, ThreadPoolExecutor(FETCH_THREADS) as pool:
            sizes = list(pool.map(lambda group: self._download_group(group, batch), groups))
        return len(wanted), sum(sizes)

    def _download_group(self, digests: list[str], batch: BlobWriter) -> int:
        """Fetch blobs as one stream of frames, each verified and staged as it arrives; after
        a transient failure, ask again for those not received yet. Returns the bytes received."""
        remaining = list(digests)
        received = 0
        delay = 0.2
        for attempt in range(RETRIES):
            try:
                with self.client.stream(
                    "POST", f"{API}/blobs/fetch", json={"digests": remaining}
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._result(response)
                    for digest, size, body in read_frames(response.iter_bytes(CHUNK_SIZE)):
                        if digest != remaining[0]:
                            raise ServerUnavailableError(
                                f"{self.url} sent blob {digest} where {remaining[0]} was due"
                            )
                        if size < CHUNK_SIZE:
                            batch.put_bytes(b"".join(body), digest)
                        else:
                            batch.put_stream(body, expected=digest)
                        remaining.pop(0)
                        received += size
                if remaining:
                    raise TruncatedPackError(f"the response ended before {remaining[0]}")
                return received
            except (httpx.TransportError, TruncatedPackError) as e:
                if attempt == RETRIES - 1:
                    raise ServerUnavailableError(
                        f"cannot download {remaining[0]} from {self.url}: {e}"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def open_blob(self, digest: str) -> BinaryIO:
        return open(self.blob_path(digest), "rb")

    def local_root(self) -> Path:
        return self.cache.root

    def duckdb_source(self, digest: str) -> str:
        return str(self.blob_path(digest))

    def read_manifest(self, digest: str) -> Manifest:
        return Manifest.from_bytes(self.blob_path(digest).read_bytes(), digest)

    # -- versions ----------------------------------------------------------------------------

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
        body = {
            "name": name,
            "type": type,
            "description": description,
            "digest": digest,
            "run_id": run_id,
            "aliases": list(aliases),
        }
        try:
            data = self.request("POST", f"{API}/projects/{project}/versions", json=body)
        except MissingBlobsError as e:
            # An upload was interrupted: send what the local cache holds, then commit again.
            present = [d for d in e.missing if self.cache.blobs.has(d)]
            if len(present) != len(e.missing):
                raise
            self.receive_blobs(project, present, self.cache.blobs.path_of)
            data = self.request("POST", f"{API}/projects/{project}/versions", json=body)
        return wire.load(VersionRecord, data["version"]), bool(data["created"])

    def resolve(self, spec: VersionSpec, default_project: str | None) -> VersionRecord:
        return wire.load(
            VersionRecord,
            self.get(
                f"{API}/resolve",
                spec=str(spec) if spec.project else f"{spec.name}:{spec.selector}",
                project=default_project,
            ),
        )

    def record_use(self, run_id: str, version_id: int) -> None:
        self.request("POST", f"{API}/runs/{run_id}/uses", json={"version_id": version_id})

    def version_by_id(self, version_id: int) -> VersionRecord:
        return wire.load(VersionRecord, self.get(f"{API}/versions/{version_id}"))

    def find_samples(
        self,
        digests: list[str],
        pixels: list[str],
        prefer: Sequence[int] = (),
        project: str | None = None,
    ) -> tuple[dict[str, SampleMatch], dict[str, SampleMatch]]:
        data = self.request(
            "POST",
            f"{API}/samples/find",
            json={
                "digests": sorted(set(digests)),
                "pixels": sorted(set(pixels)),
                "prefer": list(prefer),
                "project": project,
            },
        )
        return (
            {k: wire.load(SampleMatch, v) for k, v in data["digests"].items()},
            {k: wire.load(SampleMatch, v) for k, v in data["pixels"].items()},
        )

    def table_row(self, version_id: int) -> TableRow | None:
        data = self.get(f"{API}/versions/{version_id}/table")
        return None if data is None else wire.load(TableRow, data)

    def run_tables(self, run_id: str) -> list[tuple[VersionRecord, TableRow]]:
        return [
            (wire.load(VersionRecord, v), wire.load(TableRow, t))
            for v, t in self.get(f"{API}/runs/{run_id}/tables")
        ]

    def table_versions(
        self,
        kind: str | None = None,
        name: str | None = None,
        dataset_version_ids: list[int] | None = None,
    ) -> list[tuple[RunRecord | None, VersionRecord, TableRow]]:
        params: dict[str, Any] = {"kind": kind, "name": name}
        if dataset_version_ids is not None:
            if not dataset_version_ids:
                return []
            params["dataset_version_ids"] = dataset_version_ids
        data = self.request(
            "GET", f"{API}/tables", params={k: v for k, v in params.items() if v is not None}
        )
        return [
            (
                wire.load(RunRecord, r) if r else None,
                wire.load(VersionRecord, v),
                wire.load(TableRow, t),
            )
            for r, v, t in data
        ]

    def all_versions(self) -> list[VersionRecord]:
        return [wire.load(VersionRecord, v) for v in self.get(f"{API}/versions")]

    # -- browsing ----------------------------------------------------------------------------

    def projects(self) -> list[ProjectRecord]:
        return [wire.load(ProjectRecord, p) for p in self.get(f"{API}/projects")]

    def artifacts(self, project: str | None = None) -> list[ArtifactRecord]:
        return [wire.load(ArtifactRecord, a) for a in self.get(f"{API}/artifacts", project=project)]

    def versions(self, project: str, artifact: str) -> list[VersionRecord]:
        return [
            wire.load(VersionRecord, v)
            for v in self.get(f"{API}/projects/{project}/artifacts/{artifact}/versions")
        ]

    def lineage(self, version_id: int) -> dict[str, list[RunRecord]]:
        data = self.get(f"{API}/versions/{version_id}/lineage")
        return {k: [wire.load(RunRecord, r) for r in v] for k, v in data.items()}

    def run_versions(self, run_id: str) -> dict[str, list[VersionRecord]]:
        data = self.get(f"{API}/runs/{run_id}/versions")
        return {k: [wire.load(VersionRecord, r) for r in v] for k, v in data.items()}


def _file_chunks(path: Path | Callable[[], Path]) -> Callable[[], Iterator[bytes]]:
    """The bytes of a file, read when asked for (the path itself may be found then)."""

    def chunks() -> Iterator[bytes]:
        where = path() if callable(path) else path
        data = read_small(where, CHUNK_SIZE)  # a small file in one read (tessera/files.py)
        if data is not None:
            if data:
                yield data
            return
        with open(where, "rb") as f:
            yield from file_pieces(f)

    return chunks


def _as_bytes(source: Callable[[], Iterator[bytes]] | bytes) -> bytes:
    return source if isinstance(source, bytes) else b"".join(source())
