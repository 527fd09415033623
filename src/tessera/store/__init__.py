"""A store: a catalog (SQL) plus a blob store (bytes by digest), opened from one place.

The embedded layout is a folder::

    .tessera/
      tessera.json      {"format": 1}; a newer number means a newer Tessera wrote it
      catalog.db        SQLite catalog (WAL)
      blobs/ab/cd/...   content-addressed blobs
      tmp/              blobs being written; leftovers are removed by gc
      cache/            stat cache (safe to delete)
      lock              serialises creating and upgrading the store
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tessera.errors import StoreFormatError, StoreNotFoundError
from tessera.store.blobs import LocalBlobStore
from tessera.store.catalog import Catalog
from tessera.store.statcache import StatCache

STORE_FORMAT = 1
MARKER = "tessera.json"
DEFAULT_DIR = ".tessera"


def default_dir() -> Path:
    """``$TESSERA_DIR`` if set, else ``./.tessera``."""
    return Path(os.environ.get("TESSERA_DIR") or DEFAULT_DIR)


class Store:
    """Catalog + blobs + stat cache of one embedded store folder."""

    def __init__(self, root: Path, catalog: Catalog, blobs: LocalBlobStore):
        self.root = root
        self.catalog = catalog
        self.blobs = blobs
        self.stat_cache = StatCache(root / "cache" / "stat.sqlite")

    @classmethod
    def open(cls, root: str | os.PathLike[str] | None = None, create: bool = False) -> Store:
        root = Path(root) if root is not None else default_dir()
        root = root.absolute()
        marker = root / MARKER
        if not marker.exists():
            if not create:
                raise StoreNotFoundError(
                    f"no Tessera store at {root}; create one with tessera.init(dir=...) "
                    "or point TESSERA_DIR / --dir at an existing store"
                )
            if root.exists() and not root.is_dir():
                raise StoreFormatError(f"{root} exists and is not a folder; choose another --dir")
        with _store_lock(root, create):
            if not marker.exists():
                _write_marker(root)
            _check_marker(marker)
            blobs = LocalBlobStore(root)
            blobs.create()
            catalog = Catalog(f"sqlite:///{root / 'catalog.db'}", sqlite_path=root / "catalog.db")
            catalog.upgrade(blobs)
        return cls(root, catalog, blobs)

    def close(self) -> None:
        self.stat_cache.close()
        self.catalog.dispose()


@contextmanager
def _store_lock(root: Path, create: bool) -> Iterator[None]:
    if create:
        root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_marker(root: Path) -> None:
    temp = root / f"{MARKER}.tmp"
    temp.write_text(json.dumps({"format": STORE_FORMAT}) + "\n")
    os.replace(temp, root / MARKER)


def _check_marker(marker: Path) -> None:
    try:
        doc = json.loads(marker.read_text())
        fmt = doc["format"]
    except (ValueError, KeyError, TypeError):
        raise StoreFormatError(
            f"{marker} is not a Tessera store marker; is {marker.parent} really a store?"
        ) from None
    if not isinstance(fmt, int) or fmt > STORE_FORMAT:
        raise StoreFormatError(
            f"the store at {marker.parent} has format {fmt!r}, written by a newer Tessera; "
            f"this one reads format {STORE_FORMAT} — upgrade Tessera (pip install -U tessera)"
        )
