"""Datasets: a versioned set of labelled images with one row per sample and a stable sample id.

``Dataset`` gathers samples; ``run.log_dataset`` stores every image once (files keep their
original bytes, in-memory images are encoded once as lossless PNG) plus a Parquet sample table;
``DatasetVersion`` reads it back lazily: a column, one image, or decoded batches.
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image as PILImage

from tessera.api.artifact import ArtifactVersion, files_below
from tessera.backend.base import Backend, Source
from tessera.errors import InvalidNameError, NotFoundError, TesseraError
from tessera.gcpause import gc_paused
from tessera.media import (
    Pixels,
    canonical_pixels,
    file_extension,
    is_path_like,
    open_image,
    probe_file_bytes,
)
from tessera.names import check_artifact_path, check_name
from tessera.parallel import map_chunked
from tessera.probing import KeptBytes, Probed, probe_files
from tessera.store.hashing import hash_bytes
from tessera.store.manifest import Manifest

if TYPE_CHECKING:
    import pandas as pd

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SAMPLES_FILE = "samples.parquet"
# Columns every sample table has; user columns may not take these names.
RESERVED_COLUMNS = ("id", "image", "path", "width", "height", "pixels", "label")
_DECODE_WORKERS = min(8, 2 * (os.cpu_count() or 1))
# Image files below this mean size (thumbnails such as 28x28 PNGs) are not probed in threads:
# their decode is too short to release the GIL for long, and four threads took 1.7x as long as
# one, handing it back and forth; probing.py uses a second process instead. Larger files (a
# 64x64 JPEG already) gain from threads.
_SERIAL_PROBE_BELOW = 1024
# The bytes of small image files decoded by log_dataset are kept for the upload, up to this much
# in all (probing.KeptBytes): storing them saves reading each file again (a tenth of a bucket
# ingest's client CPU for thumbnails) and stores exactly what was decoded. Beyond it, files are
# read again.
_KEPT_BYTES = 256 * 1024 * 1024


class DatasetError(TesseraError, ValueError):
    """A sample, label or column that cannot go into a dataset."""


def sample_id(value: object) -> str:
    """Sample ids are non-empty strings; integers are accepted and written as decimal text."""
    if isinstance(value, bool) or value is None:
        raise DatasetError(f"sample id must be a non-empty string or an integer, got {value!r}")
    if isinstance(value, np.integer | int):
        return str(int(value))
    if isinstance(value, str | np.str_):
        if not value:
            raise DatasetError("sample id is empty; every sample needs a non-empty id")
        if len(value) > 512:
            raise DatasetError(f"sample id {value[:40]!r}… is longer than 512 characters")
        return str(value)
    raise DatasetError(
        f"sample id must be a non-empty string or an integer, got {type(value).__name__}"
    )


@dataclass
class _Sample:
    id: str
    image: Path | Pixels
    label: int | str | None
    columns: dict[str, Any]


class Dataset:
    """Labelled images gathered before ``run.log_dataset``. Ids must be unique and non-empty."""

    def __init__(
        self,
        name: str,
        classes: Sequence[str] | None = None,
        description: str | None = None,
    ):
        self.name = check_name(name, "dataset")
        if classes is not None:
            classes = [str(c) for c in classes]
            if len(set(classes)) != len(classes) or not classes:
                raise DatasetError("classes must be a non-empty list of distinct names")
        self.classes: list[str] | None = list(classes) if classes is not None else None
        self.description = description
        self._samples: list[_Sample] = []
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._samples)

    def __repr__(self) -> str:
        return f"<Dataset {self.name!r} samples={len(self)} classes={self.classes}>"

    def add(self, id: object, image: Any, label: Any = None, **columns: Any) -> None:
        """Add one sample. ``image``: a path, a PIL image, a numpy array (HW, HWC; uint8 or
        float in [0, 1]) or a torch tensor (CHW). ``label``: a class name or class index."""
        sid = sample_id(id)
        if sid in self._ids:
            raise DatasetError(f"duplicate sample id {sid!r}; ids must be unique in a dataset")
        if is_path_like(image):
            path = Path(image).absolute()
            if not path.is_file():
                raise NotFoundError(f"no image file at {image} (sample {sid!r})")
            source: Path | Pixels = path
        else:
            source = canonical_pixels(image)
        for key, value in columns.items():
            if key in RESERVED_COLUMNS:
                raise DatasetError(f"column name {key!r} is reserved; pick another name")
            if not key.isidentifier():
                raise DatasetError(f"column name {key!r} must be a Python identifier")
            if not (value is None or isinstance(value, str | bool | int | float | np.generic)):
                raise DatasetError(
                    f"column {key!r} of sample {sid!r} is a {type(value).__name__}; dataset "
                    "columns hold numbers, strings or booleans"
                )
        self._append(sid, source, label, columns)

    def _append(self, sid: str, source: Path | Pixels, label: Any, columns: dict[str, Any]) -> None:
        if sid in self._ids:
            raise DatasetError(f"duplicate sample id {sid!r}; ids must be unique in a dataset")
        self._samples.append(_Sample(sid, source, self._label(label, sid), dict(columns)))
        self._ids.add(sid)

    def _label(self, label: Any, sid: str) -> int | str | None:
        if label is None:
            return None
        if isinstance(label, np.generic):
            label = label.item()
        if isinstance(label, bool) or not isinstance(label, int | str):
            raise DatasetError(
                f"label of sample {sid!r} must be a class name or index, got {label!r}"
            )
        if self.classes is not None:
            if isinstance(label, int) and not 0 <= label < len(self.classes):
                raise DatasetError(
                    f"label {label} of sample {sid!r} is out of range for {len(self.classes)} classes"
                )
            if isinstance(label, str) and label not in self.classes:
                raise DatasetError(
                    f"label {label!r} of sample {sid!r} is not one of the classes {self.classes}"
                )
        return label

    @classmethod
    def from_folder(
        cls,
        root: str | os.PathLike[str],
        labels: str | os.PathLike[str] | None = None,
        id: str = "stem",
        name: str | None = None,
        classes: Sequence[str] | None = None,
        description: str | None = None,
    ) -> Dataset:
        """A dataset of every image below ``root``.

        Labels come from ``labels``, a CSV with a header naming an id column (``id``,
        ``filename``, ``file`` or ``path``) and a ``label`` column (other columns become sample
        columns); or, without it, from the class-per-subfolder layout ``root/<class>/<image>``.
        ``id="stem"`` makes the file name without extension the sample id; ``id="path"`` the
        path relative to ``root``.
        """
        with gc_paused():
            return cls._from_folder(root, labels, id, name, classes, description)

    @classmethod
    def _from_folder(
        cls,
        root: str | os.PathLike[str],
        labels: str | os.PathLike[str] | None,
        id: str,
        name: str | None,
        classes: Sequence[str] | None,
        description: str | None,
    ) -> Dataset:
        root = Path(root).absolute()
        if not root.is_dir():
            raise NotFoundError(f"{root} is not a folder of images")
        if id not in ("stem", "path"):
            raise DatasetError(f'id must be "stem" or "path", got {id!r}')
        files = _image_files(root)
        if not files:
            raise NotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) below {root}")
        ids: dict[str, str] = {}  # sample id -> path relative to root
        for rel in files:
            key = os.path.splitext(rel.rpartition("/")[2])[0] if id == "stem" else rel
            if key in ids:
                raise DatasetError(
                    f"two images have the id {key!r}: {root / ids[key]} and {root / rel}; "
                    'use id="path" to make ids from relative paths'
                )
            ids[key] = rel
        ds_name = name or root.name
        try:
            dataset = cls(ds_name, classes=classes, description=description)
        except InvalidNameError:
            raise InvalidNameError(
                f"the folder name {ds_name!r} is not a valid dataset name; pass name=..."
            ) from None
        if labels is not None:
            table = _read_label_csv(Path(labels), root)
            if dataset.classes is None:
                dataset.classes = sorted({row["label"] for row in table.values() if row["label"]})
            missing = [k for k in ids if k not in table and f"{k}" not in table]
            if missing:
                raise DatasetError(
                    f"{len(missing)} images have no row in {labels} (e.g. {', '.join(missing[:5])})"
                )
            for key, rel in ids.items():
                row = dict(table[key])
                label = row.pop("label") or None
                dataset.add(key, root / rel, label, **row)
            return dataset
        depths = {rel.count("/") for rel in files}
        by_folder = depths == {1}  # the class-per-subfolder layout: root/<class>/<image>
        if by_folder and dataset.classes is None:
            dataset.classes = sorted({rel.partition("/")[0] for rel in files})
        prefix = f"{root}/"
        for key, rel in ids.items():
            # The walk found these files: no need for add()'s checks that the path is a file.
            label = rel.partition("/")[0] if by_folder else None
            dataset._append(sample_id(key), Path(prefix + rel), label, {})
        return dataset


def _image_files(root: Path) -> list[str]:
    """Paths (relative, with ``/``) of the image files below ``root``, in ``Path`` order.

    The artifact walk (``os.scandir``, no stat per file), not ``Path.rglob``: a million-image
    folder spent seconds in pathlib. Sorted by components, as ``sorted(Path...)`` does, so
    sample order is unchanged.
    """
    found = [
        rel
        for rel, _path in files_below(str(root))
        if os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS
    ]
    found.sort(key=lambda rel: rel.split("/"))
    return found


def _read_label_csv(path: Path, root: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        raise NotFoundError(f"no labels file at {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        id_column = next((c for c in ("id", "filename", "file", "path") if c in header), None)
        if id_column is None or "label" not in header:
            raise DatasetError(
                f"{path} needs a header with an id column (id, filename, file or path) and a "
                f"label column; it has {header}"
            )
        out: dict[str, dict[str, Any]] = {}
        for row in reader:
            key = row.pop(id_column)
            if id_column != "id":  # file names: match by stem and by relative path
                out[Path(key).stem] = row
            out[key] = row
        return out


# -- logging -------------------------------------------------------------------------------------


def store_dataset(backend: Backend, project: str, ds: Dataset) -> Manifest:
    """Upload every image and the sample table; return the manifest to commit."""
    if not len(ds):
        raise DatasetError(f"dataset {ds.name!r} has no samples; add some with ds.add(...)")
    classes = ds.classes
    labels = [s.label for s in ds._samples]
    if classes is None and any(isinstance(label, str) for label in labels):
        if not all(isinstance(label, str | None) for label in labels):
            raise DatasetError("labels mix class names and indices; use one or the other")
        classes = sorted({label for label in labels if isinstance(label, str)})
    label_index = {c: i for i, c in enumerate(classes or [])}
    label_values = [label_index[label] if isinstance(label, str) else label for label in labels]

    kept = KeptBytes(_KEPT_BYTES)
    probed: dict[int, Probed] = {}
    if _tiny_files(ds._samples):  # probed in this thread and a helper interpreter (probing.py)
        files = [i for i, s in enumerate(ds._samples) if isinstance(s.image, Path)]
        results = probe_files([cast(Path, ds._samples[i].image) for i in files], kept)
        probed = dict(zip(files, results, strict=True))

    def prepare(index: int) -> tuple[Source, str, str | None]:
        """The sample's source, pixel digest, and the digest its file had when decoded."""
        sample = ds._samples[index]
        if isinstance(sample.image, Path):
            if index in probed:
                info, data = probed[index]
            else:
                info, data = probe_file_bytes(sample.image)
                data = kept.keep(data)
            # The bytes decoded, when kept, are the ones stored; else the file is read again.
            source = Source(
                path=_image_path(sample.id, file_extension(info.format)),
                local=sample.image if data is None else None,
                data=data,
                media=info.media(),
            )
            return source, info.pixels, info.file_digest
        png = sample.image.encode_png()
        return (
            Source(path=_image_path(sample.id, ".png"), data=png, media=sample.image.media()),
            sample.image.digest(),
            None,  # bytes in memory: what is stored is what was encoded
        )

    if len(probed) == len(ds._samples):  # nothing left to decode: threads would pass the GIL
        prepared = [prepare(i) for i in range(len(ds._samples))]
    else:
        with ThreadPoolExecutor(_DECODE_WORKERS) as pool:
            prepared = map_chunked(pool, prepare, range(len(ds._samples)))
    sources = _unique_paths([p[0] for p in prepared])
    entries = backend.upload(project, sources)
    changed = [
        sample.image
        for sample, entry, (_s, _p, decoded) in zip(ds._samples, entries, prepared, strict=True)
        if decoded is not None and entry.digest != decoded
    ]
    if changed:
        raise DatasetError(
            f"{len(changed)} image files changed while the dataset was being logged (e.g. "
            f"{changed[0]}): the bytes stored for them are not those decoded a moment before; "
            "nothing was committed. Log the dataset again once its files are stable. (If they "
            "did not change, they were rewritten keeping their size and modification time, "
            "which the stat cache cannot see: delete the store's cache/stat.sqlite first.)"
        )

    columns: dict[str, list[Any]] = {
        "id": [],
        "image": [],
        "path": [],
        "width": [],
        "height": [],
        "pixels": [],
    }
    for sample, entry, (_source, pixels, _decoded) in zip(
        ds._samples, entries, prepared, strict=True
    ):
        media = entry.media or {}
        columns["id"].append(sample.id)
        columns["image"].append(entry.digest)
        columns["path"].append(entry.path)
        columns["width"].append(media.get("width"))
        columns["height"].append(media.get("height"))
        columns["pixels"].append(pixels)
    arrays: dict[str, pa.Array] = {
        "id": pa.array(columns["id"], pa.string()),
        "image": pa.array(columns["image"], pa.string()),
        "path": pa.array(columns["path"], pa.string()),
        "width": pa.array(columns["width"], pa.int32()),
        "height": pa.array(columns["height"], pa.int32()),
        "pixels": pa.array(columns["pixels"], pa.string()),
        "label": pa.array(label_values, pa.int32()),
    }
    extra_names = sorted({k for s in ds._samples for k in s.columns})
    for key in extra_names:
        values = [s.columns.get(key) for s in ds._samples]
        values = [v.item() if isinstance(v, np.generic) else v for v in values]
        try:
            arrays[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DatasetError(f"column {key!r} mixes types across samples ({e})") from None
    table = pa.table(arrays)
    table_bytes = write_parquet(table)
    (table_entry,) = backend.upload(project, [Source(path=SAMPLES_FILE, data=table_bytes)])
    metadata = {
        "kind": "dataset",
        "classes": classes,
        "num_samples": len(ds),
        "samples": SAMPLES_FILE,
    }
    return Manifest.build([*entries, table_entry], metadata)


def _tiny_files(samples: list[_Sample]) -> bool:
    """Whether ``samples`` are mostly image files too small for threads to probe well (see
    _SERIAL_PROBE_BELOW); in-memory images are left to threads (PNG encoding releases the GIL)."""
    files = [s.image for s in samples[:64] if isinstance(s.image, Path)]
    if len(files) < 32:
        return False
    sizes = []
    for path in files:
        with suppress(OSError):  # a vanished file is reported by the probe itself
            sizes.append(path.stat().st_size)
    return bool(sizes) and sum(sizes) / len(sizes) < _SERIAL_PROBE_BELOW


def _image_path(sid: str, ext: str) -> str:
    name = (
        sid
        if sid.lower().endswith(ext) or Path(sid).suffix.lower() in IMAGE_EXTENSIONS
        else sid + ext
    )
    candidate = f"images/{name}"
    try:
        return check_artifact_path(candidate)
    except TesseraError:
        return f"images/_/{hash_bytes(sid.encode())[:32]}{ext}"


def _unique_paths(sources: list[Source]) -> list[Source]:
    """Two ids can map to one path (``a`` and ``a.png``); give later ones an id-hash path."""
    seen: set[str] = set()
    out = []
    for source in sources:
        path = source.path
        if path in seen:
            ext = Path(path).suffix
            path = f"images/_/{hash_bytes(path.encode())[:32]}{ext}"
            source = Source(path=path, local=source.local, data=source.data, media=source.media)
        seen.add(path)
        out.append(source)
    return out


def write_parquet(table: pa.Table) -> bytes:
    """Parquet bytes with zstd, deterministic for identical tables."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", compression_level=3, store_schema=False)
    return sink.getvalue().to_pybytes()


# -- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlobReader:
    """Reads blobs by digest; small and picklable, so DataLoader workers can carry it."""

    root: Path

    def path(self, digest: str) -> Path:
        return self.root / "blobs" / digest[:2] / digest[2:4] / digest

    def decode(self, digest: str) -> np.ndarray:
        with PILImage.open(self.path(digest)) as image:
            return np.asarray(image)

    def open_image(self, digest: str) -> PILImage.Image:
        return open_image(self.path(digest))


class Batch:
    """One batch from ``DatasetVersion.batches``: ``.ids`` plus one array per column."""

    def __init__(self, ids: np.ndarray, columns: dict[str, Any]):
        self.ids = ids
        self.columns = columns
        for key, value in columns.items():
            setattr(self, key, value)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: str) -> Any:
        return self.ids if key == "id" else self.columns[key]

    def __repr__(self) -> str:
        return f"<Batch n={len(self)} columns={list(self.columns)}>"


class DatasetVersion(ArtifactVersion):
    """A logged dataset version: classes, the sample table, images by id, decoded batches."""

    def __repr__(self) -> str:
        return f"<DatasetVersion {self.spec} samples={self.num_samples}>"

    @property
    def classes(self) -> list[str] | None:
        return self.metadata.get("classes")

    @property
    def num_samples(self) -> int:
        return int(self.metadata.get("num_samples", 0))

    @cached_property
    def samples_digest(self) -> str:
        """The digest of the Parquet sample table."""
        return self.entry(self.metadata.get("samples", SAMPLES_FILE)).digest

    def _samples_source(self) -> Any:
        digest = self.samples_digest
        path = self._backend.blob_path(digest)
        if path is not None:
            return str(path)
        with self._backend.open_blob(digest) as f:
            return pa.BufferReader(f.read())

    def table(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The sample table (pyarrow), or only some of its columns."""
        return pq.read_table(self._samples_source(), columns=list(columns) if columns else None)

    def to_pandas(self) -> pd.DataFrame:
        frame = self.table().to_pandas()
        if self.classes:
            frame["label_name"] = [
                self.classes[i] if i is not None and i == i else None for i in frame["label"]
            ]
        return frame

    @cached_property
    def _id_table(self) -> pa.Table:
        return self.table(["id", "image", "label"])

    @cached_property
    def ids(self) -> list[str]:
        """The sample ids, in table order. The same string objects as the id index that
        ``rows_of`` (and a predictions writer) use: a million ids are held once, not twice."""
        return self._id_index.tolist()

    @cached_property
    def _id_index(self) -> pd.Index:
        """Sample ids to rows, hashed once: ``rows_of`` looks up a whole batch in one call
        (a dict of a million ids cost seconds to build and several hundred megabytes)."""
        import pandas as pd

        ids = self.table(["id"]).column("id").to_numpy(zero_copy_only=False)
        return pd.Index(ids, dtype=object, copy=False)

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """The rows of these sample ids in the sample table, -1 for ids it does not have."""
        return self._id_index.get_indexer(ids)

    def row(self, id: object) -> int:
        """The row of a sample id in the sample table."""
        sid = sample_id(id)
        (row,) = self.rows_of([sid])
        if row < 0:
            raise NotFoundError(f"no sample {sid!r} in {self.spec}")
        return int(row)

    def image_digest(self, id: object) -> str:
        return self._id_table.column("image")[self.row(id)].as_py()

    def image(self, id: object) -> PILImage.Image:
        """The stored original image of a sample."""
        digest = self.image_digest(id)
        with self._backend.open_blob(digest) as f:
            return open_image(f.read())

    def array(self, id: object) -> np.ndarray:
        """``np.asarray`` of the stored original image."""
        return np.asarray(self.image(id))

    def label(self, id: object) -> int | None:
        return self._id_table.column("label")[self.row(id)].as_py()

    def blob_reader(self) -> BlobReader:
        root = self._backend.local_root()
        if root is None:
            raise TesseraError("this store has no local blob folder to read images from")
        return BlobReader(root)

    def batches(
        self,
        batch_size: int,
        columns: Sequence[str] = ("image", "label"),
        shuffle: bool = False,
        seed: int | None = None,
    ) -> Iterator[Batch]:
        """Batches with ``.ids`` and one numpy array per column; images decoded by a thread
        pool while the previous batch is in use, stacked NHWC uint8 when they share a shape."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        wanted = [c for c in columns if c != "id"]
        table_columns = ["id", *[("image" if c == "image" else c) for c in wanted]]
        try:
            table = self.table(table_columns)
        except (pa.ArrowInvalid, KeyError) as e:
            raise NotFoundError(f"{self.spec} has no such column ({e})") from None
        order = list(range(table.num_rows))
        if shuffle:
            random.Random(seed).shuffle(order)
        reader = self.blob_reader()
        ids = np.array(table.column("id").to_pylist(), dtype=object)
        plain = {c: table.column(c).to_numpy(zero_copy_only=False) for c in wanted if c != "image"}
        digests = table.column("image").to_pylist() if "image" in wanted else None

        def load(rows: list[int]) -> Batch:
            out: dict[str, Any] = {}
            for c in wanted:
                if c == "image":
                    assert digests is not None
                    needed = [digests[r] for r in rows]
                    self._backend.fetch(needed)
                    arrays = list(pool.map(reader.decode, needed))
                    shapes = {a.shape for a in arrays}
                    out[c] = np.stack(arrays) if len(shapes) == 1 else arrays
                else:
                    out[c] = plain[c][rows]
            return Batch(ids[rows], out)

        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        with ThreadPoolExecutor(_DECODE_WORKERS) as pool, ThreadPoolExecutor(1) as ahead:
            pending = ahead.submit(load, chunks[0]) if chunks else None
            for nxt in chunks[1:]:
                current = pending.result()
                pending = ahead.submit(load, nxt)
                yield current
            if pending is not None:
                yield pending.result()
