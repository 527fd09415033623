"""Reading whole files with as few system calls as possible.

A leaf module (it imports nothing of Tessera's): the probe helper interpreter (probing.py)
imports it without the rest of the package.
"""

from __future__ import annotations

import os


def read_small(path: str | os.PathLike[str], below: int) -> bytes | None:
    """The whole file, if it is smaller than ``below`` bytes: read with four system calls (open,
    fstat, one read of its size + 1 to see the end, close). None for a larger file, or one
    whose size changed or that came back short: the caller then streams it, reading to the end.

    ``open(path, "rb").read()`` makes about ten (isatty, lseek, fstat twice, a read to see the
    end), and each lets another thread take the GIL: with 32 threads storing small files in a
    bucket, those hand-overs cost more CPU than the reads did (docs/decisions.md)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size >= below:
            return None
        data = os.read(fd, size + 1)
    finally:
        os.close(fd)
    return data if len(data) == size else None
