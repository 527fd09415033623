"""The web UI's data layer: every filter, sort, join and aggregate runs here, in DuckDB.

One in-memory DuckDB database per app holds *materialised* tables: the first time a table
version is viewed, its Parquet files are loaded once (a predictions table joined by id with its
dataset's label and original image), and every later page, sort, filter, count and export is a
query over that in-memory table that returns one page. Versions are immutable, so every cache
here is keyed by version id or digest and never goes stale; the caches are bounded (LRU).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from tessera.analysis.queries import connect, parquet_paths, sql_list
from tessera.api.compare import Comparison
from tessera.backend.local import LocalBackend
from tessera.errors import NotFoundError, StoreCorruptError
from tessera.store import schema as t
from tessera.store.catalog import RunRecord, TableRow, VersionRecord
from tessera.ui.filters import (
    BOOL,
    CLASS,
    NUMBER,
    OTHER,
    TEXT,
    CompiledFilter,
    Schema,
    compile_filter,
    kind_of_duckdb_type,
    quote_ident,
)

K = TypeVar("K")
V = TypeVar("V")

PAGE_SIZES = (20, 50, 100, 200)
DEFAULT_PAGE_SIZE = 50
MAX_MATERIALISED_TABLES = 8
MAX_MATERIALISED_ROWS = 12_000_000
MAX_COMPARISONS = 3
HIDDEN_BY_DEFAULT = {"pixels", "path", "width", "height", "scores"}


class LRU(Generic[K, V]):
    """A small thread-safe least-recently-used map."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: K, value: V) -> list[V]:
        """Store a value; return the values evicted."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            evicted = []
            while len(self._items) > self.size:
                evicted.append(self._items.popitem(last=False)[1])
            return evicted

    def values(self) -> list[V]:
        with self._lock:
            return list(self._items.values())


class KeyedLocks:
    """One lock per key, so two requests never build the same expensive thing twice."""

    def __init__(self) -> None:
        self._locks: dict[Any, threading.Lock] = {}
        self._guard = threading.Lock()

    def __call__(self, key: Any) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())


# -- versions ----------------------------------------------------------------------------------


@dataclass
class VersionInfo:
    """What the UI needs from a version's manifest, read once (manifests can list 1M files)."""

    record: VersionRecord
    metadata: dict[str, Any]
    parquet: list[str]  # local paths of the version's Parquet files, in path order
    files: pa.Table  # path, digest, size, kind, format, width, height, ref
    entries: dict[str, str]  # digest of a few named files (the sample table, table files)

    @property
    def kind(self) -> str:
        return str(self.metadata.get("kind") or self.record.type)

    @property
    def classes(self) -> list[str] | None:
        classes = self.metadata.get("classes")
        return [str(c) for c in classes] if classes else None


def _files_table(manifest: Any) -> pa.Table:
    paths, digests, sizes, kinds, formats, widths, heights, refs = ([] for _ in range(8))
    for entry in manifest.files.values():
        media = entry.media or {}
        paths.append(entry.path)
        digests.append(entry.digest)
        sizes.append(entry.size)
        kinds.append(media.get("kind"))
        formats.append(media.get("format"))
        widths.append(media.get("width"))
        heights.append(media.get("height"))
        refs.append(entry.ref)
    return pa.table(
        {
            "path": pa.array(paths, pa.string()),
            "digest": pa.array(digests, pa.string()),
            "size": pa.array(sizes, pa.int64()),
            "kind": pa.array(kinds, pa.string()),
            "format": pa.array(formats, pa.string()),
            "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()),
            "ref": pa.array(refs, pa.string()),
        }
    )


# -- table sources -----------------------------------------------------------------------------


@dataclass
class TableSource:
    """A table version loaded into DuckDB, with what the viewer and the filter need to know."""

    version: VersionRecord
    kind: str  # "dataset", "predictions" or "table"
    table: str  # the DuckDB table name
    columns: list[str]
    types: dict[str, str]
    classes: list[str] | None
    class_columns: set[str]
    image_columns: dict[str, str]  # column -> SQL expression of its digest
    num_rows: int
    dataset: VersionRecord | None = None  # the dataset version a predictions table is bound to
    pins: int = 0
    schema: Schema = field(init=False)

    def __post_init__(self) -> None:
        kinds = {}
        for name in self.columns:
            kind = kind_of_duckdb_type(self.types[name])
            if name in self.class_columns and kind == NUMBER:
                kind = CLASS
            kinds[name] = kind
        self.schema = Schema(kinds, self.classes)

    @property
    def default_columns(self) -> list[str]:
        hidden = set(HIDDEN_BY_DEFAULT)
        if self.kind == "table":
            hidden = {"pixels"}
        return [c for c in self.columns if c not in hidden][:14]

    def sortable(self, column: str) -> bool:
        return column in self.types


