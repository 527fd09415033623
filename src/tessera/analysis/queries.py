"""DuckDB over a store: where each table's Parquet lives, and read-only SQL views.

``tessera.sql`` exposes four views:

- ``runs``: one row per run (project, id, name, status, times, config and summary as JSON);
- ``datasets``: one row per dataset version (project, dataset, version, digest, samples, classes);
- ``samples``: every dataset version's sample table, with ``project``, ``dataset``, ``version``;
- ``predictions``: every predictions table, long form, with ``project``, ``run``, ``run_id``,
  ``table``, ``dataset``, ``version`` (``dataset_version``).

Only a single SELECT (or WITH … SELECT) statement is accepted; the catalog is copied into
DuckDB's memory and the Parquet files are only read, so a query cannot change the store.
"""

from __future__ import annotations

import json
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from tessera.backend.base import Backend
from tessera.errors import TesseraError
from tessera.store.catalog import VersionRecord
from tessera.store.manifest import Manifest


class QueryError(TesseraError, ValueError):
    """A SQL query that was refused or failed."""


def connect() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB. It reads Parquet blobs from local files only (``parquet_paths``):
    a blob in a bucket or on a server is read from its verified copy in the local cache, see
    docs/decisions.md on why not through a registered filesystem."""
    return duckdb.connect(":memory:")


def parquet_paths(backend: Backend, manifest: Manifest) -> list[str]:
    """The local files DuckDB reads a version's Parquet blobs from, in path order."""
    return [
        backend.duckdb_source(entry.digest)
        for entry in manifest.files.values()
        if entry.path.endswith(".parquet")
    ]


def sql_list(values: list[str]) -> str:
    """A DuckDB list literal of strings (for file lists, which cannot be bound parameters)."""
    return "[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


def register_views(con: duckdb.DuckDBPyConnection, backend: Backend) -> None:
    """Create the ``runs``, ``datasets``, ``samples`` and ``predictions`` views."""
    runs = backend.runs()
    con.register(
        "_runs",
        pa.table(
            {
                "project": [r.project for r in runs],
                "id": [r.id for r in runs],
                "name": [r.name for r in runs],
                "status": [r.status for r in runs],
                "started_at": pa.array([r.started_at for r in runs], pa.float64()),
                "ended_at": pa.array([r.ended_at for r in runs], pa.float64()),
                "config": [json.dumps(r.config) for r in runs],
                "summary": [json.dumps(r.summary) for r in runs],
            }
        ),
    )
    con.execute(
        "CREATE VIEW runs AS SELECT project, id, name, status, "
        "to_timestamp(started_at) AS started_at, to_timestamp(ended_at) AS ended_at, "
        "config::JSON AS config, summary::JSON AS summary FROM _runs"
    )
    datasets: list[VersionRecord] = [v for v in backend.all_versions() if v.type == "dataset"]
    files: list[tuple[str, VersionRecord]] = []
    classes = []
    counts = []
    for version in datasets:
        manifest = backend.read_manifest(version.digest)
        classes.append(json.dumps(manifest.metadata.get("classes")))
        counts.append(int(manifest.metadata.get("num_samples", 0)))
        files += [(p, version) for p in parquet_paths(backend, manifest)]
    con.register(
        "_datasets",
        pa.table(
            {
                "project": [v.project for v in datasets],
                "dataset": [v.artifact for v in datasets],
                "version": [v.version for v in datasets],
                "digest": [v.digest for v in datasets],
                "samples": pa.array(counts, pa.int64()),
                "classes": classes,
                "created_at": pa.array([v.created_at for v in datasets], pa.float64()),
            }
        ),
    )
    con.execute(
        "CREATE VIEW datasets AS SELECT project, dataset, version, digest, samples, "
        "classes::JSON AS classes, to_timestamp(created_at) AS created_at FROM _datasets"
    )
    _union_view(
        con,
        "samples",
        [
            (path, {"project": v.project, "dataset": v.artifact, "version": v.version})
            for path, v in files
        ],
        empty="SELECT NULL::VARCHAR AS id, NULL::VARCHAR AS project, NULL::VARCHAR AS dataset, "
        "NULL::VARCHAR AS version WHERE false",
    )
    predictions: list[tuple[str, dict[str, Any]]] = []
    for run, table_version, row in backend.table_versions(kind="predictions"):
        if row.dataset_version_id is None:
            continue
        dataset = backend.version_by_id(row.dataset_version_id)
        manifest = backend.read_manifest(table_version.digest)
        for path in parquet_paths(backend, manifest):
            predictions.append(
                (
                    path,
                    {
                        "project": table_version.project,
                        "run": run.name if run else None,
                        "run_id": run.id if run else None,
                        "table": row.name,
                        "dataset": dataset.artifact,
                        "version": dataset.version,
                    },
                )
            )
    _union_view(
        con,
        "predictions",
        predictions,
        empty="SELECT NULL::VARCHAR AS id, NULL::VARCHAR AS project, NULL::VARCHAR AS run, "
        'NULL::VARCHAR AS run_id, NULL::VARCHAR AS "table", NULL::VARCHAR AS dataset, '
        "NULL::VARCHAR AS version WHERE false",
    )


def _union_view(
    con: duckdb.DuckDBPyConnection,
    name: str,
    files: list[tuple[str, dict[str, Any]]],
    empty: str,
) -> None:
    """A view over many Parquet files, each tagged with constant columns, via one scan."""
    if not files:
        con.execute(f"CREATE VIEW {name} AS {empty}")
        return
    tags = list(files[0][1])
    paths = sql_list(sorted({p for p, _ in files}))
    columns = {
        row[0]
        for row in con.execute(
            f"DESCRIBE SELECT * FROM read_parquet({paths}, union_by_name = true)"
        ).fetchall()
    }
    # A stored column named like a tag would shadow it (DuckDB renames the tag to dataset_1):
    # the tag keeps its name, the stored column is kept as <name>_column.
    renamed = ", ".join(f'"{c}" AS "{c}_column"' for c in tags if c in columns)
    rename = f" RENAME ({renamed})" if renamed else ""
    con.register(
        f"_{name}_files",
        pa.table(
            {"filename": [p for p, _ in files], **{k: [meta[k] for _, meta in files] for k in tags}}
        ),
    )
    tag_columns = ", ".join(f'f."{k}"' for k in tags)
    con.execute(
        f"CREATE VIEW {name} AS SELECT t.* EXCLUDE (filename){rename}, {tag_columns} "
        f"FROM read_parquet({paths}, union_by_name = true, filename = true) AS t "
        f"JOIN _{name}_files AS f USING (filename)"
    )


def run_readonly_sql(con: duckdb.DuckDBPyConnection, query: str) -> pd.DataFrame:
    """Run one SELECT statement; refuse anything else before it runs."""
    if not isinstance(query, str) or not query.strip():
        raise QueryError("give a SELECT statement")
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise QueryError(f"cannot parse the query: {str(e).splitlines()[0]}") from None
    if len(statements) != 1:
        raise QueryError(f"give exactly one statement, got {len(statements)}")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise QueryError(
            f"only SELECT queries are allowed (got {statements[0].type.name}); the store is "
            "read-only here"
        )
    try:
        return con.execute(query).df()
    except duckdb.Error as e:
        raise QueryError(str(e).split("\n")[0]) from None
