"""Classification metrics from counts: a confusion matrix, calibration bins, 2x2 tables.

The heavy lifting (reading millions of rows) happens in DuckDB, which reduces predictions to
these small count arrays; everything here is exact arithmetic on them, checked against
scikit-learn in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def per_class(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a C x C confusion matrix
    (rows: true class, columns: predicted). Undefined ratios (0 / 0) are 0, as scikit-learn's
    ``zero_division=0``."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    predicted = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros_like(tp), where=denominator > 0
    )
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def macro_f1(confusion: np.ndarray) -> float:
    """Mean F1 over the classes that occur (as true or predicted class), like scikit-learn's
    ``f1_score(average="macro")`` over the labels present."""
    confusion = np.asarray(confusion)
    present = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0
    if not present.any():
        return 0.0
    return float(per_class(confusion)["f1"][present].mean())


def accuracy(confusion: np.ndarray) -> float:
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else 0.0


def expected_calibration_error(
    bin_count: np.ndarray, bin_confidence: np.ndarray, bin_correct: np.ndarray
) -> float:
    """ECE from per-bin counts, summed confidences and summed correct predictions."""
    total = bin_count.sum()
    if not total:
        return 0.0
    nonempty = bin_count > 0
    gap = np.abs(bin_correct[nonempty] - bin_confidence[nonempty]) / bin_count[nonempty]
    return float((gap * bin_count[nonempty]).sum() / total)


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test: ``b`` = base right, new wrong; ``c`` = base wrong, new right."""

    b: int
    c: int
    statistic: int  # min(b, c), the binomial test's statistic
    pvalue: float

    @property
    def better(self) -> str:
        if self.b == self.c:
            return "neither"
        return "new" if self.c > self.b else "base"


def mcnemar_exact(b: int, c: int) -> McNemar:
    """Two-sided exact binomial test of b against b + c at p = 1/2."""
    from scipy.stats import binom

    n = b + c
    k = min(b, c)
    pvalue = 1.0 if n == 0 else min(1.0, 2.0 * float(binom.cdf(k, n, 0.5)))
    return McNemar(int(b), int(c), int(k), pvalue)


def bootstrap_difference(
    cells: np.ndarray,
    metric: str,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Bootstrap CI of metric(new) - metric(base) from the joint counts ``cells[t, b, n]``
    (true class t, base prediction b, new prediction n).

    Resampling samples with replacement is the same as drawing the cell counts from a
    multinomial over the observed cells, so each replicate costs C^3 work, not N.
    """
    if metric not in ("accuracy", "macro_f1"):
        raise ValueError(f"metric must be 'accuracy' or 'macro_f1', got {metric!r}")
    fn = accuracy if metric == "accuracy" else macro_f1
    cells = np.asarray(cells, dtype=np.int64)
    total = int(cells.sum())
    if total == 0:
        raise ValueError("no common samples to bootstrap over")

    def difference(counts: np.ndarray) -> float:
        return fn(counts.sum(axis=1)) - fn(counts.sum(axis=2))  # new - base

    observed = difference(cells)
    rng = np.random.default_rng(seed)
    flat = cells.reshape(-1)
    draws = rng.multinomial(total, flat / total, size=n_boot)
    replicates = np.array([difference(d.reshape(cells.shape)) for d in draws])
    alpha = (1.0 - level) / 2
    low, high = np.quantile(replicates, [alpha, 1 - alpha])
    return observed, float(low), float(high)
