"""A store: a catalog (SQL) plus a blob store (bytes by digest), opened from one place.

Where the catalog and the blobs live is chosen by URL, resolved in this order: the arguments
(``--catalog``/``--blobs``), then ``$TESSERA_CATALOG``/``$TESSERA_BLOBS``, then what the store
folder's ``tessera.json`` recorded when it was created, then the embedded default (SQLite and a
blob folder inside the store folder). Catalog: ``sqlite:///PATH`` or
``postgresql+psycopg://user@host:port/db``. Blobs: ``file:///PATH`` or ``s3://bucket/prefix``
(credentials and endpoint from the usual ``AWS_*`` variables). The folder itself always holds
the marker, temp files and caches.

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
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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

    def __init__(self, root: Path, catalog: Catalog, blobs: Any):
        self.root = root
        self.catalog = catalog
        self.blobs = blobs
        self.stat_cache = StatCache(root / "cache" / "stat.sqlite")

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str] | None = None,
        create: bool = False,
        catalog: str | None = None,
        blobs: str | None = None,
        local_only: bool = False,
    ) -> Store:
        """Open (or with ``create``, create) the store at folder ``root``. ``local_only``
        ignores ``$TESSERA_CATALOG``/``$TESSERA_BLOBS`` (for a client's local cache)."""
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
        if not local_only:
            catalog = catalog or os.environ.get("TESSERA_CATALOG") or None
            blobs = blobs or os.environ.get("TESSERA_BLOBS") or None
        with _store_lock(root, create):
            if not marker.exists():
                _write_marker(root, catalog, blobs)
            recorded = _check_marker(marker)
            catalog_url = catalog or recorded.get("catalog") or f"sqlite:///{root / 'catalog.db'}"
            blobs_url = blobs or recorded.get("blobs") or root.as_uri()
            blob_store = open_blob_store(blobs_url, root)
            blob_store.create()
            sqlite_path = root / "catalog.db" if catalog_url.startswith("sqlite") else None
            catalog_db = Catalog(catalog_url, sqlite_path=sqlite_path)
            catalog_db.upgrade(blob_store)
        return cls(root, catalog_db, blob_store)

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


def open_blob_store(url: str, root: Path) -> Any:
    """A LocalBlobStore for ``file://`` URLs, an S3BlobStore for ``s3://`` ones."""
    if url.startswith("s3://"):
        from tessera.store.s3 import S3BlobStore

        return S3BlobStore(url, root / "cache")
    if url.startswith("file://"):
        return LocalBlobStore(Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)))
    raise StoreFormatError(f"blob store URL must start with file:// or s3://, got {url!r}")


def _write_marker(root: Path, catalog: str | None, blobs: str | None) -> None:
    doc: dict[str, Any] = {"format": STORE_FORMAT}
    if catalog:
        doc["catalog"] = _without_password(catalog)
    if blobs:
        doc["blobs"] = blobs
    temp = root / f"{MARKER}.tmp"
    temp.write_text(json.dumps(doc) + "\n")
    os.replace(temp, root / MARKER)


def _without_password(url: str) -> str:
    """The catalog URL to record in the marker: never its password, which would then sit in a
    plain file beside the store. Later opens take it from ``$TESSERA_CATALOG``, or libpq finds it
    in ``$PGPASSWORD`` or ``~/.pgpass``."""
    import sqlalchemy as sa

    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return url  # Catalog() refuses it with its own message
    if parsed.password is None:
        return url
    return parsed._replace(password=None).render_as_string(hide_password=False)


def _check_marker(marker: Path) -> dict[str, Any]:
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
    return doc
