"""tessera.compare: joining runs' predictions by sample id, and every view on the join.

Each test builds a real store (tiny random images, runs logging predictions) and checks the
comparison's answers against sets and orders computed by hand from the same arrays.
"""

import json

import numpy as np
import pandas as pd
import pytest

import tessera
from conftest import MAIN_KINDS
from tessera.api.compare import CompareError
from tessera.errors import NotFoundError

CLASSES = ["cat", "dog", "fox"]
IDS = [f"s{i:02d}" for i in range(12)]
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
PREDS = {
    "base": np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 1]),
    "new": np.array([0, 0, 1, 1, 1, 1, 1, 2, 2, 0, 2, 2]),
    "extra": np.array([0, 1, 0, 0, 1, 0, 1, 1, 2, 2, 2, 2]),
}

both = pytest.mark.both_backends(kinds=MAIN_KINDS)


def tiny_images(count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (3, 3, 3), dtype=np.uint8) for _ in range(count)]


def make_dataset(name, ids, labels, images, classes=CLASSES):
    dataset = tessera.Dataset(name, classes=classes)
    for sid, label, image in zip(ids, labels, images, strict=True):
        dataset.add(sid, image, int(label))
    return dataset


def scores_for(pred, seed):
    """Continuous scores whose argmax is ``pred``."""
    rng = np.random.default_rng(seed)
    scores = rng.random((len(pred), len(CLASSES)))
    scores[np.arange(len(pred)), pred] += 1.0
    return scores


def stored(scores):
    return np.asarray(scores, dtype=np.float32).astype(np.float64)


def build_pets(store_dir):
    """pets:v0 (12 samples) and three runs, started base, new, extra but logging in the
    reverse order; base and new log scores, extra only class indices."""
    with tessera.init(project="zoo", name="maker", dir=store_dir) as run:
        version = run.log_dataset(make_dataset("pets", IDS, LABELS, tiny_images(12)))
    scores = {"base": scores_for(PREDS["base"], 1), "new": scores_for(PREDS["new"], 2)}
    runs = {
        name: tessera.init(project="zoo", name=name, config={"lr": lr}, dir=store_dir)
        for name, lr in (("base", 0.1), ("new", 0.01), ("extra", 1.0))
    }
    for name in ("extra", "new", "base"):
        with runs[name] as run:
            columns = {"pred": PREDS[name]}
            if name in scores:
                columns["scores"] = scores[name]
            run.log_predictions(version, IDS, **columns)
    return {"dir": store_dir, "scores": scores, "ids": {k: r.id for k, r in runs.items()}}


@pytest.fixture
def pets(backend_kind, shared_stores, monkeypatch):
    """The store of ``build_pets``, one per kind, shared by the tests that only read it (a
    comparison never writes to the store)."""
    return shared_stores.get("pets", backend_kind, build_pets, monkeypatch)[1]


def ids_where(mask):
    return [sid for sid, keep in zip(IDS, mask, strict=True) if keep]


@both
def test_runs_in_start_order_and_table(pets):
    with tessera.compare("pets:v0", dir=pets["dir"]) as c:
        assert [r.label for r in c.runs] == ["base", "new", "extra"]
        assert [r.id for r in c.runs] == [pets["ids"][k] for k in ("base", "new", "extra")]
        assert [r.config for r in c.runs] == [{"lr": 0.1}, {"lr": 0.01}, {"lr": 1.0}]
        assert [r.has_scores for r in c.runs] == [True, True, False]
        assert (c.n_common, c.left_out) == (12, 0)
        assert c.note == "12 samples predicted by all 3 runs"
        assert c.classes == CLASSES
        table = c.table()
    assert table.shape == (12, 10)
    assert list(table.columns) == [
        "id",
        "label",
        "base/pred",
        "base/correct",
        "base/score",
        "new/pred",
        "new/correct",
        "new/score",
        "extra/pred",
        "extra/correct",
    ]
    assert table["id"].tolist() == IDS
    assert table["label"].tolist() == [CLASSES[i] for i in LABELS]
    for name, pred in PREDS.items():
        assert table[f"{name}/pred"].tolist() == [CLASSES[i] for i in pred]
        assert table[f"{name}/correct"].tolist() == (pred == LABELS).tolist()
    for name, scores in pets["scores"].items():
        np.testing.assert_allclose(
            table[f"{name}/score"], stored(scores)[np.arange(12), LABELS], rtol=1e-6
        )


