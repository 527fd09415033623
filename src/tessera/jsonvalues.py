"""Turning user values (configs, summaries) into plain JSON, with errors that name the key."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any


def to_json(value: Any, where: str) -> Any:
    """A JSON-compatible copy of ``value``: numpy scalars and arrays, tuples, paths converted.

    Non-finite floats become None (JSON has no NaN); anything else unknown is refused with the
    key path in the message.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings, got {key!r}")
            out[key] = to_json(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars, torch tensors
    if callable(tolist):
        return to_json(tolist(), where)
    raise TypeError(
        f"{where}: cannot store a {type(value).__name__} as JSON; use numbers, strings, "
        "booleans, lists or dicts"
    )
