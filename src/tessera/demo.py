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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    """What the models see: flattened, scaled floats — not the stored bytes."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def models() -> dict[str, Callable[[], object]]:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    return {
        "logreg": lambda: LogisticRegression(max_iter=200, C=0.5),
        "boosting": lambda: HistGradientBoostingClassifier(
            max_iter=40, learning_rate=0.2, early_stopping=False
        ),
        "mlp": lambda: MLPClassifier(hidden_layer_sizes=(128,), max_iter=25, random_state=0),
    }


def evaluate(run: tessera.Run, dsv: tessera.DatasetVersion, model: object) -> tessera.TableVersion:
    """Read the dataset back in batches, preprocess, predict, log by id: no image re-stored."""
    with run.predictions(dsv) as writer, bar(f"evaluating {run.name}", dsv.num_samples) as b:
        for batch in dsv.batches(1000, columns=("image",)):
            scores = model.predict_proba(preprocess(batch.image)).astype(np.float32)  # type: ignore[attr-defined]
            writer.add(ids=batch.ids, pred=scores.argmax(axis=1), scores=scores)
            b.advance(len(batch))
    return writer.result


def blob_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in (store / "blobs").rglob("*") if p.is_file())


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def run_demo(
    dir: Path, which: str = "fashion-mnist", train_size: int = 8000, console: Console | None = None
) -> dict[str, object]:
    console = console or Console()
    started = time.perf_counter()
    data = load_images(which, console)
    console.print(
        f"[bold]Tessera demo[/bold] on {data.name}: {len(data.test_x):,} test images, "
        f"store at {dir}"
    )

    # 1. The test set, logged once.
    with tessera.init(project=PROJECT, name="log-testset", dir=dir) as run:
        ds = tessera.Dataset(data.name, classes=data.classes, description=f"{data.name} test set")
        for i, (image, label) in enumerate(zip(data.test_x, data.test_y, strict=True)):
            ds.add(id=f"test-{i:05d}", image=image, label=int(label))
        v0 = run.log_dataset(ds)
    dataset_bytes = blob_bytes(dir)
    console.print(f"dataset {v0.spec}: {v0.num_samples:,} images, {human(dataset_bytes)} stored")

    # 2. Three models, each evaluated by reading the dataset back.
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(data.train_x), size=min(train_size, len(data.train_x)), replace=False)
    train_x, train_y = preprocess(data.train_x[chosen]), data.train_y[chosen]
    added: dict[str, int] = {}
    fitted = {}
    for name, make in models().items():
        with tessera.init(
            project=PROJECT, name=name, config={"model": name, "train_size": len(chosen)}, dir=dir
        ) as run:
            model = make()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence chatter from short training
                model.fit(train_x, train_y)  # type: ignore[attr-defined]
            fitted[name] = model
            before = blob_bytes(dir)
            dsv = run.use_dataset(f"{data.name}:v0")
            evaluate(run, dsv, model)
            added[name] = blob_bytes(dir) - before

    # 3. Suspect labels: several models confidently agree on another class.
    with tessera.compare(f"{data.name}:v0", dir=dir) as comparison:
        metrics = comparison.metrics()
        suspects = comparison.suspect_labels(k=10, min_confidence=0.9)
        best = metrics["accuracy"].sort_values(ascending=False).index[:2].tolist()
        test = comparison.mcnemar(best[1], best[0])
        regressions = comparison.regressions(best[1], best[0]).head(5)
    fixes = suspects.head(5)
    with tessera.init(project=PROJECT, name="fix-labels", dir=dir) as run:
        v0 = run.use_dataset(f"{data.name}:v0")
        labels = v0.table(["id", "label"]).to_pydict()
        corrected = dict(zip(labels["id"], labels["label"], strict=True))
        for row in fixes.itertuples():
            corrected[row.id] = data.classes.index(str(row.suggested))
        ds = tessera.Dataset(
            data.name,
            classes=data.classes,
            description=f"{data.name} test set, {len(fixes)} labels corrected",
        )
        for i, image in enumerate(data.test_x):
            sid = f"test-{i:05d}"
            ds.add(id=sid, image=image, label=corrected[sid])
        before = blob_bytes(dir)
        v1 = run.log_dataset(ds)
        v1_added = blob_bytes(dir) - before
    with tessera.init(
        project=PROJECT, name=f"{best[0]}-on-v1", config={"model": best[0]}, dir=dir
    ) as run:
        before = blob_bytes(dir)
        evaluate(run, run.use_dataset(f"{data.name}:v1"), fitted[best[0]])
        added[f"{best[0]} on v1"] = blob_bytes(dir) - before

    # 4. The report.
    naive = dataset_bytes  # what logging the images again with every evaluation would cost
    table = RichTable(title="Bytes added per evaluation")
    for column in ("evaluation", "added by Tessera", "storing the images again"):
        table.add_column(column)
    for name, size in added.items():
        table.add_row(name, human(size), human(naive))
    console.print(table)
    console.print(f"dataset v1 (labels corrected, same images) added {human(v1_added)}")
    scores = RichTable(title=f"Metrics on {data.name}:v0")
    scores.add_column("run")
    for column in metrics.columns:
        scores.add_column(column)
    for name, *values in metrics.itertuples(name=None):
        scores.add_row(str(name), *[f"{v:.4f}" if isinstance(v, float) else str(v) for v in values])
    console.print(scores)
    verdict = "significant" if test.pvalue < 0.05 else "not significant"
    console.print(
        f"McNemar {best[1]} → {best[0]}: {test.b} right→wrong, {test.c} wrong→right, "
        f"p = {test.pvalue:.3g} ({verdict})"
    )
    console.print(f"top regressions {best[1]} → {best[0]}:")
    for row in regressions.itertuples():
        console.print(
            f"  {row.id}: label {row.label}, {best[1]} said {row.base_pred}, "
            f"{best[0]} said {row.new_pred}"
        )
    console.print(
        f"labels corrected in {v1.spec}: "
        + ", ".join(f"{r.id} {r.label}→{r.suggested}" for r in fixes.itertuples())
    )
    console.print(f"\nOpen the UI:  tessera ui --dir {dir}")
    console.print(f"done in {time.perf_counter() - started:.0f} s")
    return {
        "dataset_bytes": dataset_bytes,
        "added": added,
        "v1_added": v1_added,
        "metrics": metrics,
        "fixes": fixes,
        "mcnemar": test,
    }
