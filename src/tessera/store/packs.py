"""Pack files: many small blobs in one file, for stores that receive them by the thousand.

A file per blob costs the file system a create, a write, a rename and often a folder: about
130 µs of kernel time per blob here, far more than hashing or sending 20 KiB. A server that
receives a pack upload (``POST /blobs/pack``) therefore stores its new blobs as one pack file
(docs/FORMAT.md §2.7):

    frames   N x [64-byte hex digest][u64 size][bytes]     (the upload's own frames)
    index    N x [32-byte raw digest][u64 offset][u64 size] (offset of the blob's bytes)
    trailer  [u64 N][8 bytes "TSRPACK1"]

named ``packs/<BLAKE3 of the whole file>.pack``. Readers find a blob as a loose file first, then
in a pack, through ``PackIndex``: every pack's index, loaded from the trailers and refreshed
when the ``packs/`` folder changes (another process may have added a pack).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import DigestMismatchError, StoreCorruptError
from tessera.store.hashing import hash_bytes

FRAME_HEADER = struct.Struct(">64sQ")  # the wire's pack frame (tessera.wire.PACK_HEADER)
INDEX_ENTRY = struct.Struct(">32sQQ")
TRAILER = struct.Struct(">Q8s")
MAGIC = b"TSRPACK1"
SUFFIX = ".pack"


@dataclass(frozen=True)
class PackedBlob:
    pack: str  # the pack file's path
    offset: int
    size: int


def check_frames(frames: list[tuple[str, bytes]]) -> None:
    """Refuse the lot if any blob's bytes do not hash to the digest it came with."""
    for digest, data in frames:
        actual = hash_bytes(data)
        if actual != digest:
            raise DigestMismatchError(
                f"a packed blob announced as {digest} hashes to {actual}; nothing was stored"
            )


def build_pack(frames: list[tuple[str, bytes]]) -> tuple[bytes, str, dict[str, tuple[int, int]]]:
    """The bytes of a pack holding these (digest, bytes) blobs, its name (its digest), and
    each blob's (offset, size) in it."""
    parts: list[bytes] = []
    index: list[bytes] = []
    where: dict[str, tuple[int, int]] = {}
    offset = 0
    for digest, data in frames:
        parts.append(FRAME_HEADER.pack(digest.encode("ascii"), len(data)))
        offset += FRAME_HEADER.size
        index.append(INDEX_ENTRY.pack(bytes.fromhex(digest), offset, len(data)))
        where[digest] = (offset, len(data))
        parts.append(data)
        offset += len(data)
    body = b"".join([*parts, *index, TRAILER.pack(len(frames), MAGIC)])
    return body, hash_bytes(body), where


def read_index(path: str) -> dict[str, PackedBlob]:
    """A pack's blobs, from its trailer and index (two reads, whatever its size)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < TRAILER.size:
            raise StoreCorruptError(f"pack {path} is too short to be a pack")
        f.seek(size - TRAILER.size)
        count, magic = TRAILER.unpack(f.read(TRAILER.size))
        index_size = count * INDEX_ENTRY.size
        if magic != MAGIC or index_size > size - TRAILER.size:
            raise StoreCorruptError(f"pack {path} has no valid trailer; `tessera verify` checks it")
        f.seek(size - TRAILER.size - index_size)
        raw = f.read(index_size)
    out = {}
    for digest, offset, length in INDEX_ENTRY.iter_unpack(raw):
        out[digest.hex()] = PackedBlob(path, offset, length)
    return out


class PackIndex:
    """Where each packed blob is, for every pack in ``folder``; thread-safe.

    Lookups that miss re-read the folder only when its mtime has changed, so a store without
    packs pays one ``stat`` per missing blob and a store with many pays nothing more."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._blobs: dict[str, PackedBlob] = {}
        self._loaded: set[str] = set()  # pack file names already indexed
        self._seen_mtime: int | None = None
        self._lock = threading.Lock()
        self.broken: set[str] = set()  # pack files whose index cannot be read

    def find(self, digest: str) -> PackedBlob | None:
        found = self._blobs.get(digest)
        if found is None and self.refresh():
            found = self._blobs.get(digest)
        return found

    def refresh(self, force: bool = False) -> bool:
        """Index packs added since the last look; True if the folder was listed.

        A folder's mtime moves in clock ticks (milliseconds), so a pack another process adds
        in the same tick as our last look leaves it unchanged: ``force`` lists the folder all
        the same, for checks that must not miss a blob (a version's commit)."""
        try:
            mtime = os.stat(self.folder).st_mtime_ns
        except FileNotFoundError:
            return False
        if mtime == self._seen_mtime and not force:
            return False
        with self._lock:
            names = {n for n in os.listdir(self.folder) if n.endswith(SUFFIX)}
            if not names >= self._loaded:  # a pack was deleted (gc): start over
                self._blobs, self._loaded = {}, set()
            for name in sorted(names - self._loaded):
                try:
                    self._blobs.update(read_index(str(self.folder / name)))
                except FileNotFoundError:
                    continue
                except StoreCorruptError:
                    self.broken.add(name)  # verify reports it; its blobs count as missing
                self._loaded.add(name)
            self._seen_mtime = mtime
        return True

    def add(self, name: str, blobs: dict[str, PackedBlob]) -> None:
        """Index a pack this process has just written."""
        with self._lock:
            self._blobs.update(blobs)
            self._loaded.add(name)

    def packs(self) -> list[str]:
        self.refresh()
        return sorted(self._loaded)

    def items(self) -> Iterator[tuple[str, PackedBlob]]:
        self.refresh()
        return iter(list(self._blobs.items()))

    def __contains__(self, digest: str) -> bool:
        return self.find(digest) is not None

    def forget(self) -> None:
        """Drop everything (after a pack was deleted here); the next lookup re-reads."""
        with self._lock:
            self._blobs, self._loaded, self._seen_mtime = {}, set(), None
            self.broken.clear()


def read_packed(blob: PackedBlob) -> bytes:
    with open(blob.pack, "rb") as f:
        f.seek(blob.offset)
        data = f.read(blob.size)
    if len(data) != blob.size:
        raise StoreCorruptError(f"pack {blob.pack} is cut short; `tessera verify` checks it")
    return data
