"""Datasets: building them (from folders, CSV labels, in-memory images), every bad input, and
reading a logged version back (classes, ids, the sample table, images by id, decoded batches).

This module also holds the seed data the other dataset/table/prediction test modules share:
1,000 small JPEG files and a store with them logged once as a dataset (built once per session,
copied with ``shutil.copytree`` by tests that write to it).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import tessera
from conftest import MAIN_KINDS, read_blob, store_state, stored_blobs
from tessera.api.dataset import RESERVED_COLUMNS

both = pytest.mark.both_backends
# tests that log or read the 1,000 seed images: on the main kinds only (time)
main = pytest.mark.both_backends(kinds=MAIN_KINDS)

# -- shared seed data ----------------------------------------------------------------------------

CLASSES = ["bird", "cat", "dog"]  # what from_folder infers from the CSV: sorted label names
N_SEED = 1000
SEED_PROJECT = "eval"
SEED_SPEC = f"{SEED_PROJECT}/seed:v0"


@dataclass(frozen=True)
class SeedImages:
    root: Path
    labels_csv: Path
    paths: dict[str, Path] = field(repr=False)  # sample id -> the original JPEG file
    labels: dict[str, str] = field(repr=False)  # sample id -> class name
    split: dict[str, str] = field(repr=False)  # sample id -> an extra CSV column
    arrays: dict[str, np.ndarray] = field(repr=False)  # id -> np.asarray(PIL.Image.open(file))

    @property
    def ids(self) -> list[str]:
        return sorted(self.paths)


@dataclass(frozen=True)
class SeedStore:
    store: Path
    images: SeedImages


_CACHE: dict[str, object] = {}


def _pixels(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Random-ish but smooth (JPEG-compressible) RGB content; brightness varies a lot."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    base = rng.uniform(20, 230, 3)
    fx, fy = rng.uniform(0.05, 0.6, 2)
    amp = rng.uniform(10, 60, 3)
    wave = np.sin(fx * xx + fy * yy + rng.uniform(0, 6))[..., None] * amp
    return np.clip(base + wave, 0, 255).astype(np.uint8)


def make_jpegs(root: Path, count: int, seed: int = 0, size: int = 32) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(count):
        path = root / f"img{i:04d}.jpg"
        PILImage.fromarray(_pixels(rng, size)).save(path, quality=90)
        out[path.stem] = path
    return out


def seed_images(factory: pytest.TempPathFactory) -> SeedImages:
    """1,000 32x32 RGB JPEGs (quality 90) and a labels CSV, made once per session."""
    if "images" not in _CACHE:
        base = factory.mktemp("seed-images")
        paths = make_jpegs(base / "images", N_SEED)
        labels = {sid: CLASSES[(i * 7) % 3] for i, sid in enumerate(sorted(paths))}
        split = {sid: "test" if i % 4 == 0 else "val" for i, sid in enumerate(sorted(paths))}
        labels_csv = base / "labels.csv"
        with open(labels_csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "label", "split"])
            for sid in sorted(paths):
                writer.writerow([sid, labels[sid], split[sid]])
        arrays = {}
        for sid, path in paths.items():
            with PILImage.open(path) as image:
                arrays[sid] = np.asarray(image)
        distinct = {blake3.blake3(a.tobytes()).hexdigest() for a in arrays.values()}
        assert len(distinct) == N_SEED, "seed images must all differ, or joins are ambiguous"
        _CACHE["images"] = SeedImages(base / "images", labels_csv, paths, labels, split, arrays)
    return _CACHE["images"]  # type: ignore[return-value]


def log_seed(images: SeedImages, store: Path) -> None:
    dataset = tessera.Dataset.from_folder(images.root, labels=images.labels_csv, name="seed")
    with tessera.init(project=SEED_PROJECT, name="maker", dir=store) as run:
        dsv = run.log_dataset(dataset)
        assert dsv.spec == SEED_SPEC


def seed_store(factory: pytest.TempPathFactory) -> SeedStore:
    """A store folder holding the seed images logged once as dataset ``eval/seed:v0``."""
    if "store" not in _CACHE:
        images = seed_images(factory)
        store = factory.mktemp("seed-store") / "store"
        with pytest.MonkeyPatch.context() as mp:  # an embedded folder, whatever the test's kind
            for key in ("TESSERA_SERVER", "TESSERA_CATALOG", "TESSERA_BLOBS"):
                mp.delenv(key, raising=False)
            log_seed(images, store)
        _CACHE["store"] = SeedStore(store, images)
    return _CACHE["store"]  # type: ignore[return-value]


def _testing_a_store_folder() -> bool:
    return not any(
        os.environ.get(k) for k in ("TESSERA_SERVER", "TESSERA_CATALOG", "TESSERA_BLOBS")
    )


def copy_store(seed: SeedStore, dest: Path) -> Path:
    """A private, writable store holding the seed dataset, of the kind under test: a copy of
    the seed folder, or (a server, PostgreSQL, S3) the seed logged afresh."""
    if _testing_a_store_folder():
        shutil.copytree(seed.store, dest)
    else:
        log_seed(seed.images, dest)
    return dest


def shared_seed(
    seed: SeedStore, kind: str, shared_stores: Any, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A store holding the seed dataset, of the kind under test, for tests that only read it."""
    if kind == "local":
        return seed.store
    folder, _ = shared_stores.get(
        "seed", kind, lambda store: log_seed(seed.images, store), monkeypatch
    )
    return folder


