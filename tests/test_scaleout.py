"""Scale-out: several server replicas on one PostgreSQL catalog and one S3 bucket."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import tessera
from conftest import ServerProcess, make_files
from tessera.store import Store
from tessera.store.maintenance import verify

pytestmark = pytest.mark.slow


@pytest.fixture
def shared_store(postgres, s3_env, monkeypatch):
    """Catalog and blob URLs that every replica (and CLI command) of this test shares."""
    catalog, blobs = postgres.new_database(), s3_env.new_prefix()
    monkeypatch.setenv("TESSERA_CATALOG", catalog)
    monkeypatch.setenv("TESSERA_BLOBS", blobs)
    return catalog, blobs


@pytest.fixture
def replicas(tmp_path, shared_store, monkeypatch):
    first = ServerProcess(tmp_path / "replica-a").start()
    second = ServerProcess(tmp_path / "replica-b").start()
    second.admin_token = first.admin_token  # one catalog: the first replica made the admin
    monkeypatch.setenv("TESSERA_TOKEN", first.admin_token)
    yield first, second
    first.stop()
    second.stop()


WRITER = textwrap.dedent(
    """
    import sys, pathlib, tessera
    server, dir, index = sys.argv[1], sys.argv[2], int(sys.argv[3])
    barrier = pathlib.Path(sys.argv[4])
    src = pathlib.Path(dir) / "src"
    src.mkdir(parents=True)
    for i in range(20):
        (src / f"f{i}.txt").write_text(f"writer {index} file {i}")
    while not barrier.exists():
        pass
    with tessera.init(project="shared", server=server, dir=dir + "/cache") as run:
        art = tessera.Artifact("data", type="dataset")
        art.add_dir(src)
        print(run.log_artifact(art).version)
    """
)


def test_eight_writers_on_two_replicas_get_contiguous_versions(tmp_path, replicas):
    first, second = replicas
    barrier = tmp_path / "go"
    env = {**os.environ, "TESSERA_TOKEN": first.admin_token}
    env.pop("TESSERA_CATALOG")  # clients talk to servers, not to the database
    env.pop("TESSERA_BLOBS")
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                (first, second)[i % 2].url,
                str(tmp_path / f"w{i}"),
                str(i),
                str(barrier),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(8)
    ]
    time.sleep(1.0)
    barrier.touch()
    versions = []
    for writer in writers:
        out, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err
        versions.append(out.strip())
    assert sorted(versions, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(8)]
    with tessera.open_store(server=second.url, dir=tmp_path / "reader") as store:
        found = store.versions("shared", "data")
        assert [v.version for v in found] == [f"v{i}" for i in range(8)]
        assert len({v.digest for v in found}) == 8
        assert found[-1].aliases == ("latest",)
    report = verify(Store.open(tmp_path / "replica-a"))
    assert report.ok, report.problems
    assert report.versions == 8


def test_killing_a_replica_mid_commit_leaves_no_partial_version(tmp_path, replicas):
    first, second = replicas
    src = make_files(tmp_path / "src", 400, size=20_000)
    env = {**os.environ, "TESSERA_TOKEN": first.admin_token}
    env.pop("TESSERA_CATALOG")
    env.pop("TESSERA_BLOBS")
    script = textwrap.dedent(
        f"""
        import tessera
        with tessera.init(project="kill", server={first.url!r}, dir={str(tmp_path / "c")!r}) as run:
            for round in range(3):
                art = tessera.Artifact("big", type="dataset")
                art.add_dir({str(src)!r})
                art.add_bytes(str(round).encode(), "round.txt")
                run.log_artifact(art)
        """
    )
    rng = random.Random(7)
    client = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    time.sleep(rng.uniform(2.0, 5.0))
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(30)
    client.wait(180)  # it fails (its server is gone) or finished before the kill
    # The surviving replica sees only complete versions.
    with tessera.open_store(server=second.url, dir=tmp_path / "reader") as store:
        artifacts = (
            [a.name for a in store.artifacts("kill")]
            if any(p.name == "kill" for p in store.projects())
            else []
        )
        if "big" in artifacts:
            for version in store.versions("kill", "big"):
                assert version.file_count == 401
                assert len(version.files()) == 401
    report = verify(Store.open(tmp_path / "replica-b"))
    assert report.ok, report.problems


def test_migrate_store_to_postgres_and_s3(tmp_path, postgres, s3_env):
    src = make_files(tmp_path / "src", 30)
    with tessera.init(project="m", name="maker", dir=tmp_path / "folder") as run:
        art = tessera.Artifact("data", type="dataset")
        art.add_dir(src)
        run.log_artifact(art, aliases=["gold"])
        run.log({"loss": 0.5})
    catalog, blobs = postgres.new_database(), s3_env.new_prefix()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tessera.cli import main; main()",
            "migrate-store",
            str(tmp_path / "folder"),
            str(tmp_path / "scaled"),
            "--catalog",
            catalog,
            "--blobs",
            blobs,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "every digest verified" in result.stdout
    scaled = Store.open(tmp_path / "scaled")
    assert scaled.catalog.url == catalog
    assert verify(scaled).ok
    with tessera.open_store(tmp_path / "scaled") as store:
        version = store.artifact("m/data:gold")
        folder = version.download(tmp_path / "dl")
        for original in src.rglob("*.bin"):
            assert (folder / original.relative_to(src)).read_bytes() == original.read_bytes()
        (run,) = store.runs("m")
        assert store.history(run.id)["loss"] == [(0, 0.5)]


def test_the_store_marker_never_records_a_catalog_password(tmp_path, postgres, monkeypatch):
    """A catalog URL given with a password works, but the folder's tessera.json keeps the URL
    without it: later opens get the password from $TESSERA_CATALOG, $PGPASSWORD or ~/.pgpass
    (this server trusts local connections, so the reopen below needs none)."""
    url = postgres.new_database().replace("postgres@", "postgres:not-on-disk@")
    monkeypatch.setenv("TESSERA_CATALOG", url)
    store = tmp_path / "pg-store"
    with tessera.init(project="p", dir=store) as run:
        run.log({"x": 1.0})
    marker = (store / "tessera.json").read_text()
    assert "not-on-disk" not in marker
    assert url.replace(":not-on-disk", "") in marker
    monkeypatch.delenv("TESSERA_CATALOG")
    with tessera.open_store(store) as browser:
        assert [r.name for r in browser.runs("p")] == [run.name]


def _bucket_keys(blobs_url: str) -> list[str]:
    import obstore

    from tessera.store.s3 import make_s3_store, parse_s3_url

    bucket, prefix = parse_s3_url(blobs_url)
    return sorted(m["path"] for batch in obstore.list(make_s3_store(bucket, prefix)) for m in batch)


def test_a_new_bucket_keeps_blobs_flat_and_says_so(tmp_path, s3_env):
    """One object per blob at blobs/<digest> (FORMAT.md §2.8), and the marker that says so."""
    from tessera.store.s3 import BUCKET_MARKER, S3BlobStore

    url = s3_env.new_prefix()
    store = S3BlobStore(url, tmp_path / "cache")
    store.create()
    digest = store.put_bytes(b"hello\n")
    assert _bucket_keys(url) == [f"blobs/{digest}", BUCKET_MARKER]
    assert store.read(digest) == b"hello\n"
    assert [(b.digest, b.size) for b in store.list()] == [(digest, 6)]
    reopened = S3BlobStore(url, tmp_path / "cache2")
    assert reopened.layout == "flat" and reopened.has(digest)


def test_a_bucket_written_before_the_marker_keeps_its_sharded_keys(tmp_path, s3_env):
    """Blobs already at blobs/ab/cd/<digest> and no marker: read and written where they are."""
    import obstore

    from tessera.store.hashing import hash_bytes
    from tessera.store.s3 import BUCKET_MARKER, S3BlobStore, make_s3_store, parse_s3_url

    url = s3_env.new_prefix()
    old = hash_bytes(b"old blob")
    bucket, prefix = parse_s3_url(url)
    bucket_store = make_s3_store(bucket, prefix)
    obstore.put(bucket_store, f"blobs/{old[:2]}/{old[2:4]}/{old}", b"old blob")
    obstore.put(bucket_store, "blobs/.DS_Store", b"listed first, and no blob")
    store = S3BlobStore(url, tmp_path / "cache")
    store.create()
    assert store.layout == "sharded"
    assert store.read(old) == b"old blob"
    new = store.put_bytes(b"new blob")
    assert f"blobs/{new[:2]}/{new[2:4]}/{new}" in _bucket_keys(url)
    assert {b.digest for b in store.list()} == {old, new, "blobs/.DS_Store"}
    assert BUCKET_MARKER in _bucket_keys(url)


def test_a_bucket_with_blobs_in_both_layouts_and_no_marker_is_refused(tmp_path, s3_env):
    import obstore

    from tessera.errors import StoreFormatError
    from tessera.store.hashing import hash_bytes
    from tessera.store.s3 import S3BlobStore, make_s3_store, parse_s3_url

    url = s3_env.new_prefix()
    a, b = hash_bytes(b"a"), hash_bytes(b"b")
    bucket_store = make_s3_store(*parse_s3_url(url))
    obstore.put(bucket_store, f"blobs/{a[:2]}/{a[2:4]}/{a}", b"a")
    obstore.put(bucket_store, f"blobs/{b}", b"b")
    with pytest.raises(StoreFormatError, match="holds blobs in both layouts"):
        S3BlobStore(url, tmp_path / "cache").create()


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        (b'{"layout": "by-moon-phase"}', "written by a newer Tessera; upgrade Tessera"),
        (b"not json", "is not a Tessera bucket marker"),
    ],
)
def test_a_foreign_bucket_marker_is_refused_when_opening(tmp_path, s3_env, marker, message):
    import obstore

    from tessera.errors import StoreFormatError
    from tessera.store.s3 import BUCKET_MARKER, make_s3_store, parse_s3_url

    url = s3_env.new_prefix()
    bucket, prefix = parse_s3_url(url)
    obstore.put(make_s3_store(bucket, prefix), BUCKET_MARKER, marker)
    with pytest.raises(StoreFormatError, match=message):
        Store.open(tmp_path / "store", create=True, blobs=url)


def test_large_uploads_to_a_bucket_are_bounded_however_many_threads(tmp_path, s3_env):
    """32 writer threads, but at most LARGE_UPLOADS large blobs spooled and sent at once."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tessera.store.s3 import LARGE_UPLOADS, S3BlobStore

    store = S3BlobStore(s3_env.new_prefix(), tmp_path / "cache")
    store.create()
    active, peak, lock = [0], [0], threading.Lock()

    def chunks(seed: int):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            for i in range(3):
                time.sleep(0.01)
                yield bytes([seed, i]) * 1024
        finally:
            with lock:
                active[0] -= 1

    with store.batch() as batch, ThreadPoolExecutor(32) as pool:
        digests = list(pool.map(lambda seed: batch.put_stream(chunks(seed))[0], range(16)))
    assert peak[0] == LARGE_UPLOADS
    assert all(
        store.read(d) == bytes([k, 0]) * 1024 + bytes([k, 1]) * 1024 + bytes([k, 2]) * 1024
        for k, d in enumerate(digests)
    )


