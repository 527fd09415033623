"""The blob store: immutable bytes named by their BLAKE3 digest, stored once.

``BlobStore`` is the narrow interface every caller uses; ``LocalBlobStore`` keeps blobs in a
folder. Writes go through a ``WriteBatch``: bytes are hashed while they are written to a
temporary file, the batch is made durable with one ``syncfs`` (not one ``fsync`` per blob, which
costs ~0.5 ms each here), and only then are the files renamed to their digest names. So a blob
file under its final name is always complete, and a crash leaves at most temporary files, which
``gc`` removes after the grace period.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from tessera.errors import DigestMismatchError, StoreCorruptError
from tessera.store.hashing import CHUNK_SIZE, check_digest, hash_bytes, hash_file, new_hasher

_BLOB_MODE = 0o444


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int
    mtime: float  # seconds since the epoch; what gc compares with its grace period


class BlobWriter(Protocol):
    def reuse(self, digest: str) -> bool: ...
    def put_bytes(self, data: bytes | memoryview, digest: str | None = None) -> str: ...
    def put_file(self, path: str | os.PathLike[str]) -> tuple[str, int]: ...
    def put_stream(
        self, chunks: Iterable[bytes], expected: str | None = None
    ) -> tuple[str, int]: ...


class BlobStore(Protocol):
    """What every caller needs from a blob store; a local folder and S3 both provide it."""

    def has(self, digest: str) -> bool: ...
    def missing(self, digests: Iterable[str]) -> set[str]: ...
    def size(self, digest: str) -> int: ...
    def open(self, digest: str) -> BinaryIO: ...
    def read(self, digest: str) -> bytes: ...
    def batch(self) -> AbstractContextManager[BlobWriter]: ...
    def put_bytes(self, data: bytes | memoryview) -> str: ...
    def put_file(self, path: str | os.PathLike[str]) -> tuple[str, int]: ...
    def list(self) -> Iterator[BlobInfo]: ...
    def touch(self, digest: str) -> bool:
        """Renew a blob's mtime; False if the blob does not exist."""
        try:
            os.utime(self.path_text(digest))
            return True
        except FileNotFoundError:
            return False

    def delete(self, digest: str) -> None: ...
    def local_path(self, digest: str) -> Path | None: ...