def blob_kind(data: bytes) -> str:
    """What a blob holds, judged by its bytes."""
    if data[:4] == b"PAR1" and data[-4:] == b"PAR1":
        return "parquet"
    if data[:2] == b"\xff\xd8":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    try:
        doc = json.loads(data)
    except ValueError:
        return "other"
    return "manifest" if isinstance(doc, dict) and "files" in doc else "other"


def added_kinds(store: Path, before: dict[str, int] | set[str] | list[str]) -> list[str]:
    """The sorted kinds of the blobs the store under test holds now and did not in ``before``."""
    return sorted(blob_kind(read_blob(store, d)) for d in set(stored_blobs(store)) - set(before))


@pytest.fixture(scope="session")
def seed(tmp_path_factory: pytest.TempPathFactory) -> SeedStore:
    return seed_store(tmp_path_factory)


@pytest.fixture
def seed_dsv(seed: SeedStore, backend_kind: str, shared_stores, monkeypatch):
    """The seed dataset version of the kind under test, read through a store browser."""
    with tessera.open_store(shared_seed(seed, backend_kind, shared_stores, monkeypatch)) as store:
        yield store.artifact(SEED_SPEC)


# -- building datasets from folders --------------------------------------------------------------


@main
def test_from_folder_with_labels_csv(seed, seed_dsv):
    images = seed.images
    dsv = seed_dsv
    assert isinstance(dsv, tessera.DatasetVersion)
    assert dsv.type == "dataset" and dsv.num_samples == N_SEED
    assert dsv.classes == CLASSES
    assert dsv.ids == images.ids
    table = dsv.table()
    assert table.column_names == [*RESERVED_COLUMNS, "split"]
    rows = table.to_pylist()
    for row in rows:
        sid = row["id"]
        original = images.paths[sid]
        assert row["label"] == CLASSES.index(images.labels[sid])
        assert row["split"] == images.split[sid]
        assert (row["width"], row["height"]) == (32, 32)
        # content addressing: the image cell is the BLAKE3 of the original file's bytes
        assert row["image"] == blake3.blake3(original.read_bytes()).hexdigest()
        assert row["path"] == f"images/{sid}.jpg"
    assert len({row["pixels"] for row in rows}) == N_SEED
    assert len({row["image"] for row in rows}) == N_SEED


@main
def test_class_per_subfolder_layout(tmp_path, seed):
    images = seed.images
    root = tmp_path / "pets"
    for sid, path in images.paths.items():
        dest = root / images.labels[sid] / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, dest)
    (root / "notes.txt").write_text("not an image: ignored")
    dataset = tessera.Dataset.from_folder(root)
    assert dataset.name == "pets" and len(dataset) == N_SEED
    with tessera.init(project="p", dir=tmp_path / "store") as run:
        dsv = run.log_dataset(dataset)
        assert dsv.classes == CLASSES
        assert sorted(dsv.ids) == images.ids  # ordered by path: bird/…, cat/…, dog/…
        frame = dsv.to_pandas()
        assert dict(zip(frame["id"], frame["label_name"], strict=True)) == images.labels
        assert set(frame["path"]) == {f"images/{sid}.jpg" for sid in images.ids}
        # the same images through a table of file paths: every cell is a reference
        before = stored_blobs(tmp_path / "store")
        table = tessera.Table(columns=["image", "label"])
        order = images.ids[::-1]
        for sid in order:
            table.add_data(tessera.Image(root / images.labels[sid] / f"{sid}.jpg"), "x")
        with warnings.catch_warnings():
            warnings.simplefilter("error", tessera.UnmatchedImagesWarning)
            tv = run.log_table("eval", table)
        assert added_kinds(tmp_path / "store", before) == ["manifest", "parquet"]
        assert tv.dataset == dsv
        assert tv.to_arrow().column("id").to_pylist() == order


@both
def test_from_folder_id_from_path_and_duplicate_stems(tmp_path):
    rng = np.random.default_rng(1)
    for sub in ("a", "b"):
        (tmp_path / "imgs" / sub).mkdir(parents=True)
        PILImage.fromarray(_pixels(rng, 8)).save(tmp_path / "imgs" / sub / "x.png")
    with pytest.raises(tessera.DatasetError, match=r"two images have the id 'x'.*id=\"path\""):
        tessera.Dataset.from_folder(tmp_path / "imgs")
    dataset = tessera.Dataset.from_folder(tmp_path / "imgs", id="path")
    with tessera.init(project="p", dir=tmp_path / "store") as run:
        dsv = run.log_dataset(dataset)
        assert dsv.ids == ["a/x.png", "b/x.png"] and dsv.classes == ["a", "b"]
        assert [e.path for e in dsv.files()] == [
            "images/a/x.png",
            "images/b/x.png",
            "samples.parquet",
        ]
    with pytest.raises(tessera.DatasetError, match='id must be "stem" or "path"'):
        tessera.Dataset.from_folder(tmp_path / "imgs", id="name")


