"""Digesting the files of an artifact: stat cache, parallel hashing, one pass per file."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tessera import progress
from tessera.backend.base import Source
from tessera.errors import NotFoundError
from tessera.parallel import map_chunked
from tessera.store.blobs import LocalWriteBatch
from tessera.store.hashing import hash_bytes, hash_file
from tessera.store.manifest import FileEntry
from tessera.store.statcache import StatCache, now_ns

# Hashing and copying release the GIL; a few threads per core keep the disk and the CPU busy.
_WORKERS = min(16, 4 * (os.cpu_count() or 1))
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

    with (
        progress.bar("storing files", total_bytes, bytes=True, show=show) as bar,
        ThreadPoolExecutor(_WORKERS) as pool,
    ):
        entries = map_chunked(pool, digest_one, sources)
    stat_cache.remember(remembered)
    return entries
