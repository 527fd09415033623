"""Push and pull over loopback HTTP (issue #5), each against a transport floor measured in this run.

(a) ``tessera push`` (``tessera.sync.sync`` from a local store to an ``HttpBackend``, as the CLI
    does) of 10,000 files of ~20 KiB random bytes, and of 4 files of 256 MiB (1 GiB), each its
    own project, to a real ``tessera server`` (a uvicorn child on 127.0.0.1 with a fresh store);
(b) the floor: the same bytes sent with plain httpx to a trivial Starlette app under the same
    uvicorn (same process model, same event loop and HTTP implementation), which writes each
    request body to a file. Same concurrency as the client (``UPLOAD_THREADS`` connections), and
    the same request shapes: small files concatenated into bodies of ``PACK_LIMIT`` bytes, large
    files streamed one per request in ``CHUNK_SIZE`` pieces. A floor of one PUT per small file
    (what ``curl`` in a loop would do) is reported too, for information;
(c) a second push of the same data: time against the first push, and the blob bytes the server
    received during it (its own ``/api/v1/stats`` counters);
(d) ``tessera pull`` of each project into an empty local store, against plain httpx GETs of the
    same files from the trivial app (same connection count as ``HttpBackend.fetch``).

Every push and pull runs in a fresh child interpreter (as the server's first admin); its time is
measured inside the child from opening the stores to the end of ``sync`` (interpreter start-up and
imports excluded). Floors and first pushes (each to a server started on an empty store) run in
five back-to-back pairs, and the target is judged on the median of the pairs' ratios
(``benchlib.paired_throughput_result``): one run of either moves by 15-40 % on two shared cores.
The floor is strict for small files: it writes each 16 MiB body to a file and neither hashes nor
syncs anything, where the server checks every blob's digest, writes the new ones to a durable
pack file and records which project sent them; the per-file floor shows what one request per
file costs on the plain side. Each figure's
``extra`` also holds the CPU seconds of both ends (client child from ``wait4``, server from
``/proc``): on a busy machine they say more than wall times.
Set ``TESSERA_BENCH_PROFILE=DIR`` to get a cProfile dump of every push/pull child in DIR.
"""

from __future__ import annotations

import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import (
    HttpService,
    KiB,
    MiB,
    alternating,
    div,
    flush_dirty_pages,
    free_port,
    log,
    make_big_files,
    make_small_files,
    paired_throughput_result,
    remove,
    result,
    run_python,
    set_mtime_past,
)


@dataclass(frozen=True)
class Sizes:
    small_files: int
    small_min: int
    small_max: int
    big_files: int
    big_size: int
    reps: int  # pairs of a floor upload and a first push (to a fresh server each)


FULL = Sizes(10_000, 16 * KiB, 24 * KiB, 4, 256 * MiB, reps=5)
QUICK = Sizes(1_000, 16 * KiB, 24 * KiB, 4, 16 * MiB, reps=2)

THROUGHPUT_FACTOR = 0.70  # push throughput >= 70% of the floor's
SECOND_PUSH_SHARE = 0.05  # a second push takes <= 5% of the first's time


# -- child programs ----------------------------------------------------------------------------

# The trivial upload endpoint: reads each body and writes it to a file (the Tessera server writes
# every blob too), serves files for the download floor, under uvicorn.run exactly as
# ``tessera server`` calls it.
SINK_SERVER = r"""
import itertools, os, sys
from pathlib import Path
import uvicorn
from starlette.applications import Starlette
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.routing import Route

port, inbox, files = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
names = itertools.count()


async def upload(request):
    fd = os.open(inbox / f"{next(names)}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    size = 0
    try:
        async for chunk in request.stream():
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
            size += len(chunk)
    finally:
        os.close(fd)
    return JSONResponse({"size": size})


async def download(request):
    return FileResponse(files / request.path_params["path"])


async def health(request):
    return PlainTextResponse("ok")


app = Starlette(routes=[
    Route("/upload", upload, methods=["PUT", "POST"]),
    Route("/files/{path:path}", download),
    Route("/health", health),
])
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""

# Plain httpx: ``bodies`` is a list of requests, each a list of file paths (relative to
# ``root``); one file above ``stream_above`` bytes is streamed, several are concatenated.
FLOOR_UPLOAD = r"""
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import httpx
_t = _time.perf_counter
root = Path(ARGS["root"])
chunk = ARGS["chunk"]
client = httpx.Client(base_url=ARGS["url"], timeout=120,
                      limits=httpx.Limits(max_connections=16, max_keepalive_connections=16))


def chunks(path):
    with open(path, "rb") as f:
        while piece := f.read(chunk):
            yield piece