@both
def test_from_folder_csv_problems(tmp_path):
    root = tmp_path / "imgs"
    paths = make_jpegs(root, 3, seed=3, size=8)
    ids = sorted(paths)
    cases = {
        "no_id.csv": ("name,label\n" + "".join(f"{i},cat\n" for i in ids), "needs a header"),
        "no_label.csv": ("id,class\n" + "".join(f"{i},cat\n" for i in ids), "needs a header"),
        "missing_rows.csv": (f"id,label\n{ids[0]},cat\n", r"2 images have no row"),
        "reserved.csv": (
            "id,label,width\n" + "".join(f"{i},cat,3\n" for i in ids),
            "column name 'width' is reserved",
        ),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(tessera.DatasetError, match=message):
            tessera.Dataset.from_folder(root, labels=tmp_path / name)
    with pytest.raises(tessera.NotFoundError, match="no labels file"):
        tessera.Dataset.from_folder(root, labels=tmp_path / "absent.csv")
    # file names with extensions as the id column match by stem
    (tmp_path / "files.csv").write_text(
        "filename,label\n" + "".join(f"{i}.jpg,{c}\n" for i, c in zip(ids, "abc", strict=True))
    )
    dataset = tessera.Dataset.from_folder(root, labels=tmp_path / "files.csv")
    assert dataset.classes == ["a", "b", "c"]
    with tessera.init(project="p", dir=tmp_path / "store") as run:
        dsv = run.log_dataset(dataset)
        assert dsv.table(["id", "label"]).to_pydict() == {"id": ids, "label": [0, 1, 2]}
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("not an image")
    with pytest.raises(tessera.NotFoundError, match="no images"):
        tessera.Dataset.from_folder(tmp_path / "empty")
    with pytest.raises(tessera.NotFoundError, match="is not a folder"):
        tessera.Dataset.from_folder(tmp_path / "nowhere")


# -- in-memory images -----------------------------------------------------------------------------


@both
def test_in_memory_images_are_encoded_once_as_png(tmp_path):
    rng = np.random.default_rng(5)
    hw = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    hwc = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (5, 4, 4), dtype=np.uint8)
    as_float = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    as_tensor = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    as_float_tensor = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    as_pil = rng.integers(0, 256, (7, 2, 3), dtype=np.uint8)
    samples = {  # id -> (what the user holds, the pixels it must come back as)
        "hw": (hw, hw),
        "hw1": (hw[:, :, None].copy(), hw),  # HW1 is the same grey image as HW
        "hwc": (hwc, hwc),
        "rgba": (rgba, rgba),
        "float": (as_float.astype(np.float32) / 255, as_float),
        "tensor": (torch.from_numpy(as_tensor.transpose(2, 0, 1).copy()), as_tensor),
        "tensor_float": (
            torch.from_numpy(as_float_tensor.transpose(2, 0, 1).copy()).float() / 255,
            as_float_tensor,
        ),
        "pil": (PILImage.fromarray(as_pil), as_pil),
        "pil_grey": (PILImage.fromarray(hw), hw),
    }

    def build(**override) -> tessera.Dataset:
        ds = tessera.Dataset("mem", classes=["x", "y"])
        for i, (sid, (value, _)) in enumerate(samples.items()):
            ds.add(sid, override.get(sid, value), label=i % 2, score=float(i))
        return ds

    store = tmp_path / "store"
    with tessera.init(project="p", dir=store) as run:
        dsv = run.log_dataset(build())
        for sid, (_, expected) in samples.items():
            entry = dsv.entry(f"images/{sid}.png")
            assert dsv.read_bytes(entry.path)[:8] == b"\x89PNG\r\n\x1a\n"
            got = dsv.array(sid)
            assert got.dtype == np.uint8 and got.shape == expected.shape, sid
            np.testing.assert_array_equal(got, expected, err_msg=sid)
            assert entry.media["width"] == expected.shape[1]
            assert entry.media["height"] == expected.shape[0]
        table = dsv.table().to_pydict()
        assert table["score"] == [float(i) for i in range(len(samples))]
        digest = dict(zip(table["id"], table["image"], strict=True))
        # identical pixels, different holders: one blob (hw, hw1 and pil_grey)
        assert digest["hw"] == digest["hw1"] == digest["pil_grey"]
        kinds = added_kinds(store, [])
        assert kinds.count("png") == len(samples) - 2  # hw, hw1 and pil_grey share one
        assert len(kinds) == len(samples) - 2 + 2  # + samples.parquet and the manifest
        # logging the same images again: the same version, nothing new stored
        state = store_state(store)
        again = run.log_dataset(build())
        assert again == dsv and again.version == "v0"
        assert store_state(store) == state
        # one changed image under the same id: a new version, one new image blob
        v1 = run.log_dataset(build(hwc=hwc[::-1].copy()))
        assert v1.version == "v1" and v1.ids == dsv.ids
        assert added_kinds(store, state["blobs"]) == ["manifest", "parquet", "png"]


@main
def test_jpeg_files_keep_their_exact_bytes(tmp_path, seed, seed_dsv):
    target = seed_dsv.download(tmp_path / "download")
    images = seed.images
    files = sorted(p for p in (target / "images").iterdir())
    assert [p.stem for p in files] == images.ids
    for path in files:
        assert path.read_bytes() == images.paths[path.stem].read_bytes(), path.name
    assert (target / "samples.parquet").is_file()


# -- reading a dataset version -------------------------------------------------------------------


