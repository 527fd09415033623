"""What the catalog indexes about a version, derived from its stored manifest.

A dataset version's sample index comes from its sample table; a table version's row (name,
kind, row count, bound dataset version) from its manifest metadata. Deriving both on the side
that commits — the local store, or the server — means a client never has to be trusted for them,
and the embedded and remote paths share one definition.
"""

from __future__ import annotations

from collections.abc import Callable

from tessera.errors import StoreCorruptError
from tessera.store.catalog import SampleRow, TableRow
from tessera.store.hashing import hash_bytes
from tessera.store.manifest import Manifest

TABLE_TYPES = {"table": "table", "predictions": "predictions"}


def sample_rows(manifest: Manifest, read_blob: Callable[[str], bytes]) -> list[SampleRow] | None:
    """The (sample id, image digest, pixel digest) rows of a dataset version.

    The sample table is read as bytes (``read_blob``) and checked against its digest here, not
    through a blob store's local file: for a bucket that meant a copy into the local cache
    made durable with ``syncfs``, which waited for every dirty page of the disk, SeaweedFS's
    own writes included (0.4 s once in a 10,000-image ingest)."""
    if manifest.metadata.get("kind") != "dataset":
        return None
    name = manifest.metadata.get("samples", "samples.parquet")
    entry = manifest.files.get(name)
    if entry is None:
        raise StoreCorruptError(f"dataset manifest lists no sample table {name!r}")
    import pyarrow as pa  # only datasets need them; plain artifacts commit without
    import pyarrow.parquet as pq

    data = read_blob(entry.digest)
    if hash_bytes(data) != entry.digest:
        raise StoreCorruptError(
            f"the sample table {entry.digest} does not hash to its name; the store is damaged "
            "— run `tessera verify` to list every problem"
        )
    table = pq.read_table(pa.BufferReader(data), columns=["id", "image", "pixels"])
    ids, images, pixels = (table.column(c).to_pylist() for c in ("id", "image", "pixels"))
    return [SampleRow(i, d, p) for i, d, p in zip(ids, images, pixels, strict=True)]


def table_row(
    type: str, name: str, manifest: Manifest, find_dataset: Callable[[str, str], int | None]
) -> TableRow | None:
    """The table row of a table or predictions version; ``find_dataset(spec, digest)`` gives
    the id of the dataset version it is bound to."""
    kind = TABLE_TYPES.get(type)
    if kind is None:
        return None
    meta = manifest.metadata
    dataset_version_id = None
    if meta.get("dataset") and meta.get("dataset_digest"):
        dataset_version_id = find_dataset(meta["dataset"], meta["dataset_digest"])
    return TableRow(name, kind, dataset_version_id, int(meta.get("num_rows", 0)))
