"""Probing many small image files on two cores instead of one.

Probing a 28x28 PNG (read, decode, pixel digest: ``media.probe_file_bytes``) takes about 30 µs,
nearly all of it Python holding the GIL, so threads do not help (four took 1.7x as long as one).
A helper interpreter on another core does: it imports only ``tessera.media`` (Pillow, NumPy,
BLAKE3; about 0.14 s, while this process has already started) and answers chunks of paths with
their probe results over a pipe. This process and the helper take chunks from one queue, so a
slow start or a busy core balances itself; if the helper cannot start, dies or answers nonsense,
this process probes what it had taken. Results and errors are the same as probing each file
here, in order: the first bad file raises its ``ImageError``. A small file's bytes come back
with its result (base64 in the helper's answer, which must hash to the digest it gives) while a
``KeptBytes`` budget lasts, so that the upload stores the very bytes that were decoded without
reading the file again. A file the helper calls bad is probed again here, so that this
process's Pillow (its plugins, ``LOAD_TRUNCATED_IMAGES``) has the last word;
``MAX_IMAGE_PIXELS`` is passed on.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from PIL import Image as PILImage

from tessera.media import FileImage, ImageError, probe_file_bytes
from tessera.store.hashing import hash_bytes

# Below this many files, starting an interpreter costs more than it saves (10,000 thumbnails:
# 0.32 s here alone, 0.28 s with the helper, which answers its first chunk after 0.14 s).
HELPER_ABOVE = 6000
CHUNK = 256
IN_FLIGHT = 2  # chunks sent to the helper ahead of its answers, so it never waits for us

_HELPER = r"""
import base64, gc, json, queue, sys, threading, types
gc.disable()  # a short-lived process whose objects hold no cycles (see tessera/gcpause.py)
# A bare package object: tessera/__init__.py would import SQLAlchemy and the whole API (0.3 s)
# for a helper that needs media.py and errors.py alone.
package = types.ModuleType("tessera")
package.__path__ = [sys.argv[1]]
sys.modules["tessera"] = package
from PIL import Image
from tessera.media import ImageError, probe_file_bytes

Image.MAX_IMAGE_PIXELS = json.loads(sys.argv[2])
# Requests are read as they arrive, so the parent's writes never wait for our answers to be
# read (with both pipes full, both processes would wait for ever).
requests = queue.Queue()

def pump():
    for line in sys.stdin:
        requests.put(line)
    requests.put(None)

