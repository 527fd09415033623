"""Tables: evaluation rounds logged three ways add no image bytes and join back to their samples;
preprocessed arrays become new media once; reading tables back; every bad table and image."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from PIL import Image as PILImage

import tessera
from conftest import MAIN_KINDS, store_state, stored_blobs
from test_datasets import (
    CLASSES,
    N_SEED,
    SEED_PROJECT,
    SEED_SPEC,
    added_kinds,
    copy_store,
    seed_store,
)

both = pytest.mark.both_backends(kinds=MAIN_KINDS)


@pytest.fixture(scope="session")
def seed(tmp_path_factory):
    return seed_store(tmp_path_factory)


def model_outputs(n: int, round: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic stand-in for one evaluation round: class scores and their argmax."""
    scores = np.random.default_rng(100 + round).dirichlet(np.ones(len(CLASSES)), size=n)
    scores = scores.astype(np.float32)
    return scores.argmax(1), scores


# -- the seed workflow ---------------------------------------------------------------------------


# Not on PostgreSQL + S3: 60-80 s per way there (the 1,000 seed images logged to the bucket,
# the bucket listed before and after each round); test_torch runs the seed workflow on it.
@pytest.mark.both_backends(kinds=["local", "http"])
@pytest.mark.parametrize("way", ["ids", "paths", "arrays"])
def test_evaluation_rounds_add_no_image_bytes(tmp_path, seed, way):
    """Five rounds over 1,000 dataset images, logged by id, as Image(path) cells and as
    Image(np.asarray(PIL.Image.open(path))) cells: each round adds one Parquet file and one
    manifest, nothing else, and every row names the sample its image came from."""
    store = copy_store(seed, tmp_path / "store")
    images = seed.images
    image_bytes = sum(path.stat().st_size for path in images.paths.values())
    with tessera.init(project=SEED_PROJECT, name=f"eval-{way}", dir=store) as run:
        dsv = run.use_dataset("seed:v0")
        digest_of = dict(zip(*dsv.table(["id", "image"]).to_pydict().values(), strict=True))
        for round in range(5):
            order = [str(s) for s in np.random.default_rng(round).permutation(images.ids)]
            pred, scores = model_outputs(len(order), round)
            before = stored_blobs(store)
            with warnings.catch_warnings():
                warnings.simplefilter("error", tessera.UnmatchedImagesWarning)
                if way == "ids":
                    tv = run.log_predictions(dsv, order, pred=pred, scores=scores)
                else:
                    table = tessera.Table(columns=["image", "label", "pred"])
                    for sid, p in zip(order, pred, strict=True):
                        if way == "paths":
                            cell = tessera.Image(images.paths[sid])
                        else:  # images.arrays holds np.asarray(PIL.Image.open(path))
                            cell = tessera.Image(images.arrays[sid])
                        table.add_data(cell, images.labels[sid], CLASSES[p])
                    run.log({"eval": table})
                    tv = run.tables()[-1]
            after = stored_blobs(store)

            # storage: one Parquet file and the manifest; no image of any kind
            added = set(after) - set(before)
            (parquet,) = tv.files()
            assert parquet.path == ("predictions.parquet" if way == "ids" else "table.parquet")
            assert added == {parquet.digest, tv.digest}
            assert added_kinds(store, before) == ["manifest", "parquet"]
            assert sum(after[d] for d in added) < image_bytes / 10
            assert tv.version == f"v{round}" and tv.num_rows == N_SEED
            assert tv.dataset == dsv

            # joins: every row is the sample its image (or id) came from
            frame = tv.to_pandas()
            assert list(frame["id"]) == order
            if way == "ids":
                assert tv.kind == "predictions" and tv.image_columns == []
                assert frame["pred"].tolist() == pred.tolist()
                np.testing.assert_array_equal(np.stack(frame["scores"]), scores)
                continue
            assert tv.kind == "table" and tv.image_columns == ["image"]
            assert frame["label"].tolist() == [images.labels[s] for s in order]
            assert frame["pred"].tolist() == [CLASSES[p] for p in pred]
            for row, (sid, ref) in enumerate(zip(order, frame["image"], strict=True)):
                assert isinstance(ref, tessera.ImageRef)
                assert (ref.dataset, ref.id) == (SEED_SPEC, sid)
                assert ref.digest == digest_of[sid]
                if round == 0 or row % 10 == round:  # decoding every cell each round is slow
                    np.testing.assert_array_equal(ref.array(), images.arrays[sid])
        assert [t.version for t in run.tables()] == [f"v{r}" for r in range(5)]
    assert added_kinds(store, []).count("jpeg") == N_SEED  # the originals, once