@main
def test_images_by_id_and_pandas(seed, seed_dsv):
    images = seed.images
    dsv = seed_dsv
    for sid in images.ids:
        np.testing.assert_array_equal(np.asarray(dsv.image(sid)), images.arrays[sid])
    for sid in images.ids[::97]:
        np.testing.assert_array_equal(dsv.array(sid), images.arrays[sid])
        assert dsv.label(sid) == CLASSES.index(images.labels[sid])
        assert dsv.image_digest(sid) == blake3.blake3(images.paths[sid].read_bytes()).hexdigest()
    frame = dsv.to_pandas()
    assert list(frame["id"]) == images.ids
    assert list(frame["label_name"]) == [images.labels[s] for s in images.ids]
    assert list(frame["split"]) == [images.split[s] for s in images.ids]
    for method in (dsv.image, dsv.array, dsv.label, dsv.row, dsv.image_digest):
        with pytest.raises(tessera.NotFoundError, match="no sample 'nope' in eval/seed:v0"):
            method("nope")


def test_metadata_and_rows_without_building_the_manifest(seed):
    """A dataset version answers classes, its sample table and id lookups from the manifest's
    metadata and one entry, never building an object per image."""
    images = seed.images
    with tessera.open_store(seed.store) as store:
        dsv = store.artifact(SEED_SPEC)
        assert dsv.classes == CLASSES
        assert dsv.num_samples == len(images.ids)
        rows = dsv.rows_of([images.ids[3], "nope", images.ids[0]])
        assert rows.tolist() == [3, -1, 0]
        digest = dsv.samples_digest
        assert dsv._manifest is None  # only peeked at
        assert dsv.manifest.files["samples.parquet"].digest == digest
        assert dsv.metadata == dsv.manifest.metadata


def test_peeking_at_canonical_manifest_bytes():
    """peek_metadata and peek_entry agree with a full parse, even when metadata nests keys
    named "metadata" and an image path ends like the sample table's; bad bytes are refused."""
    from tessera.errors import StoreCorruptError, StoreFormatError
    from tessera.store.manifest import FileEntry, Manifest, peek_entry, peek_metadata

    entries = [
        FileEntry("samples.parquet", "a" * 64, 10),
        FileEntry("images/samples.parquet", "b" * 64, 4, {"format": "PNG", "width": 2}),
    ]
    for metadata in ({}, {"kind": "dataset", "metadata": {"metadata": {"x": [1, "}"]}}}):
        manifest = Manifest.build(entries, metadata)
        data, digest = manifest.to_bytes(), manifest.digest()
        assert peek_metadata(data, digest) == Manifest.from_bytes(data, digest).metadata
        for path, entry in manifest.files.items():
            assert peek_entry(data, path, digest) == entry
        assert peek_entry(data, "images", digest) is None
        with pytest.raises(StoreCorruptError, match="does not hash to its name"):
            peek_metadata(data + b" ", digest)
    newer = Manifest.build(entries).to_bytes().replace(b'"format":1', b'"format":9')
    with pytest.raises(StoreFormatError, match="format 9"):
        peek_metadata(newer)
    with pytest.raises(StoreCorruptError):
        peek_metadata(b"[1, 2]")


def test_peeking_at_a_manifest_tail():
    """A streamed manifest keeps only its tail: what the tail holds is found, what it does not
    is reported as not there (None) so callers parse the whole, and a wrong digest is refused
    although the tail alone would look fine."""
    import io

    from tessera.errors import StoreCorruptError
    from tessera.store.manifest import FileEntry, Manifest, peek_entry, peek_metadata, read_tail

    entries = [FileEntry(f"images/{i:04d}.png", f"{i:064x}", 100 + i) for i in range(500)]
    entries.append(FileEntry("samples.parquet", "c" * 64, 1234))
    manifest = Manifest.build(entries, {"kind": "dataset", "classes": ["a", "b"]})
    data, digest = manifest.to_bytes(), manifest.digest()

    tail = read_tail(io.BytesIO(data), digest, keep=2000)
    assert not tail.whole and len(tail.data) == 2000 and data.endswith(tail.data)
    assert peek_metadata(tail, digest) == manifest.metadata
    assert peek_entry(tail, "samples.parquet", digest) == manifest.files["samples.parquet"]
    assert peek_entry(tail, "images/0000.png", digest) is None  # before the tail

    too_short = read_tail(io.BytesIO(data), digest, keep=30)
    assert peek_metadata(too_short, digest) is None

    whole = read_tail(io.BytesIO(data), digest, keep=len(data))
    assert whole.whole and whole.data == data
    assert peek_entry(whole, "images/0000.png", digest) == manifest.files["images/0000.png"]

    with pytest.raises(StoreCorruptError, match="does not hash to its name"):
        read_tail(io.BytesIO(b" " + data), digest, keep=2000)