threading.Thread(target=pump, daemon=True).start()
for line in iter(requests.get, None):
    # The parent's budget left for bytes, and the largest file it keeps: nothing larger travels.
    allowance, file_limit, paths = json.loads(line)
    out = []
    for path in paths:
        try:
            info, data = probe_file_bytes(path)
        except ImageError:
            out.append(None)  # the parent probes it again and raises its own error
            continue
        sent = None
        if data is not None and len(data) <= min(allowance, file_limit):
            allowance -= len(data)
            sent = base64.b64encode(data).decode()
        out.append(
            [info.width, info.height, info.channels, info.format, info.pixels, info.file_digest,
             sent]
        )
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"""

Probed = tuple[FileImage, bytes | None]  # a file's probe result, and its bytes if kept


class KeptBytes:
    """The bytes of probed files held for their upload: files of at most ``FILE_LIMIT`` bytes,
    up to ``limit`` bytes in all. Other files are read again when stored (and must still hash as
    they did when probed): for a large file that second read costs little next to its bytes."""

    FILE_LIMIT = 1024 * 1024

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def keep(self, data: bytes | None) -> bytes | None:
        """``data`` if it is small and fits in what is left, else None (and it is not held)."""
        if data is None or len(data) > self.FILE_LIMIT:
            return None
        with self._lock:
            if self.held + len(data) > self.limit:
                return None
            self.held += len(data)
        return data

    @property
    def left(self) -> int:
        return self.limit - self.held


def probe_files(paths: Sequence[Path], kept: KeptBytes) -> list[Probed]:
    """``[probe_file_bytes(p) for p in paths]``, on a second core when there are many; bytes
    are kept while ``kept`` allows."""
    helper_above = HELPER_ABOVE if _usable_cores() > 1 else len(paths) + 1
    return _probe_files(paths, helper_above, CHUNK, kept)[0]


def _probe_files(
    paths: Sequence[Path], helper_above: int, chunk: int, kept: KeptBytes
) -> tuple[list[Probed], int]:
    """The probe results, and how many files the helper probed."""
    results: list[Probed | ImageError | None] = [None] * len(paths)
    queue = deque(range(0, len(paths), chunk))
    lock = threading.Lock()
    helped = [0]

    def take() -> int | None:
        with lock:
            return queue.popleft() if queue else None

    def probe_here(start: int, stop: int) -> None:
        for i in range(start, min(stop, len(paths))):
            try:
                info, data = probe_file_bytes(paths[i])
                results[i] = (info, kept.keep(data))
            except ImageError as e:
                results[i] = e

    def feed(helper: subprocess.Popen[str]) -> None:
        assert helper.stdin is not None and helper.stdout is not None
        sent: deque[int] = deque()
        try:
            while True:
                while len(sent) < IN_FLIGHT and (start := take()) is not None:
                    sent.append(start)
                    names = [os.fsdecode(p) for p in paths[start : start + chunk]]
                    request = [kept.left, kept.FILE_LIMIT, names]
                    helper.stdin.write(json.dumps(request) + "\n")
                    helper.stdin.flush()
                if not sent:
                    return
                start = sent[0]
                answers = _parse_answer(helper.stdout.readline(), len(paths[start : start + chunk]))
                for i, answer in enumerate(answers, start):
                    if answer is None:  # a bad file: this process decides, and says why
                        probe_here(i, i + 1)
                    else:
                        results[i] = (answer[0], kept.keep(answer[1]))
                sent.popleft()
                helped[0] += len(answers)
        except Exception:  # a broken helper only means that this process does more
            pass
        finally:
            with lock:  # whatever it had not answered goes back to this process
                queue.extend(sent)

    helper = _start_helper() if len(paths) >= helper_above else None
    feeder = threading.Thread(target=feed, args=(helper,), daemon=True) if helper else None
    try:
        if feeder is not None:
            feeder.start()
        while (start := take()) is not None:
            probe_here(start, start + chunk)
        if feeder is not None:
            feeder.join()
            while (start := take()) is not None:  # chunks the helper gave back
                probe_here(start, start + chunk)
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


def _parse_answer(line: str, count: int) -> list[Probed | None]:
    """The helper's answer for ``count`` files: a result and its bytes, or None for a bad
    file. Anything malformed, bytes that do not hash to the digest given included, raises
    ValueError (binascii.Error is one)."""
    answers = json.loads(line)
    if not isinstance(answers, list) or len(answers) != count:
        raise ValueError("the probe helper answered for the wrong number of files")
    out: list[Probed | None] = []
    for answer in answers:
        if answer is None:
            out.append(None)
            continue
        if not (
            isinstance(answer, list)
            and len(answer) == 7
            and all(isinstance(v, int) and not isinstance(v, bool) for v in answer[:3])
            and all(isinstance(v, str) for v in answer[3:6])
            and isinstance(answer[6], str | None)
        ):
            raise ValueError(f"the probe helper answered {answer!r}")
        info, sent = FileImage(*answer[:6]), answer[6]
        data = None if sent is None else base64.b64decode(sent, validate=True)
        if data is not None and hash_bytes(data) != info.file_digest:
            raise ValueError("the probe helper sent bytes that are not those it decoded")
        out.append((info, data))
    return out


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what a container or taskset allows
    except AttributeError:
        return os.cpu_count() or 1


def _can_start_python() -> bool:
    """Whether ``sys.executable`` starts a plain interpreter: not in a frozen application, nor
    under an embedding server (uWSGI, mod_wsgi), where it would start the application again."""
    name = Path(sys.executable or "").name.lower()
    return not getattr(sys, "frozen", False) and name.startswith(("python", "pypy"))


def _start_helper() -> subprocess.Popen[str] | None:
    if not _can_start_python():
        return None
    package = str(Path(__file__).resolve().parent)
    try:
        return subprocess.Popen(
            [sys.executable, "-c", _HELPER, package, json.dumps(PILImage.MAX_IMAGE_PIXELS)],
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
    except (OSError, ValueError, subprocess.TimeoutExpired):
        helper.kill()
        helper.wait()
    finally:
        if helper.stdout is not None:
            helper.stdout.close()
