"""PostgreSQL + S3 (issue #7): Tessera against plain obstore and psycopg doing the same work, in
this run, on PostgreSQL 15 and SeaweedFS started here (``tests/services.py``).

(a) Ingest of 10,000 small images (28x28 PNGs of the Fashion-MNIST test set from Debian's
    ``dataset-fashion-mnist``; generated ones where it is absent) with ``TESSERA_CATALOG`` and
    ``TESSERA_BLOBS`` pointing at a fresh database and a fresh bucket prefix: as a dataset
    (``Dataset.from_folder`` + ``log_dataset``: sample table, pixel digests, catalog index) and
    as a plain artifact (``add_dir`` + ``log_artifact``), each against raw ``obstore.put`` of the
    same files' bytes with the same number of threads as Tessera's ingest (the target), and for
    information against raw conditional creates (``mode="create"``), the operation Tessera
    must use. Floor and Tessera run in five back-to-back pairs, and the target is judged on the
    median of the pairs' ratios (``benchlib.paired_throughput_result``): on two cores shared with
    SeaweedFS and PostgreSQL one run of either moves by 15-40 %.
(b) 10 prediction rounds of 100,000 rows (``run.log_predictions(dsv, ids, pred=, scores=)``)
    against a 100,000-sample dataset, each round followed by the floor: the prediction columns
    written as zstd Parquet (pyarrow) and stored with one ``obstore.put``, plus one psycopg
    INSERT of a row naming it, committed. Rounds and floors alternate, so both see the same load.
    The dataset's images are drawn from a pool of 1,000 distinct Fashion-MNIST images, cycled
    (every sample still has its own id and sample-table row), to keep its build short.

Every Tessera step runs in a fresh child interpreter, timed inside it (interpreter start-up and
imports excluded, including those Tessera and pyarrow make on first use, which are reported as
``first_use_imports_s``; so is creating the fresh store's schema before an ingest). Set ``TESSERA_BENCH_PROFILE=DIR`` to get cProfile dumps of the Tessera steps.
"""

from __future__ import annotations

import importlib.util
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchlib import (
    alternating,
    div,
    flush_dirty_pages,
    log,
    paired_throughput_result,
    result,
    run_python,
)

REPO = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Sizes:
    images: int
    samples: int  # of the dataset the predictions are logged against
    rounds: int
    pool: int  # distinct images in that dataset
    reps: int  # pairs of a floor and an ingest of each kind (benchlib.alternating)


FULL = Sizes(images=10_000, samples=100_000, rounds=10, pool=1_000, reps=5)
QUICK = Sizes(images=1_000, samples=10_000, rounds=3, pool=200, reps=2)

INGEST_FACTOR = 0.70  # ingest throughput >= 70% of raw obstore puts

# -- child programs (benchlib.CHILD_PRELUDE is prepended: ARGS, report(), _T0) ------------------

PROFILE = r"""
import os
PROFILE_DIR = os.environ.get("TESSERA_BENCH_PROFILE")
prof = None
if PROFILE_DIR:
    import cProfile
    prof = cProfile.Profile()


def dump(label):
    if prof:
        prof.dump_stats(os.path.join(PROFILE_DIR, label + ".prof"))
"""

INGEST = (
    PROFILE
    + r"""
_t = _time.perf_counter
import tessera
from tessera.store import Store
t0 = _t()
Store.open(ARGS["store"], create=True).close()  # a fresh store's schema: setup, not ingest
create_s = _t() - t0
# Imports are not timed (nor are the floor's): here, the ones Tessera makes on first use, namely
# tessera.api.dataset (NumPy, Pillow, pyarrow) and pandas, which pyarrow imports on its first
# array. They are paid once per process, and reported.
t0 = _t()
import pandas
tessera.Dataset, tessera.Artifact
imports_s = _t() - t0
if prof:
    prof.enable()
t0 = _t()
with tessera.init(project="bench", name="ingest", dir=ARGS["store"]) as run:
    if ARGS["kind"] == "dataset":
        version = run.log_dataset(tessera.Dataset.from_folder(ARGS["images"], name="images"))
    else:
        art = tessera.Artifact("images", type="files")
        art.add_dir(ARGS["images"])
        version = run.log_artifact(art)
seconds = _t() - t0
if prof:
    prof.disable()
dump("ingest_" + ARGS["kind"])
report({"seconds": seconds, "spec": version.spec, "files": version.file_count,
        "store_create_s": create_s, "first_use_imports_s": imports_s})
"""
)