@main
def test_batches_cover_every_sample_once(seed, seed_dsv):
    images = seed.images
    dsv = seed_dsv
    batches = list(dsv.batches(128, columns=("image", "label"), shuffle=True, seed=7))
    assert [len(b) for b in batches] == [128] * 7 + [104]
    order = [sid for b in batches for sid in b.ids]
    assert sorted(order) == images.ids and len(set(order)) == N_SEED
    assert order != images.ids  # shuffled
    for batch in batches:
        assert isinstance(batch.image, np.ndarray)
        assert batch.image.dtype == np.uint8 and batch.image.shape == (len(batch), 32, 32, 3)
        assert batch["label"].tolist() == [CLASSES.index(images.labels[s]) for s in batch.ids]
        for sid, pixels in zip(batch.ids, batch.image, strict=True):
            np.testing.assert_array_equal(pixels, images.arrays[sid])
    same = [sid for b in dsv.batches(300, ("label",), shuffle=True, seed=7) for sid in b.ids]
    other = [sid for b in dsv.batches(300, ("label",), shuffle=True, seed=8) for sid in b.ids]
    assert same == order and other != order and sorted(other) == images.ids
    plain = list(dsv.batches(400, columns=("label", "split")))
    assert [sid for b in plain for sid in b.ids] == images.ids  # unshuffled: table order
    assert "image" not in plain[0].columns
    assert list(plain[0].split[:4]) == [images.split[s] for s in images.ids[:4]]
    with pytest.raises(tessera.NotFoundError, match="has no such column"):
        next(dsv.batches(10, columns=("image", "nope")))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        next(dsv.batches(0))


@both
def test_batches_of_mixed_sizes_are_lists(tmp_path):
    rng = np.random.default_rng(2)
    shapes = [(4, 4, 3), (6, 5, 3), (4, 4, 3), (3, 8), (4, 4, 3)]
    arrays = [rng.integers(0, 256, s, dtype=np.uint8) for s in shapes]
    ds = tessera.Dataset("mixed")
    for i, array in enumerate(arrays):
        ds.add(f"m{i}", array)
    with tessera.init(project="p", dir=tmp_path / "store") as run:
        dsv = run.log_dataset(ds)
        assert dsv.classes is None
        assert dsv.table(["label"]).column("label").null_count == len(arrays)
        (first, second) = list(dsv.batches(3, columns=("image",)))
        assert isinstance(first.image, list) and len(first.image) == 3
        for sid, image in zip(
            [*first.ids, *second.ids], [*first.image, *second.image], strict=True
        ):
            np.testing.assert_array_equal(image, arrays[int(sid[1:])])
        assert isinstance(second.image, list)  # (3, 8) and (4, 4, 3) do not stack
        uniform = list(dsv.batches(1))
        assert all(isinstance(b.image, np.ndarray) and b.image.shape[0] == 1 for b in uniform)


@pytest.mark.both_backends(kinds=["local", "http"])  # logs the 1,000 seed images afresh
def test_browsing_returns_typed_versions(tmp_path, seed):
    store = copy_store(seed, tmp_path / "store")
    with tessera.init(project=SEED_PROJECT, dir=store) as run:
        dsv = run.use_dataset("seed:latest")
        assert isinstance(dsv, tessera.DatasetVersion) and dsv.spec == SEED_SPEC
        tv = run.log_predictions(dsv, dsv.ids[:3], pred=[0, 1, 2])
        table = tessera.Table(columns=["a"], data=[[1], [2]])
        run.log({"plain": table})
        art = tessera.Artifact("weights", type="model")
        art.add_bytes(b"\0" * 10, "w.bin")
        run.log_artifact(art)
        with pytest.raises(tessera.NotFoundError, match="is a 'model' artifact, not a dataset"):
            run.use_dataset("weights:v0")
    with tessera.open_store(store) as browser:
        assert type(browser.artifact(SEED_SPEC)) is tessera.DatasetVersion
        assert (
            type(browser.artifact("predictions:v0", project=SEED_PROJECT)) is tessera.TableVersion
        )
        plain = browser.artifact(f"{SEED_PROJECT}/plain:v0")
        assert type(plain) is tessera.TableVersion and plain.num_rows == 2
        assert type(browser.artifact(f"{SEED_PROJECT}/weights:v0")) is tessera.ArtifactVersion
        assert browser.artifact(tv.spec).dataset == dsv
        versions = browser.versions(SEED_PROJECT, "seed")
        assert [type(v) for v in versions] == [tessera.DatasetVersion]


@both
def test_use_dataset_of_wrong_type_records_no_lineage(tmp_path):
    with tessera.init(project="p", dir=tmp_path / "store") as run:
        art = tessera.Artifact("weights", type="model")
        art.add_bytes(b"\0" * 10, "w.bin")
        run.log_artifact(art)
        state = store_state(tmp_path / "store")
        with pytest.raises(tessera.NotFoundError):
            run.use_dataset("weights:v0")
        assert store_state(tmp_path / "store") == state


# -- every bad input ----------------------------------------------------------------------------


