"""Every byte stored once, every byte given back as it was logged.

* The same bytes logged under two artifacts, two projects and two versions are stored once: the
  blob files on disk grow by exactly the new contents plus one manifest per new manifest.
* Re-logging unchanged content creates no version and no blob; a renamed file adds only the
  manifest.
* ``download()`` (copying and ``link=True``) and ``open()`` give back bit-identical regular files:
  small, empty, larger than the 8 MiB chunk, nested, unicode names.
* The stat cache: re-logging an unchanged folder reads none of its files; a file changed in
  place, or replaced by another file of the same size and mtime, is read again.

Known limit (not tested, by design of every stat cache, git's included): a file rewritten in
place with the same size and then given back its old mtime (same inode) is *not* read again, so
its old digest is logged. Tools that do this (``touch -r``, ``rsync --times`` writing in place)
must be followed by deleting ``<store>/cache/`` or by changing the file another way.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

import tessera
from conftest import blob_files, make_files
from tessera.files import read_small
from tessera.store import blobs as blobs_module
from tessera.store import hashing
from tessera.store.hashing import CHUNK_SIZE
from tessera.store.statcache import RACY_WINDOW_NS


@pytest.fixture
def work_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder in memory (tmpfs) when there is one: each version's blob commit calls syncfs,
    which on a disk other programs write to takes up to seconds. Hard links, modes, inodes and
    mtimes behave the same on tmpfs."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="tessera-dedup-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def on_disk(store: Path) -> dict[str, int]:
    """Blob name -> size of every blob file."""
    return {p.name: p.stat().st_size for p in blob_files(store)}


def log_dir(
    run: tessera.Run, name: str, folder: Path, metadata: dict | None = None
) -> tessera.ArtifactVersion:
    art = tessera.Artifact(name, type="files", metadata=metadata)
    art.add_dir(folder)
    return run.log_artifact(art)


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


# -- storing once --------------------------------------------------------------------------------


def test_same_bytes_are_stored_once_across_artifacts_projects_and_versions(
    work_dir: Path,
) -> None:
    src = make_files(work_dir / "src", 20, size=3000, seed=1)
    shutil.copy(src / "d3" / "f00003.bin", src / "same-bytes-twice.bin")  # a duplicate inside
    contents = folder_contents(src)
    assert len(contents) == 21
    distinct = {digest(b): len(b) for b in contents.values()}
    assert len(distinct) == 20
    store = work_dir / "store"

    with tessera.init(project="proj-a", dir=store) as run:
        v0 = log_dir(run, "images", src)
        blobs = on_disk(store)
        # 20 contents and the manifest, nothing else
        assert set(blobs) == set(distinct) | {v0.digest}
        assert all(blobs[d] == size for d, size in distinct.items())
        manifest_blob = next(p for p in blob_files(store) if p.name == v0.digest)
        manifest = json.loads(manifest_blob.read_bytes())  # the one blob that is not a file
        assert {p: e["digest"] for p, e in manifest["files"].items()} == {
            p: digest(b) for p, b in contents.items()
        }

        # the same files as another artifact: the identical manifest too, so nothing new
        copy = log_dir(run, "copy", src)
        assert (copy.name, copy.number, copy.digest) == ("copy", 0, v0.digest)
        assert on_disk(store) == blobs

        # other metadata: a new manifest, the files are shared
        tagged = log_dir(run, "tagged", src, metadata={"split": "test"})
        assert tagged.digest != v0.digest
        assert set(on_disk(store)) - set(blobs) == {tagged.digest}
        blobs = on_disk(store)

    # another project
    with tessera.init(project="proj-b", dir=store) as run:
        other = log_dir(run, "images", src)
        assert (other.project, other.number, other.digest) == ("proj-b", 0, v0.digest)
        assert on_disk(store) == blobs

    # a second version: one new file, one removed
    extra = random.Random(5).randbytes(7777)
    (src / "new.bin").write_bytes(extra)
    (src / "d0" / "f00000.bin").unlink()
    with tessera.init(project="proj-a", dir=store) as run:
        v1 = log_dir(run, "images", src)
        assert v1.number == 1
        added = {d: s for d, s in on_disk(store).items() if d not in blobs}
        assert added == {digest(extra): 7777, v1.digest: added[v1.digest]}
        assert len(v1.files()) == 21

    # what the store holds is exactly the distinct contents and the distinct manifests
    with tessera.open_store(store) as browser:
        versions = [
            *browser.versions("proj-a", "images"),
            *browser.versions("proj-a", "copy"),
            *browser.versions("proj-a", "tagged"),
            *browser.versions("proj-b", "images"),
        ]
        needed = {v.digest for v in versions}
        for v in versions:
            needed |= {e.digest for e in v.files()}
    final = on_disk(store)
    assert set(final) == needed
    assert len(final) == 20 + 1 + 3  # contents, manifests of v0 (= copy = proj-b), tagged, v1
    assert sum(final.values()) == sum(distinct.values()) + 7777 + sum(
        final[v.digest] for v in (v0, tagged, v1)
    )


def test_relogging_unchanged_content_creates_no_version_and_no_blob(work_dir: Path) -> None:
    src = make_files(work_dir / "src", 10, size=500, seed=2)
    store = work_dir / "store"
    with tessera.init(project="p", dir=store) as run:
        first = log_dir(run, "data", src)
    blobs = on_disk(store)
    for _ in range(2):  # a new run, then the same run twice
        with tessera.init(project="p", dir=store) as run:
            for _ in range(2):
                again = log_dir(run, "data", src)
                assert (again.number, again.digest) == (0, first.digest)
    assert on_disk(store) == blobs
    assert not any((store / "tmp").iterdir())
    with tessera.open_store(store) as browser:
        assert [v.number for v in browser.versions("p", "data")] == [0]
        assert browser.artifact("p/data:latest").number == 0


def test_renamed_file_adds_only_a_manifest(work_dir: Path) -> None:
    src = make_files(work_dir / "src", 10, size=500, seed=3)
    moved = (src / "d2" / "f00002.bin").read_bytes()
    store = work_dir / "store"
    with tessera.init(project="p", dir=store) as run:
        v0 = log_dir(run, "data", src)
        blobs = on_disk(store)
        (src / "d2" / "f00002.bin").rename(src / "renamed.bin")
        v1 = log_dir(run, "data", src)
    assert v1.number == 1 and v1.digest != v0.digest
    assert set(on_disk(store)) - set(blobs) == {v1.digest}
    paths = {e.path: e.digest for e in v1.files()}
    assert "d2/f00002.bin" not in paths
    assert paths["renamed.bin"] == digest(moved)


# -- giving back ---------------------------------------------------------------------------------


def round_trip_files(folder: Path) -> dict[str, bytes]:
    rng = random.Random(11)
    files = {
        "small/a.txt": b"hello\n",
        "small/b.bin": rng.randbytes(1),
        "empty.bin": b"",
        "big/chunks.bin": rng.randbytes(2 * CHUNK_SIZE + 12345),  # three chunks, streamed
        "big/one-chunk.bin": rng.randbytes(CHUNK_SIZE),  # exactly the chunk size
        "big/under.bin": rng.randbytes(CHUNK_SIZE - 1),  # the largest read in one go
        "deep/a/b/c/d/e/f/leaf.dat": rng.randbytes(3000),
        "données/画像 ü.bin": rng.randbytes(100),
        "emoji/🙂 space & 'quote'.txt": "ünïcödé\n".encode(),
        "same/x.bin": b"twice",
        "same/y.bin": b"twice",
    }
    for path, data in files.items():
        local = folder.joinpath(*path.split("/"))
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
    return files


def tree(root: Path) -> dict[str, bytes]:
    """Every entry under ``root``, which must be a regular file (no links, no leftovers)."""
    out = {}
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            assert stat.S_ISREG(os.lstat(path).st_mode), f"{path} is not a regular file"
            out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


def test_small_files_are_read_whole_in_one_read_up_to_the_limit(work_dir: Path) -> None:
    for size, expected in [(0, b""), (1, b"x"), (99, b"x" * 99), (100, None), (101, None)]:
        path = work_dir / f"f{size}"
        path.write_bytes(b"x" * size)
        assert read_small(path, below=100) == expected


def test_a_file_larger_than_its_stat_said_is_stored_whole(
    work_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small files are read with one read of their size + 1 bytes (``files.read_small``). A
    file that grew after its size was taken (simulated: fstat reports one byte less) gives
    that read more than expected; it is then streamed to its end instead, so the blob and the
    manifest hold every byte."""
    src = work_dir / "src"
    src.mkdir()
    data = os.urandom(5000)
    (src / "grown.bin").write_bytes(data)
    real_fstat = os.fstat

    def stale_fstat(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        if st.st_size != len(data):
            return st
        return os.stat_result((*st[:6], st.st_size - 1, *st[7:10]))

    monkeypatch.setattr(os, "fstat", stale_fstat)
    with tessera.init(project="p", dir=work_dir / "store") as run:
        version = log_dir(run, "grown", src)
    monkeypatch.undo()
    assert [(e.path, e.digest, e.size) for e in version.files()] == [
        ("grown.bin", digest(data), len(data))
    ]
    assert on_disk(work_dir / "store")[digest(data)] == len(data)


def test_download_and_open_give_back_identical_files(work_dir: Path) -> None:
    src = work_dir / "src"
    files = round_trip_files(src)
    store = work_dir / "store"
    with tessera.init(project="p", dir=store) as run:
        logged = log_dir(run, "round-trip", src)
    assert logged.file_count == len(files)
    blob_of = {p.name: p for p in blob_files(store)}
    big = files["big/chunks.bin"]
    assert blob_of[digest(big)].stat().st_size == len(big)
    assert blob_of[digest(big)].read_bytes() == big

    with tessera.open_store(store) as browser:
        version = browser.artifact("p/round-trip:v0")
        assert {e.path: (e.digest, e.size) for e in version.files()} == {
            p: (digest(b), len(b)) for p, b in files.items()
        }

        copied = version.download(work_dir / "copied")
        assert tree(copied) == files

        linked = version.download(work_dir / "linked", link=True)
        assert tree(linked) == files
        for path, data in files.items():
            # same file system: the download shares the blob's bytes (a hard link)
            local = linked.joinpath(*path.split("/"))
            assert os.stat(local).st_ino == blob_of[digest(data)].stat().st_ino, path

        for path, data in files.items():
            with version.open(path) as f:
                assert f.read() == data, path
            assert version.read_bytes(path) == data
    # the copies are the user's: changing one leaves the store intact
    (copied / "small" / "a.txt").write_bytes(b"changed")
    assert blob_of[digest(b"hello\n")].read_bytes() == b"hello\n"


# -- the stat cache ------------------------------------------------------------------------------


def spy_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every file tessera reads to digest or store it (from any thread)."""
    reads: list[str] = []
    real_put_file = blobs_module.LocalWriteBatch.put_file
    real_hash_file = hashing.hash_file

    def put_file(self: object, path: str | os.PathLike[str]) -> tuple[str, int]:
        reads.append(str(path))
        return real_put_file(self, path)

    def hash_file(path: str | os.PathLike[str]) -> tuple[str, int]:
        reads.append(str(path))
        return real_hash_file(path)

    monkeypatch.setattr(blobs_module.LocalWriteBatch, "put_file", put_file)
    for module in list(sys.modules.values()):  # wherever it was imported by name
        name = getattr(module, "__name__", "")
        if name.startswith("tessera") and getattr(module, "hash_file", None) is real_hash_file:
            monkeypatch.setattr(module, "hash_file", hash_file)
    return reads


def cache_rows(store: Path, run: tessera.Run) -> dict[str, tuple]:
    run._backend.store.stat_cache.wait()  # entries are written by a thread of their own
    db = sqlite3.connect(f"file:{store / 'cache' / 'stat.sqlite'}?mode=ro", uri=True)
    try:
        return {row[0]: row[1:] for row in db.execute("SELECT * FROM files")}
    finally:
        db.close()


def test_stat_cache_rereads_only_changed_files(
    work_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_files(work_dir / "src", 300, size=2000, seed=4)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    # mtimes well before the logging: the cache does not trust a file modified within
    # RACY_WINDOW_NS of being hashed (it could change again within the same timestamp tick)
    past = time.time() - 3600
    for path in files:
        os.utime(path, (past, past))
    reads = spy_reads(monkeypatch)
    store = work_dir / "store"

    with tessera.init(project="p", dir=store) as run:
        v0 = log_dir(run, "data", src)
        assert sorted(reads) == sorted(map(str, files))  # the spy sees every read, once
        rows = cache_rows(store, run)
        assert {path: row[3] for path, row in rows.items()} == {
            str(p): digest(p.read_bytes()) for p in files
        }
        reads.clear()
        again = log_dir(run, "data", src)
        assert reads == []
        assert again.number == 0
        assert cache_rows(store, run) == rows  # nothing hashed again, so nothing remembered again

    # another run (a new process would be the same: the cache is a file in the store)
    with tessera.init(project="p", dir=store) as run:
        assert log_dir(run, "data", src).number == 0
        assert reads == []

        # a normal change: same size, new bytes, the mtime moves
        changed = files[17]
        new_bytes = random.Random(1).randbytes(2000)
        changed.write_bytes(new_bytes)
        time.sleep(RACY_WINDOW_NS / 1e9 + 0.05)  # so that its next digest is trusted
        v1 = log_dir(run, "data", src)
        assert reads == [str(changed)]
        assert v1.number == 1
        before = {e.path: e.digest for e in v0.files()}
        after = {e.path: e.digest for e in v1.files()}
        key = changed.relative_to(src).as_posix()
        assert after[key] == digest(new_bytes)
        assert {k: v for k, v in after.items() if k != key} == {
            k: v for k, v in before.items() if k != key
        }
        reads.clear()

        # replaced by another file with the same size and the old mtime: the inode tells
        replaced = files[42]
        st = replaced.stat()
        other_bytes = random.Random(2).randbytes(2000)
        temp = replaced.with_name("incoming.tmp")
        temp.write_bytes(other_bytes)
        os.utime(temp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(temp, replaced)
        assert (replaced.stat().st_size, replaced.stat().st_mtime_ns) == (2000, st.st_mtime_ns)
        v2 = log_dir(run, "data", src)
        assert reads == [str(replaced)]
        assert v2.number == 2
        assert v2.entry(replaced.relative_to(src).as_posix()).digest == digest(other_bytes)
        reads.clear()

        # a file whose mtime is not safely before its hashing is not trusted: read each time
        future = time.time() + 3600
        os.utime(files[99], (future, future))
        for _ in range(2):
            assert log_dir(run, "data", src).number == 2  # the same content
            assert reads == [str(files[99])]
            reads.clear()


def test_stat_cache_writes_in_the_background_and_the_next_lookup_sees_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tessera.store.statcache import StatCache

    path = tmp_path / "a.bin"
    path.write_bytes(b"x")
    past = time.time() - 3600
    os.utime(path, (past, past))
    st = path.stat()
    cache = StatCache(tmp_path / "cache" / "stat.sqlite")
    cache.remember([(path, st, "d" * 64, time.time_ns())])
    assert cache.lookup([(path, st)]) == {str(path): "d" * 64}  # waited for the write
    cache.remember([(path, st, "e" * 64, time.time_ns())])  # the later entry wins
    cache.close()
    assert StatCache(tmp_path / "cache" / "stat.sqlite").lookup([(path, st)]) == {
        str(path): "e" * 64
    }

    # A cache that cannot be written only costs hashing later: no error, in no thread.
    failures: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(args.exc_value))
    (tmp_path / "not-a-folder").write_bytes(b"")
    broken = StatCache(tmp_path / "not-a-folder" / "stat.sqlite")
    broken.remember([(path, st, "d" * 64, time.time_ns())])
    broken.close()
    assert failures == []
