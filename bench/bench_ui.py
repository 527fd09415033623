"""Web UI: server time of the pages that touch the most rows, on a big store.

The store: one dataset of ``samples`` tiny 4x4 images (cycled from a pool of ``IMAGE_POOL``
distinct arrays, as in bench_predictions: every sample has its own id, manifest entry and
sample-table row) with 10 classes, and ``runs`` runs that each log predictions (``pred`` and 10
float32 ``scores``) on every sample by id. Built with the public API (``Dataset.add``,
``run.log_dataset``, ``run.log_predictions``) in child processes; the build is timed and
reported. Full mode aims at 1,000,000 samples and 10 runs, but only builds as many samples as
``run.log_dataset`` manages in ``BUILD_BUDGET_S`` on this machine (measured on a 20,000-sample
probe first); the size used is in every figure's notes. Quick mode: 20,000 samples, 3 runs.

Then ``tessera server`` runs on the store in its own process (uvicorn, as deployed) and httpx
sends ``REQUESTS`` requests per figure, signed in with the admin token:

- the table viewer's first page of a predictions table (joined by id with the dataset's label
  and original image in DuckDB), and of the dataset's sample table;
- a sorted + filtered page (``label = "class_k" and pred != label``, sorted by score,
  descending; k and the page vary, so counts are not all cached);
- the compare page of every run (metrics, McNemar against the base, per-class F1, confusion
  matrices, the first page of the sample grid);
- confusion-cell drill-downs (``Comparison.samples`` for a different cell each request, one
  page of the grid);
- a cached thumbnail (``THUMB_REQUESTS`` requests).

The first request of each page is "cold" (it loads the Parquet files into DuckDB, or builds
the Comparison) and is reported on its own; the target is on the warm requests: p50 <= 300 ms
and p95 <= 1 s, and <= 10 ms (p50) for a cached thumbnail. Latency is measured by the client
over loopback (so it includes HTTP); the server's own time (``Server-Timing``) is in extra.
Response sizes show that only one page of rows travels.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import log, result, run_python

IMAGE_POOL = 1_000
CLASSES = 10
BUILD_BUDGET_S = 180.0
PROBE_SAMPLES = 20_000
P50_TARGET_S = 0.300
P95_TARGET_S = 1.0
THUMB_TARGET_S = 0.010


@dataclass(frozen=True)
class Sizes:
    samples: int
    runs: int
    requests: int
    thumb_requests: int
    adaptive: bool


FULL = Sizes(samples=1_000_000, runs=10, requests=20, thumb_requests=200, adaptive=True)
QUICK = Sizes(samples=20_000, runs=3, requests=10, thumb_requests=100, adaptive=False)

BUILD_CHILD = r"""
import numpy as np
import tessera

n, pool_size = ARGS["samples"], ARGS["pool"]
rng = np.random.default_rng(0)
pool = np.zeros((pool_size, 16), np.uint8)
pool[:, :8] = np.arange(pool_size, dtype="<u8").view(np.uint8).reshape(pool_size, 8)
pool[:, 8:] = rng.integers(0, 256, (pool_size, 8), dtype=np.uint8)
images = [row.reshape(4, 4) for row in pool]
labels = rng.integers(0, ARGS["classes"], n)
t0 = _time.perf_counter()
ds = tessera.Dataset("bigset", classes=[f"class_{k}" for k in range(ARGS["classes"])])
for i in range(n):
    ds.add(f"img{i:07d}", images[i % pool_size], int(labels[i]))
t1 = _time.perf_counter()
with tessera.init(project="bench", name="build", dir=ARGS["store"]) as run:
    dsv = run.log_dataset(ds)
t2 = _time.perf_counter()
ids = np.array(dsv.ids, dtype=object)
stored_labels = np.asarray(dsv.table(["label"]).column("label").to_numpy(), dtype=np.int64)
predictions = []
for r in range(ARGS["runs"]):
    with tessera.init(project="bench", name=f"model-{r}", config={"seed": r, "lr": 0.1 / (r + 1)},
                      dir=ARGS["store"]) as run:
        version = run.use_dataset("bigset:v0")
        g = np.random.default_rng(100 + r)
        logits = g.normal(0.0, 2.0, (n, ARGS["classes"])).astype(np.float32)
        logits[np.arange(n), stored_labels] += 2.0 + 0.2 * r
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        scores = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        t = _time.perf_counter()
        table = run.log_predictions(version, ids, pred=scores.argmax(1).astype(np.int32),
                                    scores=scores)
        predictions.append(_time.perf_counter() - t)
        run.summary["accuracy"] = float((scores.argmax(1) == stored_labels).mean())
