"""Pack files: many small blobs in one file, for stores that receive them by the thousand.

A file per blob costs the file system a create, a write, a rename and often a folder: about
130 µs of kernel time per blob here, far more than hashing or sending 20 KiB. A server that
receives a pack upload (``POST /blobs/pack``) therefore stores its new blobs as one pack file
(docs/FORMAT.md §2.7):

    frames   N x [64-byte hex digest][u64 size][bytes]     (the upload's own frames)
    index    N x [32-byte raw digest][u64 offset][u64 size] (offset of the blob's bytes)
    trailer  [u64 N][8 bytes "TSRPACK1"]

named ``packs/<BLAKE3 of the whole file>.pack``. The same frames are the wire format of many
blobs in one request or response body (``POST /blobs/pack`` uploads them, ``POST /blobs/fetch``
downloads them), so the server writes an upload's new frames to the pack file as it parses them,
without first joining the body. Readers find a blob as a loose file first, then
in a pack, through ``PackIndex``: every pack's index, loaded from the trailers and refreshed
when the ``packs/`` folder changes (another process may have added a pack).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import BlobTooLargeError, DigestMismatchError, StoreCorruptError
from tessera.store.hashing import check_digest, hash_bytes

FRAME_HEADER = struct.Struct(">64sQ")  # also each blob's header in an HTTP body (read_frames)
INDEX_ENTRY = struct.Struct(">32sQQ")
TRAILER = struct.Struct(">Q8s")
MAGIC = b"TSRPACK1"
SUFFIX = ".pack"


@dataclass(frozen=True)
class PackedBlob:
    pack: str  # the pack file's path
    offset: int
    size: int


@dataclass(frozen=True)
class PackReceipt:
    """What a store made of a pack upload."""

    received: list[str]  # every blob's digest, in the upload's order
    stored: int  # how many of them were new to the store


class TruncatedPackError(ValueError):
    """A body of pack frames that ends inside a frame."""


def read_frames(chunks: Iterable[bytes]) -> Iterator[tuple[str, int, Iterator[bytes]]]:
    """Split pack frames, arriving as ``chunks`` of any size, into (digest as sent, size,
    that blob's bytes piece by piece). Each blob's pieces are consumed before the next frame
    is read (what the caller leaves unread is skipped), so a caller can refuse a frame from its
    header alone. Serves the server's ``POST /blobs/pack`` and the client's
    ``POST /blobs/fetch`` alike."""
    buffer = b""
    position = 0
    source = iter(chunks)

    def available(count: int) -> bool:
        nonlocal buffer, position
        while len(buffer) - position < count:
            chunk = next(source, None)
            if chunk is None:
                return False
            buffer = buffer[position:] + chunk
            position = 0
        return True

    def body(digest: str, size: int) -> Iterator[bytes]:
        nonlocal position
        left = size
        while left:
            if not available(1):
                raise TruncatedPackError(f"blob {digest} is cut off")
            piece = buffer[position : position + left]
            position += len(piece)
            left -= len(piece)
            yield piece

    while available(1):
        if not available(FRAME_HEADER.size):
            raise TruncatedPackError("a frame header is cut off")
        raw, size = FRAME_HEADER.unpack_from(buffer, position)
        position += FRAME_HEADER.size
        digest = raw.decode("ascii", "replace")
        pieces = body(digest, size)
        yield digest, size, pieces
        for _ in pieces:
            pass


def checked_frames(
    chunks: Iterable[bytes], max_blob_bytes: int | None = None
) -> Iterator[tuple[str, bytes]]:
    """The (digest, bytes) of each blob in pack frames that a store is asked to keep, each
    checked before it is yielded: a digest for a name, a size within ``max_blob_bytes``, bytes
    that hash to the digest. A pack upload's blobs are small (its body is at most 64 MiB), so
    each is read whole. Any failure raises (DigestMismatchError, BlobTooLargeError) before the
    iteration can end, so a caller that stores what it read as it goes refuses the lot."""
    try:
        for raw_digest, size, pieces in read_frames(chunks):
            digest = check_digest(raw_digest)
            if max_blob_bytes is not None and size > max_blob_bytes:
                raise BlobTooLargeError(
                    f"blob {digest} has {size:,} bytes, over this server's limit of "
                    f"{max_blob_bytes:,} bytes (--max-blob-size)"
                )
            data = b"".join(pieces)
            if (actual := hash_bytes(data)) != digest:
                raise DigestMismatchError(
                    f"a packed blob announced as {digest} hashes to {actual}; nothing was stored"
                )
            yield digest, data
    except TruncatedPackError as e:
        raise DigestMismatchError(f"truncated pack: {e}; nothing was stored") from None


def pack_tail(where: dict[str, tuple[int, int]]) -> bytes:
    """The index and trailer that end a pack whose frames hold these blobs at these
    (offset of the bytes, size)."""
    index = [
        INDEX_ENTRY.pack(bytes.fromhex(d), offset, size) for d, (offset, size) in where.items()
    ]
    return b"".join([*index, TRAILER.pack(len(where), MAGIC)])


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

    def unindexed(self, digests: Iterable[str]) -> set[str]:
        """The digests no pack holds as of the last look (no look here: a caller that must
        not miss another process's new pack calls ``refresh(force=True)`` first)."""
        blobs = self._blobs  # swapped whole by refresh, so one consistent view
        return {d for d in digests if d not in blobs}


def read_packed(blob: PackedBlob) -> bytes:
    """A packed blob's bytes (FileNotFoundError if its pack has been deleted since)."""
    with open(blob.pack, "rb") as f:
        f.seek(blob.offset)
        data = f.read(blob.size)
    if len(data) != blob.size:
        raise DigestMismatchError(f"pack {blob.pack} is cut short; run `tessera verify`")
    return data