def test_bad_samples_are_refused_when_added(tmp_path):
    image = np.zeros((4, 4), np.uint8)
    ds = tessera.Dataset("d", classes=["a", "b"])
    ds.add("one", image, "a")
    with pytest.raises(tessera.DatasetError, match="duplicate sample id 'one'"):
        ds.add("one", image, "b")
    with pytest.raises(tessera.DatasetError, match="sample id is empty"):
        ds.add("", image)
    for bad_id in (None, True, 1.5):
        with pytest.raises(tessera.DatasetError, match="sample id must be"):
            ds.add(bad_id, image)
    with pytest.raises(tessera.DatasetError, match="longer than 512"):
        ds.add("x" * 513, image)
    with pytest.raises(tessera.DatasetError, match=r"label 'c' of sample 'two' is not one of"):
        ds.add("two", image, "c")
    for index in (2, -1):
        with pytest.raises(tessera.DatasetError, match=f"label {index} of sample 'two' is out of"):
            ds.add("two", image, index)
    with pytest.raises(tessera.DatasetError, match="must be a class name or index"):
        ds.add("two", image, 1.0)
    for column in sorted(set(RESERVED_COLUMNS) - {"id", "image", "label"}):
        with pytest.raises(tessera.DatasetError, match=f"column name '{column}' is reserved"):
            ds.add("two", image, **{column: 1})
    with pytest.raises(tessera.DatasetError, match="must be a Python identifier"):
        ds.add("two", image, **{"bad name": 1})
    with pytest.raises(tessera.DatasetError, match="holds numbers, strings|hold numbers"):
        ds.add("two", image, extra=[1, 2])
    with pytest.raises(tessera.ImageError, match=r"got shape \(1, 2, 3, 4, 5\)"):
        ds.add("two", np.zeros((1, 2, 3, 4, 5), np.uint8))
    with pytest.raises(tessera.ImageError, match=r"got shape \(4, 4, 2\)"):
        ds.add("two", np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(tessera.ImageError, match="cannot use a dict as an image"):
        ds.add("two", {"pixels": 1})
    with pytest.raises(tessera.ImageError, match="NaN or infinity"):
        ds.add("two", np.full((2, 2), np.nan))
    with pytest.raises(tessera.NotFoundError, match="no image file at .*missing.png"):
        ds.add("two", tmp_path / "missing.png")
    assert len(ds) == 1  # nothing half-added
    with pytest.raises(tessera.DatasetError, match="distinct"):
        tessera.Dataset("d", classes=["a", "a"])
    with pytest.raises(tessera.DatasetError, match="non-empty"):
        tessera.Dataset("d", classes=[])
    with pytest.raises(tessera.InvalidNameError):
        tessera.Dataset("bad name!")


@both
def test_bad_datasets_are_refused_when_logged_and_store_unchanged(tmp_path):
    store = tmp_path / "store"
    good = make_jpegs(tmp_path / "imgs", 5, seed=4, size=8)
    corrupt = tmp_path / "imgs" / "img9999.jpg"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2000))
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(good["img0000"].read_bytes()[:200])
    vanished = tmp_path / "vanished.jpg"
    shutil.copyfile(good["img0001"], vanished)
    with tessera.init(project="p", dir=store) as run:
        run.log_dataset(_one_image_dataset())
        state = store_state(store)

        def refused(dataset, error, message):
            with pytest.raises(error, match=message):
                run.log_dataset(dataset)
            assert store_state(store) == state

        refused(
            tessera.Dataset.from_folder(tmp_path / "imgs"),
            tessera.ImageError,
            r"img9999\.jpg is not a readable image",
        )
        ds = tessera.Dataset("t")
        ds.add("a", good["img0002"])
        ds.add("b", truncated)
        refused(ds, tessera.ImageError, r"trunc\.jpg is not a readable image")
        ds = tessera.Dataset("v")
        ds.add("a", good["img0002"])
        ds.add("b", vanished)
        vanished.unlink()
        refused(ds, tessera.TesseraError, r"vanished\.jpg")
        ds = tessera.Dataset("mix")
        ds.add("a", good["img0002"], "cat")
        ds.add("b", good["img0003"], 1)
        refused(ds, tessera.DatasetError, "mix class names and indices")
        refused(tessera.Dataset("empty"), tessera.DatasetError, "has no samples")
        with pytest.raises(TypeError, match="log_dataset takes a tessera.Dataset"):
            run.log_dataset(tessera.Table(columns=["a"], data=[[1]]))
        assert store_state(store) == state


def _one_image_dataset() -> tessera.Dataset:
    ds = tessera.Dataset("ok")
    ds.add("x", np.zeros((2, 2), np.uint8))
    return ds


def _random_images(root: Path, count: int, shape: tuple[int, ...], ext: str) -> list[Path]:
    """``count`` images of random pixels, ``t000<ext>``, ``t001<ext>``, ... in ``root``."""
    rng = np.random.default_rng(11)
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"t{i:03d}{ext}" for i in range(count)]
    for path in paths:
        PILImage.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return paths


def _tiny_pngs(root: Path, count: int) -> list[Path]:
    """28x28 grey PNGs (about 800 bytes): the thumbnails a helper interpreter probes."""
    return _random_images(root, count, (28, 28), ".png")


def _kept(limit: int = 1 << 30):
    from tessera.probing import KeptBytes

    return KeptBytes(limit)


def test_a_helper_interpreter_probes_tiny_files_like_this_one(tmp_path):
    """Same results, in order, whichever process probed a file; the helper did take part, and
    sent back each file's bytes while the budget lasted."""
    from tessera.media import probe_file
    from tessera.probing import _probe_files

    paths = _tiny_pngs(tmp_path / "imgs", 120)
    results, helped = _probe_files(paths, helper_above=1, chunk=4, kept=_kept())
    assert [info for info, _data in results] == [probe_file(p) for p in paths]
    assert [data for _info, data in results] == [p.read_bytes() for p in paths]
    assert helped > 0
    budget = 30 * paths[0].stat().st_size
    kept = _kept(budget)
    results, helped = _probe_files(paths, helper_above=1, chunk=4, kept=kept)
    held = [data for _info, data in results if data is not None]
    assert 0 < len(held) < len(paths) and sum(map(len, held)) == kept.held <= budget
    assert [info for info, _data in results] == [probe_file(p) for p in paths] and helped > 0


