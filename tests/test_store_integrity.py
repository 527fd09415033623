"""Store format checks, corruption by hand, verify and gc."""

import json
import os
import sqlite3
import time

import pytest

import tessera
from conftest import blob_files, make_files
from tessera.errors import StoreCorruptError, StoreFormatError
from tessera.store import Store
from tessera.store.maintenance import gc, verify


def _log(store_dir, src, name="data", project="p"):
    with tessera.init(project=project, dir=store_dir) as run:
        art = tessera.Artifact(name, type="dataset")
        art.add_dir(src)
        return run.log_artifact(art)


def _age(path, seconds):
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_newer_store_format_is_refused(store_dir):
    tessera.init(project="p", dir=store_dir).finish()
    (store_dir / "tessera.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(StoreFormatError, match="format 99.*upgrade Tessera"):
        tessera.open_store(store_dir)


def test_newer_catalog_revision_is_refused(store_dir):
    tessera.init(project="p", dir=store_dir).finish()
    db = sqlite3.connect(store_dir / "catalog.db")
    db.execute("UPDATE alembic_version SET version_num = '9999'")
    db.commit()
    db.close()
    with pytest.raises(StoreFormatError, match="revision 9999.*newer Tessera"):
        tessera.open_store(store_dir)


def test_garbage_marker_and_garbage_catalog(store_dir):
    tessera.init(project="p", dir=store_dir).finish()
    (store_dir / "catalog.db-wal").unlink(missing_ok=True)
    (store_dir / "catalog.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreCorruptError, match="catalog.*damaged"):
        tessera.open_store(store_dir)
    (store_dir / "tessera.json").write_text("{not json")
    with pytest.raises(StoreFormatError, match="not a Tessera store marker"):
        tessera.open_store(store_dir)


def test_store_path_that_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(StoreFormatError, match="not a folder"):
        tessera.init(project="p", dir=target)


def test_verify_finds_damaged_missing_and_stray_blobs(tmp_path, store_dir):
    v = _log(store_dir, make_files(tmp_path / "src", 5))
    store = Store.open(store_dir)
    assert verify(store).ok
    files = v.files()
    damaged = store.blobs.path_of(files[0].digest)
    os.chmod(damaged, 0o644)
    damaged.write_bytes(b"flipped")
    store.blobs.path_of(files[1].digest).unlink()
    (damaged.parent / "stray.txt").write_text("?")
    report = verify(store)
    text = "\n".join(report.problems)
    assert f"{files[0].digest} is damaged" in text
    assert f"{files[0].path}: blob {files[0].digest} has 7 bytes" in text
    assert f"{files[1].path}: blob {files[1].digest} is missing" in text
    assert f"stray file '{damaged.parent.parent.name}/{damaged.parent.name}/stray.txt'" in text
    misplaced = store.blobs.path_of(files[2].digest)
    misplaced.rename(damaged.parent / misplaced.name)  # a valid digest in the wrong shard
    report = verify(store)
    assert any("stray file" in p and files[2].digest in p for p in report.problems)
    assert any(f"blob {files[2].digest} is missing" in p for p in report.problems)
    assert gc(store, 0, dry_run=True).deleted_blobs == 0  # stray files are not gc's to delete
    with pytest.raises(StoreCorruptError, match="missing"):
        v.read_bytes(files[1].path)
    store.close()


def test_verify_finds_missing_manifest(tmp_path, store_dir):
    v = _log(store_dir, make_files(tmp_path / "src", 2))
    store = Store.open(store_dir)
    store.blobs.path_of(v.digest).unlink()
    report = verify(store)
    assert report.problems == [f"p/data:v0: manifest blob {v.digest} is missing"]
    with pytest.raises(StoreCorruptError, match="Nothing was deleted"):
        gc(store, 0)
    store.close()


def test_gc_deletes_only_old_unreferenced_blobs(tmp_path, store_dir):
    src = make_files(tmp_path / "src", 4)
    v = _log(store_dir, src)
    store = Store.open(store_dir)
    kept = {p.name for p in blob_files(store_dir)}
    orphan_old = store.blobs.put_bytes(b"nobody refers to me")
    orphan_young = store.blobs.put_bytes(b"nor to me, but I am new")
    _age(store.blobs.path_of(orphan_old), 7200)
    for p in blob_files(store_dir):  # referenced blobs are old too: age must not matter
        if p.name in kept:
            _age(p, 7200)
    temp = store.blobs.tmp_dir / "leftover.tmp"
    temp.write_bytes(b"half a blob")
    _age(temp, 7200)

    dry = gc(store, 3600, dry_run=True)
    assert (dry.deleted_blobs, dry.young_garbage, dry.deleted_temp_files) == (1, 1, 1)
    assert store.blobs.has(orphan_old) and temp.exists()

    report = gc(store, 3600)
    assert report.deleted_blobs == 1 and report.deleted_bytes == len(b"nobody refers to me")
    assert report.kept_blobs == len(kept)
    assert not store.blobs.has(orphan_old) and store.blobs.has(orphan_young)
    assert not temp.exists()
    assert verify(store).ok
    assert v.download(tmp_path / "dl").is_dir()
    store.close()


def test_reusing_an_old_orphan_renews_it_so_gc_keeps_it(tmp_path, store_dir):
    src = make_files(tmp_path / "src", 1)
    store = Store.open(store_dir, create=True)
    (only,) = list(src.rglob("*.bin"))
    digest, _ = store.blobs.put_file(only)
    _age(store.blobs.path_of(digest), 7200)  # an old orphan, e.g. from a crashed run
    _log(store_dir, src)  # now referenced again, the blob is reused, not rewritten
    assert time.time() - store.blobs.path_of(digest).stat().st_mtime < 60
    store.close()


# -- pack files ---------------------------------------------------------------------------------


def _packed(store, count, seed):
    """``count`` blobs stored as one pack upload would be: [(digest, bytes)]."""
    from tessera.store.hashing import hash_bytes

    frames = [(hash_bytes(b), b) for b in (f"{seed}-{i}".encode() * 50 for i in range(count))]
    assert store.blobs.put_pack(_frames(frames)).stored == count
    return frames


def _frames(frames, piece=None):
    """A pack upload's body, in pieces of ``piece`` bytes (one piece if None)."""
    from tessera.store.packs import FRAME_HEADER

    body = b"".join(FRAME_HEADER.pack(d.encode(), len(b)) + b for d, b in frames)
    piece = piece or len(body)
    return [body[i : i + piece] for i in range(0, len(body), piece)]


def test_packed_blobs_read_like_loose_ones_and_verify_checks_them(tmp_path, store_dir):
    """Many blobs received together become one pack file: readable by every reader (from a
    second process's view too), copied out as a file for path readers, listed once, and each
    one's bytes checked by verify."""
    from tessera.store.blobs import LocalBlobStore
    from tessera.store.hashing import hash_bytes

    store = Store.open(store_dir, create=True)
    frames = _packed(store, 20, "a")
    (pack,) = list((store_dir / "packs").iterdir())
    assert blob_files(store_dir) == [] and pack.name.endswith(".pack")
    assert hash_bytes(pack.read_bytes()) + ".pack" == pack.name  # named by its content
    again = LocalBlobStore(store_dir)  # another process's view: finds the pack by itself
    for digest, data in frames:
        assert again.has(digest) and again.size(digest) == len(data)
        assert again.read(digest) == data and again.hash_blob(digest) == digest
    assert again.missing([d for d, _ in frames] + ["0" * 64]) == {"0" * 64}
    receipt = store.blobs.put_pack(_frames(frames, piece=7))  # frames cut anywhere
    assert receipt.received == [d for d, _ in frames] and receipt.stored == 0
    assert len(list((store_dir / "packs").iterdir())) == 1
    first = frames[0][0]
    path = again.local_path(first)  # copied out, for DuckDB and file responses
    assert path.read_bytes() == frames[0][1] and blob_files(store_dir) == [path]
    assert sorted(i.digest for i in again.list()) == sorted(d for d, _ in frames)
    assert verify(store).ok

    data = bytearray(pack.read_bytes())
    offset = data.index(frames[5][1])
    data[offset] ^= 1
    os.chmod(pack, 0o644)
    pack.write_bytes(bytes(data))
    problems = "\n".join(verify(store).problems)
    assert f"{frames[5][0]} is damaged" in problems
    with pytest.raises(tessera.DigestMismatchError, match="in pack"):
        LocalBlobStore(store_dir).local_path(frames[5][0])

    pack.write_bytes(bytes(data[:-5]))  # cut short: its trailer is gone, so is its index
    fresh = Store.open(store_dir)
    assert not fresh.blobs.has(frames[5][0])
    assert f"stray file 'packs/{pack.name}'" in "\n".join(verify(fresh).problems)
    assert gc(fresh, 0).deleted_blobs == 1  # the loose copy made above, unreferenced
    assert pack.exists()  # a pack without an index is not gc's to delete
    fresh.close()
    store.close()


def test_a_pack_upload_makes_one_file_however_it_is_cut_and_a_late_liar_leaves_nothing(tmp_path):
    """The server writes frames to the pack file as they are parsed: where the upload's chunks
    end does not change the file, and a bad blob at the very end (after 19 good ones were
    written) refuses them all, leaving no pack, no loose blob and no temporary file."""
    from tessera.store.hashing import hash_bytes

    frames = [(hash_bytes(b), b) for b in (f"x-{i}".encode() * 40 for i in range(20))]
    names = []
    for piece in (None, 7, 73):
        store = Store.open(tmp_path / f"cut-{piece}", create=True)
        assert store.blobs.put_pack(_frames(frames, piece)).stored == 20
        names.append(sorted(p.name for p in (tmp_path / f"cut-{piece}" / "packs").iterdir()))
        store.close()
    assert len(names[0]) == 1 and names[0] == names[1] == names[2]

    root = tmp_path / "liar"
    store = Store.open(root, create=True)

    def blob_area():
        return sorted(
            str(p.relative_to(root))
            for area in ("blobs", "packs", "tmp")
            for p in (root / area).rglob("*")
            if p.is_file()
        )

    before = blob_area()
    liar = (frames[0][0], frames[1][1])  # bytes that do not hash to the digest they come with
    with pytest.raises(tessera.DigestMismatchError, match="nothing was stored"):
        store.blobs.put_pack(_frames([*frames[1:], liar], piece=4096))
    assert blob_area() == before
    assert not any(store.blobs.has(d) for d, _ in frames)
    store.close()


def test_gc_deletes_a_pack_only_when_none_of_its_blobs_is_wanted(tmp_path, store_dir):
    store = Store.open(store_dir, create=True)
    garbage = _packed(store, 20, "g")
    mixed = _packed(store, 20, "m")
    wanted = tmp_path / "src"
    wanted.mkdir()
    (wanted / "kept.bin").write_bytes(mixed[3][1])  # a version now needs one packed blob
    _log(store_dir, wanted)
    packs = sorted((store_dir / "packs").iterdir())
    for pack in packs:
        _age(pack, 7200)
    for path in blob_files(store_dir):
        _age(path, 7200)

    dry = gc(store, 3600, dry_run=True)
    assert (dry.deleted_blobs, dry.packed_garbage) == (20, 19)
    assert len(list((store_dir / "packs").iterdir())) == 2
    report = gc(store, 3600)
    assert (report.deleted_blobs, report.packed_garbage) == (20, 19)
    assert report.deleted_bytes == sum(len(b) for _, b in garbage)
    (left,) = list((store_dir / "packs").iterdir())  # the one that holds the wanted blob
    assert left in packs
    assert not any(store.blobs.has(d) for d, _ in garbage)
    assert all(store.blobs.has(d) for d, _ in mixed)
    assert verify(store).ok
    store.close()


def test_a_commit_check_sees_a_pack_added_within_the_folder_s_mtime_tick(store_dir):
    """Replicas share one folder: a pack that another process adds in the same clock tick as
    this process's last look leaves packs/'s mtime unchanged. Lookups may miss it for a
    moment; the presence check that guards a commit must not."""
    from tessera.store.blobs import LocalBlobStore

    writer = Store.open(store_dir, create=True)
    _packed(writer, 20, "first")
    reader = LocalBlobStore(store_dir)
    assert reader.has_packs()  # the reader has looked at packs/
    folder = store_dir / "packs"
    seen = os.stat(folder).st_mtime_ns
    frames = _packed(writer, 20, "second")
    os.utime(folder, ns=(seen, seen))  # as if in the same tick
    digests = [d for d, _ in frames]
    assert not reader.has(digests[0])  # a plain lookup trusts the unchanged mtime
    assert reader.missing(digests) == set()
    assert reader.has(digests[0]) and reader.read(digests[0]) == frames[0][1]
    writer.close()


def test_gc_keeps_what_was_reused_after_it_looked_and_readers_follow_its_deletions(store_dir):
    """gc reads each file's mtime again just before deleting it, so a blob a writer reused
    (renewed) since gc's scan survives, loose or packed. Another process that had indexed a
    pack gc then deleted answers "missing", never stale bytes."""
    from tessera.store.blobs import LocalBlobStore

    store = Store.open(store_dir, create=True)
    loose = store.blobs.put_bytes(b"an orphan, about to be reused")
    reused = _packed(store, 20, "reused")
    garbage = _packed(store, 20, "garbage")
    reused_pack, garbage_pack = (store.blobs.packs.find(f[0][0]).pack for f in (reused, garbage))
    for path in (store.blobs.path_of(loose), reused_pack, garbage_pack):
        _age(path, 7200)
    reader = LocalBlobStore(store_dir)
    assert reader.read(garbage[0][0]) == garbage[0][1]  # indexed before gc runs

    # What gc's scan found doomed, renewed before the deletion (as a writer's reuse does).
    doomed = {loose, *(d for d, _ in reused), *(d for d, _ in garbage)}
    assert store.blobs.touch(loose) and store.blobs.touch(reused[0][0])
    deleted = store.blobs.delete_many(doomed, grace_seconds=3600)
    assert deleted == {d for d, _ in garbage}
    assert store.blobs.has(loose) and os.path.exists(reused_pack)
    assert not os.path.exists(garbage_pack)

    gone = garbage[3][0]
    assert reader.missing([gone, reused[3][0]]) == {gone}
    with pytest.raises(StoreCorruptError, match="missing"):
        reader.open(gone)
    assert reader.read(reused[3][0]) == reused[3][1]
    store.close()
