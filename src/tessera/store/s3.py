"""S3-compatible blob store on obstore: the same interface as the local folder.

Objects live at ``<prefix>/blobs/<digest>`` in the bucket (buckets written before the bucket
marker existed keep ``blobs/ab/cd/<digest>``; ``tessera-blobs.json`` says which, FORMAT.md
§2.8). Writes use a conditional
create (``If-None-Match: *``), so concurrent writers of one blob are safe and the first one
wins with identical bytes; large files are hashed while spooled to a local temp file (bounded
memory) and sent as multipart uploads. Reads that need a file (Parquet for DuckDB, images to
decode) go through a local cache folder of verified blobs. Endpoint, region and credentials
come from the usual ``AWS_*`` variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``).
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import obstore
from obstore.exceptions import AlreadyExistsError, PermissionDeniedError, UnauthenticatedError
from obstore.exceptions import NotFoundError as ObjectNotFound
from obstore.store import S3Store

from tessera.errors import AuthError, DigestMismatchError, StoreCorruptError, StoreFormatError
from tessera.store.blobs import BlobInfo, LocalBlobStore, store_file
from tessera.store.hashing import (
    CHUNK_SIZE,
    check_digest,
    hash_bytes,
    is_digest,
    new_hasher,
)
from tessera.store.packs import PackReceipt, checked_frames

ASK_FIRST_ABOVE = 1024 * 1024
BUCKET_MARKER = "tessera-blobs.json"
# How a digest becomes an object key (FORMAT.md §2.8). "flat" for every new bucket: S3 servers
# that keep a directory tree (SeaweedFS's filer, MinIO) made each "/" level a directory entry,
# and the sharded keys cost SeaweedFS about 11 % more time per small object (docs/decisions.md).
LAYOUTS = ("flat", "sharded")
# Requests in flight when storing or looking up many blobs. A small put is a round trip, not
# CPU work, so this does not follow the core count: SeaweedFS on loopback stored 10,000 small
# objects in 5.9 s with 8, 5.0 s with 16 and 4.6-4.9 s with 32; a distant bucket gains more.
WRITE_THREADS = 32
# Large blobs that a writer streams in (put_stream: ingest, migrate-store) are spooled to a temp
# file, then sent as multipart uploads with parts in flight of their own: at most this many at
# once per process, so 32 threads meeting 32 large files use neither 32 files' worth of temp
# space nor 32 uploads' part buffers. (A server's PUT arrives already spooled by the server.)
LARGE_UPLOADS = 4
_large_uploads = threading.BoundedSemaphore(LARGE_UPLOADS)


def parse_s3_url(url: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StoreFormatError(f"blob store URL must look like s3://bucket/prefix, got {url!r}")
    return parsed.netloc, parsed.path.strip("/")


def _client_options() -> dict[str, Any]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT")
    return {"allow_http": True} if endpoint and endpoint.startswith("http://") else {}


def _config() -> dict[str, Any]:
    if os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
        return {}
    return {"region": "us-east-1"}


def make_s3_store(bucket: str, prefix: str) -> S3Store:
    return S3Store(
        bucket,
        prefix=prefix or None,
        config=_config() or None,
        client_options=_client_options() or None,
    )


class S3BlobStore:
    def __init__(self, url: str, cache_root: Path):
        self.url = url.rstrip("/")
        self.bucket, self.prefix = parse_s3_url(url)
        self.s3 = make_s3_store(self.bucket, self.prefix)
        # Local folder: verified copies of blobs read as files, and temp files for uploads.
        self.cache = LocalBlobStore(cache_root)
        self.tmp_dir = self.cache.tmp_dir
        self._layout: str | None = None

    def create(self) -> None:
        self.cache.create()
        self.layout  # noqa: B018 - a foreign or newer bucket marker is refused when opening

    @property
    def layout(self) -> str:
        """The bucket's key layout, from its marker (written on first use, FORMAT.md §2.8)."""
        if self._layout is None:
            self._layout = self._read_layout() or self._write_layout()
        return self._layout

    def _read_layout(self) -> str | None:
        try:
            raw = bytes(obstore.get(self.s3, BUCKET_MARKER).bytes())
        except (FileNotFoundError, ObjectNotFound):
            return None
        except (PermissionDeniedError, UnauthenticatedError) as e:
            raise AuthError(
                f"the S3 credentials may not read {self.url}/{BUCKET_MARKER} "
                f"({type(e).__name__}; without ListBucket, S3 answers 403 for a missing key "
                "too); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL)"
            ) from None
        try:
            layout = json.loads(raw)["layout"]
        except (ValueError, TypeError, KeyError):
            raise StoreFormatError(
                f"{self.url}/{BUCKET_MARKER} is not a Tessera bucket marker; point "
                "--blobs at a prefix of its own"
            ) from None
        if layout not in LAYOUTS:
            raise StoreFormatError(
                f"{self.url} uses blob layout {layout!r}, written by a newer Tessera; "
                "upgrade Tessera"
            )
        return str(layout)

    def _write_layout(self) -> str:
        """Record the layout of a bucket without a marker: "sharded" if it already holds blobs
        under ``blobs/ab/cd/`` (written by a Tessera from before the marker), else "flat"."""
        try:
            page = next(iter(obstore.list(self.s3, "blobs/", chunk_size=1000)), [])
        except (PermissionDeniedError, UnauthenticatedError):
            raise AuthError(
                f"{self.url} has no {BUCKET_MARKER} and these S3 credentials may not list "
                "blobs/ to tell its layout; open it once with credentials that may list and "
                "write"
            ) from None
        # Judged by blob keys only: a stray object (a .DS_Store) says nothing about the layout.
        shapes = {_layout_of(meta["path"]) for meta in page} - {None}
        if len(shapes) > 1:
            raise StoreFormatError(
                f"{self.url} holds blobs in both layouts (blobs/<digest> and "
                f"blobs/ab/cd/<digest>) and no {BUCKET_MARKER}; it was not written by Tessera "
                "alone — point --blobs at a prefix of its own"
            )
        layout = shapes.pop() if shapes else "flat"
        try:
            obstore.put(
                self.s3, BUCKET_MARKER, json.dumps({"layout": layout}).encode(), mode="create"
            )
        except AlreadyExistsError:  # another process got there first: its word counts
            return self._read_layout() or layout
        except PermissionDeniedError:  # read-only credentials: read as found, record nothing
            pass
        return layout

    @property
    def local_root(self) -> Path:
        return self.cache.root

    def key(self, digest: str) -> str:
        check_digest(digest)
        if self.layout == "flat":
            return f"blobs/{digest}"
        return f"blobs/{digest[:2]}/{digest[2:4]}/{digest}"

    def duckdb_path(self, digest: str) -> str:
        """Where DuckDB reads this blob: its verified copy in the local cache (downloaded once).

        Not the bucket through obstore's fsspec filesystem: DuckDB's reads of Parquet files
        larger than about 2 MiB through it came back short ("Failed to read 995328 bytes from
        Python file at offset 2097152: only 0 bytes returned", obstore 0.12.1, one DuckDB
        thread or many), and a query scans whole tables anyway. The HTTP backend does the same.
        """
        return str(self.local_path(digest))

    # -- reading -----------------------------------------------------------------------------

    def has(self, digest: str) -> bool:
        try:
            obstore.head(self.s3, self.key(digest))
            return True
        except (FileNotFoundError, ObjectNotFound):
            return False

    def missing(self, digests: Iterable[str]) -> set[str]:
        unique = sorted(set(digests))
        with ThreadPoolExecutor(WRITE_THREADS) as pool:
            present = list(pool.map(self.has, unique))
        return {d for d, here in zip(unique, present, strict=True) if not here}

    def size(self, digest: str) -> int:
        try:
            return int(obstore.head(self.s3, self.key(digest))["size"])
        except (FileNotFoundError, ObjectNotFound):
            raise self._missing(digest) from None

    def mtime(self, digest: str) -> float | None:
        try:
            return obstore.head(self.s3, self.key(digest))["last_modified"].timestamp()
        except (FileNotFoundError, ObjectNotFound):
            return None

    def read(self, digest: str) -> bytes:
        try:
            return bytes(obstore.get(self.s3, self.key(digest)).bytes())
        except (FileNotFoundError, ObjectNotFound):
            raise self._missing(digest) from None

    def open(self, digest: str) -> BinaryIO:
        return open(self.local_path(digest), "rb")

    def local_path(self, digest: str) -> Path:
        """A verified local copy of the blob, downloaded into the cache first if needed."""
        path = self.cache.path_of(digest)
        if path.exists():
            return path
        try:
            result = obstore.get(self.s3, self.key(digest))
        except (FileNotFoundError, ObjectNotFound):
            raise self._missing(digest) from None
        self.cache.put_stream(
            (bytes(c) for c in result.stream(min_chunk_size=CHUNK_SIZE)), expected=digest
        )
        return path

    path_of = local_path

    def hash_blob(self, digest: str) -> str:
        """Digest of the stored bytes, streamed (verify)."""
        hasher = new_hasher()
        for chunk in obstore.get(self.s3, self.key(digest)).stream(min_chunk_size=CHUNK_SIZE):
            hasher.update(bytes(chunk))
        return hasher.hexdigest()

    def _missing(self, digest: str) -> StoreCorruptError:
        return StoreCorruptError(
            f"blob {digest} is missing from {self.url}; the store is damaged — "
            "run `tessera verify` to list every problem"
        )

    def list(self) -> Iterator[BlobInfo]:
        for batch in obstore.list(self.s3, "blobs/"):
            for meta in batch:
                name = meta["path"].rsplit("/", 1)[-1]
                if _layout_of(meta["path"]) != self.layout:
                    name = meta["path"]  # a stray object: verify reports it by its key
                yield BlobInfo(name, int(meta["size"]), meta["last_modified"].timestamp())

    def delete(self, digest: str) -> None:
        try:
            obstore.delete(self.s3, self.key(digest))
        except (FileNotFoundError, ObjectNotFound):
            pass
        self.cache.delete(digest)

    def pack_problems(self) -> list[str]:
        return []  # a bucket keeps no pack files

    def delete_many(
        self, digests: set[str], dry_run: bool = False, grace_seconds: float = 0.0
    ) -> set[str]:
        """Delete these objects, each unless it is gone or younger than ``grace_seconds`` by
        another look just before (LocalBlobStore.delete_many)."""
        deleted = set()
        for digest in digests:
            mtime = self.mtime(digest)
            if mtime is None or time.time() - mtime <= grace_seconds:
                continue
            if not dry_run:
                self.delete(digest)
            deleted.add(digest)
        return deleted

    def touch(self, digest: str) -> bool:
        # S3 cannot renew an object's LastModified without rewriting it; see docs/decisions.md.
        return self.has(digest)

    def temp_files(self) -> Iterator[tuple[Path, float]]:
        return self.cache.temp_files()

    def _new_temp(self) -> tuple[int, Path]:
        return self.cache._new_temp()

    # -- writing -----------------------------------------------------------------------------

    @contextmanager
    def batch(self) -> Iterator[S3WriteBatch]:
        yield S3WriteBatch(self)  # every put is atomic and durable on its own

    def put_bytes(self, data: bytes | memoryview) -> str:
        return S3WriteBatch(self).put_bytes(data)

    def put_file(self, path: str | os.PathLike[str]) -> tuple[str, int]:
        return S3WriteBatch(self).put_file(path)

    def put_stream(self, chunks: Iterable[bytes], expected: str | None = None) -> tuple[str, int]:
        return S3WriteBatch(self).put_stream(chunks, expected)

    def put_pack(self, chunks: Iterable[bytes], max_blob_bytes: int | None = None) -> PackReceipt:
        """Store the blobs of a pack upload (frames, in ``chunks`` of any size), one object
        each: a bucket has no per-file cost to save. All are read and checked before any is
        stored, so a blob whose bytes do not match its digest refuses the lot."""
        received: list[str] = []
        frames: dict[str, bytes] = {}
        for digest, data in checked_frames(chunks, max_blob_bytes):
            received.append(digest)
            frames[digest] = data
        with self.batch() as batch, ThreadPoolExecutor(WRITE_THREADS) as pool:
            list(
                pool.map(lambda frame: batch.put_verified_bytes(frame[1], frame[0]), frames.items())
            )
            return PackReceipt(received, len(batch.new_digests))