@pytest.mark.both_backends(kinds=["local", "http"])  # logs the 1,000 seed images afresh
def test_preprocessed_arrays_are_stored_as_new_media_once(tmp_path, seed):
    store = copy_store(seed, tmp_path / "store")
    images = seed.images

    def preprocess(path) -> np.ndarray:
        with PILImage.open(path) as image:
            small = np.asarray(image.resize((24, 24), PILImage.BILINEAR), dtype=np.float32)
        return (small / 255 - 0.5) / 0.25

    ids = images.ids[:300]
    arrays = {sid: preprocess(images.paths[sid]) for sid in ids}

    def round_table(round: int) -> tessera.Table:
        pred, _ = model_outputs(len(ids), round)
        table = tessera.Table(columns=["id", "image", "pred"])
        for sid, p in zip(ids, pred, strict=True):
            table.add_data(sid, tessera.Image(arrays[sid]), CLASSES[p])
        return table

    with tessera.init(project=SEED_PROJECT, dir=store) as run:
        before = stored_blobs(store)
        with pytest.warns(tessera.UnmatchedImagesWarning, match="300 images in table") as info:
            first = run.log_table("prep", round_table(0))
        after = stored_blobs(store)
        assert added_kinds(store, before) == ["manifest", "parquet", *["png"] * len(ids)]
        media = sum(after[e.digest] for e in first.files() if e.path.startswith("media/"))
        assert media > 0 and f"({media:,} new bytes)" in str(info[0].message)
        assert first.dataset is None  # no cell matched a sample
        frame = first.to_pandas()
        assert list(frame["id"]) == ids
        for sid, ref in list(zip(frame["id"], frame["image"], strict=True))[::50]:
            assert ref.dataset is None and ref.id is None
            x = arrays[sid].astype(np.float64)
            scaled = np.rint((x - x.min()) * (255.0 / (x.max() - x.min()))).astype(np.uint8)
            np.testing.assert_array_equal(ref.array(), scaled)

        state = store_state(store)
        with pytest.warns(tessera.UnmatchedImagesWarning):
            again = run.log_table("prep", round_table(0))
        assert again == first and again.version == "v0"
        assert store_state(store) == state  # not a byte, not a row

        with pytest.warns(tessera.UnmatchedImagesWarning):
            second = run.log_table("prep", round_table(1))
        assert second.version == "v1"
        assert added_kinds(store, state["blobs"]) == ["manifest", "parquet"]


# -- reading tables ------------------------------------------------------------------------------


def _small_dataset(run: tessera.Run, n: int = 6) -> tuple[tessera.DatasetVersion, list]:
    rng = np.random.default_rng(11)
    arrays = [rng.integers(0, 256, (5, 6, 3), dtype=np.uint8) for _ in range(n)]
    ds = tessera.Dataset("small", classes=["a", "b", "c"])
    for i, array in enumerate(arrays):
        ds.add(f"s{i}", array, i % 3)
    return run.log_dataset(ds), arrays


