"""Every comparison metric against scikit-learn (or a hand computation), at two levels.

The pure functions of ``tessera.analysis.metrics`` take small count arrays; ``tessera.compare``
reduces real stored predictions to those arrays in DuckDB (and computes log loss, top-5
accuracy and the calibration bins there). Both are checked on random data: the pure level with
hypothesis, the end-to-end level on a real store built from tiny random images.
"""

import math
import tempfile
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

import tessera
from tessera.analysis import metrics as m

PURE = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
END_TO_END = settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ECE_BINS = 15


# -- references ---------------------------------------------------------------------------------


def confusion_of(y_true, y_pred, classes):
    out = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(out, (y_true, y_pred), 1)
    return out


def ece_by_hand(confidence, correct):
    """15 equal-width bins [i/15, (i+1)/15), the last one closed at 1.0; the bin-size weighted
    mean gap between accuracy and mean confidence."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    total = 0.0
    for i in range(ECE_BINS):
        low, high = i / ECE_BINS, (i + 1) / ECE_BINS
        inside = (confidence >= low) & (
            (confidence <= high) if i == ECE_BINS - 1 else (confidence < high)
        )
        if inside.any():
            gap = abs(correct[inside].mean() - confidence[inside].mean())
            total += gap * inside.sum() / len(confidence)
    return total


def ece_bins(confidence, correct):
    """The per-bin (count, summed confidence, summed correct) arrays the pure function takes."""
    index = np.minimum(np.floor(np.asarray(confidence) * ECE_BINS), ECE_BINS - 1).astype(int)
    count = np.bincount(index, minlength=ECE_BINS).astype(np.float64)
    conf = np.bincount(index, weights=confidence, minlength=ECE_BINS)
    right = np.bincount(index, weights=np.asarray(correct, dtype=np.float64), minlength=ECE_BINS)
    return count, conf, right


def mcnemar_by_hand(b, c):
    """Two-sided exact binomial test of min(b, c) against Binomial(b + c, 1/2), capped at 1."""
    n = b + c
    if n == 0:
        return 1.0
    tail = Fraction(sum(math.comb(n, i) for i in range(min(b, c) + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


@st.composite
def predictions(draw, max_classes=9, max_n=80):
    classes = draw(st.integers(1, max_classes))
    n = draw(st.integers(1, max_n))
    labels = st.integers(0, classes - 1)
    y_true = draw(arrays(np.int64, n, elements=labels))
    y_pred = draw(arrays(np.int64, n, elements=labels))
    return classes, y_true, y_pred


# -- pure functions -----------------------------------------------------------------------------


@PURE
@given(predictions())
def test_per_class_matches_sklearn(case):
    classes, y_true, y_pred = case
    stats = m.per_class(confusion_of(y_true, y_pred, classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(classes)), zero_division=0
    )
    np.testing.assert_allclose(stats["precision"], precision, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats["recall"], recall, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats["f1"], f1, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(stats["support"], support)
    assert stats["support"].dtype == np.int64


@PURE
@given(predictions())
def test_accuracy_and_macro_f1_match_sklearn(case):
    classes, y_true, y_pred = case
    confusion = confusion_of(y_true, y_pred, classes)
    assert m.accuracy(confusion) == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    # sklearn's macro average runs over the labels present in y_true or y_pred, not all classes
    expected = f1_score(y_true, y_pred, average="macro", zero_division=0)
    assert m.macro_f1(confusion) == pytest.approx(expected, abs=1e-12)


def test_empty_confusion_gives_zero_not_nan():
    empty = np.zeros((3, 3), dtype=np.int64)
    assert m.accuracy(empty) == 0.0
    assert m.macro_f1(empty) == 0.0
    stats = m.per_class(empty)
    for key in ("precision", "recall", "f1", "support"):
        assert not np.isnan(stats[key]).any()
        assert (stats[key] == 0).all()


def test_macro_f1_ignores_classes_never_seen():
    # class 2 is neither a label nor a prediction: it must not drag the mean down
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 1, 1, 1])
    confusion = confusion_of(y_true, y_pred, 3)
    assert m.macro_f1(confusion) == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m.macro_f1(confusion) > np.mean(m.per_class(confusion)["f1"])


@PURE
@given(st.integers(1, 200), st.integers(2, 12), st.integers(0, 2**32 - 1))
def test_expected_calibration_error_matches_hand_computation(n, classes, seed):
    rng = np.random.default_rng(seed)
    scores = rng.random((n, classes)) ** rng.uniform(0.2, 4)  # continuous: no ties
    y_true = rng.integers(0, classes, n)
    probabilities = scores / scores.sum(axis=1, keepdims=True)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    got = m.expected_calibration_error(*ece_bins(confidence, correct))
    assert got == pytest.approx(ece_by_hand(confidence, correct), abs=1e-12)


def test_expected_calibration_error_edge_cases():
    zeros = np.zeros(ECE_BINS)
    assert m.expected_calibration_error(zeros, zeros, zeros) == 0.0
    # confidence exactly 1.0 belongs to the last bin; all wrong there: gap 1
    count, conf, right = ece_bins(np.array([1.0, 1.0]), np.array([False, False]))
    assert count[-1] == 2
    assert m.expected_calibration_error(count, conf, right) == pytest.approx(1.0)
    assert ece_by_hand([1.0, 1.0], [False, False]) == pytest.approx(1.0)


@PURE
@given(st.integers(0, 80), st.integers(0, 80))
def test_mcnemar_exact_matches_binomial_sum(b, c):
    result = m.mcnemar_exact(b, c)
    assert (result.b, result.c, result.statistic) == (b, c, min(b, c))
    assert result.pvalue == pytest.approx(mcnemar_by_hand(b, c), rel=1e-9, abs=1e-300)
    assert 0.0 <= result.pvalue <= 1.0
    assert result.better == ("neither" if b == c else "new" if c > b else "base")


def test_mcnemar_exact_known_values():
    assert m.mcnemar_exact(0, 0).pvalue == 1.0  # b + c == 0: no evidence at all
    assert m.mcnemar_exact(0, 0).better == "neither"
    assert m.mcnemar_exact(3, 3).pvalue == 1.0  # capped at 1
    assert m.mcnemar_exact(0, 5).pvalue == pytest.approx(2 / 32)
    assert m.mcnemar_exact(1, 9).pvalue == pytest.approx(2 * 11 / 1024)
    assert m.mcnemar_exact(500, 600).pvalue == pytest.approx(mcnemar_by_hand(500, 600), rel=1e-9)


@st.composite
def paired(draw):
    classes = draw(st.integers(2, 6))
    n = draw(st.integers(1, 60))
    labels = st.integers(0, classes - 1)
    return (
        classes,
        draw(arrays(np.int64, n, elements=labels)),
        draw(arrays(np.int64, n, elements=labels)),
        draw(arrays(np.int64, n, elements=labels)),
    )


def joint_cells(classes, y_true, base, new):
    cells = np.zeros((classes,) * 3, dtype=np.int64)
    np.add.at(cells, (y_true, base, new), 1)
    return cells


@PURE
@given(paired(), st.integers(0, 1000))
def test_bootstrap_difference_of_accuracy(case, seed):
    classes, y_true, base, new = case
    cells = joint_cells(classes, y_true, base, new)
    observed, low, high = m.bootstrap_difference(cells, "accuracy", n_boot=200, seed=seed)
    assert observed == pytest.approx(
        accuracy_score(y_true, new) - accuracy_score(y_true, base), abs=1e-12
    )
    assert low <= observed <= high
    assert -1.0 <= low <= high <= 1.0
    # a fixed seed reproduces the interval exactly
    assert m.bootstrap_difference(cells, "accuracy", n_boot=200, seed=seed) == (
        observed,
        low,
        high,
    )


@PURE
@given(paired())
def test_bootstrap_difference_of_macro_f1(case):
    classes, y_true, base, new = case
    cells = joint_cells(classes, y_true, base, new)
    observed, low, high = m.bootstrap_difference(cells, "macro_f1", n_boot=50, seed=1)
    expected = f1_score(y_true, new, average="macro", zero_division=0) - f1_score(
        y_true, base, average="macro", zero_division=0
    )
    assert observed == pytest.approx(expected, abs=1e-12)
    assert low <= high


def test_bootstrap_difference_refuses_bad_input():
    cells = joint_cells(2, np.array([0, 1]), np.array([0, 1]), np.array([1, 1]))
    with pytest.raises(ValueError, match="metric must be"):
        m.bootstrap_difference(cells, "f2")
    with pytest.raises(ValueError, match="no common samples"):
        m.bootstrap_difference(np.zeros((2, 2, 2)), "accuracy")
    a = m.bootstrap_difference(cells, "accuracy", n_boot=500, seed=3)
    b = m.bootstrap_difference(cells, "accuracy", n_boot=500, seed=4)
    assert a[0] == b[0] == -0.5  # the observed difference does not depend on the seed


# -- end to end: a real store, compared with tessera.compare -----------------------------------


def random_scores(rng, y_true, classes, skill):
    """Continuous random scores (no ties), pushed towards the true class by ``skill``."""
    scores = rng.random((len(y_true), classes))
    scores[np.arange(len(y_true)), y_true] += skill * rng.random(len(y_true))
    return scores


def build_store(store, y_true, classes, runs):
    """A dataset of tiny random images with labels ``y_true`` and one run per ``runs`` item
    (``name -> prediction columns``), started in that order; returns the sample ids."""
    rng = np.random.default_rng(len(y_true))
    ids = [f"img{i:04d}" for i in range(len(y_true))]
    with tessera.init(project="eval", name="maker", dir=store) as run:
        dataset = tessera.Dataset("testset", classes=[f"class{c}" for c in range(classes)])
        for sid, label in zip(ids, y_true, strict=True):
            dataset.add(sid, rng.integers(0, 256, (3, 3, 3), dtype=np.uint8), int(label))
        version = run.log_dataset(dataset)
    for name, columns in runs.items():
        with tessera.init(project="eval", name=name, dir=store) as run:
            run.log_predictions(version, ids, **columns)
    return ids


def probabilities_of(scores):
    """What the store keeps (float32) normalised per row, in float64."""
    stored = np.asarray(scores, dtype=np.float32).astype(np.float64)
    return stored / stored.sum(axis=1, keepdims=True)


def check_against_sklearn(comparison, y_true, classes, runs):
    names = [f"class{c}" for c in range(classes)]
    labels = list(range(classes))
    metrics = comparison.metrics()
    per_class = comparison.per_class()
    assert list(metrics.index) == list(runs)
    for name, columns in runs.items():
        scores = columns.get("scores")
        pred = columns["pred"] if "pred" in columns else probabilities_of(scores).argmax(axis=1)
        row = metrics.loc[name]
        assert row["n"] == len(y_true)
        assert row["accuracy"] == pytest.approx(accuracy_score(y_true, pred), abs=1e-12)
        assert row["macro_f1"] == pytest.approx(
            f1_score(y_true, pred, average="macro", zero_division=0), abs=1e-12
        )
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, pred, labels=labels, zero_division=0
        )
        ours = per_class.loc[name].loc[names]
        np.testing.assert_allclose(ours["precision"], precision, atol=1e-12)
        np.testing.assert_allclose(ours["recall"], recall, atol=1e-12)
        np.testing.assert_allclose(ours["f1"], f1, atol=1e-12)
        np.testing.assert_array_equal(ours["support"], support)
        confusion = comparison.confusion(name)
        assert list(confusion.index) == names and list(confusion.columns) == names
        np.testing.assert_array_equal(
            confusion.to_numpy(), confusion_matrix(y_true, pred, labels=labels)
        )
        if scores is None:
            for column in ("log_loss", "ece", "top5_accuracy"):
                assert column not in metrics.columns or np.isnan(row[column])
            continue
        probabilities = probabilities_of(scores)
        assert row["log_loss"] == pytest.approx(
            log_loss(y_true, np.clip(probabilities, 1e-15, 1), labels=labels), rel=1e-6
        )
        confidence = probabilities.max(axis=1)
        assert row["ece"] == pytest.approx(ece_by_hand(confidence, pred == y_true), abs=1e-6)
        if classes > 5:
            assert row["top5_accuracy"] == pytest.approx(
                top_k_accuracy_score(y_true, probabilities, k=5, labels=labels), abs=1e-12
            )
        else:
            assert "top5_accuracy" not in metrics.columns


def pairwise_checks(comparison, y_true, base_pred, new_pred):
    base_right, new_right = base_pred == y_true, new_pred == y_true
    b = int((base_right & ~new_right).sum())
    c = int((~base_right & new_right).sum())
    test = comparison.mcnemar("a", "b")
    assert (test.b, test.c) == (b, c)
    assert test.pvalue == pytest.approx(mcnemar_by_hand(b, c), rel=1e-9)
    ci = comparison.bootstrap_ci("a", "b", n_boot=400, seed=7)
    assert ci["difference"] == pytest.approx(new_right.mean() - base_right.mean(), abs=1e-12)
    assert ci["low"] <= ci["difference"] <= ci["high"]
    assert comparison.bootstrap_ci("a", "b", n_boot=400, seed=7) == ci
    f1 = comparison.bootstrap_ci("a", "b", metric="macro_f1", n_boot=100, seed=7)
    assert f1["difference"] == pytest.approx(
        f1_score(y_true, new_pred, average="macro", zero_division=0)
        - f1_score(y_true, base_pred, average="macro", zero_division=0),
        abs=1e-12,
    )


def three_runs(rng, y_true, classes):
    """``a``: pred and scores; ``b``: scores only (pred = argmax); ``c``: pred only."""
    a_scores = random_scores(rng, y_true, classes, skill=rng.uniform(0, 3))
    b_scores = random_scores(rng, y_true, classes, skill=rng.uniform(0, 3))
    return {
        "a": {"pred": probabilities_of(a_scores).argmax(axis=1), "scores": a_scores},
        "b": {"scores": b_scores},
        "c": {"pred": rng.integers(0, classes, len(y_true))},
    }


@END_TO_END
@given(st.integers(2, 30), st.integers(2, 9), st.integers(0, 2**32 - 1))
def test_compare_metrics_match_sklearn_end_to_end(tmp_path, n, classes, seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, classes, n)
    runs = three_runs(rng, y_true, classes)
    store = tempfile.mkdtemp(dir=tmp_path)
    build_store(store, y_true, classes, runs)
    with tessera.compare("testset:v0", dir=store) as comparison:
        assert comparison.n_common == n and comparison.left_out == 0
        check_against_sklearn(comparison, y_true, classes, runs)
        pairwise_checks(
            comparison,
            y_true,
            runs["a"]["pred"],
            probabilities_of(runs["b"]["scores"]).argmax(axis=1),
        )


@pytest.mark.parametrize(
    ("seed", "n", "classes", "absent"),
    [
        (1, 40, 7, 6),  # top-5 reported; class 6 never a label nor a prediction
        (2, 25, 3, None),  # no top-5 with fewer than six classes
    ],
)
def test_compare_metrics_fixed_cases(store_dir, seed, n, classes, absent):
    rng = np.random.default_rng(seed)
    present = [c for c in range(classes) if c != absent]
    y_true = rng.choice(present, n)
    runs = three_runs(rng, y_true, classes)
    if absent is not None:
        for columns in runs.values():
            if "scores" in columns:
                columns["scores"][:, absent] *= 1e-3  # never the argmax
                if "pred" in columns:
                    columns["pred"] = probabilities_of(columns["scores"]).argmax(axis=1)
            else:
                columns["pred"] = np.where(columns["pred"] == absent, present[0], columns["pred"])
    build_store(store_dir, y_true, classes, runs)
    with tessera.compare("testset:v0", dir=store_dir) as comparison:
        check_against_sklearn(comparison, y_true, classes, runs)
        if absent is not None:
            row = comparison.per_class().loc[("a", f"class{absent}")]
            assert row["support"] == 0 and row["f1"] == 0
        pairwise_checks(
            comparison,
            y_true,
            runs["a"]["pred"],
            probabilities_of(runs["b"]["scores"]).argmax(axis=1),
        )


def test_log_loss_clips_at_1e_15_and_ece_puts_certainty_in_the_last_bin(store_dir):
    y_true = np.array([0, 1, 2, 0, 1, 2])
    scores = np.array(
        [
            [1.0, 0.0, 0.0],  # certain and right
            [0.0, 0.0, 1.0],  # certain and wrong: p(true) = 0, clipped to 1e-15
            [0.2, 0.3, 0.5],
            [0.6, 0.3, 0.1],
            [0.1, 0.8, 0.1],
            [0.5, 0.25, 0.25],
        ]
    )
    runs = {"a": {"scores": scores}, "b": {"pred": np.array([0, 1, 2, 0, 1, 2])}}
    build_store(store_dir, y_true, 3, runs)
    with tessera.compare("testset:v0", dir=store_dir) as comparison:
        metrics = comparison.metrics()
    probabilities = probabilities_of(scores)
    p_true = np.clip(probabilities[np.arange(6), y_true], 1e-15, 1)
    assert metrics.loc["a", "log_loss"] == pytest.approx(np.mean(-np.log(p_true)), rel=1e-6)
    assert metrics.loc["a", "log_loss"] > -np.log(1e-15) / 6  # the clipped term counts
    pred = probabilities.argmax(axis=1)
    expected = ece_by_hand(probabilities.max(axis=1), pred == y_true)
    assert metrics.loc["a", "ece"] == pytest.approx(expected, abs=1e-6)
    assert metrics.loc["a", "accuracy"] == pytest.approx(4 / 6)
    assert metrics.loc["b", "accuracy"] == 1.0
