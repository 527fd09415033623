"""Probing many small image files on two cores instead of one.

Probing a 28x28 PNG (open, decode, pixel digest: ``media.probe_file``) takes about 100 µs, nearly
all of it Pillow's Python code holding the GIL, so threads do not help (four took 1.7x as long
as one). A helper interpreter on another core does: it imports only ``tessera.media`` (Pillow,
NumPy, BLAKE3; about 0.1 s, while this process has already started) and answers chunks of paths
with their probe results over a pipe. This process and the helper take chunks from one queue, so
a slow start or a busy core balances itself; if the helper cannot start, dies or answers
nonsense, this process probes what it had taken. Results and errors are the same as probing each
file here, in order: the first bad file raises its ``ImageError``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from tessera.media import FileImage, ImageError, probe_file

# Below this many files, starting an interpreter costs more than it saves.
HELPER_ABOVE = 2000
CHUNK = 256
IN_FLIGHT = 2  # chunks sent to the helper ahead of its answers, so it never waits for us

_HELPER = r"""
import json, sys, types
# A bare package object: tessera/__init__.py would import SQLAlchemy and the whole API (0.3 s)
# for a helper that needs media.py and errors.py alone.
package = types.ModuleType("tessera")
package.__path__ = [sys.argv[1]]
sys.modules["tessera"] = package
from tessera.media import ImageError, probe_file

for line in sys.stdin:
    out = []
    for path in json.loads(line):
        try:
            info = probe_file(path)
            out.append([info.width, info.height, info.channels, info.format, info.pixels])
        except ImageError as e:
            out.append(str(e))
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"""


def probe_files(paths: Sequence[Path]) -> list[FileImage]:
    """``[probe_file(p) for p in paths]``, on a second core when there are many."""
    spare_core = (os.cpu_count() or 1) > 1
    return _probe_files(paths, HELPER_ABOVE if spare_core else len(paths) + 1, CHUNK)[0]


def _probe_files(
    paths: Sequence[Path], helper_above: int, chunk: int
) -> tuple[list[FileImage], int]:
    """The probe results, and how many files the helper probed."""
    results: list[FileImage | ImageError | None] = [None] * len(paths)
    queue = deque(range(0, len(paths), chunk))
    lock = threading.Lock()
    helped = [0]

    def take() -> int | None:
        with lock:
            return queue.popleft() if queue else None

    def probe_here(start: int) -> None:
        for i in range(start, min(start + chunk, len(paths))):
            try:
                results[i] = probe_file(paths[i])
            except ImageError as e:
                results[i] = e

    def feed(helper: subprocess.Popen[str]) -> None:
        assert helper.stdin is not None and helper.stdout is not None
        sent: deque[int] = deque()
        try:
            while True:
                while len(sent) < IN_FLIGHT and (start := take()) is not None:
                    names = [os.fsdecode(p) for p in paths[start : start + chunk]]
                    helper.stdin.write(json.dumps(names) + "\n")
                    helper.stdin.flush()
                    sent.append(start)
                if not sent:
                    return
                answers = json.loads(helper.stdout.readline())
                start = sent[0]
                if not isinstance(answers, list) or len(answers) != len(
                    paths[start : start + chunk]
                ):
                    raise ValueError("the probe helper answered for the wrong number of files")
                for i, answer in enumerate(answers, start):
                    results[i] = (
                        FileImage(*answer) if isinstance(answer, list) else ImageError(answer)
                    )
                sent.popleft()
                helped[0] += len(answers)
        except (OSError, ValueError, TypeError):
            with lock:  # whatever it had not answered goes back to this process
                queue.extend(sent)

    helper = _start_helper() if len(paths) >= helper_above else None
    feeder = threading.Thread(target=feed, args=(helper,), daemon=True) if helper else None
    try:
        if feeder is not None:
            feeder.start()
        while (start := take()) is not None:
            probe_here(start)
        if feeder is not None:
            feeder.join()
            while (start := take()) is not None:  # chunks the helper gave back
                probe_here(start)
    finally:
        if helper is not None:
            _stop(helper)
    out = []
    for result in results:
        if isinstance(result, ImageError):
            raise result
        assert result is not None
        out.append(result)
    return out, helped[0]


def _start_helper() -> subprocess.Popen[str] | None:
    if not sys.executable:
        return None
    package = str(Path(__file__).resolve().parent)
    try:
        return subprocess.Popen(
            [sys.executable, "-c", _HELPER, package],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # its failures are redone, and reported, here
            text=True,
            encoding="utf-8",
            errors="surrogateescape",
        )
    except OSError:
        return None


def _stop(helper: subprocess.Popen[str]) -> None:
    try:
        if helper.stdin is not None:
            helper.stdin.close()
        helper.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        helper.kill()
        helper.wait()
    finally:
        if helper.stdout is not None:
            helper.stdout.close()