@dataclass
class Page:
    """One page of a table: the rows (dicts), and where it sits in the whole."""

    rows: list[dict[str, Any]]
    columns: list[str]
    total: int  # rows matching the filter
    page: int
    size: int
    sort: str | None
    desc: bool
    filter: CompiledFilter | None
    seconds: float = 0.0

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.size))

    @property
    def first_row(self) -> int:
        return (self.page - 1) * self.size + 1 if self.total else 0

    @property
    def last_row(self) -> int:
        return min(self.total, self.page * self.size)


class ViewError(ValueError):
    """A request parameter (sort column, column choice) that names nothing in the table."""


# -- comparisons -------------------------------------------------------------------------------


@dataclass
class CompareEntry:
    """A cached Comparison plus what the compare page derived from it (all immutable)."""

    key: tuple[Any, ...]
    comparison: Comparison
    lock: threading.Lock = field(default_factory=threading.Lock)
    summaries: dict[int, dict[str, Any]] = field(default_factory=dict)
    lists: LRU[Any, Any] = field(default_factory=lambda: LRU(32))
    built_seconds: float = 0.0

    def run_index(self, run_id: str) -> int:
        for run in self.comparison.runs:
            if run.id == run_id:
                return run.index
        raise NotFoundError(f"run {run_id!r} is not in this comparison")


def parquet_columns(cur: duckdb.DuckDBPyConnection, source: str) -> list[str]:
    """The column names of a Parquet blob (a local file: a blob in a bucket or on a server is
    read from its verified copy in the local cache)."""
    cur.execute(f"SELECT * FROM read_parquet({sql_list([source])}) LIMIT 0")
    return [column[0] for column in cur.description]


# -- the data layer ----------------------------------------------------------------------------


