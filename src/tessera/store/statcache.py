"""Remembers the digest of files by (path, size, mtime, inode), so re-logging an unchanged
folder of 10,000 files re-hashes nothing.

The cache is a small SQLite file next to the catalog. It is only an accelerator: deleting it is
always safe. A file whose mtime is within ``RACY_WINDOW_NS`` of the moment it was hashed is not
trusted later (it could have been changed again within the same timestamp tick: git's "racy
clean" problem), so it is simply hashed again.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

RACY_WINDOW_NS = 100_000_000  # 0.1 s, far above the kernel's timestamp granularity


class StatCache:
    def __init__(self, path: Path):
        self._path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._writer: threading.Thread | None = None  # the last remember()'s write
        self._writer_lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self._path, timeout=30, isolation_level=None, check_same_thread=False
            )
            deadline = time.monotonic() + 30
            while True:
                try:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=NORMAL")
                    db.execute(
                        "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, "
                        "mtime_ns INTEGER, inode INTEGER, digest TEXT, hashed_ns INTEGER)"
                    )
                    break
                except sqlite3.OperationalError as e:
                    # SQLite skips its busy handler where waiting could deadlock (two processes
                    # setting up the same new file), so wait here instead.
                    if "locked" not in str(e) or time.monotonic() > deadline:
                        db.close()
                        raise
                    time.sleep(0.005 + random.random() * 0.02)
            self._db = db
        return self._db

    def lookup(self, entries: Iterable[tuple[Path, os.stat_result]]) -> dict[str, str]:
        """Digests of the files whose path, size, mtime and inode match a trusted entry."""
        entries = list(entries)
        if not entries:
            return {}
        wanted = {str(p): st for p, st in entries}
        found: dict[str, str] = {}
        self.wait()
        with self._lock:
            db = self._connect()
            keys = list(wanted)
            for start in range(0, len(keys), 500):
                batch = keys[start : start + 500]
                marks = ",".join("?" * len(batch))
                rows = db.execute(
                    f"SELECT path, size, mtime_ns, inode, digest, hashed_ns FROM files "
                    f"WHERE path IN ({marks})",
                    batch,
                ).fetchall()
                for path, size, mtime_ns, inode, digest, hashed_ns in rows:
                    st = wanted[path]
                    if (
                        st.st_size == size
                        and st.st_mtime_ns == mtime_ns
                        and st.st_ino == inode
                        and mtime_ns + RACY_WINDOW_NS < hashed_ns
                    ):
                        found[path] = digest
        return found

    def remember(self, rows: Iterable[tuple[Path, os.stat_result, str, int]]) -> None:
        """Record (path, stat before hashing, digest, time hashing started).

        Written by a thread of its own: the SQLite inserts took a tenth of a second for 10,000
        files, at the end of an ingest that can instead spend it on its manifest and commit.
        A later lookup, remember or close waits for it; a failed write only loses the cache
        entries, which cost a hash next time."""
        values = [
            (str(p), st.st_size, st.st_mtime_ns, st.st_ino, digest, hashed_ns)
            for p, st, digest, hashed_ns in rows
        ]
        if not values:
            return
        with self._writer_lock:  # one write at a time, in order: the later entry wins
            if self._writer is not None:
                self._writer.join()
            # Not a daemon: an interpreter that exits right after an ingest still writes it.
            self._writer = threading.Thread(target=self._write, args=(values,))
            self._writer.start()

    def _write(self, values: list[tuple[str, int, int, int, str, int]]) -> None:
        with self._lock, suppress(sqlite3.Error, OSError):
            db = self._connect()
            try:
                db.execute("BEGIN")
                db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)", values)
                db.execute("COMMIT")
            except sqlite3.Error:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def wait(self) -> None:
        """Wait until what ``remember`` was given is written."""
        with self._writer_lock:
            if self._writer is not None:
                self._writer.join()
                self._writer = None

    def close(self) -> None:
        self.wait()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def now_ns() -> int:
    return time.time_ns()