@both
def test_confusion_and_samples_of_a_cell_row_and_column(pets):
    with tessera.compare("pets:v0", dir=pets["dir"]) as c:
        for name, pred in PREDS.items():
            confusion = c.confusion(name)
            assert confusion.index.tolist() == CLASSES
            assert confusion.columns.tolist() == CLASSES
            assert confusion.index.name == "true" and confusion.columns.name == "predicted"
            for t, true in enumerate(CLASSES):
                for p, predicted in enumerate(CLASSES):
                    expected = ids_where(np.equal(LABELS, t) & (pred == p))
                    assert confusion.loc[true, predicted] == len(expected)
                    cell = c.samples(name, true, predicted)
                    assert cell["id"].tolist() == expected
                    assert c.samples(name, t, p)["id"].tolist() == expected  # by index
                assert c.samples(name, true=true)["id"].tolist() == ids_where(np.equal(LABELS, t))
                assert c.samples(name, pred=true)["id"].tolist() == ids_where(pred == t)
        cell = c.samples("base", "cat", "dog")
        assert cell["label"].tolist() == ["cat"] and cell["pred"].tolist() == ["dog"]
        assert cell["score"].iloc[0] == pytest.approx(stored(pets["scores"]["base"])[3, 0])
        assert c.samples("base")["id"].tolist() == IDS  # no filter: every compared sample
        with pytest.raises(NotFoundError, match="unknown true class 'cow'"):
            c.samples("base", "cow")


@both
def test_disagreements_regressions_and_improvements(pets):
    base, new, extra = PREDS["base"], PREDS["new"], PREDS["extra"]
    with tessera.compare("pets:v0", dir=pets["dir"]) as c:
        disagree = c.disagreements()
        assert disagree["id"].tolist() == ids_where((base != new) | (new != extra))
        assert list(disagree.columns) == list(c.table().columns)

        # table(where=...) filters in DuckDB: the same rows as filtering the whole table.
        whole = c.table()
        base_wrong = whole[whole["base/correct"] == False]  # noqa: E712 - a pandas mask
        filtered = c.table("SELECT sid FROM p WHERE run = ? AND NOT correct", [0])
        assert filtered["id"].tolist() == base_wrong["id"].tolist() == ids_where(base != LABELS)
        assert filtered.equals(base_wrong.reset_index(drop=True))
        assert c.table("SELECT sid FROM p WHERE false").empty

        regressions = c.regressions("base", "new")
        expected = ids_where((base == LABELS) & (new != LABELS))
        assert sorted(regressions["id"]) == expected
        new_probabilities = stored(pets["scores"]["new"])
        new_probabilities /= new_probabilities.sum(axis=1, keepdims=True)
        confidence = dict(zip(IDS, new_probabilities.max(axis=1), strict=True))
        assert regressions["id"].tolist() == sorted(expected, key=lambda s: -confidence[s])
        np.testing.assert_allclose(
            regressions["new_confidence"], [confidence[s] for s in regressions["id"]], rtol=1e-6
        )
        assert regressions["new_pred"].tolist() == [
            CLASSES[new[IDS.index(s)]] for s in regressions["id"]
        ]

        improvements = c.improvements("base", "new")
        assert sorted(improvements["id"]) == ids_where((base != LABELS) & (new == LABELS))
        # the other direction swaps the two sets
        assert sorted(c.regressions("new", "base")["id"]) == sorted(improvements["id"])
        assert sorted(c.improvements("new", "base")["id"]) == expected
        # a run without scores as the new run: no confidence, still the right set
        assert sorted(c.regressions("new", "extra")["id"]) == ids_where(
            (new == LABELS) & (extra != LABELS)
        )
        assert c.regressions("base", "base").empty