def test_files_the_probe_helper_calls_bad_are_judged_by_this_process(tmp_path, monkeypatch):
    """The helper only flags a bad file; this process probes it again, with its own Pillow
    settings (here LOAD_TRUNCATED_IMAGES), and raises its own error when it is bad here too."""
    from PIL import ImageFile

    from tessera.media import ImageError, probe_file
    from tessera.probing import _probe_files, _start_helper, _stop

    paths = _tiny_pngs(tmp_path / "imgs", 40)
    paths[25].write_bytes(paths[25].read_bytes()[:-40])  # cut inside its pixel data
    helper = _start_helper()
    assert helper is not None and helper.stdin is not None and helper.stdout is not None
    try:
        helper.stdin.write(json.dumps([0, 1 << 20, [str(paths[0]), str(paths[25])]]) + "\n")
        helper.stdin.flush()
        info, flagged = json.loads(helper.stdout.readline())
    finally:
        _stop(helper)
    assert info == [*dataclasses.astuple(probe_file(paths[0])), None] and flagged is None
    with pytest.raises(ImageError, match=r"t025\.png is not a readable image"):
        _probe_files(paths, helper_above=1, chunk=4, kept=_kept())
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    results, helped = _probe_files(paths, helper_above=1, chunk=4, kept=_kept())
    assert [info for info, _data in results] == [probe_file(p) for p in paths] and helped > 0


def test_long_paths_do_not_block_the_probe_helper(tmp_path):
    """Requests bigger than a pipe's buffer (256 paths of ~400 characters), two in flight."""
    from tessera.media import probe_file
    from tessera.probing import _probe_files

    deep = tmp_path.joinpath(*["d" * 60] * 5)
    paths = _tiny_pngs(deep, 600)
    assert len(str(paths[0])) > 350
    results, helped = _probe_files(paths, helper_above=1, chunk=256, kept=_kept())
    assert [info for info, _data in results] == [probe_file(p) for p in paths] and helped > 0


@pytest.mark.parametrize(
    "helper",
    [
        "import sys; sys.exit(3)",
        "import sys\nfor line in sys.stdin: print('[1]', flush=True)",
        'import sys\nanswer = \'[28, 28, 1, "png", "p", "d", "#not base64#"]\'\n'
        "for line in sys.stdin: print('[' + ', '.join([answer] * 4) + ']', flush=True)",
        # Right in form, but the bytes are not those whose digest it gives.
        "import base64, json, sys\nfor line in sys.stdin:\n"
        "    _allowance, _limit, paths = json.loads(line)\n"
        "    other = base64.b64encode(b'other bytes').decode()\n"
        "    print(json.dumps([[28, 28, 1, 'png', 'p', 'd' * 64, other] for _ in paths]), "
        "flush=True)",
    ],
    ids=["dies", "answers nonsense", "sends bytes that are not base64", "sends other bytes"],
)
def test_a_failing_probe_helper_leaves_the_work_to_this_process(tmp_path, monkeypatch, helper):
    from tessera import probing
    from tessera.media import probe_file

    monkeypatch.setattr(probing, "_HELPER", helper)
    paths = _tiny_pngs(tmp_path / "imgs", 40)
    results, helped = probing._probe_files(paths, helper_above=1, chunk=4, kept=_kept())
    assert results == [(probe_file(p), p.read_bytes()) for p in paths]
    assert helped == 0


def test_a_folder_of_thumbnails_logs_the_same_with_the_probe_helper(tmp_path, monkeypatch):
    """log_dataset of many tiny files uses the helper; a corrupt one is refused, store unchanged."""
    from tessera import probing
    from tessera.media import probe_file

    helped = []
    real = probing._probe_files

    def counted(paths, helper_above, chunk, kept):
        results, count = real(paths, 10, 4, kept)
        helped.append(count)
        return results, count

    monkeypatch.setattr(probing, "_probe_files", counted)
    paths = _tiny_pngs(tmp_path / "imgs", 60)
    store = tmp_path / "store"
    with tessera.init(project="p", dir=store) as run:
        dsv = run.log_dataset(tessera.Dataset.from_folder(tmp_path / "imgs", name="thumbs"))
        table = dsv.table(["id", "pixels", "width"]).to_pylist()
        assert [row["pixels"] for row in table] == [probe_file(p).pixels for p in paths]
        assert {row["width"] for row in table} == {28}
        assert helped[0] > 0
        state = store_state(store)
        paths[37].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
        with pytest.raises(tessera.ImageError, match=r"t037\.png is not a readable image"):
            run.log_dataset(tessera.Dataset.from_folder(tmp_path / "imgs", name="thumbs"))
        assert store_state(store) == state