def send(files):
    paths = [root / f for f in files]
    if len(paths) == 1 and paths[0].stat().st_size > ARGS["stream_above"]:
        size = paths[0].stat().st_size
        r = client.put("/upload", content=chunks(paths[0]), headers={"Content-Length": str(size)})
    else:
        body = b"".join(p.read_bytes() for p in paths)
        size = len(body)
        r = client.put("/upload", content=body)
    r.raise_for_status()
    return size


t0 = _t()
with ThreadPoolExecutor(ARGS["threads"]) as pool:
    sent = sum(pool.map(send, ARGS["bodies"]))
report({"seconds": _t() - t0, "bytes": sent, "requests": len(ARGS["bodies"])})
"""

FLOOR_DOWNLOAD = r"""
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import httpx
_t = _time.perf_counter
dest = Path(ARGS["dest"])
client = httpx.Client(base_url=ARGS["url"], timeout=120,
                      limits=httpx.Limits(max_connections=16, max_keepalive_connections=16))


def get(name):
    target = dest / name
    target.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    with client.stream("GET", "/files/" + name) as r, open(target, "wb") as out:
        r.raise_for_status()
        for piece in r.iter_bytes(ARGS["chunk"]):
            out.write(piece)
            size += len(piece)
    return size


t0 = _t()
with ThreadPoolExecutor(ARGS["threads"]) as pool:
    got = sum(pool.map(get, ARGS["files"]))
report({"seconds": _t() - t0, "bytes": got})
"""

INGEST = r"""
import tessera
with tessera.init(project=ARGS["project"], name="ingest", dir=ARGS["dir"]) as run:
    art = tessera.Artifact(ARGS["project"], type="files")
    art.add_dir(ARGS["data"])
    version = run.log_artifact(art)
report({"version": version.spec, "files": version.file_count, "bytes": version.size})
"""

# Exactly what ``tessera push`` / ``tessera pull`` do: the local store doubles as the cache.
SYNC = r"""
import os
_t = _time.perf_counter
from tessera.backend.http import HttpBackend
from tessera.backend.local import LocalBackend
from tessera.sync import sync
import httpcore  # noqa: F401 - httpx imports it (and trio) on its first client: an import too
profile_dir = os.environ.get("TESSERA_BENCH_PROFILE")
if profile_dir:
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
t0 = _t()
local = LocalBackend.open(ARGS["dir"], create=ARGS["direction"] == "pull")
remote = HttpBackend.open(ARGS["url"], ARGS["token"], ARGS["dir"])
t1 = _t()
if ARGS["direction"] == "push":
    done = sync(local, remote, [ARGS["project"]])
else:
    done = sync(remote, local, [ARGS["project"]])
t2 = _t()
remote.close()
local.close()
if profile_dir:
    prof.disable()
    prof.dump_stats(os.path.join(profile_dir, ARGS["label"] + ".prof"))
report({"seconds": t2 - t0, "open_s": t1 - t0, "sync_s": t2 - t1, "blobs": done.blobs_sent,
        "bytes": done.bytes_sent, "versions": done.versions, "new_versions": done.new_versions})
"""


# -- helpers -----------------------------------------------------------------------------------


def _files(root: Path) -> list[tuple[str, int]]:
    out = []
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            out.append((str(path.relative_to(root)), path.stat().st_size))
    return sorted(out)


def _packs(files: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Consecutive files grouped into request bodies of at most ``limit`` bytes."""
    bodies: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, n in files:
        if current and size + n > limit:
            bodies.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current:
        bodies.append(current)
    return bodies


