"""Thread-pool helpers for work on many small items."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Items per task: large enough that the pool's per-task cost (a future, a lock, a wake-up)
# vanishes beside the work, small enough that a few hundred tasks keep every worker busy.
CHUNK = 256


def map_chunked(
    pool: Executor, fn: Callable[[T], R], items: Sequence[T], chunk: int = CHUNK
) -> list[R]:
    """``list(pool.map(fn, items))`` with one task per ``chunk`` items, not per item.

    A future per item made logging a million small images spend more time in the executor
    than in encoding and hashing them.
    """

    def run(start: int) -> list[R]:
        return [fn(item) for item in items[start : start + chunk]]

    out: list[R] = []
    for part in pool.map(run, range(0, len(items), chunk)):
        out.extend(part)
    return out