@both
def test_hard_samples(pets):
    wrong = sum((pred != LABELS).astype(int) for pred in PREDS.values())
    p_true = []
    for scores in pets["scores"].values():
        probabilities = stored(scores) / stored(scores).sum(axis=1, keepdims=True)
        p_true.append(probabilities[np.arange(12), LABELS])
    mean_p = np.mean(p_true, axis=0)  # runs without scores do not count
    order = sorted(
        (i for i in range(12) if wrong[i] > 0), key=lambda i: (-wrong[i], mean_p[i], IDS[i])
    )
    with tessera.compare("pets:v0", dir=pets["dir"]) as c:
        hard = c.hard_samples(4)
        everything = c.hard_samples(100)
    assert hard["id"].tolist() == [IDS[i] for i in order[:4]]
    assert everything["id"].tolist() == [IDS[i] for i in order]
    assert everything["wrong"].tolist() == [wrong[i] for i in order]
    assert (everything["runs"] == 3).all()
    np.testing.assert_allclose(everything["mean_true_probability"], mean_p[order], rtol=1e-6)
    assert everything["label"].tolist() == [CLASSES[LABELS[i]] for i in order]


@both
def test_history_of_one_sample(pets):
    with tessera.compare("pets:v0", dir=pets["dir"]) as c:
        history = c.history("s03")
        with pytest.raises(NotFoundError, match="no sample 'nope'"):
            c.history("nope")
    assert history["run"].tolist() == ["base", "new", "extra"]
    assert history["run_id"].tolist() == [pets["ids"][k] for k in ("base", "new", "extra")]
    assert history["pred"].tolist() == [CLASSES[PREDS[k][3]] for k in ("base", "new", "extra")]
    assert [json.loads(c) for c in history["config"]] == [{"lr": 0.1}, {"lr": 0.01}, {"lr": 1.0}]
    assert set(history["dataset_version"]) == {"v0"}
    np.testing.assert_allclose(history["scores"][0], stored(pets["scores"]["base"])[3], rtol=1e-6)
    assert history["scores"][2] is None


@both
def test_run_selection_by_name_and_id(pets):
    ids = pets["ids"]
    with tessera.compare("pets:v0", runs=["base", ids["extra"]], dir=pets["dir"]) as c:
        assert [r.label for r in c.runs] == ["base", "extra"]
        assert list(c.table().columns) == [
            "id",
            "label",
            "base/pred",
            "base/correct",
            "base/score",
            "extra/pred",
            "extra/correct",
        ]
        assert list(c.metrics().index) == ["base", "extra"]
        assert c.confusion(ids["extra"]).to_numpy().trace() == (PREDS["extra"] == LABELS).sum()
        assert c.confusion(1).equals(c.confusion("extra"))
        with pytest.raises(
            NotFoundError, match="no run 'new' in this comparison; runs: base, extra"
        ):
            c.confusion("new")
    with tessera.compare("pets:v0", runs="new", dir=pets["dir"]) as c:
        assert [r.label for r in c.runs] == ["new"]
    with pytest.raises(NotFoundError, match=r"no run 'nope' logged .*runs: base, new, extra"):
        tessera.compare("pets:v0", runs=["base", "nope"], dir=pets["dir"])


@both
def test_unknown_datasets_and_tables(pets):
    d = pets["dir"]
    with pytest.raises(NotFoundError, match="no dataset named 'nope'"):
        tessera.compare("nope", dir=d)
    with pytest.raises(NotFoundError, match="no artifact 'nope' in project 'zoo'"):
        tessera.compare("zoo/nope:v0", dir=d)
    with pytest.raises(NotFoundError, match="has no version 'v7'"):
        tessera.compare("pets:v7", dir=d)
    with pytest.raises(NotFoundError, match="no run logged a predictions table named 'other'"):
        tessera.compare("pets:v0", predictions="other", dir=d)
    with pytest.raises(CompareError, match="not a dataset"):
        tessera.compare("zoo/predictions", dir=d)