def _layout_of(key: str) -> str | None:
    """Which layout a key under ``blobs/`` is a blob key of, if either (FORMAT.md §2.8)."""
    parts = key.split("/")
    name = parts[-1]
    if not is_digest(name):
        return None
    if parts == ["blobs", name]:
        return "flat"
    if parts == ["blobs", name[:2], name[2:4], name]:
        return "sharded"
    return None


class S3WriteBatch:
    threads = WRITE_THREADS

    def __init__(self, store: S3BlobStore):
        self._store = store
        self._done: set[str] = set()  # stored: created here, or found already there
        self._created: set[str] = set()  # created by this batch (new objects: young for gc)
        self._lock = threading.Lock()

    def reuse(self, digest: str) -> bool:
        with self._lock:
            if digest in self._done:
                return True
        if self._store.has(digest):
            with self._lock:
                self._done.add(digest)
            return True
        return False

    def _put(self, digest: str, payload: Any) -> None:
        try:
            obstore.put(self._store.s3, self._store.key(digest), payload, mode="create")
            created = True
        except AlreadyExistsError:
            created = False  # stored already (maybe by a concurrent writer, same bytes)
        except (PermissionDeniedError, UnauthenticatedError) as e:
            raise AuthError(
                f"the S3 credentials may not write to {self._store.url} ({type(e).__name__}); "
                "log with credentials that may, or browse the store with tessera.open_store"
            ) from None
        with self._lock:
            self._done.add(digest)
            if created:
                self._created.add(digest)

    def put_bytes(self, data: bytes | memoryview, digest: str | None = None) -> str:
        actual = hash_bytes(data)
        if digest is not None and digest != actual:
            raise DigestMismatchError(f"bytes announced as {digest} hash to {actual}")
        self.put_verified_bytes(data, actual)
        return actual

    def put_verified_bytes(self, data: bytes | memoryview, digest: str) -> None:
        """Store bytes already known to hash to ``digest`` (a pack upload's checked frames)."""
        with self._lock:
            if digest in self._done:
                return
        # A small blob is sent straight away: the conditional create is one request whether or
        # not the bucket has it, where asking first (HEAD) made two for every new blob. Larger
        # ones are asked about first, so that bytes already stored do not travel again.
        if len(data) >= ASK_FIRST_ABOVE and self.reuse(digest):
            return
        self._put(digest, bytes(data))

    def put_file(self, path: str | os.PathLike[str]) -> tuple[str, int]:
        return store_file(self, path)

    def put_stream(self, chunks: Iterable[bytes], expected: str | None = None) -> tuple[str, int]:
        """Spool to a local temp file while hashing, then upload it (multipart when large)."""
        hasher = new_hasher()
        size = 0
        with _large_uploads:
            fd, temp = self._store._new_temp()
            try:
                with os.fdopen(fd, "wb") as out:
                    for chunk in chunks:
                        hasher.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                digest = hasher.hexdigest()
                if expected is not None and expected != digest:
                    raise DigestMismatchError(
                        f"upload announced as {expected} hashes to {digest}; nothing was stored"
                    )
                self.put_verified_file(temp, digest)
            finally:
                temp.unlink(missing_ok=True)
        return digest, size

    def put_verified_file(self, path: Path, digest: str) -> None:
        """Store a file already known to hash to ``digest``."""
        if not self.reuse(digest):
            self._put(digest, Path(path))

    @property
    def new_digests(self) -> set[str]:
        """The blobs this batch created (not those it found already stored)."""
        with self._lock:
            return set(self._created)
