"""Crash safety: a process killed with SIGKILL while it logs versions never leaves a visible
partial version, never damages the store, and its run ends up ``crashed``.

One store is shared by every trial. Each trial starts a process that logs versions of a 500-file
artifact (2-20 KB files, 40 of them rewritten before each version), and kills it with SIGKILL:

* 20 trials at a random moment, drawn uniformly (seeded) over the time one process takes to log
  its versions (measured: the median of the rounds timed so far, so it follows the machine's
  load), so kills land while files change, during hashing and copying, around the blob commit
  and around the catalog commit (the test prints where they landed);
* one trial at each precise stage that random delays hit only rarely: the process pauses there
  and the parent kills it while it waits. The hooks only record the stage reached and pause;
  they change no behaviour. Stages: temporary blobs half written; all written but not yet synced
  and none renamed; renames half done; renames done but not synced; blobs committed but the
  catalog transaction not begun; inside the catalog transaction (version row, alias and lineage
  written, COMMIT not sent); after COMMIT but before ``log_artifact`` returned.

After every trial:

* the killed run is ``crashed`` after ``tessera.open_store`` (its pid is dead); no run is left
  ``running``;
* ``tessera verify`` (the CLI's ``main()``, in its own process, re-hashing every blob) exits 0
  and counts the versions we see;
* versions are v0..v(n-1), ``latest`` is on the highest, each has exactly 500 files whose manifest
  digests are the BLAKE3 digests (computed here) of the files of one round the process reached,
  in logging order, logged by that process's run; versions once seen never change or disappear;
  each version the process reported (it writes a line after ``log_artifact`` returns) is there
  with that digest;
* every new version is downloaded and compared byte for byte with what was logged;
* every blob file new (or replaced) since the previous trial hashes to its name.

At the end, a fresh ``python -c "...main()" gc --grace 0s`` must reclaim every crash leftover and
nothing else (the blob files are then exactly the referenced ones, ``tmp/`` is empty), and a
fresh full ``verify`` passes.

Speed: ``import tessera`` takes seconds (pandas, pyarrow...), so the processes are forked from a
helper that imported it once: each is a new process (new pid, own SQLite connections), started
in milliseconds. The store lives on tmpfs when there is one (see ``work_dir``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import pytest

import tessera
from conftest import blob_files, make_files

PROJECT = "crash"
ARTIFACT = "data"
FILES = 500
ROUNDS_PER_TRIAL = 2  # versions each process logs
CHANGED_PER_ROUND = 40  # files rewritten before each version
RANDOM_TRIALS = 20
# Stages where a process pauses (in its second round) so that the parent kills it right there.
TARGETED_STAGES = (
    "copying",  # some file blobs written to temporary files, others not yet
    "blob-sync-temps",  # every temporary blob written, not yet synced, none renamed
    "blob-mid-rename",  # about half of the new blobs renamed to their final names
    "blob-sync-renames",  # every blob renamed, the renames not yet synced
    "catalog-start",  # blobs committed, catalog transaction not begun
    "catalog-in-transaction",  # version row, aliases and lineage written, COMMIT not sent
    "catalog-committed",  # COMMIT done, log_artifact has not returned
)
PAUSE_ROUND = 2
CLI = [sys.executable, "-c", "from tessera.cli import main; main()"]


def content(seed: int, size: int) -> bytes:
    """The bytes of a rewritten file (the helper script has the same function)."""
    return random.Random(seed).randbytes(size)


# A fork server: imports tessera once, then forks a process per request. Requests and replies
# are JSON lines on stdin/stdout. {"kind": "logger", "cfg": ...} forks a process that logs
# versions; {"kind": "cli", "args": [...], "out": path} forks one that runs tessera.cli.main();
# {"kind": "wait", "pid": n} reaps a process and reports how it ended.
FORK_SERVER = r"""
import json, os, random, sys, time, traceback
from pathlib import Path

import tessera
import tessera.cli
from tessera.store import blobs as blobs_mod
from tessera.store.catalog import Catalog

replies = os.fdopen(os.dup(1), "w")


def content(seed, size):
    return random.Random(seed).randbytes(size)