@both
def test_runs_on_different_subsets_are_compared_on_common_samples(store_dir):
    with tessera.init(project="p", name="maker", dir=store_dir) as run:
        version = run.log_dataset(make_dataset("pets", IDS, LABELS, tiny_images(12)))
    with tessera.init(project="p", name="full", dir=store_dir) as run:
        run.log_predictions(version, IDS, pred=PREDS["base"])
    with tessera.init(project="p", name="part", dir=store_dir) as run:
        run.log_predictions(version, IDS[3:], pred=PREDS["new"][3:])
    with tessera.compare("pets:v0", dir=store_dir) as c:
        assert (c.n_common, c.left_out) == (9, 3)
        assert c.note == (
            "9 samples predicted by all 2 runs; 3 predicted by only some runs were left out"
        )
        assert c.table()["id"].tolist() == IDS[3:]
        metrics = c.metrics()
        assert metrics["n"].tolist() == [9, 9]
        common = slice(3, None)
        assert metrics.loc["full", "accuracy"] == pytest.approx(
            (PREDS["base"][common] == LABELS[common]).mean()
        )
        assert c.confusion("full").to_numpy().sum() == 9
        assert sorted(c.regressions("full", "part")["id"]) == ids_where(
            (np.arange(12) >= 3) & (PREDS["base"] == LABELS) & (PREDS["new"] != LABELS)
        )
    with tessera.compare("pets:v0", runs="full", dir=store_dir) as c:
        assert (c.n_common, c.left_out) == (12, 0)


@both
def test_every_version_joins_on_id_uses_the_newest_label_and_flags_changed_images(store_dir):
    images = dict(zip(IDS[:8], tiny_images(8, seed=5), strict=True))
    first = IDS[:6]
    # v1: s00's label fixed (cat -> dog), s01 re-shot (new pixels), s05 dropped, s06, s07 added
    second = ["s00", "s01", "s02", "s03", "s04", "s06", "s07"]
    labels0 = {sid: 0 for sid in IDS[:8]}
    labels1 = {**labels0, "s00": 1, "s06": 2}
    changed = tiny_images(1, seed=99)[0]
    with tessera.init(project="p", name="maker", dir=store_dir) as run:
        v0 = run.log_dataset(make_dataset("pets", first, [0] * 6, [images[s] for s in first]))
        v1 = run.log_dataset(
            make_dataset(
                "pets",
                second,
                [labels1[s] for s in second],
                [changed if s == "s01" else images[s] for s in second],
            )
        )
    assert (v0.version, v1.version) == ("v0", "v1")
    with tessera.init(project="p", name="old", config={"data": 0}, dir=store_dir) as run:
        run.log_predictions(v0, first, pred=[0] * 6)
    with tessera.init(project="p", name="new", config={"data": 1}, dir=store_dir) as run:
        run.log_predictions(v1, second, pred=[1] * 7)
        run.log_predictions(v1, ["s00"], name="probe", pred=[2])

    with tessera.compare("pets", dir=store_dir) as c:
        assert [r.label for r in c.runs] == ["old", "new"]
        assert [r.dataset.version for r in c.runs] == ["v0", "v1"]
        assert (c.n_common, c.left_out) == (5, 3)  # s05 only old; s06, s07 only new
        table = c.table()
        assert table["id"].tolist() == ["s00", "s01", "s02", "s03", "s04"]
        assert table["label"].tolist() == ["dog", "cat", "cat", "cat", "cat"]  # newest label
        assert table["image_changed"].tolist() == [False, True, False, False, False]
        assert table["old/pred"].tolist() == ["cat"] * 5
        assert table["new/pred"].tolist() == ["dog"] * 5
        assert table["old/correct"].tolist() == [False, True, True, True, True]
        assert sorted(c.regressions("old", "new")["id"]) == ["s01", "s02", "s03", "s04"]
        assert c.improvements("old", "new")["id"].tolist() == ["s00"]

        history = c.history("s00")
        assert history["run"].tolist() == ["old", "new", "new"]
        assert history["dataset_version"].tolist() == ["v0", "v1", "v1"]
        assert history["table"].tolist() == [
            "p/predictions:v0",
            "p/predictions:v1",
            "p/probe:v0",
        ]
        assert history["pred"].tolist() == ["cat", "dog", "fox"]
        assert [json.loads(x) for x in history["config"]] == [{"data": 0}, {"data": 1}, {"data": 1}]
        assert c.history("s05")["run"].tolist() == ["old"]  # only in v0
        assert c.history("s07")["run"].tolist() == ["new"]  # only in v1

    # one version: only the runs on it, its own labels, no image_changed column
    with tessera.compare("pets:v0", dir=store_dir) as c:
        assert [r.label for r in c.runs] == ["old"]
        table = c.table()
        assert "image_changed" not in table.columns
        assert table["label"].tolist() == ["cat"] * 6
        # history still spans every version of the dataset
        assert c.history("s00")["dataset_version"].tolist() == ["v0", "v1", "v1"]
    with tessera.compare("pets:latest", dir=store_dir) as c:
        assert [r.label for r in c.runs] == ["new"]
        assert c.table()["label"].tolist()[:1] == ["dog"]


