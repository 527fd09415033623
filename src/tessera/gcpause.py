"""Pausing Python's cyclic garbage collector while one operation makes many objects."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused for the block, then restored as it was.

    Logging 10,000 files makes tens of thousands of long-lived objects (paths, sources, stat
    results, entries), and each batch of them set off a collection, the later ones of every
    object in the process (pandas, pyarrow and SQLAlchemy's included). A collection holds the
    GIL throughout, so while the upload threads waited for it, no request was sent: an ingest to
    a bucket took 0.2-0.5 s longer (docs/decisions.md). What is made inside holds no cycles worth
    collecting early; the next collection after the block sees any that exist.

    Nesting and concurrent callers are safe: only a caller that found collection enabled
    enables it again, and a program that disabled it keeps it disabled."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