def test_a_sample_table_that_reads_back_damaged_is_not_indexed(tmp_path, monkeypatch):
    """The commit reads the sample table back to index its samples, and checks it against its
    digest: bytes the store gives back altered (a damaged bucket or disk) refuse the commit,
    which records no version."""
    from tessera.errors import StoreCorruptError
    from tessera.store.blobs import LocalBlobStore

    ds = tessera.Dataset("tiny", classes=["a", "b"])
    for i in range(3):
        ds.add(f"s{i}", np.full((4, 4), i, dtype=np.uint8), i % 2)
    real_read = LocalBlobStore.read

    def damaged_read(self: LocalBlobStore, digest: str) -> bytes:
        data = real_read(self, digest)
        return data[:-1] + bytes([data[-1] ^ 1]) if data.startswith(b"PAR1") else data

    monkeypatch.setattr(LocalBlobStore, "read", damaged_read)
    with (
        tessera.init(project="p", dir=tmp_path / "store") as run,
        pytest.raises(StoreCorruptError, match="sample table .* does not hash to its name"),
    ):
        run.log_dataset(ds)
    monkeypatch.undo()
    with tessera.open_store(tmp_path / "store") as store:
        assert store.artifacts() == []


def test_an_image_file_that_changes_between_decoding_and_upload_is_refused(tmp_path, monkeypatch):
    """The probe hashes each file before decoding it. Files whose bytes were not kept for the
    upload (over the budget) are read again; if those bytes then hash otherwise, the sample's
    recorded pixels, size and format would describe other bytes than the stored ones, so nothing
    is committed and the error names a changed file."""
    from tessera.api import dataset as dataset_module
    from tessera.backend.local import LocalBackend

    monkeypatch.setattr(dataset_module, "_KEPT_BYTES", 0)
    folder = tmp_path / "imgs" / "a"
    paths = _tiny_pngs(folder, 40)
    real_upload = LocalBackend.upload
    edits = []

    def upload_after_an_edit(self, project, sources):
        if not edits:  # the images' upload, which comes after every image was decoded
            PILImage.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(paths[7])
            edits.append(paths[7])
        return real_upload(self, project, sources)

    monkeypatch.setattr(LocalBackend, "upload", upload_after_an_edit)
    with tessera.init(project="p", dir=tmp_path / "store") as run:
        ds = tessera.Dataset.from_folder(tmp_path / "imgs")
        with pytest.raises(tessera.DatasetError, match=r"1 image files changed .*t007\.png"):
            run.log_dataset(ds)
        assert edits == [paths[7]]
    monkeypatch.undo()
    with tessera.open_store(tmp_path / "store") as store:
        assert store.artifacts() == []
    with tessera.init(project="p", dir=tmp_path / "store") as run:  # stable now: logged
        version = run.log_dataset(tessera.Dataset.from_folder(tmp_path / "imgs"))
    expected = PILImage.open(paths[7])
    assert np.array_equal(version.array("t007"), np.asarray(expected))


def _jpegs(root: Path, count: int) -> list[Path]:
    """64x64 colour JPEGs of a few KB: probed in threads, by Pillow's JPEG plugin."""
    return _random_images(root, count, (64, 64, 3), ".jpg")


@pytest.mark.parametrize("kind", ["tiny PNGs", "JPEGs"])
def test_the_bytes_decoded_are_the_bytes_stored(tmp_path, monkeypatch, kind):
    """Within the budget, log_dataset stores the bytes it decoded, not the file read again: an
    edit after the decode does not reach the store, and the version is consistent (its pixel
    digests are those of its stored images). Files past the budget are read again. Thumbnails
    are probed in this thread, larger files in threads; an in-memory image whose id takes a
    file's path is stored beside it."""
    from tessera.api import dataset as dataset_module
    from tessera.backend.local import LocalBackend
    from tessera.media import pixel_digest

    folder = tmp_path / "imgs" / "a"
    paths = _tiny_pngs(folder, 40) if kind == "tiny PNGs" else _jpegs(folder, 40)
    originals = {p.stem: np.asarray(PILImage.open(p)) for p in paths}
    monkeypatch.setattr(dataset_module, "_KEPT_BYTES", 20 * max(p.stat().st_size for p in paths))
    real_upload = LocalBackend.upload
    stored_from: dict[str, str] = {}  # artifact path -> "bytes" or "file"
    edited: list[Path] = []

    def upload_after_an_edit(self, project, sources):
        if not stored_from:  # the images' upload, after every image was decoded
            stored_from.update((s.path, "file" if s.data is None else "bytes") for s in sources)
            kept = next(s for s in sources if s.data is not None and s.local is None)
            path = folder / kept.path.rpartition("/")[2]
            if path.exists():  # not the in-memory image
                PILImage.fromarray(np.zeros((9, 9), dtype=np.uint8)).save(path, "PNG")
                edited.append(path)
        return real_upload(self, project, sources)

    monkeypatch.setattr(LocalBackend, "upload", upload_after_an_edit)
    ds = tessera.Dataset.from_folder(tmp_path / "imgs")
    in_memory = np.full((8, 8), 7, dtype=np.uint8)
    ds.add(paths[1].name, in_memory)  # its path, images/t001.<ext>, is its file's already
    with tessera.init(project="p", dir=tmp_path / "store") as run:
        version = run.log_dataset(ds)
    assert set(stored_from.values()) == {"bytes", "file"} and len(edited) == 1
    assert np.asarray(PILImage.open(edited[0])).shape == (9, 9)  # the file is another image now
    pixels = {row["id"]: row["pixels"] for row in version.table(["id", "pixels"]).to_pylist()}
    for stem, original in originals.items():  # what was decoded, the edited file's included
        assert np.array_equal(version.array(stem), original)
        assert pixels[stem] == pixel_digest(original)
    assert np.array_equal(version.array(paths[1].name), in_memory)