class Rig:
    """The two servers of this benchmark, and the children that talk to them."""

    def __init__(self, workdir: Path, fetch_threads: int):
        self.workdir = workdir
        self.fetch_threads = fetch_threads
        self.inbox = workdir / "sink-inbox"
        self.inbox.mkdir()
        self.data = workdir / "data"
        port = free_port()
        self.sink = HttpService(
            [sys.executable, "-c", SINK_SERVER, str(port), str(self.inbox), str(self.data)],
            port,
            workdir / "sink.log",
            "/health",
        )
        self.server_log = workdir / "server.log"
        self.servers = 0
        self.server = self._start_server()

    def _start_server(self) -> HttpService:
        """A ``tessera server`` on a store of its own, and its first admin's token."""
        self.servers += 1
        store = self.workdir / f"server-store-{self.servers}"
        port = free_port()
        server = HttpService(
            [
                sys.executable,
                "-c",
                "from tessera.cli import main; main()",
                "server",
                "--dir",
                str(store),
                "--port",
                str(port),
            ],
            port,
            self.server_log,
            "/api/v1/health",
            env={"TESSERA_PROGRESS": "0"},
        )
        tokens = [ln.strip() for ln in self.server_log.read_text().splitlines()]
        self.token = [t for t in tokens if t.startswith("tsr_")][-1]
        return server

    def fresh_server(self) -> None:
        """Replace the server by one on an empty store (the last one's is removed, untimed)."""
        self.server.stop()
        remove(self.workdir / f"server-store-{self.servers}")
        self.server = self._start_server()

    def stop(self) -> None:
        self.server.stop()
        self.sink.stop()

    def stats(self) -> dict[str, int]:
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.get(f"{self.server.url}/api/v1/stats", headers=headers).json()

    def floor_upload(self, root: Path, bodies: list[list[str]], threads: int) -> dict[str, Any]:
        from tessera.store.hashing import CHUNK_SIZE

        flush_dirty_pages()
        sink_cpu = _cpu_seconds(self.sink.process.pid)
        child = run_python(
            FLOOR_UPLOAD,
            {
                "url": self.sink.url,
                "root": str(root),
                "bodies": bodies,
                "threads": threads,
                "chunk": CHUNK_SIZE,
                "stream_above": 4 * MiB,
            },
        )
        out = _with_cpu(child, _cpu_seconds(self.sink.process.pid) - sink_cpu)
        for leftover in self.inbox.iterdir():  # untimed
            leftover.unlink()
        return out

    def floor_download(self, prefix: str, files: list[str], dest: Path) -> dict[str, Any]:
        from tessera.store.hashing import CHUNK_SIZE

        flush_dirty_pages()
        sink_cpu = _cpu_seconds(self.sink.process.pid)
        child = run_python(
            FLOOR_DOWNLOAD,
            {
                "url": self.sink.url,
                "files": [f"{prefix}/{f}" for f in files],
                "dest": str(dest),
                "threads": self.fetch_threads,
                "chunk": CHUNK_SIZE,
            },
        )
        out = _with_cpu(child, _cpu_seconds(self.sink.process.pid) - sink_cpu)
        remove(dest)
        return out

    def sync(self, direction: str, project: str, store: Path, label: str) -> dict[str, Any]:
        flush_dirty_pages()
        before = self.stats()
        server_cpu = _cpu_seconds(self.server.process.pid)
        child = run_python(
            SYNC,
            {
                "direction": direction,
                "project": project,
                "dir": str(store),
                "url": self.server.url,
                "token": self.token,
                "label": label,
            },
        )
        out = _with_cpu(child, _cpu_seconds(self.server.process.pid) - server_cpu)
        after = self.stats()
        out["server_bytes_received"] = after["blob_bytes_received"] - before["blob_bytes_received"]
        out["server_requests"] = after["requests"] - before["requests"] - 1  # our stats call
        return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _with_cpu(child: Any, server_cpu: float) -> dict[str, Any]:
    """The child's report plus the CPU seconds both ends spent: on a busy machine wall times
    are inflated by waiting for a CPU, CPU times much less so."""
    return {**child.output, "client_cpu_s": child.cpu_seconds, "server_cpu_s": server_cpu}


def _mibps(nbytes: int, seconds: float) -> float:
    return nbytes / MiB / seconds


# -- the benchmark -----------------------------------------------------------------------------


def run(workdir: Path, quick: bool) -> list[dict[str, Any]]:
    from tessera.backend.http import FETCH_THREADS, PACK_LIMIT, UPLOAD_THREADS

    sizes = QUICK if quick else FULL
    data = workdir / "data"
    local = workdir / "local-store"
    log(
        f"server: generating {sizes.small_files} small files and {sizes.big_files} x "
        f"{sizes.big_size // MiB} MiB, and logging them to a local store"
    )
    make_small_files(data / "small", sizes.small_files, sizes.small_min, sizes.small_max)
    make_big_files(data / "big", sizes.big_files, sizes.big_size)
    set_mtime_past(data, 2.0)
    for project in ("small", "big"):
        run_python(INGEST, {"project": project, "dir": str(local), "data": str(data / project)})

    rig = Rig(workdir, FETCH_THREADS)
    results: list[dict[str, Any]] = []
    try:
        for project in ("small", "big"):
            results += _measure(rig, project, data, local, sizes, PACK_LIMIT, UPLOAD_THREADS)
    finally:
        rig.stop()
    return results