RAW_PUTS = r"""
from concurrent.futures import ThreadPoolExecutor
import obstore
from obstore.store import S3Store
_t = _time.perf_counter
s3 = S3Store(ARGS["bucket"], prefix=ARGS["prefix"], endpoint=ARGS["endpoint"],
             access_key_id=ARGS["key"], secret_access_key=ARGS["secret"], region="us-east-1",
             client_options={"allow_http": True})


MODE = {"mode": ARGS["mode"]} if ARGS.get("mode") else {}  # "create": If-None-Match: *


def put(path):
    with open(path, "rb") as f:
        data = f.read()
    obstore.put(s3, path.rpartition("/")[2], data, **MODE)
    return len(data)


t0 = _t()
with ThreadPoolExecutor(ARGS["threads"]) as pool:
    total = sum(pool.map(put, ARGS["files"]))
report({"seconds": _t() - t0, "bytes": total, "objects": len(ARGS["files"])})
"""

BUILD = r"""
import numpy as np
import tessera
_t = _time.perf_counter
pool = np.load(ARGS["pool"])
labels = np.load(ARGS["labels"])
t0 = _t()
ds = tessera.Dataset("eval-set", classes=[f"class_{k}" for k in range(10)])
for i in range(ARGS["samples"]):
    ds.add(f"s{i:07d}", pool[i % len(pool)], int(labels[i % len(pool)]))
with tessera.init(project="bench", name="build", dir=ARGS["store"]) as run:
    version = run.log_dataset(ds)
report({"seconds": _t() - t0, "spec": version.spec, "samples": version.num_samples})
"""

ROUNDS = (
    PROFILE
    + r"""
import io
import uuid
import numpy as np
import obstore
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from obstore.store import S3Store
import tessera
_t = _time.perf_counter

run = tessera.init(project="bench", name="eval", dir=ARGS["store"])
dsv = run.use_dataset(ARGS["dataset"])
ids = np.array(list(dsv.ids), dtype=object)  # what Batch.ids looks like
labels = dsv.table(["label"]).column("label").to_numpy().astype(np.int64)
classes = len(dsv.classes)

s3 = S3Store(ARGS["bucket"], prefix=ARGS["prefix"], endpoint=ARGS["endpoint"],
             access_key_id=ARGS["key"], secret_access_key=ARGS["secret"], region="us-east-1",
             client_options={"allow_http": True})
db = psycopg.connect(ARGS["dsn"])
db.execute("CREATE TABLE rounds (key text PRIMARY KEY, num_rows bigint, created_at double precision)")
db.commit()


def fake_predictions(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (len(labels), classes)).astype(np.float32)
    logits[np.arange(len(labels)), labels] += 3.0
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    scores = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return scores.argmax(axis=1).astype(np.int32), scores


def floor_round(pred, scores):
    table = pa.table({
        "id": pa.array(ids, pa.string()),
        "pred": pa.array(pred),
        "scores": pa.FixedSizeListArray.from_arrays(pa.array(scores.reshape(-1)), classes),
    })
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    key = f"rounds/{uuid.uuid4().hex}.parquet"
    obstore.put(s3, key, sink.getvalue())
    db.execute("INSERT INTO rounds VALUES (%s, %s, %s)", (key, len(ids), _time.time()))
    db.commit()
    return len(sink.getvalue())


tessera_s, floor_s, floor_bytes = [], [], 0
for r in range(ARGS["rounds"]):
    pred, scores = fake_predictions(r)
    if prof:
        prof.enable()
    t0 = _t()
    run.log_predictions(dsv, ids, pred=pred, scores=scores)
    tessera_s.append(_t() - t0)
    if prof:
        prof.disable()
    t0 = _t()
    floor_bytes = floor_round(pred, scores)
    floor_s.append(_t() - t0)
run.finish()
dump("prediction_rounds")
report({"tessera_s": tessera_s, "floor_s": floor_s, "floor_parquet_bytes": floor_bytes,
        "rows": len(ids)})
"""
)


# -- helpers -----------------------------------------------------------------------------------