@both
def test_tables_read_back(tmp_path):
    store = tmp_path / "store"
    with tessera.init(project="p", name="first", dir=store) as run:
        dsv, arrays = _small_dataset(run)
        stranger = np.full((3, 3), 7, np.uint8)
        table = tessera.Table(columns=["image", "thumb", "score", "note"])
        for i in (4, 0, 2):
            table.add_data(
                tessera.Image(
                    torch.from_numpy(arrays[i].transpose(2, 0, 1).copy()), caption=f"c{i}"
                ),
                stranger if i == 0 else None,
                np.float32(i / 2),
                None if i == 2 else f"n{i}",
            )
        with pytest.warns(tessera.UnmatchedImagesWarning, match="1 images in table 'a'"):
            run.log({"a": table, "loss": 0.5})
        assert run.history() == {"loss": [(0, 0.5)]}
        run.log({"b": tessera.Table.from_pandas(pd.DataFrame({"x": [1, 2], "y": ["u", "v"]}))})
        preds = run.log_predictions(dsv, ["s1", "s3"], pred=["b", "a"], loss=[0.1, 0.2])
        run.log_table("c", tessera.Table.from_arrow(pa.table({"k": [1.5, 2.5, 3.5]})))

        listed = run.tables()
        assert [(t.name, t.kind, t.version) for t in listed] == [
            ("a", "table", "v0"),
            ("b", "table", "v0"),
            ("predictions", "predictions", "v0"),
            ("c", "table", "v0"),
        ]
        a, b, p, c = listed
        assert all(isinstance(t, tessera.TableVersion) for t in listed)
        assert (a.num_rows, b.num_rows, p.num_rows, c.num_rows) == (3, 2, 2, 3)
        assert a.dataset == dsv and p.dataset == dsv and p == preds
        assert b.dataset is None and c.dataset is None
        assert a.image_columns == ["image", "thumb"]
        assert a.to_arrow().column_names == ["id", "image", "thumb", "score", "note"]
        assert a.to_arrow(["id", "score"]).to_pydict() == {
            "id": ["s4", "s0", "s2"],
            "score": [2.0, 0.0, 1.0],
        }
        frame = a.to_pandas()
        assert frame["note"].tolist()[:2] == ["n4", "n0"] and pd.isna(frame["note"][2])
        refs = frame["image"].tolist()
        assert [(r.dataset, r.id, r.caption) for r in refs] == [
            ("p/small:v0", f"s{i}", f"c{i}") for i in (4, 0, 2)
        ]
        for ref, i in zip(refs, (4, 0, 2), strict=True):
            np.testing.assert_array_equal(ref.array(), arrays[i])
        thumbs = frame["thumb"].tolist()
        assert thumbs[0] is None and thumbs[1].dataset is None and thumbs[2] is None
        np.testing.assert_array_equal(thumbs[1].array(), stranger)
        assert b.to_pandas().to_dict("list") == {"x": [1, 2], "y": ["u", "v"]}
        assert c.to_arrow().column("k").to_pylist() == [1.5, 2.5, 3.5]
        assert p.to_pandas()["pred"].tolist() == [1, 0]
        assert p.metadata["classes"] == ["a", "b", "c"] and p.metadata["dataset"] == dsv.spec
    with tessera.init(project="p", name="second", dir=store) as run:
        assert run.tables() == []
        run.log_table("b", tessera.Table(columns=["x", "y"], data=[[1, "u"], [2, "v"]]))
        (only,) = run.tables()
        assert only == b  # identical content: the same version, now also logged by this run
    with tessera.open_store(store) as browser:
        assert type(browser.artifact("p/a:v0")) is tessera.TableVersion
        assert browser.artifact("p/a:v0").to_arrow().equals(a.to_arrow())
        assert [r.name for r in browser.lineage("p/b:v0")["logged"]] == ["first", "second"]
        assert [r.name for r in browser.lineage("p/small:v0")["used"]] == ["first"]


@both
def test_reencoded_file_resolves_to_its_sample_by_pixels(tmp_path):
    store = tmp_path / "store"
    with tessera.init(project="p", dir=store) as run:
        dsv, arrays = _small_dataset(run)
        path = tmp_path / "copy.bmp"  # the same pixels, other bytes than the stored PNG
        PILImage.fromarray(arrays[3]).save(path)
        before = stored_blobs(store)
        with warnings.catch_warnings():
            warnings.simplefilter("error", tessera.UnmatchedImagesWarning)
            tv = run.log_table("t", tessera.Table(columns=["image"], data=[[tessera.Image(path)]]))
        assert tv.to_arrow().column("id").to_pylist() == ["s3"]
        assert tv.to_pandas()["image"][0].digest == dsv.image_digest("s3")
        assert added_kinds(store, before) == ["manifest", "parquet"]