def _measure(
    rig: Rig,
    project: str,
    data: Path,
    local: Path,
    sizes: Sizes,
    pack_limit: int,
    threads: int,
) -> list[dict[str, Any]]:
    files = _files(data / project)
    total = sum(n for _, n in files)
    shape = (
        f"{len(files)} files of {sizes.small_min // KiB}-{sizes.small_max // KiB} KiB"
        if project == "small"
        else f"{len(files)} files of {sizes.big_size // MiB} MiB"
    )
    bodies = _packs(files, pack_limit) if project == "small" else [[f] for f, _ in files]

    log(f"server: {project}: floor uploads and first pushes, {sizes.reps} pairs")
    pushes = 0

    def first_push() -> dict[str, Any]:
        nonlocal pushes
        if pushes:
            rig.fresh_server()  # a first push each time
        pushes += 1
        return rig.sync("push", project, local, f"push_{project}_first_{pushes}")

    floors, firsts = alternating(
        sizes.reps, lambda: rig.floor_upload(data / project, bodies, threads), first_push
    )
    first_seconds = statistics.median(f["seconds"] for f in firsts)
    log(f"server: {project}: second push")
    second = rig.sync("push", project, local, f"push_{project}_second")

    rows = [
        paired_throughput_result(
            f"server.push_{project}",
            "MiB/s",
            total / MiB,
            [f["seconds"] for f in floors],
            [f["seconds"] for f in firsts],
            floor_name=f"plain httpx, {threads} connections",
            share=THROUGHPUT_FACTOR,
            notes=(
                f"First `tessera push` of {shape} ({total / MiB:,.0f} MiB) to a `tessera server` "
                f"on loopback started on an empty store each time, {firsts[0]['blobs']} blobs "
                f"sent. Floor: the same bytes PUT with plain httpx to a trivial Starlette "
                f"endpoint under the same uvicorn that writes each body to a file, {threads} "
                f"threads, {len(bodies)} requests ({'bodies of <= ' + str(pack_limit // MiB) + ' MiB' if project == 'small' else 'one streamed file each'})."
            ),
            extra={"push_samples": firsts, "floor_samples": floors},
        ),
        result(
            f"server.push_{project}.second",
            second["seconds"],
            "s",
            reference=first_seconds,
            reference_name="first push (median of this run's)",
            ratio=div(second["seconds"], first_seconds),
            ratio_meaning="second push time / first push time",
            target=f"<= {SECOND_PUSH_SHARE:.0%} of the first push",
            passed=second["seconds"] <= SECOND_PUSH_SHARE * first_seconds
            and second["server_bytes_received"] == 0,
            notes=(
                f"The same push again: {second['blobs']} blobs sent; the server's own counters "
                f"saw {second['server_bytes_received']} blob bytes and "
                f"{second['server_requests']} requests during it."
            ),
            extra={"push": second},
        ),
    ]
    if project == "small":
        log("server: small: floor of one PUT per file (informational)")
        per_file = rig.floor_upload(data / project, [[f] for f, _ in files], threads)
        rate = _mibps(total, per_file["seconds"])
        push_rate = rows[0]["value"]  # the median first push's throughput
        rows.append(
            result(
                "server.push_small.per_file_floor",
                rate,
                "MiB/s",
                reference=push_rate,
                reference_name="tessera push (median of this run's)",
                ratio=div(push_rate, rate),
                ratio_meaning="push throughput / per-file PUT throughput",
                notes=(
                    f"Informational: plain httpx PUT of each of the {len(files)} files as its own "
                    f"request ({threads} threads), what `curl` in a loop would do: "
                    f"{per_file['seconds']:.2f} s."
                ),
                extra={"floor": per_file},
            )
        )

    log(f"server: {project}: pull into an empty store, and the download floor")
    pulled = rig.workdir / f"pulled-{project}"
    pull = rig.sync("pull", project, pulled, f"pull_{project}")
    remove(pulled)
    down = rig.floor_download(project, [f for f, _ in files], rig.workdir / "downloaded")
    pull_rate = _mibps(total, pull["seconds"])
    down_rate = _mibps(total, down["seconds"])
    rows.append(
        result(
            f"server.pull_{project}",
            pull_rate,
            "MiB/s",
            reference=down_rate,
            reference_name=f"plain httpx GETs, {rig.fetch_threads} connections",
            ratio=div(pull_rate, down_rate),
            ratio_meaning="pull throughput / floor throughput",
            notes=(
                f"Informational: `tessera pull` of the project into an empty local store "
                f"({pull['seconds']:.2f} s, {pull['blobs']} blobs fetched) vs plain httpx GETs of "
                f"the same files from the trivial app, written to files ({down['seconds']:.2f} s)."
            ),
            extra={"pull": pull, "floor": down},
        )
    )
    return rows