@both
def test_suspect_labels_finds_flipped_labels(store_dir):
    n = 30
    rng = np.random.default_rng(3)
    ids = [f"x{i:02d}" for i in range(n)]
    truth = rng.integers(0, 3, n)
    flipped = {4: 2, 11: 1, 23: 0}  # index -> the label written instead of the truth
    for i, wrong_label in list(flipped.items()):
        if wrong_label == truth[i]:
            flipped[i] = (truth[i] + 1) % 3
    labels = truth.copy()
    for i, wrong_label in flipped.items():
        labels[i] = wrong_label
    with tessera.init(project="p", name="maker", dir=store_dir) as run:
        version = run.log_dataset(make_dataset("pets", ids, labels, tiny_images(n)))
    for r in range(3):
        scores = rng.random((n, 3)) * 0.1
        scores[np.arange(n), truth] = 0.9 + 0.05 * rng.random(n)  # confidently right
        if r == 0:  # one run's own, lone, mistake on an unflipped sample is no label error
            scores[7] = 0.0
            scores[7, (truth[7] + 1) % 3] = 1.0
        with tessera.init(project="p", name=f"model{r}", dir=store_dir) as run:
            run.log_predictions(version, ids, scores=scores)
    with tessera.compare("pets:v0", dir=store_dir) as c:
        suspects = c.suspect_labels(k=10)
        hard = c.hard_samples(10)
    expected = sorted(ids[i] for i in flipped)
    assert sorted(suspects["id"]) == expected
    by_id = suspects.set_index("id")
    for i in flipped:
        row = by_id.loc[ids[i]]
        assert row["label"] == CLASSES[labels[i]]
        assert row["suggested"] == CLASSES[truth[i]]
        assert row["runs_agreeing"] == 3
        assert row["mean_confidence"] > 0.7
    assert set(expected) <= set(hard["id"])
    assert ids[7] in set(hard["id"]) - set(suspects["id"])


@both
def test_dataset_in_two_projects_needs_a_project(store_dir):
    for project, pred in (("p1", PREDS["base"]), ("p2", PREDS["new"])):
        with tessera.init(project=project, name="maker", dir=store_dir) as run:
            version = run.log_dataset(make_dataset("pets", IDS, LABELS, tiny_images(12)))
        with tessera.init(project=project, name=f"model-{project}", dir=store_dir) as run:
            run.log_predictions(version, IDS, pred=pred)
    with pytest.raises(CompareError, match=r"several projects \(p1, p2\)"):
        tessera.compare("pets", dir=store_dir)
    with pytest.raises(CompareError, match="several projects"):
        tessera.compare("pets:v0", dir=store_dir)
    with tessera.compare("pets", project="p2", dir=store_dir) as c:
        assert [r.label for r in c.runs] == ["model-p2"]
    with tessera.compare("p1/pets:v0", dir=store_dir) as c:
        assert [r.label for r in c.runs] == ["model-p1"]
        assert c.metrics().loc["model-p1", "accuracy"] == pytest.approx(
            (PREDS["base"] == LABELS).mean()
        )