@both
def test_images_bind_to_the_run_s_dataset_then_its_project_then_the_newest(tmp_path):
    """An image held by several dataset versions binds a table to the version its run used,
    not to a newer one with the same images, nor to another project's copy."""
    store = tmp_path / "store"
    with tessera.init(project="p", name="build", dir=store) as run:
        v0, arrays = _small_dataset(run)
        grown = tessera.Dataset("small", classes=["a", "b", "c"])  # v1: v0's images and more
        for i, array in enumerate([*arrays, np.zeros((5, 6, 3), np.uint8)]):
            grown.add(f"s{i}", array, i % 3)
        v1 = run.log_dataset(grown)
    with tessera.init(project="other", name="copy", dir=store) as run:
        elsewhere = tessera.Dataset("small", classes=["a", "b", "c"])
        for i, array in enumerate(arrays):
            elsewhere.add(f"o{i}", array, i % 3)
        newest = run.log_dataset(elsewhere)  # the newest version holding these images
    assert newest.created_at >= v1.created_at >= v0.created_at

    def logged_table(run: tessera.Run) -> tessera.TableVersion:
        rows = [[tessera.Image(array)] for array in arrays[:3]]
        return run.log_table("t", tessera.Table(columns=["image"], data=rows))

    with tessera.init(project="p", name="eval-v0", dir=store) as run:
        run.use_dataset("small:v0")
        tv = logged_table(run)
        assert tv.dataset.spec == v0.spec
        assert tv.to_arrow().column("id").to_pylist() == ["s0", "s1", "s2"]
    with tessera.init(project="p", name="no-dataset", dir=store) as run:
        assert logged_table(run).dataset.spec == v1.spec  # its project's newest, not "other"'s
    with tessera.init(project="other", name="there", dir=store) as run:
        tv = logged_table(run)
        assert tv.dataset.spec == newest.spec
        assert tv.to_arrow().column("id").to_pylist() == ["o0", "o1", "o2"]


@both
def test_a_table_read_back_logs_again_with_no_image_bytes(tmp_path):
    """The everyday loop: read a logged table with to_pandas(), keep some rows, log them. Its
    ImageRef cells keep their samples (even where another sample has the same image), its
    media cells their digests and captions, and nothing but a Parquet file and a manifest is
    stored. An ImageRef edited to name a sample that lacks its image is refused."""
    store = tmp_path / "store"
    with tessera.init(project="p", name="eval", dir=store) as run:
        dsv, arrays = _small_dataset(run)
    with tessera.init(project="q", name="twins", dir=store) as run:
        twin = tessera.Dataset("twins")  # two samples with the same image, in another project
        twin.add("left", arrays[0])
        twin.add("right", arrays[0])
        twins = run.log_dataset(twin)
        right_digest = twins.image_digest("right")
    with tessera.init(project="p", name="eval", dir=store) as run:
        run.use_dataset("small:v0")
        stranger = np.full((3, 3), 9, np.uint8)
        table = tessera.Table(columns=["image", "thumb", "pred"])
        for i in range(5):
            table.add_data(tessera.Image(arrays[i]), tessera.Image(stranger, caption=f"t{i}"), i)
        with pytest.warns(tessera.UnmatchedImagesWarning):
            first = run.log_table("eval", table)
        frame = first.to_pandas()
        assert frame["image"][0].id == "s0"
        # A cell naming the twin "right", whose image "left" has too: the name is kept.
        right = tessera.ImageRef(right_digest, twins.spec, "right", "mine")
        kept = frame[frame["pred"] % 2 == 0].copy()
        kept["image"] = [right, *kept["image"].tolist()[1:]]
        kept = kept.drop(columns="id")
        before = stored_blobs(store)
        with warnings.catch_warnings():
            warnings.simplefilter("error", tessera.UnmatchedImagesWarning)
            again = run.log_table("eval-even", tessera.Table.from_pandas(kept))
        assert added_kinds(store, before) == ["manifest", "parquet"]
        back = again.to_pandas()
        assert back["id"].tolist() == ["right", "s2", "s4"]  # "right", not its twin "left"
        assert [(r.dataset, r.id) for r in back["image"]] == [
            (twins.spec, "right"),
            (dsv.spec, "s2"),
            (dsv.spec, "s4"),
        ]
        assert again.dataset is None  # its first image column spans two dataset versions
        assert [(r.digest, r.caption) for r in back["thumb"]] == [
            (frame["thumb"][i].digest, f"t{i}") for i in (0, 2, 4)
        ]
        np.testing.assert_array_equal(back["thumb"][1].array(), stranger)

        forged = kept.copy()
        forged["image"] = [tessera.ImageRef(right.digest, dsv.spec, "s3", None)] * len(kept)
        state = store_state(store)
        with pytest.raises(tessera.TableError, match="names sample 's3' of p/small:v0, which"):
            run.log_table("forged", tessera.Table.from_pandas(forged))
        assert store_state(store) == state


