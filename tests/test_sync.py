"""Offline first: log to a local store with no server, `tessera push` it later, `tessera pull`
it elsewhere; only missing blobs travel, both directions are idempotent, and what is local is
never fetched again.

What the server received is read from its counters; what it *sent* from its access log (every
request uvicorn answered, recorded by a logging handler on ``uvicorn.access``), so "no blob bytes
from the server" is observed on the server, not inferred on the client.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import tessera
from conftest import ThreadedServer, make_images, store_state
from tessera.backend.local import LocalBackend

pytestmark = pytest.mark.slow

REQUEST = re.compile(r'"([A-Z]+) (\S+) HTTP/')


class AccessLog(logging.Handler):
    """Every request the server answered: (method, path)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.requests: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = REQUEST.search(record.getMessage())
        if match:
            self.requests.append((match.group(1), match.group(2)))

    @contextmanager
    def watch(self) -> Iterator[list[tuple[str, str]]]:
        """The requests answered inside the block."""
        start = len(self.requests)
        seen: list[tuple[str, str]] = []
        yield seen
        seen.extend(self.requests[start:])


def blob_downloads(requests: list[tuple[str, str]]) -> list[str]:
    return [
        path
        for method, path in requests
        if (method == "GET" and "/blobs/" in path) or path.startswith("/api/v1/blobs/fetch")
    ]