@both
def test_duplicate_run_names_get_distinct_labels(store_dir):
    with tessera.init(project="p", name="maker", dir=store_dir) as run:
        version = run.log_dataset(make_dataset("pets", IDS, LABELS, tiny_images(12)))
    run_ids = []
    for name, pred in (("same", PREDS["base"]), ("same", PREDS["new"]), ("other", LABELS)):
        with tessera.init(project="p", name=name, dir=store_dir) as run:
            run.log_predictions(version, IDS, pred=pred)
            run_ids.append(run.id)
    labels = [f"same-{run_ids[0][:6]}", f"same-{run_ids[1][:6]}", "other"]
    with tessera.compare("pets:v0", dir=store_dir) as c:
        assert [r.label for r in c.runs] == labels
        assert len(set(labels)) == 3
        table = c.table()
        assert [col for col in table.columns if col.endswith("/pred")] == [
            f"{label}/pred" for label in labels
        ]
        assert table[f"{labels[1]}/pred"].tolist() == [CLASSES[i] for i in PREDS["new"]]
        assert list(c.metrics().index) == labels
        assert c.metrics().loc[labels[0], "accuracy"] == pytest.approx(
            (PREDS["base"] == LABELS).mean()
        )
        assert c.confusion(run_ids[1]).equals(c.confusion(labels[1]))
    with tessera.compare("pets:v0", runs=["same"], dir=store_dir) as c:
        assert [r.label for r in c.runs] == labels[:2]


@both
def test_scores_only_predictions_use_the_argmax(store_dir):
    scores = scores_for(PREDS["new"], 8)
    with tessera.init(project="p", name="maker", dir=store_dir) as run:
        version = run.log_dataset(make_dataset("pets", IDS, LABELS, tiny_images(12)))
    with tessera.init(project="p", name="scored", dir=store_dir) as run:
        run.log_predictions(version, IDS, scores=scores)
    with tessera.compare("pets:v0", dir=store_dir) as c:
        table = c.table()
        metrics = c.metrics()
        assert c.runs[0].has_scores
    assert list(table.columns) == ["id", "label", "scored/pred", "scored/correct", "scored/score"]
    assert table["scored/pred"].tolist() == [CLASSES[i] for i in PREDS["new"]]
    assert table["scored/correct"].tolist() == (PREDS["new"] == LABELS).tolist()
    assert metrics.loc["scored", "accuracy"] == pytest.approx((PREDS["new"] == LABELS).mean())
    assert {"log_loss", "ece"} <= set(metrics.columns)
    assert isinstance(table["scored/pred"].dtype, pd.CategoricalDtype)


@both
def test_runs_that_share_no_sample(store_dir):
    with tessera.init(project="p", name="maker", dir=store_dir) as run:
        version = run.log_dataset(make_dataset("pets", IDS, LABELS, tiny_images(12)))
    for name, part in (("first", slice(0, 6)), ("second", slice(6, 12))):
        with tessera.init(project="p", name=name, dir=store_dir) as run:
            run.log_predictions(version, IDS[part], scores=scores_for(PREDS["base"][part], 4))
    with tessera.compare("pets:v0", dir=store_dir) as c:
        assert (c.n_common, c.left_out) == (0, 12)
        assert c.note.endswith("12 predicted by only some runs were left out")
        metrics = c.metrics()
    assert metrics["n"].tolist() == [0, 0]
    assert metrics["log_loss"].isna().all()


@both
def test_an_empty_run_selection_is_refused(pets):
    with pytest.raises(CompareError, match="no runs"):
        tessera.compare("pets:v0", runs=[], dir=pets["dir"])
