"""Helpers shared by the benchmark modules (``bench_<topic>.py``): result rows, timing, child
processes with an isolated peak-RSS figure, and small file-system utilities.

This module is not a benchmark itself: ``run.py`` only discovers files named ``bench_*.py``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

KiB = 1024
MiB = 1024 * 1024

_START = time.perf_counter()


def log(message: str) -> None:
    """A progress line on stderr (stdout carries the summary)."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- result rows -------------------------------------------------------------------------------


def result(
    name: str,
    value: float | int,
    unit: str,
    *,
    reference: float | int | None = None,
    reference_name: str | None = None,
    ratio: float | None = None,
    ratio_meaning: str | None = None,
    target: str | None = None,
    passed: bool | None = None,
    notes: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One figure of the report.

    ``reference`` is the floor (or reference) measured in the same run, in the same ``unit``;
    ``ratio`` is what ``target`` is judged on (``ratio_meaning`` says how it was computed, e.g.
    ``"value / floor"``); ``passed`` is None for purely informational figures.
    """
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "reference": reference,
        "reference_name": reference_name,
        "ratio": ratio,
        "ratio_meaning": ratio_meaning,
        "target": target,
        "passed": passed,
        "notes": notes,
        "extra": extra or {},
    }


def throughput_result(
    name: str,
    value: float,
    unit: str,
    *,
    floor: float,
    floor_name: str,
    share: float,
    notes: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A throughput judged against its floor: passes when ``value >= share * floor``."""
    ratio = div(value, floor)
    return result(
        name,
        value,
        unit,
        reference=floor,
        reference_name=floor_name,
        ratio=ratio,
        ratio_meaning="throughput / floor throughput",
        target=f">= {share:.0%} of the floor",
        passed=ratio is not None and ratio >= share,
        notes=notes,
        extra=extra,
    )


T = TypeVar("T")


def alternating(
    pairs: int, floor: Callable[[], T], measured: Callable[[], T]
) -> tuple[list[T], list[T]]:
    """``pairs`` runs of each, back to back in pairs: floor then measured, then measured then
    floor, and so on, so that a machine that speeds up or slows down meanwhile favours neither.
    Returns (floor runs, measured runs), pair by pair."""
    floors: list[T] = []
    measures: list[T] = []
    for pair in range(pairs):
        if pair % 2 == 0:
            floors.append(floor())
            measures.append(measured())
        else:
            measures.append(measured())
            floors.append(floor())
    return floors, measures


def paired_throughput_result(
    name: str,
    unit: str,
    work: float,
    floor_seconds: list[float],
    measured_seconds: list[float],
    *,
    floor_name: str,
    share: float,
    notes: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A throughput (``work`` units per second) judged against its floor pair by pair: the
    median over pairs of floor time / measured time must reach ``share``.

    On two cores shared with the servers under test, one run of either side moves by 15-40 %,
    in spells that last seconds; the two runs of a pair are seconds apart and mostly share a
    spell, where the best or the median of each side taken apart compares different moments
    (docs/decisions.md). The value and the reference are the medians' throughputs."""
    ratios = [f / m for f, m in zip(floor_seconds, measured_seconds, strict=True)]
    ratio = statistics.median(ratios)
    best = min(floor_seconds) / min(measured_seconds)
    return result(
        name,
        work / statistics.median(measured_seconds),
        unit,
        reference=work / statistics.median(floor_seconds),
        reference_name=floor_name,
        ratio=ratio,
        ratio_meaning="median over run pairs of floor time / measured time",
        target=f">= {share:.0%} of the floor",
        passed=ratio >= share,
        notes=(
            f"{notes} Times, pair by pair (floor / measured): "
            + ", ".join(
                f"{f:.2f} / {m:.2f} s" for f, m in zip(floor_seconds, measured_seconds, strict=True)
            )
            + f"; ratios {', '.join(f'{r:.2f}' for r in ratios)}; best against best {best:.2f}."
        ),
        extra={
            **(extra or {}),
            "pair_ratios": ratios,
            "best_ratio": best,
            "floor_samples_s": floor_seconds,
            "measured_samples_s": measured_seconds,
        },
    )


def div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# -- timing ------------------------------------------------------------------------------------


def flush_dirty_pages() -> None:
    """``sync`` (untimed) before a timed step, so that writes of earlier steps are not flushed
    during it and charged to it."""
    os.sync()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def best_of(
    n: int,
    fn: Callable[[int], Any],
    *,
    setup: Callable[[int], Any] | None = None,
    teardown: Callable[[int], Any] | None = None,
) -> tuple[float, list[float]]:
    """Run ``fn(i)`` ``n`` times (``setup(i)``/``teardown(i)`` untimed around each, and the
    page cache's dirty pages flushed before each); return the best time and every sample."""
    samples = []
    for i in range(n):
        if setup is not None:
            setup(i)
        flush_dirty_pages()
        seconds, _ = timed(functools.partial(fn, i))
        samples.append(seconds)
        if teardown is not None:
            teardown(i)
    return min(samples), samples


# -- child processes ---------------------------------------------------------------------------

# Prepended to every child's code. ``ARGS`` holds the JSON arguments; ``report(dict)`` prints
# the result (plus the child's own peak RSS) as the last line of stdout.
CHILD_PRELUDE = r'''
import json as _json, sys as _sys, time as _time
_T0 = _time.perf_counter()
_ARG = _sys.argv[1]
if _ARG.startswith("@"):  # large arguments travel in a file (see run_python)
    with open(_ARG[1:]) as _f:
        _ARG = _f.read()
ARGS = _json.loads(_ARG)

def peak_rss_mib():
    """VmHWM: the high-water mark of this process's own address space (fresh since exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None

def report(out):
    out = dict(out)
    out["peak_rss_mib"] = peak_rss_mib()
    _sys.stdout.write("\n" + _json.dumps(out) + "\n")
    _sys.stdout.flush()
'''


@dataclass
class Finished:
    """A finished child process, measured by ``wait4()`` on its own pid."""

    wall_seconds: float
    cpu_user_seconds: float
    cpu_sys_seconds: float
    wait4_maxrss_mib: float  # an upper bound only, see run_python
    stdout: str = field(repr=False, default="")
    stderr: str = field(repr=False, default="")

    @property
    def cpu_seconds(self) -> float:
        return self.cpu_user_seconds + self.cpu_sys_seconds


@dataclass
class ChildResult:
    output: dict[str, Any]
    wall_seconds: float  # as seen by the parent: interpreter start-up and imports included
    cpu_seconds: float  # user + system CPU of the child (all its threads), from wait4()
    peak_rss_mib: float  # VmHWM reported by the child itself
    wait4_maxrss_mib: float  # ru_maxrss from wait4(): an upper bound, see run_python
    parent_rss_mib: float | None
    stderr: str = field(repr=False, default="")


def rss_mib(which: str = "VmRSS", pid: int | str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(which + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_command(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 900.0,
    check: bool = True,
) -> Finished:
    """Run a command; wall time, and CPU time and ru_maxrss of exactly that process (wait4 on
    its pid, not RUSAGE_CHILDREN, which would mix in every earlier child)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.send_signal(signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.001)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{argv[0]} failed (exit {proc.returncode}):\n{stderr[-4000:]}\n{stdout[-2000:]}"
        )
    return Finished(
        wall_seconds=wall,
        cpu_user_seconds=usage.ru_utime,
        cpu_sys_seconds=usage.ru_stime,
        wait4_maxrss_mib=usage.ru_maxrss / 1024,
        stdout=stdout,
        stderr=stderr,
    )


def run_python(
    code: str,
    args: dict[str, Any],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 900.0,
) -> ChildResult:
    """Run ``code`` in a fresh Python interpreter and return what it ``report()``-ed.

    Peak RSS: the child reports its own VmHWM, which covers only its address space since exec.
    ``wait4()``'s ``ru_maxrss`` for that exact pid is recorded as a cross-check, but on Linux it
    is only an upper bound: exec() folds the RSS high-water mark of the forked parent into the
    child's ``maxrss``, so a big benchmark runner would inflate it.
    """
    child_env = dict(os.environ)
    child_env.setdefault("TESSERA_PROGRESS", "0")
    if env:
        child_env.update(env)
    parent_rss = rss_mib()
    encoded = json.dumps(args)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as spill:
        if len(encoded) > 64 * KiB:  # one argv string may hold at most 128 KiB on Linux
            spill.write(encoded)
            spill.flush()
            encoded = "@" + spill.name
        done = run_command(
            [sys.executable, "-c", CHILD_PRELUDE + code, encoded],
            env=child_env,
            timeout=timeout,
        )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"benchmark child printed nothing:\n{done.stderr[-4000:]}")
    output = json.loads(lines[-1])
    return ChildResult(
        output=output,
        wall_seconds=done.wall_seconds,
        cpu_seconds=done.cpu_seconds,
        peak_rss_mib=output.get("peak_rss_mib"),
        wait4_maxrss_mib=done.wait4_maxrss_mib,
        parent_rss_mib=parent_rss,
        stderr=done.stderr,
    )


# -- files -------------------------------------------------------------------------------------


def count_files(root: Path) -> int:
    """Regular files below ``root`` (0 if it does not exist)."""
    total = 0
    for _folder, _dirs, files in os.walk(root):
        total += len(files)
    return total


def remove(path: Path) -> None:
    """Delete a file or folder tree if it exists (read-only blob files included)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def set_mtime_past(root: Path, seconds: float = 2.0) -> None:
    """Backdate every file below ``root``: a file modified within the stat cache's racy window
    of being hashed is (rightly) never trusted by it, which would make re-log look slow."""
    when = time.time() - seconds
    for folder, _dirs, files in os.walk(root):
        for name in files:
            os.utime(os.path.join(folder, name), (when, when))


def fs_info(path: Path) -> dict[str, Any]:
    """Device, file-system type and free space of the file system holding ``path``."""
    path = path.resolve()
    st = os.stat(path)
    fstype = source = mount = options = None
    best = ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    point = parts[1]
                    inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
                    if inside and len(point) >= len(best):
                        best, source, mount, fstype = point, parts[0], point, parts[2]
                        options = parts[3] if len(parts) > 3 else None
    except OSError:
        pass
    usage = shutil.disk_usage(path)
    journal = None
    if fstype == "ext4" and source and source.startswith("/dev/"):
        # ext4 lists a journal under /proc/fs/jbd2/<device>-8 when it has one.
        journal = os.path.exists(f"/proc/fs/jbd2/{os.path.basename(source)}-8")
    return {
        "path": str(path),
        "device": st.st_dev,
        "source": source,
        "mount": mount,
        "fstype": fstype,
        "options": options,
        "journal": journal,
        "free_gib": round(usage.free / 1024**3, 1),
    }


# -- services ----------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpService:
    """A child process serving HTTP on 127.0.0.1, started and waited for (``ready_path`` must
    answer 200), its output in ``log_path``; stop it with ``stop()`` (or use ``with``)."""

    def __init__(
        self,
        argv: list[str],
        port: int,
        log_path: Path,
        ready_path: str = "/",
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
    ):
        import httpx

        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        with open(log_path, "ab") as out:
            self.process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{argv[:3]} exited:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + ready_path, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{argv[:3]} did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> HttpService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- data --------------------------------------------------------------------------------------


def make_small_files(root: Path, count: int, min_size: int, max_size: int) -> tuple[int, int]:
    """``count`` files of random (incompressible) bytes in 10 class folders; (files, bytes)."""
    import random

    rng = random.Random(20240501)
    total = 0
    for i in range(count):
        folder = root / f"class_{i % 10}"
        if i < 10:
            folder.mkdir(parents=True, exist_ok=True)
        size = rng.randint(min_size, max_size)
        (folder / f"{i:05d}.bin").write_bytes(os.urandom(size))
        total += size
    return count, total


def _make_big_file(path: Path, size: int, seed: int) -> None:
    import blake3

    # BLAKE3's extendable output is a fast keystream: incompressible, distinct per seed.
    stream = blake3.blake3(f"tessera-bench-{seed}".encode())
    piece = 16 * MiB
    with open(path, "wb") as f:
        for offset in range(0, size, piece):
            f.write(stream.digest(length=min(piece, size - offset), seek=offset))


def make_big_files(root: Path, count: int, size: int) -> tuple[int, int]:
    """``count`` files ``root/part-<i>.bin`` of ``size`` incompressible bytes; (files, bytes)."""
    from concurrent.futures import ThreadPoolExecutor

    root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda i: _make_big_file(root / f"part-{i}.bin", size, i), range(count)))
    return count, count * size
