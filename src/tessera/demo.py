"""``tessera demo``: the job Tessera exists for, end to end, on real images.

1. Log the Fashion-MNIST test set (10,000 images, Debian's ``dataset-fashion-mnist``; scikit-learn's
   digits where that is absent) as a dataset with class names.
2. Train three different models on part of the training split; evaluate each by reading the
   dataset back with ``batches()`` through a preprocessing step, and log predictions by sample id
   with class scores: no image is stored again.
3. Find suspect labels with the comparison, correct a few in dataset ``v1`` (same images: no
   new image bytes), and re-evaluate one model on it.
4. Print what it cost and what it found.
"""

from __future__ import annotations

import gzip
import struct
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table as RichTable

import tessera
from tessera.progress import bar

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
PROJECT = "demo"


@dataclass
class Images:
    name: str
    classes: list[str]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_images(which: str, console: Console) -> Images:
    if which == "fashion-mnist":
        if (FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists():
            return Images(
                "fashion-mnist",
                FASHION_CLASSES,
                _read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz"),
                _read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz"),
                _read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz"),
                _read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz"),
            )
        console.print(
            f"[yellow]Fashion-MNIST is not installed ({FASHION_DIR}); using scikit-learn's "
            "digits instead (apt-get install dataset-fashion-mnist for the real thing)[/yellow]"
        )
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    split = len(pixels) // 2
    return Images(
        "digits",
        [str(i) for i in range(10)],
        pixels[:split],
        digits.target[:split].astype(np.uint8),
        pixels[split:],
        digits.target[split:].astype(np.uint8),
    )


def preprocess(images: np.ndarray) -> np.ndarray:
    """What the models see — not the stored bytes: 2x2 mean-pooled (28x28 → 14x14; smaller
    images are kept whole), flattened, scaled to floats in [0, 1]. Pooling makes every model
    about four times cheaper to train at a cost of under a point of accuracy."""
    n, height, width = images.shape[:3]
    if height >= 16 and width >= 16 and height % 2 == 0 and width % 2 == 0:
        x = images.astype(np.float32)  # four strided adds: 5x faster than a reshaped mean
        pooled = x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]
        return pooled.reshape(n, -1) * np.float32(0.25 / 255)
    return images.reshape(n, -1).astype(np.float32) / 255.0


def models() -> dict[str, Callable[[], object]]:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    return {
        "logreg": lambda: LogisticRegression(max_iter=200),
        "boosting": lambda: HistGradientBoostingClassifier(
            max_iter=20,
            learning_rate=0.2,
            max_bins=32,
            max_leaf_nodes=15,
            early_stopping=False,
            random_state=0,
        ),
        "mlp": lambda: MLPClassifier(hidden_layer_sizes=(128,), max_iter=30, random_state=0),
    }


def one_thread() -> Any:
    """Train and predict on one thread. scikit-learn's OpenMP and BLAS pools spin-wait for
    each other; on a 2-core machine with anything else running, the boosting model took 34 s
    with two threads and 3 s with one (measured), so one thread is what keeps the demo
    predictable."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def evaluate(run: tessera.Run, dsv: tessera.DatasetVersion, model: object) -> tessera.TableVersion:
    """Read the dataset back in batches, preprocess, predict, log by id: no image re-stored."""
    with run.predictions(dsv) as writer, bar(f"evaluating {run.name}", dsv.num_samples) as b:
        for batch in dsv.batches(1000, columns=("image",)):
            scores = model.predict_proba(preprocess(batch.image)).astype(np.float32)  # type: ignore[attr-defined]
            writer.add(ids=batch.ids, pred=scores.argmax(axis=1), scores=scores)
            b.advance(len(batch))
    return writer.result


class Phases:
    """Wall-clock time per phase of the demo, printed as it goes and summed up at the end."""

    def __init__(self, console: Console):
        self.console = console
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        elapsed = time.perf_counter() - started
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        self.console.print(f"  [dim]{name}: {elapsed:.1f} s[/dim]")

    def table(self) -> RichTable:
        total = time.perf_counter() - self.started
        table = RichTable(title="Time per phase")
        table.add_column("phase")
        table.add_column("seconds", justify="right")
        for name, seconds in self.seconds.items():
            table.add_row(name, f"{seconds:.1f}")
        table.add_row(
            "other (opening and closing runs, byte accounting)",
            f"{total - sum(self.seconds.values()):.1f}",
        )
        table.add_row("[bold]total[/bold]", f"[bold]{total:.1f}[/bold]")
        return table


class Ledger:
    """Bytes each logged version added to the store: the blobs its manifest lists (every blob a
    version needs is listed there — the rule ``gc`` relies on) that no earlier version had,
    plus the manifest itself. Checked against the blob folder once, at the end."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.seen: set[str] = set()
        self.total = 0

    def add(self, version: tessera.ArtifactVersion) -> int:
        sizes = {e.digest: e.size for e in version.files() if e.ref is None}
        d = version.digest  # the manifest blob, at its place in the store layout (FORMAT.md §2.4)
        sizes[d] = (self.store / "blobs" / d[:2] / d[2:4] / d).stat().st_size
        added = sum(size for digest, size in sizes.items() if digest not in self.seen)
        self.seen.update(sizes)
        self.total += added
        return added