class UIData:
    """Everything the pages read, over one LocalBackend and one in-memory DuckDB database."""

    def __init__(self, backend: LocalBackend):
        self.backend = backend
        self.db = connect()
        self._infos: LRU[int, VersionInfo] = LRU(64)
        self._sources: OrderedDict[int, TableSource] = OrderedDict()
        self._sources_lock = threading.Lock()
        self._counts: LRU[tuple[Any, ...], int] = LRU(1024)
        self._diffs: LRU[tuple[int, int], dict[str, Any]] = LRU(16)
        self._comparisons: LRU[tuple[Any, ...], CompareEntry] = LRU(MAX_COMPARISONS)
        self._storage: LRU[tuple[str, int], dict[str, int]] = LRU(256)
        self._prediction_tables: LRU[tuple[int, int], list[Any]] = LRU(64)
        self._build_locks = KeyedLocks()
        self._stale_checked = 0.0

    def close(self) -> None:
        for entry in self._comparisons.values():
            entry.comparison.close()
        self.db.close()

    @contextmanager
    def cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        cur = self.db.cursor()
        try:
            yield cur
        finally:
            cur.close()

    def mark_stale_runs(self) -> None:
        """Notice crashed runs, at most every 10 seconds (it is a catalog write)."""
        now = time.monotonic()
        if now - self._stale_checked > 10:
            self._stale_checked = now
            self.backend.mark_stale_runs()

    # -- catalog -----------------------------------------------------------------------------

    def version(self, version_id: int) -> VersionRecord:
        return self.backend.version_by_id(version_id)

    def info(self, version_id: int) -> VersionInfo:
        found = self._infos.get(version_id)
        if found is not None:
            return found
        with self._build_locks(("info", version_id)):
            found = self._infos.get(version_id)
            if found is not None:
                return found
            record = self.backend.version_by_id(version_id)
            manifest = self.backend.read_manifest(record.digest)
            metadata = dict(manifest.metadata)
            named = {}
            for key in ("samples", "table"):
                path = metadata.get(key)
                if isinstance(path, str) and path in manifest.files:
                    named[key] = manifest.files[path].digest
            info = VersionInfo(
                record=record,
                metadata=metadata,
                parquet=parquet_paths(self.backend, manifest)
                if record.type in ("dataset", "table", "predictions")
                else [],
                files=_files_table(manifest),
                entries=named,
            )
            if record.type == "dataset" and "samples" in named:
                info.parquet = [self.backend.duckdb_source(named["samples"])]
            del manifest
            self._infos.put(version_id, info)
            return info

    def project_summary(self, project: str) -> dict[str, int]:
        """Counts and sizes of one project: datasets, other artifacts, versions, and the bytes
        of the distinct blobs its versions keep (what it really stores) against the sum of its
        version sizes (what it would take without deduplication)."""
        catalog = self.backend.catalog
        with catalog.read() as conn:
            pid = conn.execute(
                sa.select(t.projects.c.id).where(t.projects.c.name == project)
            ).scalar()
            if pid is None:
                raise NotFoundError(f"no project {project!r}")
            versions = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(t.versions.c.size), 0))
                .select_from(t.versions)
                .join(t.artifacts, t.artifacts.c.id == t.versions.c.artifact_id)
                .where(t.artifacts.c.project_id == pid)
            ).one()
            newest = conn.execute(
                sa.select(sa.func.coalesce(sa.func.max(t.versions.c.id), 0))
                .select_from(t.versions)
                .join(t.artifacts, t.artifacts.c.id == t.versions.c.artifact_id)
                .where(t.artifacts.c.project_id == pid)
            ).scalar_one()
            types = dict(
                conn.execute(
                    sa.select(t.artifacts.c.type, sa.func.count())
                    .where(t.artifacts.c.project_id == pid)
                    .group_by(t.artifacts.c.type)
                ).all()
            )
        key = (project, int(newest))
        stored = self._storage.get(key)
        if stored is None:
            with catalog.read() as conn:
                digests = conn.execute(
                    sa.select(t.version_blobs.c.digest)
                    .distinct()
                    .join(t.versions, t.versions.c.id == t.version_blobs.c.version_id)
                    .join(t.artifacts, t.artifacts.c.id == t.versions.c.artifact_id)
                    .where(t.artifacts.c.project_id == pid)
                ).scalars()
                total = count = 0
                for digest in digests:
                    try:  # asked of the blob store: over S3, no blob is downloaded for this
                        total += self.backend.store.blobs.size(digest)
                    except StoreCorruptError:
                        continue
                    count += 1
            stored = {"blobs": count, "stored_bytes": total}
            self._storage.put(key, stored)
        return {
            "datasets": int(types.get("dataset", 0)),
            "artifacts": int(sum(types.values())),
            "versions": int(versions[0]),
            "logical_bytes": int(versions[1]),
            **stored,
        }

    # -- runs table (project page) -----------------------------------------------------------

    def runs_page(
        self,
        runs: list[RunRecord],
        keys: list[str],
        sort: str | None,
        desc: bool,
        page: int,
        size: int,
    ) -> tuple[list[dict[str, Any]], int]:
        """Sort and page a project's runs in DuckDB; ``keys`` are ``config.x`` / ``summary.y``
        columns, sorted numerically where the value is a number, else as text."""
        now = time.time()
        data: dict[str, list[Any]] = {
            "id": [r.id for r in runs],
            "name": [r.name for r in runs],
            "status": [r.status for r in runs],
            "started": [r.started_at for r in runs],
            "duration": [((r.ended_at or now) - r.started_at) for r in runs],
        }
        flat = [(flatten(r.config), flatten(r.summary)) for r in runs]
        for i, key in enumerate(keys):
            where, _, name = key.partition(".")
            values = [(c if where == "config" else s).get(name) for c, s in flat]
            data[f"k{i}_num"] = [
                float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None
                for v in values
            ]
            data[f"k{i}_txt"] = [None if v is None else json.dumps(v) for v in values]
        arrow = pa.table(
            {
                k: pa.array(
                    v,
                    pa.float64()
                    if k.endswith("_num") or k in ("started", "duration")
                    else pa.string(),
                )
                for k, v in data.items()
            }
        )
        order = "started"
        if sort in ("name", "status", "started", "duration"):
            order = sort
        elif sort in keys:
            i = keys.index(sort)
            order = f"k{i}_num {'DESC' if desc else 'ASC'} NULLS LAST, k{i}_txt"
        direction = "DESC" if desc else "ASC"
        view = f"runs_{uuid.uuid4().hex}"
        with self.cursor() as cur:
            cur.register(view, arrow)
            try:
                total = cur.execute(f"SELECT count(*) FROM {view}").fetchone()[0]
                rows = cur.execute(
                    f"SELECT id FROM {view} ORDER BY {order} {direction} NULLS LAST, started, id "
                    "LIMIT ? OFFSET ?",
                    [size, (page - 1) * size],
                ).fetchall()
            finally:
                cur.unregister(view)
        by_id = {r.id: (r, f) for r, f in zip(runs, flat, strict=True)}
        out = []
        for (run_id,) in rows:
            run, (config, summary) = by_id[run_id]
            values = {}
            for key in keys:
                where, _, name = key.partition(".")
                values[key] = (config if where == "config" else summary).get(name)
            out.append({"run": run, "values": values})
        return out, int(total)

    # -- materialised tables -----------------------------------------------------------------

    @contextmanager
    def source(self, version_id: int) -> Iterator[TableSource]:
        """The version's table, loaded into DuckDB (once), pinned while in use."""
        src = self._pin(version_id)
        if src is None:
            with self._build_locks(("source", version_id)):
                src = self._pin(version_id)
                if src is None:
                    built = self._materialise(version_id)
                    with self._sources_lock:
                        built.pins += 1
                        self._sources[version_id] = built
                    self._evict()
                    src = built
        try:
            yield src
        finally:
            with self._sources_lock:
                src.pins -= 1

    def _pin(self, version_id: int) -> TableSource | None:
        with self._sources_lock:
            src = self._sources.get(version_id)
            if src is not None:
                src.pins += 1
                self._sources.move_to_end(version_id)
            return src

    def _evict(self) -> None:
        with self._sources_lock:
            total = sum(s.num_rows for s in self._sources.values())
            for version_id, src in list(self._sources.items()):
                if len(self._sources) <= MAX_MATERIALISED_TABLES and total <= MAX_MATERIALISED_ROWS:
                    break
                if src.pins > 0 or len(self._sources) == 1:
                    continue
                del self._sources[version_id]
                total -= src.num_rows
                with self.cursor() as cur:
                    cur.execute(f"DROP TABLE IF EXISTS {src.table}")

    def _materialise(self, version_id: int) -> TableSource:
        info = self.info(version_id)
        record = info.record
        if record.type not in ("dataset", "table", "predictions") or not info.parquet:
            raise NotFoundError(f"{record.spec} is a {record.type!r} artifact with no table")
        name = f"m_{version_id}_{uuid.uuid4().hex[:8]}"
        files = sql_list(info.parquet)
        dataset: VersionRecord | None = None
        classes = info.classes
        class_columns: set[str] = set()
        image_columns: dict[str, str] = {}
        with self.cursor() as cur:
            if record.type == "dataset":
                names = parquet_columns(cur, info.parquet[0])
                exclude = " EXCLUDE (pixels)" if "pixels" in names else ""
                cur.execute(f"CREATE TABLE {name} AS SELECT *{exclude} FROM read_parquet({files})")
                kind = "dataset"
                if classes:
                    class_columns = {"label"}
                image_columns = {"image": '"image"'}
            elif record.type == "predictions" or info.kind == "predictions":
                kind = "predictions"
                row = self.backend.table_row(record.id)
                dataset = (
                    self.backend.version_by_id(row.dataset_version_id)
                    if row is not None and row.dataset_version_id is not None
                    else None
                )
                self._create_predictions(cur, name, info, dataset)
                if dataset is not None:
                    classes = self.info(dataset.id).classes or classes
                    image_columns = {"image": '"image"'}
                if classes:
                    class_columns = {"label", "pred"}
            else:
                kind = "table"
                cur.execute(f"CREATE TABLE {name} AS SELECT * FROM read_parquet({files})")
                for column in info.metadata.get("image_columns") or []:
                    image_columns[column] = f"{quote_ident(column)}.digest"
            described = cur.execute(f"DESCRIBE {name}").fetchall()
            count = cur.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
        columns = [row[0] for row in described]
        types = {row[0]: row[1] for row in described}
        for column, type_name in types.items():  # media columns of predictions (masks)
            if column not in image_columns and type_name.startswith("STRUCT(digest VARCHAR"):
                image_columns[column] = f"{quote_ident(column)}.digest"
        return TableSource(
            version=record,
            kind=kind,
            table=name,
            columns=columns,
            types=types,
            classes=classes,
            class_columns=class_columns & set(columns),
            image_columns={c: e for c, e in image_columns.items() if c in types},
            num_rows=int(count),
            dataset=dataset,
        )

    def _create_predictions(
        self,
        cur: duckdb.DuckDBPyConnection,
        name: str,
        info: VersionInfo,
        dataset: VersionRecord | None,
    ) -> None:
        """Predictions joined by id with their dataset's label and original image."""
        names = parquet_columns(cur, info.parquet[0])
        files = sql_list(info.parquet)
        has_pred, has_scores = "pred" in names, "scores" in names
        pred = (
            "p.pred"
            if has_pred
            else "(list_position(p.scores::FLOAT[], list_max(p.scores::FLOAT[])) - 1)::INTEGER"
            if has_scores
            else "NULL::INTEGER"
        )
        select = ["p.id AS id"]
        taken = {"id"}
        if dataset is not None:
            select += ["s.image AS image", "s.label AS label"]
            taken |= {"image", "label"}
        select.append(f"{pred} AS pred")
        taken.add("pred")
        if dataset is not None:
            select.append(f"({pred} = s.label) AS correct")
            taken.add("correct")
        if has_scores and "score" not in names:
            select.append(f"(p.scores::FLOAT[])[{pred} + 1] AS score")
            taken.add("score")
        for column in names:
            if column in ("id", "pred"):
                continue
            alias = column
            while alias in taken:
                alias += "_1"
            taken.add(alias)
            expr = f"p.{quote_ident(column)}"
            if column == "scores":
                expr += "::FLOAT[]"
            select.append(f"{expr} AS {quote_ident(alias)}")
        source = f"read_parquet({files}, filename = true, file_row_number = true)"
        if dataset is not None:
            samples = sql_list(self.info(dataset.id).parquet)
            sql = (
                f"CREATE TABLE {name} AS SELECT {', '.join(select)} FROM {source} AS p "
                f"LEFT JOIN (SELECT id, image, label FROM read_parquet({samples})) AS s "
                "ON s.id = p.id ORDER BY p.filename, p.file_row_number"
            )
        else:
            sql = (
                f"CREATE TABLE {name} AS SELECT {', '.join(select)} FROM {source} AS p "
                "ORDER BY p.filename, p.file_row_number"
            )
        cur.execute(sql)

    # -- pages of a table --------------------------------------------------------------------

    def choose_columns(self, src: TableSource, wanted: list[str] | None) -> list[str]:
        if not wanted:
            return src.default_columns
        unknown = [c for c in wanted if c not in src.types]
        if unknown:
            raise ViewError(f"no column {unknown[0]!r} in this table")
        return [c for c in src.columns if c in set(wanted)]

    def compile(self, src: TableSource, text: str | None) -> CompiledFilter | None:
        text = (text or "").strip()
        if not text:
            return None
        return compile_filter(text, src.schema)

    def _where(self, compiled: CompiledFilter | None) -> tuple[str, list[Any]]:
        if compiled is None:
            return "", []
        return f"WHERE {compiled.sql}", list(compiled.params)

    def count(self, src: TableSource, compiled: CompiledFilter | None) -> int:
        if compiled is None:
            return src.num_rows
        key = (src.table, compiled.sql, json.dumps(compiled.params, default=str))
        found = self._counts.get(key)
        if found is not None:
            return found
        where, params = self._where(compiled)
        with self.cursor() as cur:
            total = int(
                cur.execute(f"SELECT count(*) FROM {src.table} {where}", params).fetchone()[0]
            )
        self._counts.put(key, total)
        return total

    def order_sql(self, src: TableSource, sort: str | None, desc: bool) -> str:
        if sort is None:
            return "rowid DESC" if desc else "rowid"
        if not src.sortable(sort):
            raise ViewError(f"cannot sort by {sort!r}: no such column")
        return f"{quote_ident(sort)} {'DESC' if desc else 'ASC'} NULLS LAST, rowid"

    def page(
        self,
        src: TableSource,
        columns: list[str],
        compiled: CompiledFilter | None,
        sort: str | None,
        desc: bool,
        page: int,
        size: int,
    ) -> Page:
        started = time.perf_counter()
        order = self.order_sql(src, sort, desc)
        total = self.count(src, compiled)
        pages = max(1, -(-total // size))
        page = min(max(1, page), pages)
        where, params = self._where(compiled)
        select = [quote_ident(c) for c in columns]
        extra = []
        for column, expr in src.image_columns.items():
            if column in columns:
                extra.append(f"{expr} AS {quote_ident('__digest__' + column)}")
        if "id" in src.types and "id" not in columns:
            extra.append('"id" AS "__id__"')
        sql = (
            f"SELECT {', '.join(select + extra)} FROM {src.table} {where} "
            f"ORDER BY {order} LIMIT ? OFFSET ?"
        )
        with self.cursor() as cur:
            result = cur.execute(sql, [*params, size, (page - 1) * size])
            names = [d[0] for d in result.description]
            rows = [dict(zip(names, row, strict=True)) for row in result.fetchall()]
        return Page(
            rows=rows,
            columns=columns,
            total=total,
            page=page,
            size=size,
            sort=sort,
            desc=desc,
            filter=compiled,
            seconds=time.perf_counter() - started,
        )

    def export(
        self,
        src: TableSource,
        columns: list[str],
        compiled: CompiledFilter | None,
        sort: str | None,
        desc: bool,
        fmt: str,
        target: Path,
    ) -> int:
        """Write every row matching the filter (chosen columns, in order) to ``target``."""
        import pyarrow.csv as pacsv

        order = self.order_sql(src, sort, desc)
        where, params = self._where(compiled)
        select = []
        select_params: list[Any] = []
        for column in columns:
            q = quote_ident(column)
            if column in src.image_columns and fmt == "csv":
                select.append(f"{src.image_columns[column]} AS {q}")
            elif fmt == "csv" and kind_of_duckdb_type(src.types[column]) == OTHER:
                select.append(f"CAST({q} AS VARCHAR) AS {q}")
            else:
                select.append(q)
            if column in src.class_columns and src.classes:
                select.append(
                    f"list_extract(?::VARCHAR[], {q} + 1) AS {quote_ident(column + '_name')}"
                )
                select_params.append(list(src.classes))
        sql = f"SELECT {', '.join(select)} FROM {src.table} {where} ORDER BY {order}"
        rows = 0
        with self.cursor() as cur:
            relation = cur.sql(sql, params=[*select_params, *params])
            to_reader = next(
                getattr(relation, name)
                for name in ("to_arrow_reader", "fetch_arrow_reader", "record_batch")
                if hasattr(relation, name)
            )  # DuckDB 2 / 1.x names
            reader = to_reader(65_536)
            writer: Any = None
            try:
                for batch in reader:
                    if writer is None:
                        writer = (
                            pacsv.CSVWriter(str(target), batch.schema)
                            if fmt == "csv"
                            else pq.ParquetWriter(str(target), batch.schema, compression="zstd")
                        )
                    writer.write_batch(batch)
                    rows += batch.num_rows
                if writer is None:  # no rows: still a valid file with the columns
                    schema = reader.schema
                    writer = (
                        pacsv.CSVWriter(str(target), schema)
                        if fmt == "csv"
                        else pq.ParquetWriter(str(target), schema, compression="zstd")
                    )
            finally:
                if writer is not None:
                    writer.close()
        return rows

    def sample_row(self, dataset_version_id: int, sample_id: str) -> dict[str, Any] | None:
        with self.source(dataset_version_id) as src, self.cursor() as cur:
            result = cur.execute(f"SELECT * FROM {src.table} WHERE id = ? LIMIT 1", [sample_id])
            names = [d[0] for d in result.description]
            row = result.fetchone()
        return None if row is None else dict(zip(names, row, strict=True))

    def images_of(self, dataset_version_id: int, ids: list[str]) -> dict[str, str]:
        """Original image digests of some sample ids."""
        if not ids:
            return {}
        with self.source(dataset_version_id) as src, self.cursor() as cur:
            rows = cur.execute(
                f"SELECT id, image FROM {src.table} WHERE list_contains(?::VARCHAR[], id)",
                [ids],
            ).fetchall()
        return dict(rows)

    def sample_across_versions(
        self, versions: list[VersionRecord], sample_id: str
    ) -> list[dict[str, Any]]:
        """The sample in every version of its dataset: present?, image digest, label."""
        out = []
        previous: dict[str, Any] | None = None
        with self.cursor() as cur:
            for version in versions:
                info = self.info(version.id)
                if not info.parquet:
                    continue
                row = cur.execute(
                    f"SELECT image, label FROM read_parquet({sql_list(info.parquet)}) "
                    "WHERE id = ? LIMIT 1",
                    [sample_id],
                ).fetchone()
                entry: dict[str, Any] = {
                    "version": version,
                    "present": row is not None,
                    "image": row[0] if row else None,
                    "label": row[1] if row else None,
                    "classes": info.classes,
                }
                if previous is None:
                    entry["change"] = "added" if row is not None else None
                elif previous["present"] and row is None:
                    entry["change"] = "removed"
                elif not previous["present"] and row is not None:
                    entry["change"] = "added"
                elif row is not None and (
                    previous["image"] != entry["image"] or previous["label"] != entry["label"]
                ):
                    parts = []
                    if previous["image"] != entry["image"]:
                        parts.append("image changed")
                    if previous["label"] != entry["label"]:
                        parts.append("label changed")
                    entry["change"] = ", ".join(parts)
                else:
                    entry["change"] = None
                previous = entry
                out.append(entry)
        return out

    # -- what changed since the previous version ---------------------------------------------

    def diff(self, old_id: int, new_id: int) -> dict[str, Any]:
        """Added, removed and changed items between two versions (cached): by sample id for
        datasets and predictions, by path for everything else. Materialised as a small
        DuckDB table of the differences only."""
        key = (old_id, new_id)
        found = self._diffs.get(key)
        if found is not None:
            return found
        with self._build_locks(("diff", key)):
            found = self._diffs.get(key)
            if found is not None:
                return found
            old, new = self.info(old_id), self.info(new_id)
            name = f"d_{old_id}_{new_id}_{uuid.uuid4().hex[:8]}"
            by = "path"
            with self.cursor() as cur:
                if new.record.type == "dataset" and old.parquet and new.parquet:
                    by = "id"
                    cur.execute(
                        f"CREATE TABLE {name} AS SELECT CASE WHEN a.id IS NULL THEN 'added' "
                        "WHEN b.id IS NULL THEN 'removed' ELSE 'changed' END AS change, "
                        "coalesce(b.id, a.id) AS key, a.image AS old_digest, b.image AS new_digest, "
                        "CAST(a.label AS VARCHAR) AS old_value, CAST(b.label AS VARCHAR) AS new_value "
                        f"FROM (SELECT id, image, label FROM read_parquet({sql_list(old.parquet)})) AS a "
                        f"FULL OUTER JOIN (SELECT id, image, label FROM read_parquet({sql_list(new.parquet)})) AS b "
                        "ON a.id = b.id WHERE a.id IS NULL OR b.id IS NULL OR a.image <> b.image "
                        "OR a.label IS DISTINCT FROM b.label ORDER BY key"
                    )
                elif new.record.type == "predictions" and old.parquet and new.parquet:
                    by = "id"
                    old_names = parquet_columns(cur, old.parquet[0])
                    new_names = parquet_columns(cur, new.parquet[0])
                    old_pred = "pred" if "pred" in old_names else "NULL"
                    new_pred = "pred" if "pred" in new_names else "NULL"
                    cur.execute(
                        f"CREATE TABLE {name} AS SELECT CASE WHEN a.id IS NULL THEN 'added' "
                        "WHEN b.id IS NULL THEN 'removed' ELSE 'changed' END AS change, "
                        "coalesce(b.id, a.id) AS key, NULL::VARCHAR AS old_digest, "
                        "NULL::VARCHAR AS new_digest, CAST(a.pred AS VARCHAR) AS old_value, "
                        "CAST(b.pred AS VARCHAR) AS new_value "
                        f"FROM (SELECT id, {old_pred} AS pred FROM read_parquet({sql_list(old.parquet)})) AS a "
                        f"FULL OUTER JOIN (SELECT id, {new_pred} AS pred FROM read_parquet({sql_list(new.parquet)})) AS b "
                        "ON a.id = b.id WHERE a.id IS NULL OR b.id IS NULL "
                        "OR a.pred IS DISTINCT FROM b.pred ORDER BY key"
                    )
                else:
                    va, vb = f"fa_{name}", f"fb_{name}"
                    cur.register(va, old.files)
                    cur.register(vb, new.files)
                    try:
                        cur.execute(
                            f"CREATE TABLE {name} AS SELECT CASE WHEN a.path IS NULL THEN 'added' "
                            "WHEN b.path IS NULL THEN 'removed' ELSE 'changed' END AS change, "
                            "coalesce(b.path, a.path) AS key, "
                            "CASE WHEN a.kind = 'image' THEN a.digest END AS old_digest, "
                            "CASE WHEN b.kind = 'image' THEN b.digest END AS new_digest, "
                            "CAST(a.size AS VARCHAR) AS old_value, CAST(b.size AS VARCHAR) AS new_value "
                            f"FROM {va} AS a FULL OUTER JOIN {vb} AS b ON a.path = b.path "
                            "WHERE a.path IS NULL OR b.path IS NULL OR a.digest <> b.digest "
                            "ORDER BY key"
                        )
                    finally:
                        cur.unregister(va)
                        cur.unregister(vb)
                counts = dict(
                    cur.execute(f"SELECT change, count(*) FROM {name} GROUP BY change").fetchall()
                )
            found = {
                "table": name,
                "by": by,
                "counts": {k: int(counts.get(k, 0)) for k in ("added", "removed", "changed")},
                "old": old.record,
                "new": new.record,
                "classes": new.classes or old.classes,
            }
            for evicted in self._diffs.put(key, found):
                with self.cursor() as cur:
                    cur.execute(f"DROP TABLE IF EXISTS {evicted['table']}")
            return found

    def diff_page(self, diff: dict[str, Any], change: str, page: int, size: int) -> list[dict]:
        with self.cursor() as cur:
            result = cur.execute(
                f"SELECT * FROM {diff['table']} WHERE change = ? ORDER BY key LIMIT ? OFFSET ?",
                [change, size, (page - 1) * size],
            )
            names = [d[0] for d in result.description]
            return [dict(zip(names, row, strict=True)) for row in result.fetchall()]

    def files_page(self, info: VersionInfo, page: int, size: int) -> list[dict[str, Any]]:
        """One page of a version's files, in path order (the manifest's order): a slice."""
        return info.files.slice((page - 1) * size, size).to_pylist()

    # -- comparisons -------------------------------------------------------------------------

    def newest_version_id(self) -> int:
        """The highest version id: it changes whenever anything is logged, so it makes a
        freshness key for lists derived from the catalog."""
        with self.backend.catalog.read() as conn:
            return int(conn.execute(sa.select(sa.func.max(t.versions.c.id))).scalar() or 0)

    def prediction_tables(
        self, dataset_version_id: int, readable: Callable[[str], bool]
    ) -> list[tuple[RunRecord, VersionRecord, TableRow]]:
        """The newest predictions table of every run (readable by the viewer) on a dataset
        version, oldest run first: the runs a comparison can take."""
        key = (dataset_version_id, self.newest_version_id())
        found = self._prediction_tables.get(key)
        if found is None:
            found = self.backend.table_versions(
                kind="predictions", name="predictions", dataset_version_ids=[dataset_version_id]
            )
            self._prediction_tables.put(key, found)
        latest: dict[str, tuple[RunRecord, VersionRecord, TableRow]] = {}
        for run, version, row in found:
            if run is None or not readable(run.project) or not readable(version.project):
                continue
            latest[run.id] = (run, version, row)
        return sorted(latest.values(), key=lambda item: (item[0].started_at, item[0].id))

    def comparison(
        self, dataset: VersionRecord, tables: list[tuple[RunRecord, VersionRecord, TableRow]]
    ) -> CompareEntry:
        """The Comparison of these runs' predictions on one dataset version, built once (in
        DuckDB) and kept in an LRU keyed by the dataset digest and the runs' table versions."""
        key = (dataset.digest, tuple((run.id, version.id) for run, version, _ in tables))
        found = self._comparisons.get(key)
        if found is not None:
            return found
        with self._build_locks(("compare", key)):
            found = self._comparisons.get(key)
            if found is not None:
                return found
            started = time.perf_counter()
            comparison = Comparison(
                self.backend,
                f"{dataset.artifact}:v{dataset.number}",
                [run.id for run, _, _ in tables],
                "predictions",
                dataset.project,
            )
            entry = CompareEntry(key, comparison, built_seconds=time.perf_counter() - started)
            for evicted in self._comparisons.put(key, entry):
                with evicted.lock:
                    evicted.comparison.close()
            return entry

    def compare_summary(self, entry: CompareEntry, base: int) -> dict[str, Any]:
        """Metrics, McNemar against ``base``, per-class stats and confusion matrices: computed
        once per (comparison, base run) and kept with the comparison."""
        with entry.lock:
            found = entry.summaries.get(base)
            if found is not None:
                return found
            c = entry.comparison
            metrics = c.metrics()
            per_class = c.per_class()
            confusions = [c.confusion(c.runs[0].index)]  # then the others from the same counts
            counts = c._confusions()
            for run in c.runs[1:]:
                frame = confusions[0].copy()
                frame.iloc[:, :] = counts[run.index]
                confusions.append(frame)
            tests = {}
            for run in c.runs:
                if run.index != base:
                    tests[run.index] = c.mcnemar(base, run.index)
            summary = {
                "metrics": metrics,
                "per_class": per_class,
                "confusions": confusions,
                "mcnemar": tests,
            }
            entry.summaries[base] = summary
            return summary

    def compare_page(
        self, entry: CompareEntry, view: str, base: int, new: int, page: int, size: int
    ) -> tuple[int, int, list[str]]:
        """One page of a quick filter's samples: (how many in all, the page number, clamped to
        the last page, and the page's ids).

        ``all`` pages in SQL; ``disagreements`` keeps its sample numbers (an int32 array) with
        the comparison; the others keep the ids that the Comparison method returns
        (regressions, improvements, hard samples, suspect labels), so the grid shows exactly
        what the API answers."""
        c = entry.comparison

        def clamp(total: int) -> tuple[int, int]:
            last = max(1, -(-total // size))
            chosen = min(max(1, page), last)
            return chosen, (chosen - 1) * size

        if view == "all":
            page, offset = clamp(c.n_common)
            with entry.lock:
                rows = c._con.execute(  # the comparison's tables: p (predictions), labels
                    "SELECT l.id FROM p JOIN labels AS l USING (sid) WHERE p.run = ? "
                    "ORDER BY p.sid LIMIT ? OFFSET ?",
                    [base, size, offset],
                ).fetchall()
            return c.n_common, page, [r[0] for r in rows]
        if view == "disagreements":
            sids = entry.lists.get(("disagreements",))
            if sids is None:
                with entry.lock:
                    sids = c._con.execute(
                        "SELECT sid FROM p GROUP BY sid HAVING count(DISTINCT pred) > 1 "
                        "ORDER BY sid"
                    ).fetchnumpy()["sid"]
                entry.lists.put(("disagreements",), sids)
            page, offset = clamp(len(sids))
            chosen = [int(x) for x in sids[offset : offset + size]]
            with entry.lock:
                rows = c._con.execute(
                    "SELECT id FROM labels WHERE list_contains(?::INTEGER[], sid) ORDER BY sid",
                    [chosen],
                ).fetchall()
            return len(sids), page, [r[0] for r in rows]
        key = (view, base, new)
        ids = entry.lists.get(key)
        if ids is None:
            with entry.lock:
                if view == "regressions":
                    ids = c.regressions(base, new)["id"].tolist()
                elif view == "improvements":
                    ids = c.improvements(base, new)["id"].tolist()
                elif view == "hard":
                    ids = c.hard_samples(k=1000)["id"].tolist()
                elif view == "suspect":
                    ids = c.suspect_labels(k=1000)["id"].tolist()
                else:
                    raise ViewError(f"unknown view {view!r}")
            entry.lists.put(key, ids)
        page, offset = clamp(len(ids))
        return len(ids), page, ids[offset : offset + size]

    def cell_ids(self, entry: CompareEntry, run: int, true: int, pred: int) -> list[str]:
        """Exactly the samples of one confusion cell: ``Comparison.samples(run, true, pred)``."""
        key = ("cell", run, true, pred)
        found = entry.lists.get(key)
        if found is not None:
            return found
        with entry.lock:
            ids = entry.comparison.samples(run, true, pred)["id"].tolist()
        entry.lists.put(key, ids)
        return ids

    def compare_rows(self, entry: CompareEntry, ids: list[str]) -> list[dict[str, Any]]:
        """Every run's prediction on some samples (one page), in the order of ``ids``:
        ``{"id", "label", "preds": {run index: (pred, correct)}}``, label and pred as class
        indices. Two indexed-free but narrow scans of the comparison's tables (a page is a
        few dozen samples; ``Comparison.table(where)`` joins before it filters, about 10x
        slower on a million predictions)."""
        if not ids:
            return []
        with entry.lock:
            con = entry.comparison._con
            labels = con.execute(
                "SELECT sid, id, label FROM labels WHERE list_contains(?::VARCHAR[], id)", [ids]
            ).fetchall()
            sids = [row[0] for row in labels]
            preds = con.execute(
                "SELECT sid, run, pred, correct FROM p WHERE list_contains(?::INTEGER[], sid)",
                [sids],
            ).fetchall()
        by_sid: dict[int, dict[int, tuple[Any, Any]]] = {}
        for sid, run, pred, correct in preds:
            by_sid.setdefault(sid, {})[run] = (pred, correct)
        rows = {
            sample_id: {"id": sample_id, "label": label, "preds": by_sid.get(sid, {})}
            for sid, sample_id, label in labels
        }
        return [rows[i] for i in ids if i in rows]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


__all__ = ["BOOL", "CLASS", "NUMBER", "TEXT", "Page", "TableSource", "UIData", "ViewError"]