def _syncfs(fd: int) -> bool:
    """Flush every dirty page of the file system holding ``fd``; False if unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs(fd) == 0
    except (OSError, AttributeError):
        return False


class LocalBlobStore:
    """Blobs in ``root/blobs/ab/cd/<digest>``, temporary files in ``root/tmp``."""

    def __init__(self, root: Path):
        self.root = root
        self.blob_dir = root / "blobs"
        self._blob_prefix = str(self.blob_dir)
        self.tmp_dir = root / "tmp"
        self._tmp_prefix = str(self.tmp_dir)

    def create(self) -> None:
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    # -- reading -----------------------------------------------------------------------------

    def path_of(self, digest: str) -> Path:
        return Path(self.path_text(digest))

    def path_text(self, digest: str) -> str:
        """``path_of`` as a string: per-blob loops over a million blobs skip pathlib."""
        check_digest(digest)
        return f"{self._blob_prefix}/{digest[:2]}/{digest[2:4]}/{digest}"

    def local_path(self, digest: str) -> Path:
        return self.path_of(digest)

    @property
    def local_root(self) -> Path:
        """The folder whose ``blobs/ab/cd/<digest>`` files readers may open directly."""
        return self.root

    def duckdb_path(self, digest: str) -> str:
        return str(self.path_of(digest))

    def hash_blob(self, digest: str) -> str:
        return hash_file(self.path_of(digest))[0]

    def mtime(self, digest: str) -> float | None:
        try:
            return self.path_of(digest).stat().st_mtime
        except FileNotFoundError:
            return None

    def has(self, digest: str) -> bool:
        return os.path.exists(self.path_text(digest))

    def missing(self, digests: Iterable[str]) -> set[str]:
        return {d for d in set(digests) if not self.has(d)}

    def size(self, digest: str) -> int:
        try:
            return self.path_of(digest).stat().st_size
        except FileNotFoundError:
            raise self._missing(digest) from None

    def open(self, digest: str) -> BinaryIO:
        try:
            return open(self.path_of(digest), "rb")
        except FileNotFoundError:
            raise self._missing(digest) from None

    def read(self, digest: str) -> bytes:
        with self.open(digest) as f:
            return f.read()

    def _missing(self, digest: str) -> StoreCorruptError:
        return StoreCorruptError(
            f"blob {digest} is missing from {self.blob_dir}; the store is damaged — "
            "run `tessera verify` to list every problem"
        )

    def list(self) -> Iterator[BlobInfo]:
        if not self.blob_dir.exists():
            return
        for first in sorted(os.scandir(self.blob_dir), key=lambda e: e.name):
            if not first.is_dir():
                continue
            for second in sorted(os.scandir(first.path), key=lambda e: e.name):
                if not second.is_dir():
                    continue
                for entry in os.scandir(second.path):
                    st = entry.stat()
                    # A file in the wrong shard folder cannot be read by its digest: report it
                    # under its path, which is not a digest, so verify calls it stray.
                    name = entry.name
                    if name[:2] != first.name or name[2:4] != second.name:
                        name = f"{first.name}/{second.name}/{name}"
                    yield BlobInfo(name, st.st_size, st.st_mtime)

    # -- writing -----------------------------------------------------------------------------

    @contextmanager
    def batch(self) -> Iterator[LocalWriteBatch]:
        """Write several blobs, made durable and visible together when the block exits."""
        writer = LocalWriteBatch(self)
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise
        writer.commit()

    def put_bytes(self, data: bytes | memoryview) -> str:
        with self.batch() as b:
            return b.put_bytes(data)

    def put_file(self, path: str | os.PathLike[str]) -> tuple[str, int]:
        with self.batch() as b:
            return b.put_file(path)

    def put_stream(self, chunks: Iterable[bytes], expected: str | None = None) -> tuple[str, int]:
        with self.batch() as b:
            return b.put_stream(chunks, expected)

    def touch(self, digest: str) -> bool:
        """Renew a blob's mtime; False if the blob does not exist."""
        try:
            os.utime(self.path_text(digest))
            return True
        except FileNotFoundError:
            return False

    def delete(self, digest: str) -> None:
        with suppress(FileNotFoundError):
            os.unlink(self.path_of(digest))

    def temp_files(self) -> Iterator[tuple[Path, float]]:
        """Leftover temporary files (from crashed writers) and their mtimes."""
        if not self.tmp_dir.exists():
            return
        for entry in os.scandir(self.tmp_dir):
            try:
                yield Path(entry.path), entry.stat().st_mtime
            except FileNotFoundError:
                continue

    def _place(self, temp: Path, digest: str) -> str:
        """Rename a durable temporary file to its blob name; returns that name."""
        final = self.path_text(digest)
        # Renaming over an existing blob is harmless: it has the same bytes. The shard folders
        # of a young store appear as blobs arrive, so the rename is tried first and the folder
        # made only when it is missing: one system call for most blobs.
        try:
            os.replace(temp, final)
        except FileNotFoundError:
            os.makedirs(final[: -len(digest) - 1], exist_ok=True)
            os.replace(temp, final)
        return final

    def _new_temp(self) -> tuple[int, Path]:
        # Created read-only: the mode restricts later opens, not this one, so the blob needs
        # no chmod before it is renamed into place. The 96 random bits come from the process's
        # PRNG (reseeded after fork), not from a getrandom call per blob; O_EXCL turns a
        # collision into another draw, never a shared file.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        while True:
            path = f"{self._tmp_prefix}/{random.getrandbits(96):024x}.tmp"
            try:
                return os.open(path, flags, _BLOB_MODE), Path(path)
            except FileExistsError:
                continue
            except FileNotFoundError:  # tmp/ removed by hand since the store was created
                self.tmp_dir.mkdir(parents=True, exist_ok=True)