def blob_bytes(store: Path) -> int:
    """What the store's blob folder holds, measured on disk."""
    return sum(p.stat().st_size for p in (store / "blobs").rglob("*") if p.is_file())


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def run_demo(
    dir: Path,
    which: str = "fashion-mnist",
    train_size: int = 10_000,
    limit: int | None = None,
    console: Console | None = None,
) -> dict[str, object]:
    """Run the demo into the store ``dir``; ``limit`` keeps only the first N test images."""
    console = console or Console()
    phase = Phases(console)
    ledger = Ledger(dir)
    with phase("loading images"):
        data = load_images(which, console)
    test_x, test_y = data.test_x[:limit], data.test_y[:limit]
    console.print(
        f"[bold]Tessera demo[/bold] on {data.name}: {len(test_x):,} test images, store at {dir}"
    )

    # 1. The test set, logged once.
    with phase("logging the test set (v0)"):
        v0 = log_testset(dir, data, test_x, test_y.tolist())
    dataset_bytes = ledger.add(v0)
    image_bytes = sum(e.size for e in v0.files() if e.path.startswith("images/"))
    console.print(f"dataset {v0.spec}: {v0.num_samples:,} images, {human(dataset_bytes)} stored")

    # 2. Three models, each trained and then evaluated by reading the dataset back.
    with phase("importing scikit-learn, preprocessing the training images"):
        rng = np.random.default_rng(0)
        size = min(train_size, len(data.train_x))
        chosen = rng.choice(len(data.train_x), size=size, replace=False)
        train_x, train_y = preprocess(data.train_x[chosen]), data.train_y[chosen]
        makers = models()
    added: dict[str, int] = {}
    fitted = {}
    for name, make in makers.items():
        config = {"model": name, "train_size": len(chosen)}
        with tessera.init(project=PROJECT, name=name, config=config, dir=dir) as run:
            model = make()
            with (
                phase(f"training {name} on {len(chosen):,} images"),
                one_thread(),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")  # convergence chatter from short training
                model.fit(train_x, train_y)  # type: ignore[attr-defined]
            fitted[name] = model
            with phase(f"evaluating {name} (batches → predictions)"), one_thread():
                predictions = evaluate(run, run.use_dataset(f"{data.name}:v0"), model)
            added[name] = ledger.add(predictions)

    # 3. Suspect labels: several models confidently agree on another class.
    with phase("comparing the models"), tessera.compare(f"{data.name}:v0", dir=dir) as comparison:
        metrics = comparison.metrics()
        suspects = comparison.suspect_labels(k=10, min_confidence=0.9)
        best = metrics["accuracy"].sort_values(ascending=False).index[:2].tolist()
        test = comparison.mcnemar(best[1], best[0])
        regressions = comparison.regressions(best[1], best[0]).head(5)
    fixes = suspects.head(5)
    v1, v1_added, shared = None, 0, False
    if len(fixes):  # none only on a tiny --limit, where no model is confidently wrong
        with phase("correcting labels (v1)"):
            corrected = test_y.tolist()
            for row in fixes.itertuples():
                corrected[int(str(row.id).removeprefix("test-"))] = data.classes.index(
                    str(row.suggested)
                )
            v1 = log_testset(dir, data, test_x, corrected, based_on=v0.spec)
        v1_added = ledger.add(v1)
        config = {"model": best[0]}
        with tessera.init(project=PROJECT, name=f"{best[0]}-on-v1", config=config, dir=dir) as run:
            with phase(f"re-evaluating {best[0]} on v1"), one_thread():
                predictions = evaluate(run, run.use_dataset(v1.spec), fitted[best[0]])
            shared = {e.digest for e in predictions.files()} <= ledger.seen
            added[f"{best[0]} on v1"] = ledger.add(predictions)

    # 4. The report.
    console.print(
        f"\ndataset {v0.spec}: {human(dataset_bytes)} — {human(image_bytes)} of images, the "
        "rest its sample table and manifest"
    )
    table = RichTable(title="Bytes added per evaluation")
    for column in ("evaluation", "added by Tessera", "storing the images again"):
        table.add_column(column)
    for name, size in added.items():
        table.add_row(name, human(size), human(image_bytes))
    console.print(table)
    if shared:
        console.print(
            f"{best[0]} made the same predictions on v1 as on v0: its Parquet file is the blob "
            "already stored, so only a manifest was added"
        )
    if v1 is not None:
        console.print(
            f"dataset {v1.spec} (labels corrected, same images) added {human(v1_added)}: a new "
            "sample table and manifest, no image bytes"
        )
    on_disk = blob_bytes(dir)
    console.print(
        f"blob folder on disk: {human(on_disk)}; the figures above add up to "
        f"{human(ledger.total)}" + ("" if on_disk == ledger.total else " (they differ!)")
    )
    metrics_table(console, f"Metrics on {v0.spec}", metrics)
    verdict = "significant" if test.pvalue < 0.05 else "not significant"
    console.print(
        f"McNemar {best[1]} → {best[0]} (the two best): {test.b} right→wrong, "
        f"{test.c} wrong→right, p = {test.pvalue:.3g} ({verdict} at 5%)"
    )
    console.print(f"top regressions {best[1]} → {best[0]} (right before, wrong after):")
    for row in regressions.itertuples():
        console.print(
            f"  {row.id}: label {row.label}, {best[1]} said {row.base_pred}, "
            f"{best[0]} said {row.new_pred}"
        )
    if v1 is None:
        console.print("no suspect labels (no two models confidently agree): nothing to correct")
    else:
        console.print(
            f"suspect labels corrected in {v1.spec}: "
            + ", ".join(f"{r.id} {r.label}→{r.suggested}" for r in fixes.itertuples())
        )
    console.print(phase.table())
    console.print(f"\nOpen the UI:  tessera ui --dir {dir}   (or run the demo with --ui)")
    return {
        "dataset_bytes": dataset_bytes,
        "image_bytes": image_bytes,
        "added": added,
        "v1_added": v1_added,
        "blob_folder_bytes": on_disk,
        "metrics": metrics,
        "fixes": fixes,
        "mcnemar": test,
        "seconds": phase.seconds,
    }


def log_testset(
    dir: Path, data: Images, test_x: np.ndarray, labels: list[int], based_on: str | None = None
) -> tessera.DatasetVersion:
    """Log the test images with ``labels`` as the next dataset version; ``based_on`` (a version
    spec) is recorded as the run's input, so the UI shows v1's lineage from v0."""
    with tessera.init(
        project=PROJECT, name="fix-labels" if based_on else "log-testset", dir=dir
    ) as run:
        if based_on:
            run.use_dataset(based_on)
        description = f"{data.name} test set" + (", labels corrected" if based_on else "")
        ds = tessera.Dataset(data.name, classes=data.classes, description=description)
        for i, (image, label) in enumerate(zip(test_x, labels, strict=True)):
            ds.add(id=f"test-{i:05d}", image=image, label=label)
        return run.log_dataset(ds)


def metrics_table(console: Console, title: str, metrics: Any) -> None:
    table = RichTable(title=title)
    table.add_column("run")
    for column in metrics.columns:
        table.add_column(column)
    for name, *values in metrics.itertuples(name=None):
        table.add_row(str(name), *[f"{v:.4f}" if isinstance(v, float) else str(v) for v in values])
    console.print(table)