def test_read_only_credentials_open_a_bucket_without_writing_its_marker(
    tmp_path, s3_env, monkeypatch
):
    """A reader (SeaweedFS identity with Read and List only) of a bucket that no writer has
    opened since the marker existed reads its sharded keys; nothing is written."""
    import obstore

    from tessera.errors import AuthError
    from tessera.store.hashing import hash_bytes
    from tessera.store.s3 import BUCKET_MARKER, S3BlobStore, make_s3_store, parse_s3_url

    url, empty = s3_env.new_prefix(), s3_env.new_prefix()
    old = hash_bytes(b"old blob")
    obstore.put(make_s3_store(*parse_s3_url(url)), f"blobs/{old[:2]}/{old[2:4]}/{old}", b"old blob")
    for key, value in s3_env.reader_env().items():
        monkeypatch.setenv(key, value)
    store = S3BlobStore(url, tmp_path / "cache")
    store.create()
    assert store.layout == "sharded" and store.read(old) == b"old blob"
    fresh = S3BlobStore(empty, tmp_path / "cache2")
    fresh.create()
    assert fresh.layout == "flat"
    with pytest.raises(AuthError, match="the S3 credentials may not write to s3://"):
        store.put_bytes(b"new blob")
    assert BUCKET_MARKER not in _bucket_keys(url) and _bucket_keys(empty) == []
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(AuthError, match="the S3 credentials may not read s3://"):
        S3BlobStore(url, tmp_path / "cache3").create()
