"""Digesting the files of an artifact: stat cache, parallel hashing, one pass per file."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tessera import progress
from tessera.backend.base import Source
from tessera.errors import NotFoundError
from tessera.store.blobs import WRITE_THREADS, LocalWriteBatch
from tessera.store.hashing import hash_bytes, hash_file
from tessera.store.manifest import FileEntry
from tessera.store.statcache import StatCache, now_ns

_CHUNK_BYTES = 4 * 1024 * 1024
_CHUNK_FILES = 64
_SHOW_PROGRESS_FILES = 2000
_SHOW_PROGRESS_BYTES = 256 * 1024 * 1024


def digest_sources(
    sources: list[Source], stat_cache: StatCache, batch: LocalWriteBatch | None
) -> list[FileEntry]:
    """Digest every source; with a ``batch``, also store the bytes of all but references.

    Files the stat cache knows (same path, size, mtime, inode) are not read again; when their
    blob is present, nothing at all is written for them. Without a batch (a remote store),
    only digests are computed: the caller asks the server which blobs it lacks.
    """
    stats: dict[Path, os.stat_result] = {}
    for source in sources:
        if source.local is not None:
            try:
                stats[source.local] = source.local.stat()
            except FileNotFoundError:
                raise NotFoundError(
                    f"{source.local} (for {source.path!r}) no longer exists; nothing was logged"
                ) from None
    cached = stat_cache.lookup(stats.items())
    total_bytes = sum(st.st_size for st in stats.values())
    show = len(sources) >= _SHOW_PROGRESS_FILES or total_bytes >= _SHOW_PROGRESS_BYTES
    remembered: list[tuple[Path, os.stat_result, str, int]] = []

    def digest_one(source: Source) -> FileEntry:
        if source.data is not None:
            digest = batch.put_bytes(source.data) if batch else hash_bytes(source.data)
            return FileEntry(source.path, digest, len(source.data), source.media, source.ref)
        assert source.local is not None
        st = stats[source.local]
        digest = cached.get(str(source.local))
        size = st.st_size
        stored_elsewhere = batch is None or source.ref is not None
        if digest is None or not (stored_elsewhere or batch.reuse(digest)):
            started = now_ns()
            if batch is not None and source.ref is None:
                digest, size = batch.put_file(source.local)
            else:
                digest, size = hash_file(source.local)
            if size == st.st_size:
                remembered.append((source.local, st, digest, started))
        bar.advance(size)
        return FileEntry(source.path, digest, size, source.media, source.ref)

    def digest_chunk(chunk: list[Source]) -> list[FileEntry]:
        return [digest_one(source) for source in chunk]

    with (
        progress.bar("storing files", total_bytes, bytes=True, show=show) as bar,
        ThreadPoolExecutor(batch.threads if batch is not None else WRITE_THREADS) as pool,
    ):
        chunks = pool.map(digest_chunk, _chunks(sources, stats))
        entries = [entry for chunk in chunks for entry in chunk]
    stat_cache.remember(remembered)
    return entries


def _chunks(sources: list[Source], stats: dict[Path, os.stat_result]) -> list[list[Source]]:
    """Sources grouped into pool tasks of about ``_CHUNK_BYTES`` (at most ``_CHUNK_FILES``).

    A task per 20 KB file costs more in futures and GIL hand-offs between threads than hashing
    it does; a task per large file keeps every thread busy. Order is kept."""
    chunks: list[list[Source]] = []
    current: list[Source] = []
    current_bytes = 0
    for source in sources:
        size = len(source.data) if source.data is not None else stats[source.local].st_size
        current.append(source)
        current_bytes += size
        if current_bytes >= _CHUNK_BYTES or len(current) >= _CHUNK_FILES:
            chunks.append(current)
            current, current_bytes = [], 0
    if current:
        chunks.append(current)
    return chunks