def _services() -> Any:
    """tests/services.py, imported by path (the benchmark is not a test)."""
    spec = importlib.util.spec_from_file_location(
        "tessera_test_services", REPO / "tests/services.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _images(count: int) -> tuple[np.ndarray, np.ndarray, str]:
    """``count`` 28x28 grey images and labels: Fashion-MNIST's test set, else generated."""
    if (FASHION / "t10k-images-idx3-ubyte.gz").exists():
        from tessera.demo import _read_idx

        images = _read_idx(FASHION / "t10k-images-idx3-ubyte.gz")
        labels = _read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
        reps = -(-count // len(images))
        return np.tile(images, (reps, 1, 1))[:count], np.tile(labels, reps)[:count], "fashion-mnist"
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    return images, rng.integers(0, 10, count).astype(np.uint8), "generated noise"


def _write_pngs(root: Path, images: np.ndarray, labels: np.ndarray) -> list[str]:
    from PIL import Image

    paths = []
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:05d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


class Services:
    """PostgreSQL and SeaweedFS, and the environment that points Tessera at a fresh store."""

    def __init__(self, workdir: Path):
        services = _services()
        self.pg = services.Postgres(workdir / "postgres")
        try:
            self.s3 = services.SeaweedFS(workdir / "seaweedfs")
        except BaseException:
            self.stop_postgres()
            raise
        self.bucket, self.key, self.secret = services.S3_BUCKET, services.S3_KEY, services.S3_SECRET

    def stop_postgres(self) -> None:
        self.pg.stop()
        shutil.rmtree(self.pg.root, ignore_errors=True)

    def stop(self) -> None:
        self.s3.stop()
        self.stop_postgres()

    def fresh_store(self) -> tuple[dict[str, str], str, str]:
        """(environment for a fresh PostgreSQL database + bucket prefix, database, prefix)."""
        catalog, blobs = self.pg.new_database(), self.s3.new_prefix()
        env = {**self.s3.env(), "TESSERA_CATALOG": catalog, "TESSERA_BLOBS": blobs}
        return env, catalog.rpartition("/")[2], blobs.removeprefix(f"s3://{self.bucket}/")

    def s3_args(self, prefix: str) -> dict[str, str]:
        return {
            "bucket": self.bucket,
            "prefix": prefix,
            "endpoint": self.s3.endpoint,
            "key": self.key,
            "secret": self.secret,
        }

    def dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.pg.port} user=postgres dbname={database}"


# -- the benchmark -----------------------------------------------------------------------------


def run(workdir: Path, quick: bool) -> list[dict[str, Any]]:
    sizes = QUICK if quick else FULL
    log("scaleout: starting PostgreSQL 15 and SeaweedFS")
    services = Services(workdir)
    try:
        return _ingest(services, workdir, sizes) + _predictions(services, workdir, sizes)
    finally:
        services.stop()


def _ingest(services: Services, workdir: Path, sizes: Sizes) -> list[dict[str, Any]]:
    from tessera.store.s3 import WRITE_THREADS as threads

    images, labels, source = _images(sizes.images)
    folder = workdir / "images"
    files = _write_pngs(folder, images, labels)
    total = sum(Path(f).stat().st_size for f in files)
    rows = []
    for kind in ("dataset", "artifact"):
        log(f"scaleout: raw obstore puts and Tessera {kind} ingests, {sizes.reps} pairs")

        def floor_run() -> float:
            _env, _db, prefix = services.fresh_store()
            flush_dirty_pages()
            child = run_python(
                RAW_PUTS, {**services.s3_args(prefix), "files": files, "threads": threads}
            )
            return float(child.output["seconds"])

        def ingest_run(kind: str = kind) -> dict[str, Any]:
            env, _db, _prefix = services.fresh_store()
            flush_dirty_pages()
            store = workdir / f"store-{kind}"
            out = run_python(
                INGEST, {"store": str(store), "images": str(folder), "kind": kind}, env=env
            ).output
            shutil.rmtree(store, ignore_errors=True)
            return out

        floors, ingests = alternating(sizes.reps, floor_run, ingest_run)
        seconds = [o["seconds"] for o in ingests]
        out = ingests[0]
        # The conditional create Tessera must use (concurrent writers of one blob), done raw:
        # informational, to show how much of the gap to plain puts that operation is.
        _env, _db, prefix = services.fresh_store()
        flush_dirty_pages()
        creates = run_python(
            RAW_PUTS,
            {**services.s3_args(prefix), "files": files, "threads": threads, "mode": "create"},
        ).output["seconds"]
        rate = len(files) / statistics.median(seconds)
        what = (
            "Dataset.from_folder + log_dataset (sample table, pixel digests, catalog index)"
            if kind == "dataset"
            else "Artifact.add_dir + log_artifact"
        )
        rows.append(
            paired_throughput_result(
                f"scaleout.ingest_{kind}",
                "images/s",
                len(files),
                floors,
                seconds,
                floor_name=f"raw obstore.put, {threads} threads",
                share=INGEST_FACTOR,
                notes=(
                    f"{len(files)} PNGs of 28x28 ({source}, {total / 1024**2:.1f} MiB) logged "
                    f"with {what} on PostgreSQL 15 + SeaweedFS S3, a fresh database and prefix "
                    f"each time ({out['spec']}; {out['first_use_imports_s']:.2f} s of imports on "
                    f"first use, untimed). Floor: obstore.put of each file's bytes, {threads} "
                    f"threads (Tessera's S3 write threads), on a fresh prefix of the same bucket."
                ),
                extra={"tessera": ingests, "bytes": total},
            )
        )
        rows.append(
            result(
                f"scaleout.ingest_{kind}.vs_creates",
                rate,
                "images/s",
                reference=len(files) / creates,
                reference_name=f'raw obstore.put(mode="create"), {threads} threads',
                ratio=div(rate, len(files) / creates),
                ratio_meaning="throughput / raw conditional creates' throughput",
                notes=(
                    f"The same ingest against raw conditional creates (If-None-Match: *, which "
                    f"Tessera must use so that concurrent writers of one blob are safe) of the "
                    f"same files: {creates:.2f} s, one run after the others, against the median "
                    f"ingest. Informational; the target is judged against plain puts above."
                ),
            )
        )
    shutil.rmtree(folder, ignore_errors=True)
    return rows


def _predictions(services: Services, workdir: Path, sizes: Sizes) -> list[dict[str, Any]]:
    images, labels, source = _images(sizes.pool)
    np.save(workdir / "pool.npy", images)
    np.save(workdir / "labels.npy", labels)
    env, database, prefix = services.fresh_store()
    store = workdir / "store-predictions"
    log(f"scaleout: building a {sizes.samples:,}-sample dataset on PostgreSQL + S3")
    built = run_python(
        BUILD,
        {
            "store": str(store),
            "samples": sizes.samples,
            "pool": str(workdir / "pool.npy"),
            "labels": str(workdir / "labels.npy"),
        },
        env=env,
    ).output
    log(
        f"scaleout: {sizes.rounds} prediction rounds of {sizes.samples:,} rows, each with its floor"
    )
    out = run_python(
        ROUNDS,
        {
            "store": str(store),
            "dataset": built["spec"],
            "rounds": sizes.rounds,
            "dsn": services.dsn(database),
            **services.s3_args(prefix + "-floor"),
        },
        env=env,
    ).output
    # The first round also loads the dataset's id index: the median is the steady state.
    median, floor = statistics.median(out["tessera_s"]), statistics.median(out["floor_s"])
    return [
        result(
            "scaleout.prediction_round",
            median,
            "s",
            reference=floor,
            reference_name="pyarrow zstd Parquet + obstore.put + psycopg INSERT",
            ratio=div(median, floor),
            ratio_meaning="Tessera round time / floor round time (medians)",
            notes=(
                f"Informational: median of {sizes.rounds} rounds of run.log_predictions of "
                f"{out['rows']:,} rows (pred + 10 float32 scores) against a {built['samples']:,}-"
                f"sample dataset ({source} images, {sizes.pool} distinct, cycled) on PostgreSQL + "
                f"S3; first round {out['tessera_s'][0]:.2f} s. Floor, after each round: the same "
                f"columns with the ids as zstd Parquet ({out['floor_parquet_bytes']:,} bytes), "
                "one obstore.put and one committed psycopg INSERT."
            ),
            extra={**out, "dataset_build": built},
        )
    ]