class LocalWriteBatch:
    """Blobs written to temporary files; ``commit`` syncs them and renames them into place."""

    def __init__(self, store: LocalBlobStore):
        self._store = store
        self._pending: dict[str, Path] = {}
        self._lock = threading.Lock()

    def put_bytes(self, data: bytes | memoryview, digest: str | None = None) -> str:
        actual = hash_bytes(data)
        if digest is not None and digest != actual:
            raise DigestMismatchError(f"bytes announced as {digest} hash to {actual}")
        if self.reuse(actual):
            return actual
        fd, temp = self._store._new_temp()
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        self._stage(actual, temp)
        return actual

    def put_file(self, path: str | os.PathLike[str]) -> tuple[str, int]:
        """Store a file's bytes, hashing exactly the bytes that are written (one read pass)."""
        with open(path, "rb", buffering=0) as src:
            size = os.fstat(src.fileno()).st_size
            if size < CHUNK_SIZE:
                # Small files: read once, write only if the store lacks them.
                data = src.read()
                return self.put_bytes(data), len(data)
            return self.put_stream(_read_chunks(src))

    def put_stream(self, chunks: Iterable[bytes], expected: str | None = None) -> tuple[str, int]:
        hasher = new_hasher()
        size = 0
        fd, temp = self._store._new_temp()
        try:
            try:
                for chunk in chunks:
                    hasher.update(chunk)
                    _write_all(fd, chunk)
                    size += len(chunk)
            finally:
                os.close(fd)
            digest = hasher.hexdigest()
            if expected is not None and expected != digest:
                raise DigestMismatchError(
                    f"upload announced as {expected} hashes to {digest}; nothing was stored"
                )
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        if self.reuse(digest):
            temp.unlink(missing_ok=True)
        else:
            self._stage(digest, temp)
        return digest, size

    def reuse(self, digest: str) -> bool:
        """True if the blob is already stored (or staged here); nothing needs writing then.

        Renews the blob's mtime, so that a concurrent ``gc`` treats a blob that is about to be
        referenced again as new, and leaves it to the grace period.
        """
        with self._lock:
            if digest in self._pending:
                return True
        return self._store.touch(digest)

    def put_verified_file(self, path: Path, digest: str) -> None:
        """Move in a file already known to hash to ``digest`` (e.g. verified on arrival)."""
        if self.reuse(digest):
            path.unlink(missing_ok=True)
        else:
            self._stage(digest, path)

    def _stage(self, digest: str, temp: Path) -> None:
        with self._lock:
            if digest in self._pending:
                duplicate = temp
            else:
                self._pending[digest] = temp
                duplicate = None
        if duplicate is not None:
            duplicate.unlink(missing_ok=True)

    @property
    def new_digests(self) -> set[str]:
        with self._lock:
            return set(self._pending)

    def commit(self) -> None:
        if not self._pending:
            return
        store = self._store
        _make_durable(store.tmp_dir, list(self._pending.values()))
        finals = []
        for digest, temp in self._pending.items():
            finals.append(Path(store._place(temp, digest)))
        # The renames themselves must be durable before the catalog may point at the blobs.
        _make_durable(store.blob_dir, finals)
        self._pending.clear()

    def abort(self) -> None:
        for temp in self._pending.values():
            temp.unlink(missing_ok=True)
        self._pending.clear()


def _read_chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(CHUNK_SIZE):
        yield chunk


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _make_durable(directory: Path, files: list[Path]) -> None:
    """syncfs the file system once; fall back to fsync of each file and its folder."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        if _syncfs(fd):
            return
    finally:
        os.close(fd)
    folders = set()
    for path in files:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        folders.add(path.parent)
    for folder in folders:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        except OSError as e:  # some file systems refuse fsync on folders
            if e.errno not in (errno.EINVAL, errno.EBADF):
                raise
        finally:
            os.close(dfd)


def blob_age_ok(info: BlobInfo, grace_seconds: float, now: float | None = None) -> bool:
    """True if the blob is older than the grace period (so gc may reclaim it if unreferenced)."""
    return (now if now is not None else time.time()) - info.mtime > grace_seconds