report({"add_s": t1 - t0, "log_dataset_s": t2 - t1, "predictions_s": predictions,
        "dataset": dsv.spec})
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``tessera server`` in a child process, with its first admin token."""

    def __init__(self, store: Path, log_path: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
        with open(log_path, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from tessera.cli import main; main()", "server",
                 "--dir", str(store), "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        import httpx

        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"tessera server exited: {log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"tessera server did not start: {log_path.read_text()}")
            time.sleep(0.2)
        tokens = [
            line.strip()
            for line in log_path.read_text().splitlines()
            if line.strip().startswith("tsr_")
        ]
        if not tokens:
            raise RuntimeError("no admin token in the server's output")
        self.token = tokens[0]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


def _timed_get(http: Any, url: str, **kwargs: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    response = http.get(url, **kwargs)
    seconds = time.perf_counter() - start
    if response.status_code not in (200, 304):
        raise RuntimeError(f"GET {url} -> {response.status_code}: {response.text[:500]}")
    return seconds, response


def _server_ms(response: Any) -> float | None:
    match = re.search(r"app;dur=([0-9.]+)", response.headers.get("server-timing", ""))
    return float(match.group(1)) if match else None


def _measure(
    http: Any, name: str, urls: list[tuple[str, dict[str, Any]]], what: str, size_note: str
) -> tuple[dict[str, Any], float]:
    """Cold request (the first URL), then every URL once more (warm), timed."""
    cold_url, cold_kwargs = urls[0]
    cold, first = _timed_get(http, cold_url, **cold_kwargs)
    samples, server_ms, sizes = [], [], []
    for url, kwargs in urls:
        seconds, response = _timed_get(http, url, **kwargs)
        samples.append(seconds)
        sizes.append(len(response.content))
        ms = _server_ms(response)
        if ms is not None:
            server_ms.append(ms)
    p50, p95 = _pct(samples, 50), _pct(samples, 95)
    passed = p50 <= P50_TARGET_S and p95 <= P95_TARGET_S
    row = result(
        name,
        round(p50 * 1000, 1),
        "ms",
        target="p50 <= 300 ms and p95 <= 1 s (warm)",
        passed=passed,
        notes=(
            f"{what}. {len(samples)} warm requests: p50 {p50 * 1000:.0f} ms, p95 "
            f"{p95 * 1000:.0f} ms, max {max(samples) * 1000:.0f} ms; the first (cold) request "
            f"took {cold * 1000:.0f} ms. Response {statistics.median(sizes) / 1024:.1f} KiB "
            f"(median) — {size_note}."
        ),
        extra={
            "p50_ms": p50 * 1000,
            "p95_ms": p95 * 1000,
            "cold_ms": cold * 1000,
            "samples_ms": [s * 1000 for s in samples],
            "server_timing_ms": server_ms,
            "response_bytes": sizes,
            "cold_response_bytes": len(first.content),
        },
    )
    return row, cold


def run(workdir: Path, quick: bool) -> list[dict[str, Any]]:
    import httpx

    sizes = QUICK if quick else FULL
    results: list[dict[str, Any]] = []
    samples = sizes.samples
    build_notes = ""
    if sizes.adaptive:
        log(f"ui: probing the dataset build rate with {PROBE_SAMPLES:,} samples")
        probe = run_python(
            BUILD_CHILD,
            {"store": str(workdir / "probe"), "samples": PROBE_SAMPLES, "pool": IMAGE_POOL,
             "classes": CLASSES, "runs": 0},
            timeout=900,
        ).output  # fmt: skip
        per_sample = (probe["add_s"] + probe["log_dataset_s"]) / PROBE_SAMPLES
        feasible = int(BUILD_BUDGET_S / per_sample) // 10_000 * 10_000
        samples = max(PROBE_SAMPLES, min(sizes.samples, feasible))
        build_notes = (
            f" The probe built {PROBE_SAMPLES:,} samples in "
            f"{probe['add_s'] + probe['log_dataset_s']:.1f} s ({per_sample * 1e6:.0f} µs per "
            f"sample), so a {sizes.samples:,}-sample build would take about "
            f"{per_sample * sizes.samples / 60:.0f} min; "
            + (
                f"the benchmark used {samples:,} samples, what fits in {BUILD_BUDGET_S:.0f} s."
                if samples < sizes.samples
                else "it fits the budget."
            )
        )
        import shutil

        shutil.rmtree(workdir / "probe", ignore_errors=True)
    store = workdir / "store"
    log(f"ui: building a {samples:,}-sample dataset and {sizes.runs} prediction runs")
    started = time.perf_counter()
    build = run_python(
        BUILD_CHILD,
        {"store": str(store), "samples": samples, "pool": min(samples, IMAGE_POOL),
         "classes": CLASSES, "runs": sizes.runs},
        timeout=3600,
    )  # fmt: skip
    b = build.output
    wall = time.perf_counter() - started
    size_text = f"{samples:,} samples x {sizes.runs} runs"
    results.append(
        result(
            "ui.store_build",
            round(b["add_s"] + b["log_dataset_s"] + sum(b["predictions_s"]), 1),
            "s",
            notes=(
                f"Informational: the benchmark store, {size_text} (target size "
                f"{sizes.samples:,} x {sizes.runs}). Dataset.add {b['add_s']:.1f} s + "
                f"run.log_dataset {b['log_dataset_s']:.1f} s + {sizes.runs} x "
                f"run.log_predictions (median {statistics.median(b['predictions_s']):.1f} s); "
                f"{wall:.0f} s wall with interpreter start-up.{build_notes}"
            ),
            extra={**b, "samples": samples, "runs": sizes.runs, "wall_s": wall},
        )
    )

    server = Server(store, workdir / "server.log")
    try:
        headers = {"Authorization": f"Bearer {server.token}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=600) as http:
            # where things are: the dataset version, a predictions table, the runs
            versions = http.get("/api/v1/versions").json()
            dataset = next(v for v in versions if v["type"] == "dataset")
            predictions = [v for v in versions if v["type"] == "predictions"]
            table = predictions[0]
            n = sizes.requests

            rows_url = f"/versions/{table['id']}/rows"
            row, _ = _measure(
                http,
                "ui.table.first_page",
                [(rows_url, {})] * n,
                f"Table viewer, first page of a predictions table ({samples:,} rows, joined "
                f"by id with the dataset's label and original image; {size_text})",
                "one page: 50 rows",
            )
            results.append(row)
            row, _ = _measure(
                http,
                "ui.table.first_page.dataset",
                [(f"/versions/{dataset['id']}/rows", {})] * n,
                f"Table viewer, first page of the dataset's sample table ({samples:,} rows)",
                "one page: 50 rows",
            )
            results.append(row)
            filtered = [
                (
                    rows_url,
                    {
                        "params": {
                            "q": f'label = "class_{i % CLASSES}" and pred != label',
                            "sort": "score",
                            "desc": "1",
                            "page": str(1 + i // CLASSES),
                        }
                    },
                )
                for i in range(n)
            ]
            row, _ = _measure(
                http,
                "ui.table.sorted_filtered",
                filtered,
                'Table viewer, label = "class_k" and pred != label, sorted by score '
                "descending; k and the page change every request (10 different filters, "
                "so half the counts are not cached)",
                "one page: 50 rows",
            )
            results.append(row)

            compare_url = f"/compare?dataset={dataset['id']}"
            t0 = time.perf_counter()
            row, cold = _measure(
                http,
                "ui.compare.page",
                [(compare_url, {})] * n,
                f"Compare page of all {sizes.runs} runs on {samples:,} samples: metrics, "
                "McNemar against the base, per-class F1, confusion matrices, the first page "
                "of the sample grid",
                "48 sample tiles and the matrices",
            )
            row["extra"]["cold_includes"] = (
                "Comparison built in DuckDB + metrics, per-class, confusions and McNemar "
                "(computed once per comparison and base run, then cached)"
            )
            log(f"ui: compare page cold {cold:.1f} s (total {time.perf_counter() - t0:.1f} s)")
            results.append(row)
            cells = [(i % sizes.runs, (i * 3) % CLASSES, (i * 7 + 2) % CLASSES) for i in range(n)]
            cell_urls = [
                (
                    "/compare/samples",
                    {
                        "params": {"dataset": dataset["id"], "cell": f"{r}.{t}.{p}"},
                        "headers": {"HX-Request": "true", "HX-Target": "samples"},
                    },
                )
                for r, t, p in cells
            ]
            row, _ = _measure(
                http,
                "ui.compare.cell",
                cell_urls,
                "Confusion-cell drill-down (htmx fragment): Comparison.samples(run, true, "
                f"pred) for a different cell every request over {samples:,} x "
                f"{sizes.runs} predictions, and one page of the grid",
                "one page: 48 tiles",
            )
            results.append(row)

            floor = []
            for _ in range(sizes.thumb_requests):
                seconds, _response = _timed_get(http, "/api/v1/health")
                floor.append(seconds)
            floor_p50 = _pct(floor, 50)
            page = http.get(f"/versions/{dataset['id']}/rows").text
            thumb = re.search(r'src="(/media/thumb/[^"]+)"', page).group(1)
            http.get(thumb)  # made and cached once
            times = []
            for _ in range(sizes.thumb_requests):
                seconds, response = _timed_get(http, thumb)
                times.append(seconds)
            p50, p95 = _pct(times, 50), _pct(times, 95)
            results.append(
                result(
                    "ui.thumbnail.cached",
                    round(p50 * 1000, 2),
                    "ms",
                    reference=round(floor_p50 * 1000, 2),
                    reference_name="GET /api/v1/health, same server (p50)",
                    ratio=p50 / floor_p50 if floor_p50 else None,
                    ratio_meaning="thumbnail p50 / health p50: the cost above an empty request",
                    target="p50 <= 10 ms",
                    passed=p50 <= THUMB_TARGET_S,
                    notes=(
                        f"{sizes.thumb_requests} GETs of one cached 128 px WebP thumbnail "
                        f"({len(response.content)} bytes; permission check against the "
                        f"catalog, then the file from cache/thumbs): p50 {p50 * 1000:.1f} ms, "
                        f"p95 {p95 * 1000:.1f} ms. Served with "
                        f"Cache-Control: {response.headers.get('cache-control')} and an ETag, "
                        "so a browser does not ask again."
                    ),
                    extra={
                        "samples_ms": [t * 1000 for t in times],
                        "health_samples_ms": [t * 1000 for t in floor],
                    },
                )
            )
    finally:
        server.stop()
    return results
