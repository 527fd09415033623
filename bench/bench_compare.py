"""Compare: ``tessera.compare`` over many runs' predictions on a large dataset.

Setup goes through the public API only: a ``Dataset`` of tiny distinct images logged with
``run.log_dataset``, then one run per model streaming predictions (class and ten scores per
sample) through ``run.predictions(...)``. Its times are informational, beside a floor: writing
the same PNG bytes to files.

Timed (each in a fresh child process, peak RSS its own):

1. ``tessera.compare(...)`` construction, then ``metrics()``, ``per_class()``,
   ``regressions(base, new)`` and ``disagreements()`` (``table()`` filtered in DuckDB to samples
   the runs disagree on) — target each <= 3 s, the child's peak RSS <= 4 GB;
2. the reference: the same metrics in plain pandas/numpy from the same Parquet files (read,
   join on id, accuracy, macro-F1, top-5, log loss, ECE), whose values must match.

``--quick``: 3 runs x 20,000 samples. Full: 10 runs x 1,000,000 samples.

A second variant (``compare_s3``) runs the same figures on a PostgreSQL catalog and a SeaweedFS
bucket (tests/services.py), at a smaller size; it is skipped with a note when PostgreSQL or
SeaweedFS is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import div, log, result, run_python

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
CLASSES = 10
TARGET_S = 3.0
TARGET_RSS_MIB = 4096
SETUP_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Size:
    runs: int
    samples: int
    batch: int  # predictions per PredictionWriter.add, as a data loader would yield them


FULL = Size(runs=10, samples=1_000_000, batch=50_000)
QUICK = Size(runs=3, samples=20_000, batch=5_000)
S3_FULL = Size(runs=10, samples=100_000, batch=50_000)
S3_QUICK = Size(runs=3, samples=5_000, batch=5_000)

# Builds the store through the public API and reports the time of each step.
SETUP_CHILD = r"""
import numpy as np, tessera, time
n, runs, batch, classes = ARGS["samples"], ARGS["runs"], ARGS["batch"], ARGS["classes"]
rng = np.random.default_rng(ARGS["seed"])
names = [f"class{c}" for c in range(classes)]
labels = rng.integers(0, classes, n)
ids = np.array([f"s{i:07d}" for i in range(n)])
# Tiny but real and distinct images: noise per sample, its index written into two pixels.
images = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
images[:, 0, 0] = np.arange(n) % 256
images[:, 0, 1] = (np.arange(n) // 256) % 256
images[:, 0, 2] = (np.arange(n) // 65536) % 256
t = time.perf_counter()
ds = tessera.Dataset("bench", classes=names)
for i in range(n):
    ds.add(ids[i], images[i], int(labels[i]))
add_s = time.perf_counter() - t
t = time.perf_counter()
with tessera.init(project="bench", name="data", dir=ARGS["store"]) as run:
    run.log_dataset(ds)
log_s = time.perf_counter() - t
del ds, images
rounds = []
# Models of similar quality whose mistakes correlate, as real ones do: each sample has a
# difficulty and a class it is confused with; a model of skill k gets the samples easier
# than k right, and mostly mistakes the others for their confuser.
difficulty = rng.random(n)
confuser = (labels + rng.integers(1, classes, n)) % classes
for r in range(runs):
    skill = 0.80 + 0.12 * r / max(1, runs - 1)
    right = difficulty < skill + rng.normal(0, 0.02, n)
    wrong = np.where(rng.random(n) < 0.7, confuser, rng.integers(0, classes, n))
    pred = np.where(right, labels, wrong)
    logits = rng.normal(0, 1, (n, classes)).astype(np.float32)
    logits[np.arange(n), pred] += 2.5
    scores = np.exp(logits)
    scores /= scores.sum(axis=1, keepdims=True)
    t = time.perf_counter()
    with tessera.init(project="bench", name=f"model{r}", dir=ARGS["store"]) as run:
        dataset = run.use_dataset("bench:latest")
        with run.predictions(dataset) as writer:
            for s in range(0, n, batch):
                writer.add(ids[s:s + batch], pred=pred[s:s + batch], scores=scores[s:s + batch])
    rounds.append(time.perf_counter() - t)
report({"add_s": add_s, "log_dataset_s": log_s, "rounds_s": rounds})
"""

# The floor of logging the dataset: the same PNG bytes, written to one file each.
FLOOR_CHILD = r"""
import io, os, time, numpy as np
from PIL import Image
n = ARGS["samples"]
rng = np.random.default_rng(ARGS["seed"])
rng.integers(0, ARGS["classes"], n)  # the labels: the same draws as the setup, same images
images = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
images[:, 0, 0] = np.arange(n) % 256
images[:, 0, 1] = (np.arange(n) // 256) % 256
images[:, 0, 2] = (np.arange(n) // 65536) % 256
t = time.perf_counter()
pngs = []
for image in images:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    pngs.append(out.getvalue())
encode_s = time.perf_counter() - t
root = ARGS["dir"]
t = time.perf_counter()
for i, data in enumerate(pngs):
    folder = f"{root}/{i % 256:02x}"
    if i < 256:
        os.makedirs(folder)
    with open(f"{folder}/{i}.png", "wb") as f:
        f.write(data)
os.sync()
write_s = time.perf_counter() - t
report({"encode_s": encode_s, "write_s": write_s, "bytes": sum(map(len, pngs))})
"""

# Every compare figure, timed in one process: construction first, then each query.
COMPARE_CHILD = r"""
import time, tessera
t = time.perf_counter()
c = tessera.compare("bench:latest", dir=ARGS.get("store"))
out = {"construct_s": time.perf_counter() - t}
base, new = c.runs[0].label, c.runs[-1].label
calls = {
    "metrics": c.metrics,
    "per_class": c.per_class,
    "regressions": lambda: c.regressions(base, new),
    "disagreements": c.disagreements,
}
for name, call in calls.items():
    times = []
    for _ in range(ARGS["repeat"]):
        t = time.perf_counter()
        value = call()
        times.append(time.perf_counter() - t)
    out[name + "_s"] = min(times)
    out[name + "_samples_s"] = times
    out[name + "_rows"] = len(value)
    if name == "metrics":
        out["metrics"] = {k: v for k, v in value.reset_index().to_dict("list").items()}
out["n_common"] = c.n_common
c.close()
report(out)
"""

# The reference: plain pandas/numpy over the same Parquet files.
PANDAS_CHILD = r"""
import time, numpy as np, pandas as pd, pyarrow.parquet as pq
def metrics(samples, path, classes):
    preds = pd.read_parquet(path, columns=["id", "pred", "scores"])
    joined = samples.merge(preds, on="id", how="inner")
    label = joined["label"].to_numpy()
    pred = joined["pred"].to_numpy()
    scores = np.stack(joined["scores"].to_numpy())
    confusion = np.bincount(label * classes + pred, minlength=classes * classes).reshape(
        classes, classes)
    tp = np.diag(confusion).astype(float)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros(classes), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros(classes), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(classes),
                   where=(precision + recall) > 0)
    p = scores / scores.sum(axis=1, keepdims=True)
    p_true = p[np.arange(len(label)), label]
    rank = (scores > scores[np.arange(len(label)), label][:, None]).sum(axis=1)
    conf = p.max(axis=1)
    bins = np.minimum((conf * 15).astype(int), 14)
    correct = pred == label
    ece = 0.0
    for b in range(15):
        inside = bins == b
        if inside.any():
            ece += inside.sum() / len(label) * abs(correct[inside].mean() - conf[inside].mean())
    out = {"n": len(label), "accuracy": correct.mean(), "macro_f1": f1.mean(),
           "top5_accuracy": (rank < 5).mean(), "log_loss": -np.log(np.maximum(p_true, 1e-15)).mean(),
           "ece": ece}
    return {k: float(v) for k, v in out.items()}
t = time.perf_counter()
samples = pd.read_parquet(ARGS["samples"], columns=["id", "label"])
rows = [metrics(samples, path, ARGS["classes"]) for path in ARGS["predictions"]]
report({"seconds": time.perf_counter() - t, "metrics": rows})
"""

# The Parquet blobs of the dataset and of every run, found through the public API (untimed).
PATHS_CHILD = r"""
import tessera
from tessera.api.dataset import DatasetVersion
with tessera.compare("bench:latest", dir=ARGS.get("store")) as c:
    backend = c._backend
    samples = DatasetVersion(backend, c.versions[-1]).samples_digest
    tables = [backend.read_manifest(r.table.digest).files["predictions.parquet"] for r in c.runs]
    report({
        "samples": backend.duckdb_source(samples),
        "predictions": [backend.duckdb_source(t.digest) for t in tables],
    })
"""


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    env = {"PYTHONPATH": f"{SRC}{os.pathsep}{path}" if path else str(SRC)}
    env.update(extra or {})
    return env


def _figures(
    prefix: str, size: Size, store: str | None, env: dict[str, str], with_reference: bool
) -> list[dict[str, Any]]:
    shape = f"{size.runs} runs x {size.samples:,} samples x {CLASSES} classes"
    log(f"{prefix}: compare queries on {shape}")
    child = run_python(COMPARE_CHILD, {"store": store, "repeat": 2}, env=env)
    out = child.output
    rss_ok = child.peak_rss_mib <= TARGET_RSS_MIB
    rows = [
        result(
            f"{prefix}.construct",
            out["construct_s"],
            "s",
            notes=(
                f"tessera.compare(...) on {shape}: finds the runs in the catalog and "
                "materialises the joined predictions in DuckDB. Informational."
            ),
        )
    ]
    reference_s = None
    if with_reference:
        log(f"{prefix}: the same metrics in plain pandas")
        paths = run_python(PATHS_CHILD, {"store": store}, env=env).output
        ref = run_python(
            PANDAS_CHILD,
            {"samples": paths["samples"], "predictions": paths["predictions"], "classes": CLASSES},
            env=env,
        )
        reference_s = ref.output["seconds"]
        agree = _agree(out["metrics"], ref.output["metrics"])
        rows.append(
            result(
                f"{prefix}.pandas_metrics",
                reference_s,
                "s",
                notes=(
                    "Reference: pandas reads the sample table and every run's Parquet, joins on "
                    "id and computes n, accuracy, macro-F1, top-5, log loss and ECE with numpy "
                    f"(peak RSS {child_mib(ref.peak_rss_mib)} MiB). Values agree with "
                    f"Comparison.metrics(): {agree}."
                ),
                extra={"peak_rss_mib": ref.peak_rss_mib, "values_agree": agree},
            )
        )
    if reference_s is not None:
        together = out["construct_s"] + out["metrics_s"]
        rows.append(
            result(
                f"{prefix}.construct_and_metrics",
                together,
                "s",
                reference=reference_s,
                reference_name="plain pandas metrics",
                ratio=div(together, reference_s),
                ratio_meaning="(tessera.compare(...) + metrics()) / pandas reference",
                notes=(
                    "The fair first-answer comparison: both read the Parquet files and join on "
                    "id before the first metric. Informational."
                ),
            )
        )
    for name in ("metrics", "per_class", "regressions", "disagreements"):
        seconds = out[f"{name}_s"]
        ok = seconds <= TARGET_S and rss_ok
        ratio = div(seconds, reference_s) if name == "metrics" else None
        rows.append(
            result(
                f"{prefix}.{name}",
                seconds,
                "s",
                reference=reference_s if name == "metrics" else None,
                reference_name="plain pandas metrics" if name == "metrics" and ratio else None,
                ratio=ratio,
                ratio_meaning="Comparison.metrics() / pandas reference" if ratio else None,
                target=f"<= {TARGET_S:g} s and peak RSS <= {TARGET_RSS_MIB} MiB",
                passed=ok,
                notes=(
                    f"{name}() on {shape}: {out[f'{name}_rows']:,} rows, best of "
                    f"{len(out[f'{name}_samples_s'])}; the comparing process peaked at "
                    f"{child_mib(child.peak_rss_mib)} MiB."
                ),
                extra={"samples_s": out[f"{name}_samples_s"]},
            )
        )
    rows.append(
        result(
            f"{prefix}.peak_rss",
            child.peak_rss_mib,
            "MiB",
            target=f"<= {TARGET_RSS_MIB} MiB",
            passed=rss_ok,
            notes="VmHWM of the child that constructed the comparison and ran every query.",
        )
    )
    return rows


def child_mib(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f}"


def _agree(ours: dict[str, list[Any]], theirs: list[dict[str, float]]) -> bool:
    for i, row in enumerate(theirs):
        for key, value in row.items():
            if abs(float(ours[key][i]) - float(value)) > 1e-4 * max(1.0, abs(float(value))):
                return False
    return True


def _setup(prefix: str, size: Size, store: str, env: dict[str, str]) -> list[dict[str, Any]]:
    log(f"{prefix}: logging a {size.samples:,}-sample dataset and {size.runs} prediction rounds")
    args = {
        "store": store,
        "samples": size.samples,
        "runs": size.runs,
        "batch": size.batch,
        "classes": CLASSES,
        "seed": 7,
    }
    setup = run_python(SETUP_CHILD, args, env=env, timeout=SETUP_TIMEOUT_S)
    s = setup.output
    return [
        result(
            f"{prefix}.dataset_add",
            s["add_s"],
            "s",
            notes=f"Informational: Dataset.add of {size.samples:,} 8x8 uint8 arrays.",
        ),
        result(
            f"{prefix}.log_dataset",
            s["log_dataset_s"],
            "s",
            notes=(
                f"Informational: run.log_dataset of {size.samples:,} samples "
                f"({size.samples / s['log_dataset_s']:,.0f} samples/s; PNG encode, pixel "
                "digest, BLAKE3, one blob file each, manifest, sample table, catalog index). "
                f"Setup peak RSS {child_mib(setup.peak_rss_mib)} MiB."
            ),
            extra={"samples_per_s": size.samples / s["log_dataset_s"]},
        ),
        result(
            f"{prefix}.prediction_round",
            max(s["rounds_s"]),
            "s",
            notes=(
                f"Informational: the slowest of {size.runs} rounds of use_dataset + a "
                f"PredictionWriter fed {size.batch:,} ids, preds and {CLASSES} scores per batch."
            ),
            extra={"rounds_s": s["rounds_s"]},
        ),
    ]


def _local(workdir: Path, quick: bool) -> list[dict[str, Any]]:
    size = QUICK if quick else FULL
    store = workdir / "store"
    env = _env()
    rows = _setup("compare", size, str(store), env)
    log("compare: floor — the same PNG bytes written to one file each")
    floor_dir = workdir / "floor"
    floor_dir.mkdir(parents=True)
    floor = run_python(
        FLOOR_CHILD,
        {"samples": size.samples, "seed": 7, "classes": CLASSES, "dir": str(floor_dir)},
    )
    shutil.rmtree(floor_dir)
    f = floor.output
    log_dataset = next(r for r in rows if r["name"] == "compare.log_dataset")
    log_dataset.update(
        reference=f["encode_s"] + f["write_s"],
        reference_name="PIL PNG encode + one file write each",
        ratio=div(log_dataset["value"], f["encode_s"] + f["write_s"]),
        ratio_meaning="log_dataset / (encode + write the same PNGs)",
    )
    log_dataset["extra"].update(floor_encode_s=f["encode_s"], floor_write_s=f["write_s"])
    return rows + _figures("compare", size, str(store), env, with_reference=True)


def _services() -> Any:
    spec = importlib.util.spec_from_file_location(
        "tessera_test_services", REPO / "tests/services.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _s3(workdir: Path, quick: bool) -> list[dict[str, Any]]:
    import pytest  # tests/services.py reports a missing server with pytest.fail

    size = S3_QUICK if quick else S3_FULL
    unavailable = (Exception, pytest.fail.Exception)
    try:
        services = _services()
        postgres = services.Postgres(workdir / "pg")
    except unavailable as e:
        return [_skipped(f"PostgreSQL unavailable: {e}")]
    try:
        try:
            seaweed = services.SeaweedFS(workdir / "weed")
        except unavailable as e:
            return [_skipped(f"SeaweedFS unavailable: {e}")]
        try:
            env = _env(
                {
                    **seaweed.env(),
                    "TESSERA_CATALOG": postgres.new_database(),
                    "TESSERA_BLOBS": seaweed.new_prefix(),
                }
            )
            store = str(workdir / "client")  # the folder of the bucket's local cache
            rows = _setup("compare_s3", size, store, env)
            return rows + _figures("compare_s3", size, store, env, with_reference=False)
        finally:
            seaweed.stop()
    finally:
        postgres.stop()


def _skipped(why: str) -> dict[str, Any]:
    return result("compare_s3.skipped", 0, "", notes=why)


def run(workdir: Path, quick: bool) -> list[dict[str, Any]]:
    rows = _local(workdir / "local", quick)
    if os.environ.get("TESSERA_BENCH_S3", "1") != "0":
        rows += _s3(workdir / "s3", quick)
    return rows
