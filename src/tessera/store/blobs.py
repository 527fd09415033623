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
import io
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

from tessera.errors import DigestMismatchError, StoreCorruptError
from tessera.files import read_small
from tessera.store.hashing import (
    CHUNK_SIZE,
    check_digest,
    file_pieces,
    hash_bytes,
    hash_file,
    new_hasher,
)
from tessera.store.packs import (
    FRAME_HEADER,
    PackedBlob,
    PackIndex,
    PackReceipt,
    checked_frames,
    pack_tail,
    read_packed,
)

_BLOB_MODE = 0o444
T = TypeVar("T")
# Fewer new blobs than this in one pack upload are stored as loose files: a pack of a handful
# saves little and leaves more packs for gc to weigh.
PACK_MIN_BLOBS = 16
# Threads that store a batch's files: hashing and copying release the GIL, and a few threads
# per core keep the disk and the CPU busy.
WRITE_THREADS = min(16, 4 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int
    mtime: float  # seconds since the epoch; what gc compares with its grace period


class BlobWriter(Protocol):
    def reuse(self, digest: str) -> bool: ...
    def put_bytes(self, data: bytes | memoryview, digest: str | None = None) -> str: ...
    def put_verified_bytes(self, data: bytes | memoryview, digest: str) -> None: ...
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
    def put_pack(
        self, chunks: Iterable[bytes], max_blob_bytes: int | None = None
    ) -> PackReceipt: ...
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


def store_file(writer: BlobWriter, path: str | os.PathLike[str]) -> tuple[str, int]:
    """Store a file's bytes through ``writer``, hashing exactly the bytes that are written (one
    read pass): a small file read whole (``files.read_small``) and stored as bytes, written only
    if the store lacks it; any other streamed. Every ``BlobWriter.put_file`` is this."""
    data = read_small(path, CHUNK_SIZE)
    if data is not None:
        return writer.put_bytes(data), len(data)
    with open(path, "rb", buffering=0) as src:
        return writer.put_stream(file_pieces(src))


def _syncfs(fd: int) -> bool:
    """Flush every dirty page of the file system holding ``fd``; False if unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs(fd) == 0
    except (OSError, AttributeError):
        return False


class LocalBlobStore:
    """Blobs in ``root/blobs/ab/cd/<digest>`` (loose) or in ``root/packs/<digest>.pack``
    (many small blobs received at once, see ``tessera.store.packs``), temporary files in
    ``root/tmp``. A loose file is always looked for first."""

    def __init__(self, root: Path):
        self.root = root
        self.blob_dir = root / "blobs"
        self._blob_prefix = str(self.blob_dir)
        self.tmp_dir = root / "tmp"
        self._tmp_prefix = str(self.tmp_dir)
        self.pack_dir = root / "packs"
        self.packs = PackIndex(self.pack_dir)

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
        """The blob as a file of its own. A packed blob is copied out first (made durable
        before it takes its name, as every blob is), for readers that need a path: DuckDB,
        file responses, loaders that open files by digest."""
        path = self.path_text(digest)
        if not os.path.exists(path):
            self._from_pack(digest, lambda packed: self._unpack(digest, packed), sure=True)
        return Path(path)

    def has_packs(self) -> bool:
        return self.packs.any()

    def pack_problems(self) -> list[str]:
        """Packs whose bytes do not hash to their name (verify; every blob is checked too)."""
        problems = []
        for name in sorted(self.packs.packs()):
            try:
                actual = hash_file(self.pack_dir / name)[0]
            except FileNotFoundError:
                continue  # deleted meanwhile (gc)
            if f"{actual}.pack" != name:
                problems.append(f"packs: {name} is damaged (its bytes hash to {actual})")
        return problems

    def _from_pack(self, digest: str, use: Callable[[PackedBlob], T], sure: bool) -> T | None:
        """``use`` applied to a pack that holds the blob; None if no pack does.

        ``sure``: list ``packs/`` again before answering "none" (PackIndex.refresh). A pack
        deleted since it was indexed (by gc, maybe in another process) sends the look-up to
        the folder again: gc deletes a pack only once its wanted blobs have loose copies."""
        for _ in range(2):
            packed = self.packs.find(digest)
            if packed is None and sure and self.packs.refresh(force=True):
                packed = self.packs.find(digest)
            if packed is None:
                return None
            try:
                return use(packed)
            except FileNotFoundError:
                self.packs.refresh(force=True)
                if os.path.exists(self.path_text(digest)):
                    return None  # the loose copy gc kept: callers look there
        return None

    def _unpack(self, digest: str, packed: PackedBlob) -> None:
        data = read_packed(packed)
        if hash_bytes(data) != digest:
            raise DigestMismatchError(
                f"blob {digest} in pack {packed.pack} is damaged; run `tessera verify`"
            )
        # One blob: fsync it alone rather than sync the file system. Its name must be durable
        # too: gc may delete the pack once this copy exists.
        final = Path(self._place(self._synced_temp(data), digest))
        _fsync_folder(final.parent)
        _fsync_folder(final.parent.parent)

    @property
    def local_root(self) -> Path:
        """The folder whose ``blobs/ab/cd/<digest>`` files readers may open directly."""
        return self.root

    def duckdb_path(self, digest: str) -> str:
        return str(self.local_path(digest))

    def _loose_or_packed(
        self, digest: str, loose: Callable[[str], T], packed: Callable[[PackedBlob], T]
    ) -> T:
        """``loose`` on the blob's own file, else ``packed`` on a pack that holds it, else
        ``loose`` again (gc may have deleted the pack, keeping a loose copy); that last try
        raises FileNotFoundError if the blob is nowhere."""
        path = self.path_text(digest)
        try:
            return loose(path)
        except FileNotFoundError:
            pass
        found = self._from_pack(digest, packed, sure=True)
        return loose(path) if found is None else found

    def hash_blob(self, digest: str) -> str:
        return self._loose_or_packed(
            digest, lambda path: hash_file(path)[0], lambda p: hash_bytes(read_packed(p))
        )

    def has(self, digest: str) -> bool:
        """Whether the blob is stored. Quick, for the many look-ups of a write; an answer that
        decides an outcome comes from ``missing``."""
        return os.path.exists(self.path_text(digest)) or digest in self.packs

    def missing(self, digests: Iterable[str]) -> set[str]:
        """The blobs not stored, with ``packs/`` listed afresh and every pack that answers
        for a blob checked to still exist (gc in another process may have deleted it)."""
        self.packs.refresh(force=True)  # sees new packs, forgets those gc deleted meanwhile
        # The index first: a dict look-up, where a packed blob's loose name is a failed stat.
        return {d for d in self.packs.unindexed(digests) if not os.path.exists(self.path_text(d))}

    def size(self, digest: str) -> int:
        try:
            return self._loose_or_packed(
                digest, lambda path: os.stat(path).st_size, lambda p: (os.stat(p.pack), p.size)[1]
            )
        except FileNotFoundError:
            raise self._missing(digest) from None

    def open(self, digest: str) -> BinaryIO:
        try:
            # Packed blobs are small: read whole.
            return self._loose_or_packed(
                digest,
                lambda path: open(path, "rb"),
                lambda p: io.BytesIO(read_packed(p)),
            )
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
        yield from self._list_packed()

    def _list_packed(self) -> Iterator[BlobInfo]:
        """Packed blobs that have no loose copy; a pack whose index is unreadable is listed
        under its path (not a digest), so verify reports it and gc leaves it alone."""
        mtimes: dict[str, float] = {}
        for digest, packed in sorted(self.packs.items()):  # one location per digest
            if os.path.exists(self.path_text(digest)):
                continue
            if packed.pack not in mtimes:
                try:
                    mtimes[packed.pack] = os.stat(packed.pack).st_mtime
                except FileNotFoundError:
                    continue
            yield BlobInfo(digest, packed.size, mtimes[packed.pack])
        for name in sorted(self.packs.broken):  # a frozenset, replaced whole
            with suppress(FileNotFoundError):
                st = os.stat(self.pack_dir / name)
                yield BlobInfo(f"packs/{name}", st.st_size, st.st_mtime)

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

    def put_pack(self, chunks: Iterable[bytes], max_blob_bytes: int | None = None) -> PackReceipt:
        """Store the blobs of a pack upload: frames, arriving as ``chunks`` of any size. A blob
        whose bytes do not match its digest refuses the lot.

        New blobs' frames are written to the pack file as they are parsed and hashed, so the
        upload is never joined into one body nor copied into a second one (16 MiB buffers
        allocated afresh cost more in page faults than the writes); the file is named by the
        hash of what was written. Blobs already stored are renewed (as
        ``LocalWriteBatch.reuse`` does, for gc) and skipped. When only a few are new, they
        become loose files instead."""
        received: list[str] = []
        where: dict[str, tuple[int, int]] = {}  # new blob -> (offset of its bytes, size)
        hasher = new_hasher()  # of the whole pack file: its name
        fd, temp = self._new_temp()
        try:
            with open(fd, "wb", buffering=1024 * 1024) as out:
                offset = 0
                for digest, data in checked_frames(chunks, max_blob_bytes):
                    received.append(digest)
                    if digest in where or self.touch(digest):
                        continue
                    header = FRAME_HEADER.pack(digest.encode("ascii"), len(data))
                    for piece in (header, data):
                        out.write(piece)
                        hasher.update(piece)
                    where[digest] = (offset + len(header), len(data))
                    offset += len(header) + len(data)
                if len(where) >= PACK_MIN_BLOBS:
                    tail = pack_tail(where)
                    out.write(tail)
                    hasher.update(tail)
                    out.flush()
                    # One file: fsync it alone. syncfs (what a batch of loose blobs uses) would
                    # also wait for every other upload's dirty pages, and several arrive at once.
                    os.fsync(out.fileno())
            if len(where) < PACK_MIN_BLOBS:
                with open(temp, "rb") as written, self.batch() as batch:
                    for digest, (at, size) in where.items():
                        written.seek(at)
                        batch.put_verified_bytes(written.read(size), digest)
                temp.unlink()
                return PackReceipt(received, len(where))
            self.pack_dir.mkdir(exist_ok=True)
            final = self.pack_dir / f"{hasher.hexdigest()}.pack"
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        # The name must be durable before the catalog may point at the blobs.
        _fsync_folder(self.pack_dir)
        self.packs.add(final.name, {d: PackedBlob(str(final), *at) for d, at in where.items()})
        return PackReceipt(received, len(where))

    def touch(self, digest: str) -> bool:
        """Renew a blob's mtime (a packed blob's: its pack's); False if it does not exist."""
        try:
            os.utime(self.path_text(digest))
            return True
        except FileNotFoundError:
            return bool(self._from_pack(digest, lambda p: os.utime(p.pack) or True, sure=False))

    def delete_many(
        self, digests: set[str], dry_run: bool = False, grace_seconds: float = 0.0
    ) -> set[str]:
        """Delete these blobs where that frees them entirely; return those deleted.

        Each file's mtime is read again just before it goes: one renewed within
        ``grace_seconds`` (a writer reused a blob since gc looked, FORMAT.md §9.3) is kept. A
        loose file goes on its own. A pack goes when every blob in it is being deleted or has a
        loose copy that stays; a pack that holds any other blob is kept whole (its blobs stay
        readable, and go with it later)."""

        def renewed(path: str) -> bool | None:  # None: gone already
            try:
                return time.time() - os.stat(path).st_mtime <= grace_seconds
            except FileNotFoundError:
                return None

        gone: set[str] = set()
        kept: set[str] = set()
        for digest in digests:
            path = self.path_text(digest)
            state = renewed(path)
            if state is None:
                continue
            if state:
                kept.add(digest)
                continue
            if not dry_run:
                with suppress(FileNotFoundError):
                    os.unlink(path)
            gone.add(digest)
        packed: set[str] = set()
        kept_in_packs: set[str] = set()
        removed_pack = False
        for name, members in self.packs.packs().items():
            packed.update(members)
            pack = str(self.pack_dir / name)
            free = all(
                (d in digests and d not in kept)
                or (d not in gone and os.path.exists(self.path_text(d)))
                for d in members
            )
            if free and renewed(pack) is False:
                if not dry_run:
                    with suppress(FileNotFoundError):
                        os.unlink(pack)
                    removed_pack = True
            else:
                kept_in_packs.update(members)
        if removed_pack:
            self.packs.refresh(force=True)
        return {
            d
            for d in digests
            if d not in kept and d not in kept_in_packs and (d in gone or d in packed)
        }

    def delete(self, digest: str) -> None:
        self.delete_many({digest})

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

    def _synced_temp(self, data: bytes | memoryview) -> Path:
        """``data`` in a new temporary file, written and fsynced (removed if that fails)."""
        fd, temp = self._new_temp()
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp

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

    threads = WRITE_THREADS  # how many threads may usefully write through one batch

    def __init__(self, store: LocalBlobStore):
        self._store = store
        self._pending: dict[str, Path] = {}
        self._lock = threading.Lock()

    def put_bytes(self, data: bytes | memoryview, digest: str | None = None) -> str:
        actual = hash_bytes(data)
        if digest is not None and digest != actual:
            raise DigestMismatchError(f"bytes announced as {digest} hash to {actual}")
        self.put_verified_bytes(data, actual)
        return actual

    def put_verified_bytes(self, data: bytes | memoryview, digest: str) -> None:
        """Store bytes already known to hash to ``digest`` (a pack upload's checked frames)."""
        if self.reuse(digest):
            return
        fd, temp = self._store._new_temp()
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        self._stage(digest, temp)

    def put_file(self, path: str | os.PathLike[str]) -> tuple[str, int]:
        return store_file(self, path)

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


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_folder(folder: Path) -> None:
    """Make the names in ``folder`` durable (tolerating file systems that refuse it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


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
        _fsync_folder(folder)
