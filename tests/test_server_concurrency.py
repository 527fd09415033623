"""A real server under duress: killed (SIGKILL) in the middle of a large upload and restarted on
the same port and store, and eight client processes committing versions of one artifact at once.

Clients are child processes started by a fork server (a fresh interpreter that imported tessera
once): plain fork() from the test process would copy BLAKE3's thread pool without its threads,
see test_a_forked_child_can_hash.
The restarted server is a second ``tessera server`` on the same store and port, started ahead of
time with its imports done and waiting on its stdin, so that it listens again well inside the
client's retry window (~6-9 s: 6 attempts, backoff doubling from 0.2 s) even on a loaded machine.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import tessera
from conftest import ServerProcess
from tessera.store import Store
from tessera.store.hashing import hash_file
from tessera.store.maintenance import verify

pytestmark = pytest.mark.slow

FORK = multiprocessing.get_context("forkserver")
FORK.set_forkserver_preload(["tessera", "tessera.backend.http", "test_server_concurrency"])
BIG_FILES = 12
BIG_SIZE = 8 * 1024 * 1024  # 12 x 8 MB streamed PUTs (4 at a time), plus small files in a pack
SMALL_FILES = 40

STANDBY = """
import sys
from tessera.cli import main
import tessera.server.app, uvicorn
print("standby ready", flush=True)
sys.stdin.readline()
main()
"""


PYTHON_CLI_STANDBY = (sys.executable, "-c", STANDBY, "server")
TESSERA_CLI = (sys.executable, "-c", "from tessera.cli import main; main()")


class Standby:
    """`tessera server --dir STORE --port PORT`, imported and waiting for a line on stdin."""

    def __init__(self, first: ServerProcess):
        self.server = ServerProcess(first.store)
        self.server.port, self.server.url = first.port, first.url
        self.server.admin_token = first.admin_token
        self.log = first.store.parent / "standby.log"
        self.process = subprocess.Popen(
            [*PYTHON_CLI_STANDBY, "--dir", str(first.store), "--port", str(first.port)],
            stdin=subprocess.PIPE,
            stdout=open(self.log, "wb"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.server.process = self.process

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while "standby ready" not in self.log.read_text():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "standby server never got ready"
            time.sleep(0.05)

    def go(self, timeout: float = 60) -> float:
        """Let it start serving; return how long until it answered."""
        start = time.monotonic()
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()
        while True:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.server.url}/api/v1/health", timeout=1).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            assert time.monotonic() - start < timeout, self.log.read_text()
            time.sleep(0.02)


def _child(target: Any, *args: Any) -> None:
    """Run ``target`` in a forked child; write its result (or its traceback) as JSON."""
    out: Path = args[-1]
    try:
        result = {"ok": target(*args[:-1])}
    except BaseException:
        result = {"error": traceback.format_exc()}
    out.write_text(json.dumps(result))


def _upload(url: str, token: str, cache: Path, src: Path) -> dict[str, Any]:
    os.environ["TESSERA_TOKEN"] = token
    with tessera.init(project="big", name="uploader", dir=cache, server=url) as run:
        art = tessera.Artifact("bundle", type="dataset")
        art.add_dir(src)
        version = run.log_artifact(art)
        return {"spec": version.spec, "digest": version.digest, "run": run.id}


def _commit_one(url: str, token: str, cache: Path, i: int, barrier: Any) -> dict[str, Any]:
    os.environ["TESSERA_TOKEN"] = token
    data = _payload(i)
    with tessera.init(project="many", name=f"client{i}", dir=cache, server=url) as run:
        art = tessera.Artifact("shared", type="model")
        art.add_bytes(data, "weights.bin")
        barrier.wait(120)  # all eight commit at the same moment
        version = run.log_artifact(art)
        return {"number": version.number, "digest": version.digest, "run": run.id}


def _payload(i: int) -> bytes:
    return (f"client {i} ".encode() * 100_000)[: 700_000 + i]


def _result(path: Path) -> dict[str, Any]:
    assert path.exists(), "the child died without a result"
    result = json.loads(path.read_text())
    assert "ok" in result, result.get("error")
    return result["ok"]


def _blobs(store: Path) -> set[str]:
    return {p.name for p in (store / "blobs").rglob("*") if p.is_file()}


def _size(path: Path) -> int:
    """A temp file's size, 0 once it has been renamed into blobs/ (or deleted)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _stats(url: str, token: str) -> dict[str, int]:
    response = httpx.get(
        f"{url}/api/v1/stats", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    response.raise_for_status()
    return response.json()


@dataclass
class Restarted:
    server: ServerProcess  # the live (restarted) server
    store: Path
    src: Path
    digests: dict[str, str]  # relative path -> digest of the uploaded files
    upload: dict[str, Any]  # what the client process reported: {"ok": ...} or {"error": ...}
    blobs_at_kill: set[str]
    downtime: float
    stats_after: dict[str, int]  # the restarted server's counters once the client finished
    bystander_status: str  # a live run created before the kill, read after the restart


@pytest.fixture(scope="module")
def restarted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Restarted]:
    """Kill the server mid-upload, restart it on the same port and store, let the client
    finish."""
    root = tmp_path_factory.mktemp("restart")
    src = root / "bundle"
    (src / "small").mkdir(parents=True)
    for i in range(BIG_FILES):
        (src / f"big{i}.bin").write_bytes(os.urandom(BIG_SIZE))
    for i in range(SMALL_FILES):
        (src / "small" / f"s{i:02d}.bin").write_bytes(os.urandom(20_000 + i))
    digests = {str(p.relative_to(src)): hash_file(p)[0] for p in src.rglob("*") if p.is_file()}
    big = {digests[f"big{i}.bin"] for i in range(BIG_FILES)}

    first = ServerProcess(root / "store").start()
    token = first.admin_token or ""
    standby = Standby(first)
    try:
        # a run a client is busy with while the server restarts (it just sent a heartbeat)
        with first.client(token) as c:
            bystander = c.post("/api/v1/projects/big/runs", json={"name": "bystander"}).json()
            c.patch(f"/api/v1/runs/{bystander['id']}", json={"heartbeat": True})
        standby.wait_ready()
        out = root / "upload.json"
        child = FORK.Process(
            target=_child, args=(_upload, first.url, token, root / "cache", src, out)
        )
        child.start()
        tmp = first.store / "tmp"
        deadline = time.monotonic() + 240
        # Wait until half the big blobs are stored and another is on its way. The client sends
        # at most 4 requests at once, one after another per thread, so with 6 blobs stored at
        # least one PUT was answered before the kill: a resumed upload must not send it again.
        while True:
            assert child.is_alive(), "the upload finished before the server could be killed"
            assert time.monotonic() < deadline, "the upload never got going"
            stored = _blobs(first.store) & big
            if len(stored) >= BIG_FILES // 2 and any(_size(p) > 1024 * 1024 for p in tmp.glob("*")):
                break
            time.sleep(0.005)
        first.stop(kill=True)  # SIGKILL: no clean shutdown, connections reset
        blobs_at_kill = _blobs(first.store)
        downtime = standby.go()
        child.join(300)
        upload = json.loads(out.read_text()) if out.exists() else {"error": "no result"}
        stats = _stats(first.url, token)
        with standby.server.client(token) as c:
            status = c.get(f"/api/v1/runs/{bystander['id']}").json()["status"]
        yield Restarted(
            standby.server, first.store, src, digests, upload, blobs_at_kill, downtime, stats,
            status,
        )  # fmt: skip
    finally:
        first.stop(kill=True)
        standby.server.stop()


