"""Predictions: model outputs bound to a dataset version by sample id, and nothing else.

``PredictionWriter`` is the one code path: ``run.log_predictions`` adds everything in one call,
``run.predictions(...)`` streams batch by batch. Every batch is validated before it is accepted
(ids known and unique, lengths, classes, finite scores); rows are buffered into Parquet row groups
of a fixed size, so memory stays bounded and identical predictions give identical bytes; nothing
reaches the store until the writer closes cleanly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tessera.api.dataset import DatasetVersion, sample_id
from tessera.api.table import IMAGE_TYPE, TableError
from tessera.backend.base import Source
from tessera.media import canonical_pixels
from tessera.names import check_name
from tessera.store.hashing import hash_bytes
from tessera.store.manifest import Manifest

if TYPE_CHECKING:
    from tessera.api.run import Run
    from tessera.api.table import TableVersion

PREDICTIONS_FILE = "predictions.parquet"
ROW_GROUP_ROWS = 65_536
RESERVED = ("id",)


class PredictionError(TableError):
    """Predictions that do not fit their dataset version."""


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:
        raise PredictionError(f"column {name!r} cannot be read as an array ({e})") from None


def _ids(values: Any) -> list[str]:
    array = _to_numpy(values, "ids")
    if array.ndim != 1:
        raise PredictionError(f"ids must be one-dimensional, got shape {array.shape}")
    if array.dtype.kind in "iu":
        return array.astype(str).tolist()
    if array.dtype.kind == "U":
        out = array.tolist()
        if any(not s for s in out):
            raise PredictionError("ids contain an empty string")
        return out
    return [sample_id(v) for v in array.tolist()]


def _encodings(schema: pa.Schema) -> dict[str, Any]:
    """Dictionaries only where they pay (integer columns such as class indices); float scores
    split by byte stream, which zstd compresses far better than dictionaries of unique floats
    (measured: the 100,000-row round shrank from 1.12x to 0.77x the plain-Parquet floor)."""
    dictionary = [f.name for f in schema if pa.types.is_integer(f.type)]
    encoding: dict[str, str] = {}
    for f in schema:
        if f.name in dictionary:
            continue
        if pa.types.is_floating(f.type):
            encoding[f.name] = "BYTE_STREAM_SPLIT"
        elif pa.types.is_fixed_size_list(f.type) and pa.types.is_floating(f.type.value_type):
            encoding[f"{f.name}.list.element"] = "BYTE_STREAM_SPLIT"
        elif pa.types.is_string(f.type):
            encoding[f.name] = "PLAIN"
    return {"use_dictionary": dictionary, "column_encoding": encoding}


class PredictionWriter:
    """Validates and buffers prediction batches; ``close()`` stores them as one table version."""

    def __init__(self, run: Run, dataset: DatasetVersion, name: str = "predictions"):
        if not isinstance(dataset, DatasetVersion):
            raise TypeError(
                "predictions are logged against a DatasetVersion (from run.use_dataset or "
                f"run.log_dataset), got {type(dataset).__name__}"
            )
        self._run = run
        self._dataset = dataset
        self.name = check_name(name, "table")
        self._classes = dataset.classes
        self._seen = np.zeros(len(dataset._id_index), dtype=bool)
        self._schema: pa.Schema | None = None
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._sink = pa.BufferOutputStream()
        self._writer: pq.ParquetWriter | None = None
        self._media: dict[str, Source] = {}
        self._media_columns: set[str] = set()
        self.num_rows = 0
        self._closed = False
        self.result: TableVersion | None = None  # the stored version, once closed

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- adding ------------------------------------------------------------------------------

    def add(self, ids: Any, **columns: Any) -> None:
        """Add predictions for ``ids``: e.g. ``pred`` (class indices or names), ``scores``
        (N x classes), ``loss``, or any per-sample column (N, N x K, or N x H x W media)."""
        if self._closed:
            raise PredictionError("this predictions writer is closed")
        sample_ids = _ids(ids)
        n = len(sample_ids)
        if n == 0:
            return
        if not columns:
            raise PredictionError("no prediction columns given; pass e.g. pred=..., scores=...")
        rows = self._check_ids(sample_ids)
        self._batch_media: dict[str, Source] = {}  # kept only if the whole batch is accepted
        self._batch_media_columns: set[str] = set()
        arrays: dict[str, pa.Array] = {"id": pa.array(sample_ids, pa.string())}
        for key, value in columns.items():
            if key in RESERVED:
                raise PredictionError(f"column name {key!r} is reserved for the sample ids")
            arrays[key] = self._column(key, _to_numpy(value, key), n)
        batch = pa.record_batch(list(arrays.values()), names=list(arrays))
        if self._schema is None:
            self._schema = batch.schema
        elif batch.schema != self._schema:
            try:
                batch = batch.cast(self._schema)
            except (pa.ArrowInvalid, ValueError, TypeError, pa.ArrowNotImplementedError):
                raise PredictionError(
                    f"this batch's columns {batch.schema.names} / types do not match the first "
                    f"batch's {self._schema.names}; every batch needs the same columns"
                ) from None
        self._seen[rows] = True  # accepted only now, after every check passed
        self._media.update(self._batch_media)
        self._media_columns |= self._batch_media_columns
        self._pending.append(batch)
        self._pending_rows += n
        self.num_rows += n
        while self._pending_rows >= ROW_GROUP_ROWS:
            self._flush(ROW_GROUP_ROWS)

    def _check_ids(self, sample_ids: list[str]) -> np.ndarray:
        array = self._dataset.rows_of(sample_ids).astype(np.int64, copy=False)
        unknown = np.flatnonzero(array < 0)
        if unknown.size:
            first = ", ".join(repr(sample_ids[i]) for i in unknown[:5])
            raise PredictionError(
                f"{unknown.size} ids are not in {self._dataset.spec} (first: {first}); predictions "
                "must be made on samples of the dataset version they are logged against"
            )
        order = np.sort(array)
        repeated = order[1:][order[1:] == order[:-1]]
        if repeated.size:
            found = np.flatnonzero(np.isin(array, repeated))
            dupes = list(dict.fromkeys(sample_ids[i] for i in found))[:5]
            raise PredictionError(f"duplicate ids in this batch: {', '.join(map(repr, dupes))}")
        again = np.flatnonzero(self._seen[array])
        if again.size:
            first = ", ".join(repr(sample_ids[i]) for i in again[:5])
            raise PredictionError(
                f"{again.size} ids already have predictions here (first: {first})"
            )
        return array

    def _column(self, key: str, value: np.ndarray, n: int) -> pa.Array:
        if value.ndim == 0 or len(value) != n:
            raise PredictionError(
                f"column {key!r} has {0 if value.ndim == 0 else len(value)} rows for {n} ids"
            )
        if key == "pred":
            return self._pred(value)
        if key == "scores":
            return self._scores(value)
        if value.ndim == 1:
            if value.dtype.kind == "O":
                return pa.array(value.tolist())
            return pa.array(value)
        if value.ndim == 2:
            flat = pa.array(np.ascontiguousarray(value).reshape(-1))
            return pa.FixedSizeListArray.from_arrays(flat, value.shape[1])
        return self._media_column(key, value)

    def _pred(self, value: np.ndarray) -> pa.Array:
        classes = self._classes
        if value.ndim != 1:
            raise PredictionError(f"pred must be one class per sample, got shape {value.shape}")
        if value.dtype.kind in "UO":
            if not classes:
                raise PredictionError(
                    f"{self._dataset.spec} has no class names; give pred as class indices"
                )
            index = {c: i for i, c in enumerate(classes)}
            names = value.tolist()
            unknown = sorted({str(v) for v in names if v not in index})
            if unknown:
                raise PredictionError(
                    f"unknown class names in pred: {', '.join(map(repr, unknown[:5]))}; the "
                    f"classes are {classes}"
                )
            return pa.array([index[v] for v in names], pa.int32())
        if value.dtype.kind not in "iu":
            raise PredictionError(f"pred must be class indices or names, got dtype {value.dtype}")
        if classes and value.size and (value.min() < 0 or value.max() >= len(classes)):
            raise PredictionError(
                f"pred has class indices outside 0..{len(classes) - 1} "
                f"(min {value.min()}, max {value.max()})"
            )
        return pa.array(value.astype(np.int32))

    def _scores(self, value: np.ndarray) -> pa.Array:
        if value.ndim != 2:
            raise PredictionError(f"scores must be N x classes, got shape {value.shape}")
        if self._classes and value.shape[1] != len(self._classes):
            raise PredictionError(
                f"scores have {value.shape[1]} columns but {self._dataset.spec} has "
                f"{len(self._classes)} classes"
            )
        if value.dtype.kind not in "fiu":
            raise PredictionError(f"scores must be numbers, got dtype {value.dtype}")
        scores = value.astype(np.float32, copy=False)
        bad = ~np.isfinite(scores)
        if bad.any():
            row = int(np.flatnonzero(bad.any(axis=1))[0])
            raise PredictionError(
                f"scores contain NaN or infinity (first in row {row} of this batch)"
            )
        flat = pa.array(np.ascontiguousarray(scores).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, scores.shape[1])

    def _media_column(self, key: str, value: np.ndarray) -> pa.Array:
        """Masks and heat maps: each row an image blob, identical ones stored once."""
        self._batch_media_columns.add(key)
        cells = []
        for item in value:
            pixels = canonical_pixels(item, chw=False)
            png = pixels.encode_png()
            digest = hash_bytes(png)
            path = f"media/{digest}.png"
            if path not in self._media and path not in self._batch_media:
                self._batch_media[path] = Source(path=path, data=png, media=pixels.media())
            cells.append({"digest": digest, "dataset": None, "id": None, "caption": None})
        return pa.array(cells, IMAGE_TYPE)

    def _flush(self, rows: int | None = None) -> None:
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending, schema=self._schema)
        take = table.num_rows if rows is None else rows
        head, rest = table.slice(0, take), table.slice(take)
        if self._writer is None:
            assert self._schema is not None
            self._writer = pq.ParquetWriter(
                self._sink,
                self._schema,
                compression="zstd",
                compression_level=3,
                store_schema=False,
                **_encodings(self._schema),
            )
        self._writer.write_table(head, row_group_size=ROW_GROUP_ROWS)
        self._pending = rest.to_batches()
        self._pending_rows = rest.num_rows

    # -- ending ------------------------------------------------------------------------------

    def abort(self) -> None:
        """Drop everything added; nothing is stored."""
        self._closed = True
        self._pending = []
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> TableVersion:
        """Store the predictions as a new table version (or return the identical one)."""
        from tessera.api.table import TableVersion

        if self._closed:
            raise PredictionError("this predictions writer is already closed")
        if self.num_rows == 0:
            self.abort()
            raise PredictionError("no predictions were added; nothing was logged")
        self._flush()
        assert self._writer is not None
        self._writer.close()
        self._closed = True
        data = self._sink.getvalue().to_pybytes()
        run = self._run
        backend = run._backend
        project = run.project
        media = list(self._media.values())
        media_entries = backend.upload(project, media) if media else []
        (entry,) = backend.upload(project, [Source(path=PREDICTIONS_FILE, data=data)])
        dataset = self._dataset
        metadata = {
            "kind": "predictions",
            "name": self.name,
            "num_rows": self.num_rows,
            "table": PREDICTIONS_FILE,
            "dataset": dataset.spec,
            "dataset_digest": dataset.digest,
            "classes": dataset.classes,
            "image_columns": sorted(self._media_columns),
        }
        manifest = Manifest.build([*media_entries, entry], metadata)
        digest = backend.put_manifest(project, manifest)
        record, _created = backend.commit_version(
            project=run.project,
            name=self.name,
            type="predictions",
            description=f"predictions on {dataset.spec}",
            manifest=manifest,
            digest=digest,
            run_id=run.id,
        )
        backend.record_use(run.id, dataset._record.id)
        self.result = TableVersion(backend, record, manifest, run=run)
        return self.result
