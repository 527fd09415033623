"""Predictions: model outputs bound to a dataset version by sample id.

Every validation error leaves the store as it was; streaming round-trips exactly across Parquet
row groups; masks are media stored once across rows and rounds.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import tessera
from conftest import MAIN_KINDS, read_blob, store_state, stored_blobs
from tessera.api import predictions as predictions_module
from test_datasets import (
    N_SEED,
    SEED_PROJECT,
    added_kinds,
    copy_store,
    seed_store,
)

both = pytest.mark.both_backends(kinds=MAIN_KINDS)

CLASSES = ["cat", "dog", "bird"]  # deliberately not sorted: names map by the dataset's order
IDS = [f"s{i:02d}" for i in range(12)]


@pytest.fixture(scope="session")
def seed(tmp_path_factory):
    return seed_store(tmp_path_factory)


@pytest.fixture
def small(backend_kind, shared_stores, monkeypatch):
    """A store (one per kind, shared by the module's tests) with a 12-sample dataset, and a
    run of this test on it."""

    def build(store):
        rng = np.random.default_rng(3)
        ds = tessera.Dataset("small", classes=CLASSES)
        for i, sid in enumerate(IDS):
            ds.add(sid, rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), CLASSES[i % 3])
        with tessera.init(project="p", name="maker", dir=store) as run:
            run.log_dataset(ds)

    store, _ = shared_stores.get("predictions-small", backend_kind, build, monkeypatch)
    with tessera.init(project="p", name="evaluator", dir=store) as run:
        yield store, run, run.use_dataset("small:v0")


def _scores(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(3), size=n).astype(np.float32)


def _stored_table(tv: tessera.TableVersion):
    """The predictions as stored: a dict of columns, scores as an N x K float32 array."""
    table = tv.to_arrow()
    out = table.to_pydict()
    if "scores" in out:
        out["scores"] = np.array(out["scores"], dtype=np.float32)
    return out


# -- validation ----------------------------------------------------------------------------------

FOUR = IDS[:4]
BAD_CALLS = {
    "unknown ids": (
        dict(ids=["s00", "x1", "x2", "x3", "x4", "x5", "x6", "x7"], pred=[0] * 8),
        r"^7 ids are not in p/small:v0 \(first: 'x1', 'x2', 'x3', 'x4', 'x5'\); predictions "
        r"must be made on samples of the dataset version",
    ),
    "duplicate ids": (
        dict(ids=["s00", "s01", "s00", "s01", "s02"], pred=[0] * 5),
        r"duplicate ids in this batch: 's00', 's01'$",
    ),
    "pred shorter than ids": (dict(ids=FOUR, pred=[0, 1, 2]), "'pred' has 3 rows for 4 ids"),
    "scores longer than ids": (
        dict(ids=FOUR, scores=_scores(5)),
        "'scores' has 5 rows for 4 ids",
    ),
    "other column shorter": (dict(ids=FOUR, loss=[0.1, 0.2]), "'loss' has 2 rows for 4 ids"),
    "NaN in scores": (
        dict(ids=FOUR, scores=np.where(np.arange(12).reshape(4, 3) == 7, np.nan, 0.5)),
        r"scores contain NaN or infinity \(first in row 2 of this batch\)",
    ),
    "inf in scores": (
        dict(ids=FOUR, scores=np.where(np.arange(12).reshape(4, 3) == 3, np.inf, 0.5)),
        r"NaN or infinity \(first in row 1",
    ),
    "-inf in scores": (
        dict(ids=FOUR, scores=np.where(np.arange(12).reshape(4, 3) == 11, -np.inf, 0.5)),
        r"NaN or infinity \(first in row 3",
    ),
    "scores width": (
        dict(ids=FOUR, scores=np.full((4, 2), 0.5)),
        "scores have 2 columns but p/small:v0 has 3 classes",
    ),
    "scores one-dimensional": (
        dict(ids=FOUR, scores=np.full(4, 0.5)),
        r"scores must be N x classes, got shape \(4,\)",
    ),
    "scores of strings": (dict(ids=FOUR, scores=[["a", "b", "c"]] * 4), "scores must be numbers"),
    "scores as a string": (dict(ids=FOUR, scores="high"), "'scores' has 0 rows for 4 ids"),
    "unknown class names": (
        dict(ids=FOUR, pred=["cat", "wolf", "dog", "fox"]),
        r"unknown class names in pred: 'fox', 'wolf'; the classes are \['cat', 'dog', 'bird'\]",
    ),
    "pred index too large": (
        dict(ids=FOUR, pred=[0, 1, 3, 0]),
        r"pred has class indices outside 0\.\.2 \(min 0, max 3\)",
    ),
    "pred index negative": (
        dict(ids=FOUR, pred=torch.tensor([-1, 0, 1, 2])),
        r"outside 0\.\.2 \(min -1, max 2\)",
    ),
    "pred of floats": (dict(ids=FOUR, pred=[0.0, 1.0, 2.0, 1.0]), "got dtype float64"),
    "pred two-dimensional": (dict(ids=FOUR, pred=np.zeros((4, 3), int)), "one class per sample"),
    "ragged column": (dict(ids=FOUR, loss=[[1, 2], [3], [4], [5]]), "cannot be read as an array"),
    "ids two-dimensional": (
        dict(ids=[FOUR, FOUR], pred=[0] * 4),
        r"ids must be one-dimensional, got shape \(2, 4\)",
    ),
    "ids as one string": (dict(ids="s00", pred=[0]), "ids must be one-dimensional"),
    "ids with an empty one": (dict(ids=["s00", ""], pred=[0, 1]), "ids contain an empty string"),
    "a column named id": (dict(ids=FOUR, pred=[0] * 4, id=FOUR), "'id' is reserved"),
    "no columns": (dict(ids=FOUR), "no prediction columns given"),
    "empty": (dict(ids=[], pred=[]), "no predictions were added; nothing was logged"),
    "empty arrays": (
        dict(ids=np.array([], dtype=str), scores=np.zeros((0, 3))),
        "no predictions were added",
    ),
}


@both
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_predictions_are_refused_and_store_unchanged(small, case):
    store, run, dsv = small
    kwargs, message = BAD_CALLS[case]
    state = store_state(store)
    with pytest.raises(tessera.PredictionError, match=message) as info:
        run.log_predictions(dsv, **kwargs)
    assert isinstance(info.value, tessera.TesseraError) and isinstance(info.value, ValueError)
    if case == "unknown ids":
        assert "x6" not in str(info.value) and "s00" not in str(info.value)
    assert store_state(store) == state


@both
def test_wrong_argument_types_are_refused(small):
    store, run, dsv = small
    state = store_state(store)
    for not_a_dataset in ("small:v0", dsv.table(), run.tables):
        with pytest.raises(TypeError, match="logged against a DatasetVersion"):
            run.log_predictions(not_a_dataset, FOUR, pred=[0] * 4)
        with pytest.raises(TypeError, match="logged against a DatasetVersion"):
            run.predictions(not_a_dataset)
    with tessera.open_store(store) as browser:
        plain = browser.artifact("p/small:v0")
        assert isinstance(plain, tessera.DatasetVersion)
    with pytest.raises(tessera.InvalidNameError, match="invalid table name"):
        run.log_predictions(dsv, FOUR, name="my preds", pred=[0] * 4)
    assert store_state(store) == state


@both
def test_streaming_errors_store_nothing(small, monkeypatch):
    store, run, dsv = small
    monkeypatch.setattr(predictions_module, "ROW_GROUP_ROWS", 3)  # row groups get flushed
    state = store_state(store)
    with (
        pytest.raises(
            tessera.PredictionError,
            match=r"2 ids already have predictions here \(first: 's03', 's04'\)",
        ),
        run.predictions(dsv) as p,
    ):
        p.add(ids=IDS[:5], pred=[0] * 5, scores=_scores(5))
        p.add(ids=IDS[3:8], pred=[0] * 5, scores=_scores(5))
    assert store_state(store) == state

    with pytest.raises(RuntimeError, match="model crashed"), run.predictions(dsv) as p:
        for start in range(0, 9, 3):
            p.add(ids=IDS[start : start + 3], pred=[1] * 3, scores=_scores(3))
        raise RuntimeError("model crashed")
    assert p.num_rows == 9
    assert store_state(store) == state

    with pytest.raises(KeyboardInterrupt), run.predictions(dsv) as p:
        p.add(ids=IDS[:4], pred=[1] * 4)
        raise KeyboardInterrupt
    assert store_state(store) == state

    same_columns = "every batch needs the same columns"
    with pytest.raises(tessera.PredictionError, match=same_columns), run.predictions(dsv) as p:
        p.add(ids=IDS[:4], pred=[1] * 4, scores=_scores(4))
        p.add(ids=IDS[4:8], pred=[1] * 4)
    assert store_state(store) == state

    with pytest.raises(tessera.PredictionError, match="no predictions"), run.predictions(dsv):
        pass
    assert store_state(store) == state


@both
def test_a_rejected_batch_leaves_the_writer_usable(small):
    _store, run, dsv = small
    scores = _scores(12, seed=4)
    bad = scores[4:8].copy()
    bad[1, 1] = np.nan
    with run.predictions(dsv, name="retry") as p:
        p.add(ids=IDS[:4], pred=scores[:4].argmax(1), scores=scores[:4])
        with pytest.raises(tessera.PredictionError, match="NaN"):
            p.add(ids=IDS[4:8], pred=scores[4:8].argmax(1), scores=bad)
        with pytest.raises(tessera.PredictionError, match="not in"):
            p.add(ids=["s08", "nope"], pred=[0, 0], scores=scores[8:10])
        # the rejected ids were not marked as done: they can be added now
        p.add(ids=IDS[4:12], pred=scores[4:].argmax(1), scores=scores[4:])
        assert p.num_rows == 12
    tv = run.tables()[-1]
    assert (tv.name, tv.num_rows) == ("retry", 12)
    stored = _stored_table(tv)
    assert stored["id"] == IDS
    np.testing.assert_array_equal(stored["scores"], scores)
    with pytest.raises(tessera.PredictionError, match="writer is closed"):
        p.add(ids=IDS[:1], pred=[0])
    with pytest.raises(tessera.PredictionError, match="already closed"):
        p.close()


@both
def test_a_rejected_batch_leaves_no_media_behind(small):
    _store, run, dsv = small
    masks = np.arange(4 * 5 * 5, dtype=np.uint8).reshape(4, 5, 5) + 17
    with run.predictions(dsv, name="masked") as p:
        p.add(ids=IDS[:4], pred=[0] * 4, mask=np.zeros((4, 5, 5), np.uint8))
        with pytest.raises(tessera.PredictionError, match="rows for 4 ids"):
            p.add(ids=IDS[4:8], mask=masks, pred=[0] * 3)
    tv = run.tables()[-1]
    assert [f.path for f in tv.files() if f.path.startswith("media/")] == [
        f"media/{tv.to_pandas()['mask'][0].digest}.png"
    ]


# -- what is stored ------------------------------------------------------------------------------


@both
def test_prediction_columns_round_trip(small):
    _store, run, dsv = small
    scores = torch.from_numpy(_scores(6, seed=9).astype(np.float64))
    embedding = np.arange(6 * 4, dtype=np.float32).reshape(6, 4) / 7
    ids = np.array(["s05", "s00", "s11", "s03", "s07", "s01"])
    tv = run.log_predictions(
        dsv,
        ids,
        name="columns",
        pred=["bird", "cat", "dog", "bird", "cat", "cat"],
        scores=scores,
        loss=np.linspace(0, 1, 6),
        correct=np.array([True, False, True, True, False, False]),
        note=["a", "b", "c", "d", "e", "f"],
        embedding=embedding,
    )
    assert tv.type == "predictions" and tv.kind == "predictions" and tv.dataset == dsv
    stored = _stored_table(tv)
    assert stored["id"] == ids.tolist()
    assert stored["pred"] == [2, 0, 1, 2, 0, 0]  # names map by the dataset's class order
    np.testing.assert_array_equal(stored["scores"], scores.numpy().astype(np.float32))
    assert stored["loss"] == np.linspace(0, 1, 6).tolist()
    assert stored["correct"] == [True, False, True, True, False, False]
    assert stored["note"] == list("abcdef")
    np.testing.assert_array_equal(np.array(stored["embedding"], np.float32), embedding)
    assert tv.metadata["classes"] == CLASSES and tv.metadata["dataset_digest"] == dsv.digest
    # integer ids (and torch tensors of them) name samples whose ids are decimal text
    ds = tessera.Dataset("numbered")
    for i in range(5):
        ds.add(i * 10, np.full((2, 2), i, np.uint8))
    numbered = run.log_dataset(ds)
    assert numbered.ids == ["0", "10", "20", "30", "40"]
    tv = run.log_predictions(numbered, torch.tensor([40, 0]), name="by-number", score=[0.5, 1.5])
    assert _stored_table(tv) == {"id": ["40", "0"], "score": [0.5, 1.5]}
    with pytest.raises(tessera.PredictionError, match=r"has no class names; give pred as class"):
        run.log_predictions(numbered, [0], name="by-number", pred=["cat"])


@both
def test_masks_are_media_stored_once_across_rows_and_rounds(small):
    store, run, dsv = small
    patterns = np.zeros((3, 8, 8), np.uint8)
    patterns[0, :4] = 1
    patterns[1, :, :4] = 2
    patterns[2, 2:6, 2:6] = 1
    masks = patterns[[i % 3 for i in range(12)]]
    before = stored_blobs(store)
    first = run.log_predictions(dsv, IDS, name="seg", pred=[0] * 12, mask=masks)
    assert added_kinds(store, before) == ["manifest", "parquet", "png", "png", "png"]
    assert first.image_columns == ["mask"]
    media = sorted(f.path for f in first.files() if f.path.startswith("media/"))
    assert len(media) == 3
    refs = first.to_pandas()["mask"].tolist()
    assert len({r.digest for r in refs}) == 3
    for ref, mask in zip(refs, masks, strict=True):
        assert ref.dataset is None and ref.id is None
        np.testing.assert_array_equal(ref.array(), mask)

    # round 2: other predictions, the same masks (streamed, repeated across batches)
    before = stored_blobs(store)
    with run.predictions(dsv, name="seg") as p:
        for start in (0, 5, 9):
            stop = {0: 5, 5: 9, 9: 12}[start]
            p.add(ids=IDS[start:stop], pred=[1] * (stop - start), mask=masks[start:stop])
    second = run.tables()[-1]
    assert second.version == "v1"
    assert added_kinds(store, before) == ["manifest", "parquet"]
    assert sorted(f.path for f in second.files() if f.path.startswith("media/")) == media
    for digest in {r.digest for r in refs}:
        assert read_blob(store, digest)[:4] == b"\x89PNG"


# -- streaming at scale --------------------------------------------------------------------------


def _stream_and_check(run, dsv, store, batch_size: int, seed: int) -> None:
    ids = np.array(dsv.ids)
    n = len(ids)
    order = np.random.default_rng(seed).permutation(n)
    scores = _scores(n, seed=seed)
    pred = scores.argmax(1)
    loss = np.random.default_rng(seed + 1).random(n)
    with run.predictions(dsv, name="stream") as p:
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            p.add(ids=ids[rows], pred=pred[rows], scores=scores[rows], loss=loss[rows])
    tv = run.tables()[-1]
    assert tv.num_rows == n
    stored = _stored_table(tv)
    assert stored["id"] == ids[order].tolist()
    assert stored["pred"] == pred[order].tolist()
    np.testing.assert_array_equal(stored["scores"], scores[order])  # float32, bit for bit
    assert stored["loss"] == loss[order].tolist()
    group = predictions_module.ROW_GROUP_ROWS
    (entry,) = tv.files()
    parquet = pq.ParquetFile(pa.BufferReader(read_blob(store, entry.digest)))
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    assert sizes == [group] * (n // group) + ([n % group] if n % group else [])
    assert len(sizes) >= 3
    # the same rows in one call: identical bytes, so the same version
    again = run.log_predictions(
        dsv, ids[order], name="stream", pred=pred[order], scores=scores[order], loss=loss[order]
    )
    assert again == tv


@both
def test_streaming_crosses_row_groups_and_round_trips(tmp_path, seed, monkeypatch):
    """The row-group logic at a size the seed dataset can fill (1,000 samples, groups of 300,
    batches of 77); the next test does the same at the real size, 150,000 rows."""
    monkeypatch.setattr(predictions_module, "ROW_GROUP_ROWS", 300)
    store = copy_store(seed, tmp_path / "store")
    with tessera.init(project=SEED_PROJECT, dir=store) as run:
        dsv = run.use_dataset("seed:v0")
        assert dsv.num_samples == N_SEED
        _stream_and_check(run, dsv, store, batch_size=77, seed=1)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("TESSERA_SLOW_TESTS"),
    reason="logging a 150,000-sample dataset takes ~90 s; set TESSERA_SLOW_TESTS=1 to run",
)
def test_streaming_150000_predictions_in_batches_of_1000(tmp_path):
    n = 150_000
    ds = tessera.Dataset("big", classes=["a", "b", "c"])
    pixel = np.zeros((1, 1), np.uint8)
    for i in range(n):
        ds.add(f"b{i:06d}", pixel, i % 3)
    with tessera.init(project="p", dir=tmp_path / "store") as run:
        dsv = run.log_dataset(ds)
        assert predictions_module.ROW_GROUP_ROWS == 65_536
        _stream_and_check(run, dsv, tmp_path / "store", batch_size=1000, seed=2)


@both
def test_message_for_unknown_ids_counts_all_of_them(small):
    _store, run, dsv = small
    unknown = [f"zz{i}" for i in range(40)]
    with pytest.raises(tessera.PredictionError) as info:
        run.log_predictions(dsv, [*IDS[:3], *unknown], pred=[0] * 43)
    message = str(info.value)
    assert message.startswith("40 ids are not in p/small:v0")
    assert re.findall(r"'(zz\d+)'", message) == unknown[:5]