def logger(cfg):
    trace_fd = os.open(cfg["trace"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    result_fd = os.open(cfg["results"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    state = {"round": 0, "puts": 0, "renames": 0, "to_rename": 0, "syncs": 0}

    def trace(event, **kw):
        kw.update(ev=event, t=time.monotonic(), round=state["round"])
        os.write(trace_fd, (json.dumps(kw) + "\n").encode())

    def stage(name):
        trace(name)
        if cfg["pause_at"] == name and state["round"] == cfg["pause_round"]:
            trace("paused")
            time.sleep(3600)

    # Hooks: they record the stage reached (and pause where asked), then run the real code.
    real_put_file = blobs_mod.LocalWriteBatch.put_file
    real_commit = blobs_mod.LocalWriteBatch.commit
    real_durable = blobs_mod._make_durable
    real_place = blobs_mod.LocalBlobStore._place
    real_commit_version = Catalog.commit_version
    real_link = Catalog._link

    def put_file(self, path):
        state["puts"] += 1
        if state["puts"] == 1:
            stage("hashing")
        elif state["puts"] == cfg["changed"] // 2:
            stage("copying")
        return real_put_file(self, path)

    def commit(self):
        state["renames"] = 0
        state["syncs"] = 0
        state["to_rename"] = len(self._pending)
        stage("blob-commit")
        real_commit(self)
        stage("blob-committed")

    def durable(directory, files):
        state["syncs"] += 1
        stage("blob-sync-temps" if state["syncs"] == 1 else "blob-sync-renames")
        return real_durable(directory, files)

    def place(self, temp, digest):
        state["renames"] += 1
        if state["renames"] == max(1, state["to_rename"] // 2):
            stage("blob-mid-rename")
        return real_place(self, temp, digest)

    def commit_version(self, **kw):
        stage("catalog-start")
        result = real_commit_version(self, **kw)
        stage("catalog-committed")
        return result

    def link(self, conn, run_id, version_id, direction):
        real_link(self, conn, run_id, version_id, direction)
        if direction == "logged":
            stage("catalog-in-transaction")

    blobs_mod.LocalWriteBatch.put_file = put_file
    blobs_mod.LocalWriteBatch.commit = commit
    blobs_mod._make_durable = durable
    blobs_mod.LocalBlobStore._place = place
    Catalog.commit_version = commit_version
    Catalog._link = link

    trace("go")
    run = tessera.init(project=cfg["project"], dir=cfg["store"])
    trace("init-done", run=run.id)
    src = Path(cfg["src"])
    for k, changes in enumerate(cfg["plan"], start=1):
        state["round"] = k
        state["puts"] = 0
        stage("modify")
        for path, seed, size in changes:
            (src / path).write_bytes(content(seed, size))
        art = tessera.Artifact(cfg["artifact"], type="files")
        art.add_dir(src)
        stage("log-start")
        version = run.log_artifact(art)
        line = {"trial": cfg["trial"], "round": k, "number": version.number,
                "digest": version.digest}
        os.write(result_fd, (json.dumps(line) + "\n").encode())
        stage("logged")
    state["round"] = 0
    trace("done")
    time.sleep(3600)  # wait to be killed, so that every trial ends in a crash


def cli(args):
    sys.argv = ["tessera", *args]
    try:
        tessera.cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    return code


for line in sys.stdin:
    request = json.loads(line)
    if request["kind"] == "wait":
        _, status = os.waitpid(request["pid"], 0)
        reply = {"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                 "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}
    else:
        pid = os.fork()
        if pid == 0:  # the new process
            code = 1
            try:
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                err = os.open(request["out"] + ".err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(out, 1)
                os.dup2(err, 2)
                replies.close()
                if request["kind"] == "logger":
                    logger(request["cfg"])
                else:
                    code = cli(request["args"])
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(code)
        reply = {"pid": pid}
    replies.write(json.dumps(reply) + "\n")
    replies.flush()
"""


class ForkServer:
    def __init__(self, tmp: Path):
        script = tmp / "fork_server.py"
        script.write_text(FORK_SERVER)
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.alive: set[int] = set()

    def request(self, **request: object) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def start(self, kind: str, out: Path, **request: object) -> int:
        pid = self.request(kind=kind, out=str(out), **request)["pid"]
        self.alive.add(pid)
        return pid

    def wait(self, pid: int) -> dict:
        """Reap a process: until then a dead process is a zombie, which still looks alive."""
        result = self.request(kind="wait", pid=pid)
        self.alive.discard(pid)
        return result

    def close(self) -> None:
        for pid in list(self.alive):
            os.kill(pid, signal.SIGKILL)
            self.wait(pid)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def running(pid: int) -> bool:
    """True while ``pid`` (a process we started and have not reaped) has not ended."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class State:
    """What the source folder held when one version was to be logged."""

    trial: int
    round: int
    files: dict[str, bytes]
    digests: dict[str, str]


def state_key(digests: dict[str, str]) -> str:
    h = blake3.blake3()
    for path in sorted(digests):
        h.update(f"{path}\0{digests[path]}\n".encode())
    return h.hexdigest()


@dataclass
class Trial:
    index: int
    pause_at: str | None = None
    random_kill: bool = False
    delay: float | None = None
    events: list[dict] = field(default_factory=list)

    @property
    def last_event(self) -> str:
        events = [e["ev"] for e in self.events if e["ev"] != "paused"]
        return events[-1] if events else "(starting)"


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [
        json.loads(line)
        for line in path.read_text().splitlines()
        if line.endswith("}")  # a line cut short by the kill is not a record
    ]


class Harness:
    def __init__(self, tmp: Path, server: ForkServer):
        self.tmp = tmp
        self.server = server
        self.store = tmp / "store"
        self.src = tmp / "src"
        self.rng = random.Random(20240611)
        # the source folder: 500 files of 2 to 20 KB
        for group, size in enumerate((2_000, 5_000, 10_000, 15_000, 20_000)):
            make_files(self.src / f"g{group}", FILES // 5, size=size, seed=group)
        self.paths = sorted(
            p.relative_to(self.src).as_posix() for p in self.src.rglob("*") if p.is_file()
        )
        assert len(self.paths) == FILES
        files = {p: (self.src / p).read_bytes() for p in self.paths}
        digests = {p: blake3.blake3(b).hexdigest() for p, b in files.items()}
        self.current = State(-1, 0, files, digests)
        self.states: dict[str, State] = {}  # by state key: every state a process may log
        self.trials: list[Trial] = []
        self.run_ids: dict[int, str] = {}  # trial -> the run its process created
        self.reported: dict[int, dict] = {}  # version number -> the process's report
        self.checked: dict[int, str] = {}  # version number -> digest, once fully checked
        self.order: dict[int, tuple[int, int]] = {}  # version number -> (trial, round)
        self.hashed: dict[str, int] = {}  # blob name -> inode, once hashed
        self.round_times: list[float] = []  # seconds from "modify" to "logged"
        self.seed = 0

    def plan(self, trial: int) -> list[list[tuple[str, int, int]]]:
        """The files a process rewrites before each of its versions; records the states."""
        plan = []
        state = self.current
        for k in range(1, ROUNDS_PER_TRIAL + 1):
            changes = []
            files = dict(state.files)
            digests = dict(state.digests)
            for path in self.rng.sample(self.paths, CHANGED_PER_ROUND):
                self.seed += 1
                size = self.rng.randint(2_000, 20_000)
                files[path] = content(self.seed, size)
                digests[path] = blake3.blake3(files[path]).hexdigest()
                changes.append((path, self.seed, size))
            state = State(trial, k, files, digests)
            assert state_key(digests) not in self.states
            self.states[state_key(digests)] = state
            plan.append(changes)
        self.current = state  # the next process starts from the end of this plan
        return plan

    def start_logger(self, trial: Trial) -> tuple[int, Path]:
        # The source folder as this process must find it: the last process was killed with
        # some of its files rewritten and others not.
        for path, data in self.current.files.items():
            local = self.src / path
            if local.read_bytes() != data:
                local.write_bytes(data)
        trace = self.tmp / f"trace-{trial.index}.jsonl"
        cfg = {
            "trial": trial.index,
            "store": str(self.store),
            "src": str(self.src),
            "project": PROJECT,
            "artifact": ARTIFACT,
            "plan": self.plan(trial.index),
            "pause_at": trial.pause_at,
            "pause_round": PAUSE_ROUND,
            "changed": CHANGED_PER_ROUND,
            "trace": str(trace),
            "results": str(self.tmp / "results.jsonl"),
        }
        pid = self.server.start("logger", self.tmp / f"logger-{trial.index}.out", cfg=cfg)
        return pid, trace

    def calibrate(self, trial: Trial) -> float:
        """How long a process takes to log its versions: the median of the rounds measured so
        far (all but the very first, which stored all 500 files into an empty store), times
        the rounds. Kept up to date, as the machine's load changes."""
        at = {(e["ev"], e["round"]): e["t"] for e in trial.events}
        for k in range(1, ROUNDS_PER_TRIAL + 1):
            if ("logged", k) in at and (trial.index, k) != (0, 1):
                self.round_times.append(at["logged", k] - at["modify", k])
        return ROUNDS_PER_TRIAL * statistics.median(self.round_times)

    def wait_for_event(self, trace: Path, pid: int, names: set[str]) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(e["ev"] in names for e in read_jsonl(trace)):
                return
            if not running(pid):
                return  # ended on its own; the caller reports it
            time.sleep(0.002)
        raise AssertionError(f"the process never reached {names}")

    def start_cli(self, *args: str) -> tuple[int, Path]:
        out = self.tmp / "cli.out"
        pid = self.server.start("cli", out, args=[*args, "--dir", str(self.store)])
        return pid, out

    def cli_result(self, pid: int, out: Path) -> str:
        status = self.server.wait(pid)
        text = out.read_text()
        errors = Path(f"{out}.err").read_text()
        assert status == {"signal": None, "code": 0}, f"{status}\n{text}\n{errors}"
        return text

    # -- checks --------------------------------------------------------------------------------

    def check_runs(self, trial: Trial, store: tessera.StoreBrowser) -> None:
        """The killed run is crashed once the store is opened again (its pid is dead)."""
        statuses = {r.id: r.status for r in store.runs(PROJECT)}
        if trial.index in self.run_ids:
            run = self.run_ids[trial.index]
            assert statuses.get(run) == "crashed", f"trial {trial.index}: {statuses.get(run)}"
        # every process was killed, so no run may be left running (or look finished)
        assert set(statuses.values()) <= {"crashed"}, statuses
        assert set(self.run_ids.values()) <= set(statuses)

    def check_versions(self, store: tessera.StoreBrowser) -> None:
        """v0..v(n-1), latest on the highest, each exactly one logged state, none lost."""
        for report in read_jsonl(self.tmp / "results.jsonl"):
            self.reported.setdefault(report["number"], report)
        if not any(a.name == ARTIFACT for a in store.artifacts(PROJECT)):
            assert not self.reported, "versions were reported but the artifact is missing"
            return
        versions = store.versions(PROJECT, ARTIFACT)
        numbers = [v.number for v in versions]
        assert numbers == list(range(len(versions))), f"version numbers {numbers}"
        assert versions[-1].aliases == ("latest",), [v.aliases for v in versions]
        assert all(v.aliases == () for v in versions[:-1])
        assert len(versions) >= len(self.checked), "a committed version disappeared"
        assert set(self.reported) <= set(numbers), "a version a process reported is gone"

        previous = (-1, 0)
        for version in versions:
            n = version.number
            if n in self.checked:  # fully checked before: it must not have changed
                assert self.checked[n] == version.digest, f"v{n} changed"
                previous = self.order[n]
                continue
            assert version.file_count == FILES
            files = version.files()
            assert len(files) == FILES
            state = self.states.get(state_key({e.path: e.digest for e in files}))
            assert state is not None, f"v{n} holds content no process was asked to log"
            order = (state.trial, state.round)
            assert order > previous, f"v{n} is {order}, logged after {previous}"
            previous = self.order[n] = order
            # a version exists only if its process got as far as logging it
            events = self.trials[state.trial].events
            reached = {e["round"] for e in events if e["ev"] == "log-start"}
            assert state.round in reached, f"v{n}: round {state.round} was never logged"
            if n in self.reported:
                report = self.reported[n]
                assert (report["trial"], report["round"]) == order
                assert report["digest"] == version.digest
            if state.trial in self.run_ids:
                assert version.run_id == self.run_ids[state.trial]
                logged_by = [r.id for r in version.lineage()["logged"]]
                assert logged_by == [self.run_ids[state.trial]]
            self.check_download(version, state)
            self.checked[n] = version.digest

    def check_download(self, version: tessera.ArtifactVersion, state: State) -> None:
        root = self.tmp / "download"
        shutil.rmtree(root, ignore_errors=True)
        version.download(root)
        found = sorted(
            Path(folder, name).relative_to(root).as_posix()
            for folder, _dirs, names in os.walk(root)
            for name in names
        )
        assert found == sorted(state.files), f"{version.spec}: other files"
        for path, data in state.files.items():
            assert (root / path).read_bytes() == data, f"{version.spec}: {path} differs"
        shutil.rmtree(root)

    def check_new_blobs(self) -> None:
        """Blob files new or replaced since the last look hash to their names."""
        for folder, _dirs, names in os.walk(self.store / "blobs"):
            for name in names:
                path = Path(folder, name)
                inode = path.stat().st_ino
                if self.hashed.get(name) != inode:
                    assert blake3.blake3(path.read_bytes()).hexdigest() == name, path
                    self.hashed[name] = inode


@pytest.fixture
def work_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder in memory (tmpfs) when there is one. A blob commit calls syncfs, which flushes
    every dirty page of the whole file system: on a disk other programs write to, that took
    0.3-2.4 s per call here, four calls per version. What a SIGKILL leaves behind does not
    depend on the file system (the kernel keeps every completed write), so nothing is lost."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="tessera-crash-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_at_any_point_leaves_a_consistent_store(work_dir: Path) -> None:
    server = ForkServer(work_dir)
    try:
        run_trials(Harness(work_dir, server))
    finally:
        server.close()


def run_trials(h: Harness) -> None:
    rest = [Trial(0, pause_at=stage) for stage in TARGETED_STAGES]
    rest += [Trial(0, random_kill=True) for _ in range(RANDOM_TRIALS)]
    h.rng.shuffle(rest)
    # first the calibration: it logs all its versions, then is killed while idle
    h.trials = [Trial(0), *rest]
    for i, trial in enumerate(h.trials):
        trial.index = i

    started = time.monotonic()
    window = 0.0  # how long one process takes, unkilled, to log its versions
    for trial in h.trials:
        pid, trace = h.start_logger(trial)
        if trial.random_kill:
            h.wait_for_event(trace, pid, {"init-done"})
            trial.delay = h.rng.uniform(0, window)
            time.sleep(trial.delay)
        else:
            h.wait_for_event(trace, pid, {"paused"} if trial.pause_at else {"done"})
        assert running(pid), (
            f"trial {trial.index}: the process ended by itself:\n"
            + (h.tmp / f"logger-{trial.index}.out.err").read_text()
        )
        os.kill(pid, signal.SIGKILL)
        assert h.server.wait(pid) == {"signal": signal.SIGKILL, "code": None}
        trial.events = read_jsonl(trace)
        window = h.calibrate(trial)
        if trial.pause_at:
            assert trial.last_event == trial.pause_at, (trial.pause_at, trial.events[-3:])
        for event in trial.events:
            if event["ev"] == "init-done":
                h.run_ids[trial.index] = event["run"]

        with tessera.open_store(h.store) as store:
            h.check_runs(trial, store)
            verifier = h.start_cli("verify")
            h.check_versions(store)  # while verify (read-only too) runs
        h.check_new_blobs()
        out = h.cli_result(*verifier)
        assert out.startswith("ok") and f" {len(h.checked)} versions" in out, out

    # The garbage the crashes left (blobs no version lists, temporary files) is reclaimable,
    # and gc keeps exactly what the versions reference. Fresh interpreters, the real CLI.
    gc = subprocess.run(
        [*CLI, "gc", "--grace", "0s", "--dir", str(h.store)], capture_output=True, text=True
    )
    assert gc.returncode == 0, gc.stdout + gc.stderr
    verify = subprocess.run([*CLI, "verify", "--dir", str(h.store)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert f" {len(h.checked)} versions" in verify.stdout, verify.stdout
    referenced = set()
    with tessera.open_store(h.store) as store:
        for version in store.versions(PROJECT, ARTIFACT):
            referenced.add(version.digest)
            referenced |= {e.digest for e in version.files()}
    assert {p.name for p in blob_files(h.store)} == referenced
    assert not any((h.store / "tmp").iterdir())

    stages: dict[str, int] = {}
    for trial in h.trials:
        if trial.random_kill:
            stages[trial.last_event] = stages.get(trial.last_event, 0) + 1
    print(
        f"\n{len(h.trials)} trials, {len(h.checked)} versions in {time.monotonic() - started:.1f}"
        f" s; random kills (within {window:.2f} s of the run's start, at the end) landed after: "
        f"{stages}"
    )
