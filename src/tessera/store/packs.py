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
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import DigestMismatchError, StoreCorruptError
from tessera.store.hashing import hash_bytes

FRAME_HEADER = struct.Struct(">64sQ")  # also the wire's frame (tessera.wire)
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
    """A pack's blobs, from its trailer and index (two reads, whatever its size). An index
    that points outside the frames makes the whole pack unreadable (StoreCorruptError)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < TRAILER.size:
            raise StoreCorruptError(f"pack {path} is too short to be a pack")
        f.seek(size - TRAILER.size)
        count, magic = TRAILER.unpack(f.read(TRAILER.size))
        index_size = count * INDEX_ENTRY.size
        frames_end = size - TRAILER.size - index_size
        if magic != MAGIC or frames_end < 0:
            raise StoreCorruptError(f"pack {path} has no valid trailer")
        f.seek(frames_end)
        raw = f.read(index_size)
    out = {}
    for digest, offset, length in INDEX_ENTRY.iter_unpack(raw):
        if offset < FRAME_HEADER.size or offset + length > frames_end:
            raise StoreCorruptError(f"pack {path} has an index entry outside its frames")
        out[digest.hex()] = PackedBlob(path, offset, length)
    return out


class PackIndex:
    """Which packs hold which blobs, for every pack in ``folder``; thread-safe.

    Lookups that miss re-read the folder only when its mtime has changed, so a store without
    packs pays one ``stat`` per missing blob and a store with many pays nothing more. Packs are
    only ever added by writers and deleted by gc; a deletion rebuilds the index aside and swaps
    it in, so a concurrent lookup never sees it half-built."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._packs: dict[str, dict[str, PackedBlob]] = {}  # pack file name -> its blobs
        self._blobs: dict[str, PackedBlob] = {}  # digest -> one pack that holds it
        self._seen_mtime: int | None = None
        self._lock = threading.Lock()
        self.broken: frozenset[str] = frozenset()  # pack files whose index cannot be read

    def find(self, digest: str) -> PackedBlob | None:
        found = self._blobs.get(digest)
        if found is None and self.refresh():
            found = self._blobs.get(digest)
        return found

    def refresh(self, force: bool = False) -> bool:
        """Index packs added since the last look, forget deleted ones; True if the folder was
        listed.

        A folder's mtime moves in clock ticks (milliseconds), so a pack another process adds
        in the same tick as our last look leaves it unchanged: ``force`` lists the folder all
        the same, for answers that decide an outcome (what is missing, before a commit)."""
        try:
            mtime = os.stat(self.folder).st_mtime_ns
        except FileNotFoundError:
            return False
        if mtime == self._seen_mtime and not force:
            return False
        with self._lock:
            names = {n for n in os.listdir(self.folder) if n.endswith(SUFFIX)}
            known = set(self._packs) | self.broken
            if names >= known:  # only additions: index them in place
                packs, blobs, broken = self._packs, self._blobs, set(self.broken)
            else:  # gc deleted a pack: build the index aside, swap it in below
                packs = {n: b for n, b in self._packs.items() if n in names}
                blobs = {}
                for members in packs.values():
                    blobs.update(members)
                broken = {n for n in self.broken if n in names}
            for name in sorted(names - set(packs) - broken):
                try:
                    members = read_index(str(self.folder / name))
                except FileNotFoundError:
                    continue
                except StoreCorruptError:
                    broken.add(name)  # verify reports it; its blobs count as missing
                    continue
                packs[name] = members
                blobs.update(members)
            self._packs, self._blobs, self.broken = packs, blobs, frozenset(broken)
            self._seen_mtime = mtime
        return True

    def add(self, name: str, blobs: dict[str, PackedBlob]) -> None:
        """Index a pack this process has just written."""
        with self._lock:
            self._packs[name] = blobs
            self._blobs.update(blobs)

    def packs(self) -> dict[str, dict[str, PackedBlob]]:
        """Every readable pack (by file name) and its blobs, as of a fresh look."""
        self.refresh(force=True)
        with self._lock:
            return dict(self._packs)

    def items(self) -> list[tuple[str, PackedBlob]]:
        self.refresh()
        return list(self._blobs.items())

    def any(self) -> bool:
        """Whether the folder holds any readable pack (a stat when nothing changed)."""
        self.refresh()
        return bool(self._packs)

    def __contains__(self, digest: str) -> bool:
        return self.find(digest) is not None


def read_packed(blob: PackedBlob) -> bytes:
    """A packed blob's bytes (FileNotFoundError if its pack has been deleted since)."""
    with open(blob.pack, "rb") as f:
        f.seek(blob.offset)
        data = f.read(blob.size)
    if len(data) != blob.size:
        raise DigestMismatchError(f"pack {blob.pack} is cut short; run `tessera verify`")
    return data