def test_an_upload_survives_the_server_being_killed_mid_upload(
    restarted: Restarted, tmp_path: Path
) -> None:
    r = restarted
    wanted = set(r.digests.values())
    total = sum((r.src / path).stat().st_size for path in r.digests)
    # the kill really happened mid-upload: some of the big blobs had arrived, not all
    assert 0 < len(r.blobs_at_kill & wanted) < len(wanted)
    # the client rode out the restart (its retries last ~6-9 s)
    assert "ok" in r.upload, f"server down {r.downtime:.1f}s; client: {r.upload.get('error')}"
    assert r.upload["ok"]["spec"] == "big/bundle:v0"
    with r.server.client(r.server.admin_token) as c:
        run = c.get(f"/api/v1/runs/{r.upload['ok']['run']}").json()
    assert run["status"] == "finished"
    # resumed, not restarted from scratch: what the first server had stored was not sent again
    assert 0 < r.stats_after["blob_bytes_received"] < total, (r.stats_after, total)

    # the store is sound (a killed server leaves at most garbage in tmp/)
    result = subprocess.run(
        [*TESSERA_CLI, "verify", "--dir", str(r.store)],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout

    # and the version's files come back bit-identical, through the server
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESSERA_TOKEN", r.server.admin_token or "")
        with tessera.open_store(dir=tmp_path / "fresh-cache", server=r.server.url) as store:
            version = store.artifact("big/bundle:v0")
            assert version.digest == r.upload["ok"]["digest"]
            target = version.download(tmp_path / "out")
    got = {str(p.relative_to(target)): hash_file(p)[0] for p in target.rglob("*") if p.is_file()}
    assert got == r.digests


def test_a_server_restart_does_not_crash_live_remote_runs(restarted: Restarted) -> None:
    assert restarted.bystander_status == "running"


def test_eight_clients_commit_distinct_contiguous_versions(
    restarted: Restarted, tmp_path: Path
) -> None:
    server = restarted.server
    token = server.admin_token or ""
    barrier = FORK.Barrier(8)
    outs = [tmp_path / f"client{i}.json" for i in range(8)]
    children = [
        FORK.Process(
            target=_child,
            args=(_commit_one, server.url, token, tmp_path / f"cache{i}", i, barrier, outs[i]),
        )
        for i in range(8)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(300)
    assert [c.exitcode for c in children] == [0] * 8
    results = [_result(out) for out in outs]
    assert sorted(r["number"] for r in results) == list(range(8))
    assert len({r["digest"] for r in results}) == 8

    with server.client(token) as c:
        listed = c.get("/api/v1/projects/many/artifacts/shared/versions").json()
        runs = c.get("/api/v1/projects/many/runs").json()
    assert [v["number"] for v in listed] == list(range(8))
    assert {v["number"]: v["digest"] for v in listed} == {r["number"]: r["digest"] for r in results}
    assert {v["run_id"] for v in listed} == {r["run"] for r in results}
    assert sorted(r["status"] for r in runs) == ["finished"] * 8

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESSERA_TOKEN", token)
        with tessera.open_store(dir=tmp_path / "reader", server=server.url) as store:
            for i, r in enumerate(results):
                version = store.artifact(f"many/shared:v{r['number']}")
                assert version.read_bytes("weights.bin") == _payload(i)

    backend_store = Store.open(restarted.store)
    try:
        report = verify(backend_store)
    finally:
        backend_store.close()
    assert report.ok, report.problems


def _hash_big_file(path: Path) -> str:
    return hash_file(path)[0]


def test_a_forked_child_can_hash(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(4 * 1024 * 1024))
    expected = hash_file(path)[0]  # the parent hashes first (starts the pool)
    out = tmp_path / "child.json"
    child = multiprocessing.get_context("fork").Process(
        target=_child, args=(_hash_big_file, path, out)
    )
    child.start()
    child.join(5)  # hashing 4 MB takes milliseconds
    if child.is_alive():
        child.kill()
        child.join()
    assert _result(out) == expected
