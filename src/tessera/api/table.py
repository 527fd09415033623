"""Tables of logged rows, and ``Image``: the habit people already have, at no storage cost.

``run.log({"eval": table})`` resolves every ``Image`` cell before anything is stored: by content
digest (the same file bytes), then by pixel digest (the decoded original array), against every
dataset in the store. A match becomes a reference to that dataset sample; only unmatched images
are stored as new (deduplicated) media, and Tessera says so once.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image as PILImage

from tessera.api.artifact import ArtifactVersion
from tessera.api.dataset import DatasetVersion, write_parquet
from tessera.backend.base import Backend, Source
from tessera.errors import DigestMismatchError, NotFoundError, TesseraError
from tessera.media import (
    Pixels,
    canonical_pixels,
    file_extension,
    is_path_like,
    open_image,
    probe_file,
)
from tessera.names import parse_version_spec
from tessera.store.catalog import SampleMatch, TableRow
from tessera.store.hashing import hash_bytes, hash_file
from tessera.store.manifest import FileEntry, Manifest

if TYPE_CHECKING:
    import pandas as pd

TABLE_FILE = "table.parquet"
IMAGE_TYPE = pa.struct(
    [
        ("digest", pa.string()),
        ("dataset", pa.string()),
        ("id", pa.string()),
        ("caption", pa.string()),
    ]
)


class UnmatchedImagesWarning(UserWarning):
    """Images in a logged table matched no dataset sample and were stored as new media."""


class TableError(TesseraError, ValueError):
    """A table or prediction column that cannot be logged."""


class Image:
    """An image cell: a path, PIL image, numpy array (HW, HWC) or torch tensor (CHW)."""

    def __init__(self, x: Any, caption: str | None = None):
        self.caption = None if caption is None else str(caption)
        self.path: Path | None = None
        self.pixels: Pixels | None = None
        if is_path_like(x):
            self.path = Path(x).absolute()
            if not self.path.is_file():
                raise NotFoundError(f"no image file at {x}")
        else:
            self.pixels = canonical_pixels(x)

    def __repr__(self) -> str:
        what = str(self.path) if self.path else f"array {self.pixels.array.shape}"  # type: ignore[union-attr]
        return f"<tessera.Image {what}>"


@dataclass(frozen=True)
class ImageRef:
    """An image cell read back: the stored image it refers to (a dataset sample, or media)."""

    digest: str
    dataset: str | None
    id: str | None
    caption: str | None
    _backend: Any = None

    def __repr__(self) -> str:
        where = f"{self.dataset}#{self.id}" if self.dataset else self.digest[:12]
        return f"<ImageRef {where}>"

    def open(self) -> PILImage.Image:
        with self._backend.open_blob(self.digest) as f:
            return open_image(f.read())

    def array(self) -> np.ndarray:
        return np.asarray(self.open())


class Table:
    """Rows to log with ``run.log({"name": table})``. Cells may be ``tessera.Image``."""

    def __init__(
        self, columns: Sequence[str] | None = None, data: Sequence[Sequence[Any]] | None = None
    ):
        self.columns: list[str] = [str(c) for c in (columns or [])]
        if len(set(self.columns)) != len(self.columns):
            raise TableError(f"duplicate column names in {self.columns}")
        self._rows: list[list[Any]] = []
        self._arrow: pa.Table | None = None
        for row in data or []:
            self.add_data(*row)

    def __len__(self) -> int:
        return self._arrow.num_rows if self._arrow is not None else len(self._rows)

    def __repr__(self) -> str:
        return f"<tessera.Table columns={self.columns} rows={len(self)}>"

    def add_data(self, *row: Any) -> None:
        if self._arrow is not None:
            raise TableError("a table made from Arrow data cannot take more rows")
        if len(row) != len(self.columns):
            raise TableError(
                f"add_data got {len(row)} values for {len(self.columns)} columns {self.columns}"
            )
        self._rows.append(list(row))

    @classmethod
    def from_pandas(cls, df: pd.DataFrame) -> Table:
        table = cls(columns=[str(c) for c in df.columns])
        for row in df.itertuples(index=False, name=None):
            table.add_data(*row)
        return table

    @classmethod
    def from_arrow(cls, data: pa.Table) -> Table:
        table = cls(columns=data.column_names)
        table._arrow = data
        return table

    def column_values(self, index: int) -> list[Any]:
        return [row[index] for row in self._rows]


# -- logging a table -----------------------------------------------------------------------------


@dataclass
class _Resolved:
    cells: dict[str, list[dict[str, Any] | None]]
    sources: dict[str, Source]
    sample_ids: list[str | None] | None
    dataset_version_id: int | None
    unmatched: int
    restored: set[str] = field(default_factory=set)  # media paths logged before, not new


def _is_media_cell(value: Any) -> bool:
    return (
        isinstance(value, Image | ImageRef)
        or (isinstance(value, np.ndarray) and value.ndim >= 2)
        or (type(value).__module__.startswith("torch") and getattr(value, "ndim", 0) >= 2)
    )


def store_table(
    backend: Backend, project: str, name: str, table: Table, prefer: Sequence[int] = ()
) -> tuple[Manifest, TableRow, int, int]:
    """Resolve images, upload media and the Parquet file; return the manifest, the table row,
    and the count and bytes of images stored as new media. An image found in several dataset
    versions is taken from one in ``prefer`` (the logging run's datasets) first, then from one
    of ``project``, then from the newest."""
    if table._arrow is not None:
        arrow = table._arrow
        resolved = _Resolved({}, {}, None, None, 0)
    else:
        if not table._rows:
            raise TableError(f"table {name!r} has no rows; add some with add_data")
        media_columns = [
            i
            for i, _ in enumerate(table.columns)
            if any(_is_media_cell(v) for v in table.column_values(i))
        ]
        resolved = _resolve_images(backend, table, media_columns, prefer, project)
        arrays: dict[str, pa.Array] = {}
        for i, column in enumerate(table.columns):
            if column in resolved.cells:
                arrays[column] = pa.array(resolved.cells[column], IMAGE_TYPE)
                continue
            values = [_plain(v) for v in table.column_values(i)]
            try:
                arrays[column] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise TableError(f"column {column!r} of table {name!r} mixes types ({e})") from None
        if resolved.sample_ids is not None and "id" not in arrays:
            arrays = {"id": pa.array(resolved.sample_ids, pa.string()), **arrays}
        arrow = pa.table(arrays)
    media = list(resolved.sources.values())
    media_entries = backend.upload(project, media) if media else []
    (table_entry,) = backend.upload(project, [Source(path=TABLE_FILE, data=write_parquet(arrow))])
    dataset_spec = (
        backend.version_by_id(resolved.dataset_version_id).spec
        if resolved.dataset_version_id is not None
        else None
    )
    metadata = {
        "kind": "table",
        "name": name,
        "num_rows": arrow.num_rows,
        "table": TABLE_FILE,
        "image_columns": sorted(resolved.cells),
        "dataset": dataset_spec,
        "dataset_digest": (
            backend.version_by_id(resolved.dataset_version_id).digest
            if resolved.dataset_version_id is not None
            else None
        ),
    }
    manifest = Manifest.build([*media_entries, table_entry], metadata)
    row = TableRow(name, "table", resolved.dataset_version_id, arrow.num_rows)
    new_bytes = sum(e.size for e in media_entries if e.path not in resolved.restored)
    return manifest, row, resolved.unmatched, new_bytes


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _resolve_images(
    backend: Backend,
    table: Table,
    media_columns: list[int],
    prefer: Sequence[int],
    project: str,
) -> _Resolved:
    """Find each image cell's stored original, else prepare it as new media.

    An ``ImageRef`` (a cell read back from a logged table) keeps the sample it names, once that
    sample is checked to hold its image; one of another store's dataset, or of media, is matched
    by its digest like a file, else logged as media again from its stored bytes. So a table read
    with ``to_pandas()``, filtered and logged again stores no image bytes."""
    cells: list[tuple[int, int, Image | ImageRef]] = []  # (column, row, value)
    for col in media_columns:
        for row, value in enumerate(table.column_values(col)):
            if value is None:
                continue
            if not _is_media_cell(value):
                raise TableError(
                    f"column {table.columns[col]!r} mixes images and {type(value).__name__} values"
                )
            cells.append((col, row, value if isinstance(value, Image | ImageRef) else Image(value)))
    by_ref = _named_samples(backend, [cell[2] for cell in cells])

    def digest_of(item: tuple[int, int, Image | ImageRef]) -> tuple[str | None, str | None]:
        image = item[2]
        if isinstance(image, ImageRef):
            return image.digest, None
        if image.path is not None:
            return hash_file(image.path)[0], None
        assert image.pixels is not None
        return None, image.pixels.digest()

    with ThreadPoolExecutor(8) as pool:
        digests = list(pool.map(digest_of, cells))
        by_digest, _ = backend.find_samples(
            [d for i, (d, _) in enumerate(digests) if d and i not in by_ref], [], prefer, project
        )
        # Files whose bytes no dataset holds may still be a re-encoding of a dataset image.
        missing_paths = [
            i
            for i, (d, _) in enumerate(digests)
            if d is not None and d not in by_digest and not isinstance(cells[i][2], ImageRef)
        ]
        probed = dict(
            zip(
                missing_paths,
                pool.map(lambda i: probe_file(cells[i][2].path), missing_paths),
                strict=True,
            )
        )
    pixel_keys = [p for _, p in digests if p] + [info.pixels for info in probed.values()]
    _, by_pixels = backend.find_samples([], pixel_keys, prefer, project)

    spec_cache: dict[int, str] = {}

    def spec(version_id: int) -> str:
        if version_id not in spec_cache:
            spec_cache[version_id] = backend.version_by_id(version_id).spec
        return spec_cache[version_id]

    out: dict[str, list[dict[str, Any] | None]] = {
        table.columns[c]: [None] * len(table._rows) for c in media_columns
    }
    sources: dict[str, Source] = {}
    restored: set[str] = set()  # sources of media ImageRefs: stored already
    unmatched = 0
    first_column = media_columns[0] if media_columns else None
    sample_ids: list[str | None] = [None] * len(table._rows)
    versions: set[int] = set()
    for i, ((col, row, image), (digest, pixels)) in enumerate(zip(cells, digests, strict=True)):
        match: SampleMatch | None = by_ref.get(i)
        if match is None and digest is not None:
            match = by_digest.get(digest)
            if match is None and i in probed:
                match = by_pixels.get(probed[i].pixels)
        elif match is None and pixels is not None:
            match = by_pixels.get(pixels)
        if match is not None:
            cell = {
                "digest": match.digest,
                "dataset": spec(match.version_id),
                "id": match.sample_id,
                "caption": image.caption,
            }
            if col == first_column:
                sample_ids[row] = match.sample_id
                versions.add(match.version_id)
        elif isinstance(image, ImageRef):  # media already: stored again under its digest
            source = _stored_media_source(image, backend)
            sources[source.path] = source
            restored.add(source.path)
            cell = {"digest": image.digest, "dataset": None, "id": None, "caption": image.caption}
        else:
            unmatched += 1
            source = _media_source(image, digest, probed.get(i))
            sources[source.path] = source
            cell = {
                "digest": _source_digest(source),
                "dataset": None,
                "id": None,
                "caption": image.caption,
            }
        out[table.columns[col]][row] = cell
    has_ids = any(s is not None for s in sample_ids)
    return _Resolved(
        cells=out,
        sources=sources,
        sample_ids=sample_ids if has_ids else None,
        dataset_version_id=next(iter(versions)) if len(versions) == 1 else None,
        unmatched=unmatched,
        restored=restored,
    )


def _named_samples(backend: Backend, values: list[Image | ImageRef]) -> dict[int, SampleMatch]:
    """The dataset samples that ``ImageRef`` values name (by their index in ``values``), each
    checked against its dataset version. A version this store lacks matches nothing here."""
    wanted: dict[str, list[int]] = {}
    for i, value in enumerate(values):
        if isinstance(value, ImageRef) and value.dataset is not None and value.id is not None:
            wanted.setdefault(value.dataset, []).append(i)
    found: dict[int, SampleMatch] = {}
    for spec, indexes in wanted.items():
        try:
            record = backend.resolve(parse_version_spec(spec), None)
        except NotFoundError:
            continue  # read from another store: matched by digest, or logged as media
        if record.type != "dataset":
            continue
        version = DatasetVersion(backend, record)
        refs = [values[i] for i in indexes]
        rows = version.rows_of([str(ref.id) for ref in refs])  # one look-up for them all
        # Only the rows named, not the whole column as Python strings.
        images = version._id_table.column("image").take(np.maximum(rows, 0)).to_pylist()
        for i, ref, row, image in zip(indexes, refs, rows, images, strict=True):
            assert isinstance(ref, ImageRef) and ref.id is not None
            stored = image if row >= 0 else None
            if stored != ref.digest:
                what = f"has image {stored}" if stored else "has no such sample"
                raise TableError(
                    f"{ref!r} names sample {ref.id!r} of {spec}, which {what}, not {ref.digest}; "
                    "use the ImageRef values that to_pandas() returned, unchanged"
                )
            found[i] = SampleMatch(record.id, ref.id, ref.digest)
    return found


def _stored_media_source(ref: ImageRef, backend: Backend) -> Source:
    """A media image read back from a table, as a source with its stored bytes and name: the
    upload finds the blob present and stores nothing new."""
    with (ref._backend or backend).open_blob(ref.digest) as f:
        data = f.read()
    if hash_bytes(data) != ref.digest:
        raise DigestMismatchError(f"the stored bytes of {ref!r} do not hash to {ref.digest}")
    info = probe_file(data)
    return Source(
        path=f"media/{ref.digest}{file_extension(info.format)}", data=data, media=info.media()
    )


def _media_source(image: Image, digest: str | None, probed: Any) -> Source:
    if image.path is not None:
        assert digest is not None
        ext = file_extension(probed.format) if probed is not None else image.path.suffix.lower()
        return Source(
            path=f"media/{digest}{ext}",
            local=image.path,
            media=probed.media() if probed is not None else None,
        )
    assert image.pixels is not None
    png = image.pixels.encode_png()
    return Source(path=f"media/{hash_bytes(png)}.png", data=png, media=image.pixels.media())


def _source_digest(source: Source) -> str:
    return source.path.split("/", 1)[1].split(".", 1)[0]


# -- reading -------------------------------------------------------------------------------------


class TableVersion(ArtifactVersion):
    """A logged table or predictions table."""

    def __repr__(self) -> str:
        return f"<TableVersion {self.spec} rows={self.num_rows}>"

    @property
    def kind(self) -> str:
        return str(self.metadata.get("kind", "table"))

    @property
    def num_rows(self) -> int:
        return int(self.metadata.get("num_rows", 0))

    @property
    def image_columns(self) -> list[str]:
        return list(self.metadata.get("image_columns", []))

    @cached_property
    def dataset(self) -> DatasetVersion | None:
        """The dataset version this table's rows refer to, if any."""
        row = self._backend.table_row(self._record.id)
        if row is None or row.dataset_version_id is None:
            return None
        return DatasetVersion(self._backend, self._backend.version_by_id(row.dataset_version_id))

    def _parquet_files(self) -> list[FileEntry]:
        return [e for e in self.files() if e.path.endswith(".parquet")]

    def to_arrow(self, columns: Sequence[str] | None = None) -> pa.Table:
        parts = []
        for entry in self._parquet_files():
            path = self._backend.blob_path(entry.digest)
            if path is not None:
                source: Any = str(path)
            else:
                with self._backend.open_blob(entry.digest) as f:
                    source = pa.BufferReader(f.read())
            parts.append(pq.read_table(source, columns=list(columns) if columns else None))
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def to_pandas(self) -> pd.DataFrame:
        """A DataFrame; image cells become ``ImageRef`` objects that open the stored image."""
        frame = self.to_arrow().to_pandas()
        for column in self.image_columns:
            frame[column] = [
                None
                if cell is None
                else ImageRef(
                    cell["digest"], cell["dataset"], cell["id"], cell["caption"], self._backend
                )
                for cell in frame[column]
            ]
        return frame
