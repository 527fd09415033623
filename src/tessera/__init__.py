"""Tessera: version image datasets and log model predictions on them by reference.

The public API, and nothing else::

    import tessera

    with tessera.init(project="mnist", config={"lr": 0.1}) as run:
        art = tessera.Artifact("weights", type="model")
        art.add_file("model.pt")
        run.log_artifact(art, aliases=["best"])
        run.log({"loss": 0.25})
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from tessera.api.artifact import Artifact, ArtifactVersion
from tessera.api.browse import StoreBrowser
from tessera.api.run import Run
from tessera.config import open_backend
from tessera.errors import (
    ConflictError,
    DigestMismatchError,
    InvalidNameError,
    InvalidPathError,
    NotFoundError,
    RunFinishedError,
    StoreCorruptError,
    StoreFormatError,
    StoreNotFoundError,
    TesseraError,
)
from tessera.jsonvalues import to_json
from tessera.names import check_name

if TYPE_CHECKING:
    import pandas as pd

    from tessera.api.compare import CompareError, Comparison, compare
    from tessera.api.dataset import Batch, Dataset, DatasetError, DatasetVersion
    from tessera.api.predictions import PredictionError, PredictionWriter
    from tessera.api.table import (
        Image,
        ImageRef,
        Table,
        TableError,
        TableVersion,
        UnmatchedImagesWarning,
    )
    from tessera.media import ImageError

# Names whose modules pull in numpy, pyarrow, Pillow, pandas or DuckDB are imported on first
# use (PEP 562), so that `import tessera` for runs, metrics and file artifacts stays light:
# eager imports cost ~150 MiB of RSS and seconds of start-up before any work.
_LAZY = {
    "CompareError": "tessera.api.compare",
    "Comparison": "tessera.api.compare",
    "compare": "tessera.api.compare",
    "Batch": "tessera.api.dataset",
    "Dataset": "tessera.api.dataset",
    "DatasetError": "tessera.api.dataset",
    "DatasetVersion": "tessera.api.dataset",
    "PredictionError": "tessera.api.predictions",
    "PredictionWriter": "tessera.api.predictions",
    "Image": "tessera.api.table",
    "ImageRef": "tessera.api.table",
    "Table": "tessera.api.table",
    "TableError": "tessera.api.table",
    "TableVersion": "tessera.api.table",
    "UnmatchedImagesWarning": "tessera.api.table",
    "ImageError": "tessera.media",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tessera' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"


def init(
    project: str,
    name: str | None = None,
    config: dict[str, Any] | None = None,
    dir: str | os.PathLike[str] | None = None,
    server: str | None = None,
) -> Run:
    """Start a run in ``project``.

    ``dir`` (or ``$TESSERA_DIR``, default ``./.tessera``) is the store, created on first use.
    With ``server`` (or ``$TESSERA_SERVER``) the run is logged to that Tessera server instead,
    and ``dir`` is its local cache; the token comes from ``$TESSERA_TOKEN`` or
    ``tessera login``."""
    check_name(project, "project")
    if name is not None:
        check_name(name, "run")
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    config_json = to_json(config or {}, "config")
    backend = open_backend(dir, server, create=True)
    try:
        backend.mark_stale_runs()
        record = backend.create_run(project, name, config_json)
    except BaseException:
        backend.close()
        raise
    return Run(backend, record)


def sql(
    query: str, dir: str | os.PathLike[str] | None = None, server: str | None = None
) -> pd.DataFrame:
    """Run one read-only SELECT over the views ``runs``, ``datasets``, ``samples`` and
    ``predictions`` of a store (see ``tessera.analysis.queries``); returns a DataFrame."""
    from tessera.analysis.queries import connect, register_views, run_readonly_sql

    backend = open_backend(dir, server)
    con = connect()
    try:
        register_views(con, backend)
        return run_readonly_sql(con, query)
    finally:
        con.close()
        backend.close()


def open_store(
    dir: str | os.PathLike[str] | None = None, server: str | None = None
) -> StoreBrowser:
    """Browse an existing store read-only: projects, runs, artifacts, versions, lineage."""
    backend = open_backend(dir, server)
    backend.mark_stale_runs()
    return StoreBrowser(backend)


__all__ = [
    "Artifact",
    "ArtifactVersion",
    "Batch",
    "CompareError",
    "Comparison",
    "ConflictError",
    "Dataset",
    "DatasetError",
    "DatasetVersion",
    "DigestMismatchError",
    "Image",
    "ImageError",
    "ImageRef",
    "InvalidNameError",
    "InvalidPathError",
    "NotFoundError",
    "PredictionError",
    "PredictionWriter",
    "Run",
    "RunFinishedError",
    "StoreBrowser",
    "StoreCorruptError",
    "StoreFormatError",
    "StoreNotFoundError",
    "Table",
    "TableError",
    "TableVersion",
    "TesseraError",
    "UnmatchedImagesWarning",
    "compare",
    "init",
    "open_store",
    "sql",
]