def tessera_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    result = subprocess.run(
        [sys.executable, "-c", "from tessera.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env={**clean, "COLUMNS": "200", **env},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def project_blobs(store: Path, project: str) -> set[str]:
    """Every blob the versions of ``project`` need: manifests and the files they name."""
    backend = LocalBackend.open(store)
    try:
        out: set[str] = set()
        for version in backend.all_versions():
            if version.project == project:
                out |= {version.digest, *backend.read_manifest(version.digest).stored_digests()}
        return out
    finally:
        backend.close()


def server_blobs(store: Path) -> set[str]:
    return {p.name for p in (store / "blobs").rglob("*") if p.is_file()}


def state(store: Path) -> dict[str, object]:
    """store_state, with metric rows compared on (run, step, key, value): their logged_at is
    the time they were copied (see the report: push rewrites every metric row)."""
    out = store_state(store)
    db = sqlite3.connect(store / "catalog.db")
    try:
        out["metrics"] = sorted(
            db.execute("SELECT run_id, step, key, value FROM metrics").fetchall()
        )
    finally:
        db.close()
    return out


def content(store: Path, projects: list[str]) -> dict[str, object]:
    """What a store holds of some projects, independent of its row ids: runs with their metric
    histories, and versions with their digests."""
    backend = LocalBackend.open(store)
    try:
        runs = {
            r.id: (r.project, r.name, r.status, r.config, r.summary, backend.metric_history(r.id))
            for p in projects
            for r in backend.runs(p)
        }
        versions = {
            (v.project, v.artifact, v.version): (v.type, v.digest, v.size, v.file_count, v.run_id)
            for v in backend.all_versions()
            if v.project in projects
        }
        used = {r: sorted(v.spec for v in backend.run_versions(r)["used"]) for r in runs}  # lineage
        return {"runs": runs, "versions": versions, "used": used}
    finally:
        backend.close()


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


@dataclass
class World:
    server: ThreadedServer
    log: AccessLog
    local: Path  # the offline store everything was logged to
    env: dict[str, str]  # TESSERA_SERVER / TESSERA_TOKEN of alice, a user with no special rights
    images: Path
    first_push: subprocess.CompletedProcess[str]
    first_push_sent: dict[str, int]  # server counters moved by `tessera push --project p`
    blobs_before_p2: set[str]  # the server's blobs after that push
    p2_push_sent: dict[str, int]  # ... and by the later `tessera push --project p2`


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("sync")
    local = root / "laptop"
    images = make_images(root / "imgs", 12)
    more_images = make_images(root / "imgs2", 13)  # the same 12 images, and one more
    weights = root / "weights.bin"
    weights.write_bytes(np.random.default_rng(1).bytes(300_000))
    with pytest.MonkeyPatch.context() as mp:
        for key in ("TESSERA_SERVER", "TESSERA_TOKEN", "TESSERA_DIR"):
            mp.delenv(key, raising=False)
        # offline: no server exists yet
        with tessera.init(project="p", name="train", config={"lr": 0.1}, dir=local) as run:
            dsv = run.log_dataset(tessera.Dataset.from_folder(images, name="ds"))
            for step in range(5):
                run.log({"loss": 1.0 / (step + 1), "acc": step / 5})
            scores = np.random.default_rng(0).random((12, 3)).astype("float32")
            run.log_predictions(dsv, dsv.ids, pred=scores.argmax(1), scores=scores)
            art = tessera.Artifact("weights", type="model")
            art.add_file(weights)
            run.log_artifact(art, aliases=["best"])
        with tessera.init(project="p", name="eval", dir=local) as run:
            dsv = run.use_dataset("ds")
            run.log({"acc": 0.9})
            scores = np.random.default_rng(1).random((12, 3)).astype("float32")
            run.log_predictions(dsv, dsv.ids, pred=scores.argmax(1), scores=scores)
        with tessera.init(project="p2", name="other", dir=local) as run:
            run.log_dataset(tessera.Dataset.from_folder(more_images, name="ds2"))

    server = ThreadedServer(root / "server-store")
    log = AccessLog()
    access = logging.getLogger("uvicorn.access")
    access.addHandler(log)
    access.setLevel(logging.INFO)
    env = {"TESSERA_SERVER": server.url, "TESSERA_TOKEN": server.token_for("alice")}
    store = server.app.state.settings.dir
    before = server.stats()
    first = tessera_cli("push", "--project", "p", "--dir", str(local), env=env)
    first_sent = delta(server.stats(), before)
    blobs_before_p2 = server_blobs(store)
    before = server.stats()
    tessera_cli("push", "--project", "p2", "--dir", str(local), env=env)
    p2_sent = delta(server.stats(), before)
    yield World(server, log, local, env, images, first, first_sent, blobs_before_p2, p2_sent)
    access.removeHandler(log)
    server.stop()


def test_push_sends_only_missing_blobs_and_is_idempotent(world: World) -> None:
    w = world
    store = w.server.app.state.settings.dir
    wanted = project_blobs(w.local, "p")
    sent = w.first_push_sent
    # the first push: every blob of p, each exactly once, and everything arrived
    assert sent["blobs_received"] == len(wanted) == sent["blobs_stored"]
    assert sent["blobs_already_present"] == 0
    assert sent["blob_bytes_received"] >= sum(
        (w.local / "blobs" / d[:2] / d[2:4] / d).stat().st_size for d in wanted
    )
    assert w.blobs_before_p2 == wanted
    assert content(store, ["p"]) == content(w.local, ["p"])
    versions = len(content(w.local, ["p"])["versions"])  # type: ignore[arg-type]
    assert f"pushed 2 runs and {versions} versions ({versions} new) of p;" in w.first_push.stdout

    # the second push: nothing travels, nothing changes
    before, stats = state(store), w.server.stats()
    again = tessera_cli("push", "--project", "p", "--dir", str(w.local), env=w.env)
    moved = delta(w.server.stats(), stats)
    assert moved["blobs_received"] == moved["blob_bytes_received"] == 0
    assert "(0 new)" in again.stdout and "sent 0 blobs" in again.stdout
    assert state(store) == before


def test_pushing_another_project_with_the_same_images_sends_none_of_them(world: World) -> None:
    w = world
    store = w.server.app.state.settings.dir
    wanted = project_blobs(w.local, "p2")
    new = wanted - w.blobs_before_p2
    images = {d for d in wanted if d in project_blobs(w.local, "p")}
    assert len(images) == 12  # the twelve images p2 shares with p were on the server already
    assert len(new) == 3  # the 13th image, the sample table, the manifest
    moved = w.p2_push_sent
    assert moved["blobs_received"] == len(new) == moved["blobs_stored"]
    assert w.blobs_before_p2 | new <= server_blobs(store)
    assert content(store, ["p2"]) == content(w.local, ["p2"])


def test_pull_fetches_only_missing_blobs_and_works_offline(world: World, tmp_path: Path) -> None:
    w = world
    store = w.server.app.state.settings.dir
    elsewhere = tmp_path / "elsewhere"
    before_stats = w.server.stats()
    out = tessera_cli("pull", "--dir", str(elsewhere), env=w.env)
    versions = len(content(w.local, ["p", "p2"])["versions"])  # type: ignore[arg-type]
    assert f"pulled 3 runs and {versions} versions ({versions} new) of p, p2;" in out.stdout
    # each blob fetched once: as many sent as the server holds, and all of them arrived
    assert delta(w.server.stats(), before_stats)["blobs_sent"] == len(server_blobs(store))
    assert f"fetched {len(server_blobs(store))} blobs" in out.stdout
    assert server_blobs(elsewhere) == server_blobs(store)
    assert content(elsewhere, ["p", "p2"]) == content(w.local, ["p", "p2"])

    before = state(elsewhere)
    before_stats = w.server.stats()
    with w.log.watch() as second:
        out = tessera_cli("pull", "--dir", str(elsewhere), env=w.env)
    assert blob_downloads(second) == []
    assert delta(w.server.stats(), before_stats)["blobs_sent"] == 0
    assert "(0 new)" in out.stdout and "fetched 0 blobs" in out.stdout
    assert state(elsewhere) == before

    # offline (no TESSERA_SERVER: the embedded store, which has no way to reach a server)
    with w.log.watch() as offline:
        with tessera.compare("ds", project="p", dir=elsewhere) as comparison:
            assert sorted(r.label for r in comparison.runs) == ["eval", "train"]
            assert len(comparison.metrics()) == 2
        with tessera.init(project="p", name="offline", dir=elsewhere) as run:
            dsv = run.use_dataset("ds")
            originals = {p.name: p.read_bytes() for p in w.images.rglob("*.jpg")}
            for sid in dsv.ids:
                with dsv._backend.open_blob(dsv.image_digest(sid)) as f:
                    assert f.read() in originals.values()
                assert dsv.array(sid).shape == (24, 24, 3)
    assert offline == []  # not one request reached the server


def test_a_cached_version_reads_no_blob_bytes_from_the_server(world: World, tmp_path: Path):
    w = world
    cache = tmp_path / "cache"

    def read_everything() -> int:
        with tessera.init(project="p", dir=cache, server=w.server.url) as run:
            dsv = run.use_dataset("ds")
            total = sum(dsv.array(sid).size for sid in dsv.ids)
            assert len(dsv.to_pandas()) == 12
        return total

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESSERA_TOKEN", w.env["TESSERA_TOKEN"])
        before = w.server.stats()
        first = read_everything()
        sent = delta(w.server.stats(), before)["blobs_sent"]
        cached = server_blobs(cache)
        # 12 images, samples, manifest: each sent once, all of them p's
        assert sent == len(cached) == 14 and cached <= project_blobs(w.local, "p")
        before = w.server.stats()
        with w.log.watch() as warm:
            assert read_everything() == first
    assert blob_downloads(warm) == []
    assert delta(w.server.stats(), before)["blobs_sent"] == 0
    assert any("/resolve" in path for _m, path in warm)  # it did ask the server (for the spec)