# -- bad tables and images -----------------------------------------------------------------------


@both
def test_bad_images_and_tables_are_refused_and_store_unchanged(tmp_path):
    store = tmp_path / "store"
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(tessera.ImageError, match="cannot use a object as an image"):
        tessera.Image(object())
    with pytest.raises(tessera.ImageError, match="cannot use a list as an image"):
        tessera.Image([[1, 2], [3, 4]])
    with pytest.raises(tessera.ImageError, match=r"got shape \(1, 2, 3, 4, 5\)"):
        tessera.Image(np.zeros((1, 2, 3, 4, 5), np.uint8))
    with pytest.raises(tessera.ImageError, match=r"got shape \(7,\)"):
        tessera.Image(torch.zeros(7))
    with pytest.raises(tessera.ImageError, match="at least one pixel"):
        tessera.Image(np.zeros((0, 4), np.uint8))
    with pytest.raises(tessera.NotFoundError, match="no image file at .*absent.png"):
        tessera.Image(tmp_path / "absent.png")
    with pytest.raises(tessera.TableError, match="duplicate column names"):
        tessera.Table(columns=["a", "a"])
    table = tessera.Table(columns=["a", "b"])
    with pytest.raises(tessera.TableError, match="add_data got 1 values for 2 columns"):
        table.add_data(1)
    with pytest.raises(tessera.TableError, match="cannot take more rows"):
        tessera.Table.from_arrow(pa.table({"a": [1]})).add_data(2)

    with tessera.init(project="p", dir=store) as run:
        _small_dataset(run)
        state = store_state(store)

        def refused(table, error, message, name="t"):
            with pytest.raises(error, match=message):
                run.log({name: table})
            assert store_state(store) == state

        refused(tessera.Table(columns=["a"]), tessera.TableError, "has no rows")
        image = tessera.Image(np.zeros((3, 3), np.uint8))
        refused(
            tessera.Table(columns=["image"], data=[[image], [3]]),
            tessera.TableError,
            "column 'image' mixes images and int values",
        )
        refused(
            tessera.Table(columns=["v"], data=[[1], ["x"]]),
            tessera.TableError,
            "column 'v' of table 't' mixes types",
        )
        refused(
            tessera.Table(columns=["image"], data=[[image], [tessera.Image(corrupt)]]),
            tessera.ImageError,
            r"broken\.jpg is not a readable image",
        )
        refused(
            tessera.Table(columns=["a"], data=[[1]]),
            tessera.InvalidNameError,
            "invalid table name",
            "bad name!",
        )
        with pytest.raises(TypeError, match="log_table takes a tessera.Table"):
            run.log_table("t", [[1, 2]])
        with pytest.raises(TypeError, match="metrics must be numbers"):
            run.log({"t": [[1, 2]]})
        assert store_state(store) == state
