"""The blob protocol of a real server: ask what is missing, stream or pack the bytes (hashed on
arrival, refused on a mismatch), read them back with ranges and caching, commit only complete
versions, refuse what is too large."""

from __future__ import annotations

import os
import secrets
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import tessera
from conftest import ServerProcess, ThreadedServer
from tessera.store.hashing import hash_bytes
from tessera.store.manifest import FileEntry, Manifest

P = "blobs"
API = "/api/v1"
FRAME = struct.Struct(">64sQ")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    server = ThreadedServer(tmp_path_factory.mktemp("blobs") / "server-store")
    yield server
    server.stop()


@pytest.fixture
def api(srv: ThreadedServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=srv.url, headers={"Authorization": f"Bearer {srv.admin_token}"}, timeout=120
    ) as client:
        yield client


def store_files(store: Path) -> set[str]:
    """Every file under the store's blobs/, packs/ and tmp/ folders."""
    return {
        str(p.relative_to(store))
        for folder in ("blobs", "packs", "tmp")
        for p in (store / folder).rglob("*")
        if p.is_file()
    }


def blob(size: int) -> tuple[str, bytes]:
    data = secrets.token_bytes(size)
    return hash_bytes(data), data


def chunked(data: bytes, size: int = 65536) -> Iterator[bytes]:
    """A streamed body: httpx sends it chunked, without a Content-Length."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


def pack(*frames: tuple[str, bytes]) -> bytes:
    return b"".join(FRAME.pack(d.encode(), len(b)) + b for d, b in frames)


def missing(api: httpx.Client, digests: list[str]) -> list[str]:
    response = api.post(f"{API}/blobs/missing", json={"project": P, "digests": digests})
    assert response.status_code == 200, response.text
    return response.json()["missing"]


def commit(api: httpx.Client, name: str, files: dict[str, bytes], upload: bool = True):
    """Upload (or not) the files and the manifest; commit; return (response, manifest digest,
    {path: digest})."""
    digests = {path: hash_bytes(data) for path, data in files.items()}
    manifest = Manifest.build([FileEntry(p, digests[p], len(d)) for p, d in files.items()])
    raw = manifest.to_bytes()
    if upload:
        body = pack(*((digests[p], d) for p, d in files.items()))
        assert api.post(f"{API}/blobs/pack", params={"project": P}, content=body).is_success
    assert api.put(f"{API}/blobs/{hash_bytes(raw)}", params={"project": P}, content=raw).is_success
    response = api.post(
        f"{API}/projects/{P}/versions",
        json={"name": name, "type": "model", "digest": hash_bytes(raw)},
    )
    return response, hash_bytes(raw), digests


# -- asking what is missing -------------------------------------------------------------------


def test_missing_lists_exactly_the_absent_digests(srv, api):
    (have, have_bytes), (lack1, _), (lack2, _) = blob(100), blob(100), blob(100)
    assert api.put(f"{API}/blobs/{have}", params={"project": P}, content=have_bytes).is_success
    assert missing(api, [lack2, have, lack1, lack1]) == sorted([lack1, lack2])
    assert missing(api, []) == []
    response = api.post(f"{API}/blobs/missing", json={"project": P, "digests": ["abc"]})
    assert response.status_code == 400 and "digest" in response.json()["message"]


# -- single blobs, streamed -------------------------------------------------------------------


def test_put_is_streamed_hashed_and_idempotent(srv, api):
    digest, data = blob(3 * 1024 * 1024 + 17)
    before = srv.stats()
    response = api.put(f"{API}/blobs/{digest}", params={"project": P}, content=chunked(data))
    assert response.status_code == 200, response.text
    assert response.json() == {"digest": digest, "size": len(data), "stored": True}
    on_disk = srv.app.state.backend.store.blobs.path_of(digest)
    assert on_disk.read_bytes() == data
    inode = on_disk.stat().st_ino
    after = srv.stats()
    assert after["blobs_received"] - before["blobs_received"] == 1
    assert after["blobs_stored"] - before["blobs_stored"] == 1
    assert after["blob_bytes_received"] - before["blob_bytes_received"] == len(data)

    # the same blob again (this time with a Content-Length): accepted, nothing rewritten
    response = api.put(f"{API}/blobs/{digest}", params={"project": P}, content=data)
    assert response.status_code == 200
    assert response.json() == {"digest": digest, "size": len(data), "stored": False}
    assert on_disk.stat().st_ino == inode and on_disk.read_bytes() == data
    again = srv.stats()
    assert again["blobs_stored"] == after["blobs_stored"]
    assert again["blobs_already_present"] - after["blobs_already_present"] == 1
    assert not list((srv.app.state.settings.dir / "tmp").iterdir())


@pytest.mark.parametrize("streamed", [True, False], ids=["chunked", "content-length"])
def test_put_with_a_wrong_digest_is_refused_and_discarded(srv, api, streamed):
    store = srv.app.state.settings.dir
    announced, _ = blob(2 * 1024 * 1024)
    actual, data = blob(2 * 1024 * 1024)
    before = store_files(store)
    response = api.put(
        f"{API}/blobs/{announced}",
        params={"project": P},
        content=chunked(data) if streamed else data,
    )
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "DigestMismatchError"
    assert actual in body["message"] and "nothing was stored" in body["message"]
    assert store_files(store) == before  # nothing in blobs/, no leftover in tmp/
    assert missing(api, [announced, actual]) == sorted([announced, actual])


# -- packs ------------------------------------------------------------------------------------


def test_pack_stores_many_blobs_in_one_request(srv, api):
    frames = [blob(n) for n in (0, 1, 1000, 200_000)]
    digests = [d for d, _ in frames]
    before = srv.stats()
    response = api.post(f"{API}/blobs/pack", params={"project": P}, content=pack(*frames))
    assert response.status_code == 200, response.text
    assert response.json() == {"received": 4, "stored": 4}
    after = srv.stats()
    assert after["requests"] - before["requests"] == 1  # one request for all four
    assert after["blobs_received"] - before["blobs_received"] == 4
    assert missing(api, digests) == []
    for digest, data in frames:
        assert srv.app.state.backend.store.blobs.read(digest) == data
    # idempotent
    response = api.post(f"{API}/blobs/pack", params={"project": P}, content=pack(*frames))
    assert response.json() == {"received": 4, "stored": 0}


def test_many_small_blobs_land_in_one_pack_file_and_read_back(srv, api):
    """A pack upload of many new blobs costs the server one file, not one per blob; each blob
    still reads back alone (with ranges), in a fetch, and through verify."""
    from tessera.store.maintenance import verify

    store = srv.app.state.settings.dir
    files = {f"part-{i:02d}.bin": secrets.token_bytes(1000 + 37 * i) for i in range(40)}
    before = store_files(store)
    response, manifest_digest, digests = commit(api, "packed", files)
    assert response.status_code == 200 and response.json()["created"], response.text
    added = store_files(store) - before
    packs = [f for f in added if f.startswith("packs/")]
    assert len(packs) == 1 and sorted(added - set(packs)) == [
        f"blobs/{manifest_digest[:2]}/{manifest_digest[2:4]}/{manifest_digest}"
    ]
    wanted = sorted(digests.values())
    response = api.post(f"{API}/blobs/fetch", json={"digests": wanted})
    assert response.status_code == 200, response.text
    body, offset, got = response.content, 0, {}
    while offset < len(body):
        raw, size = FRAME.unpack_from(body, offset)
        offset += FRAME.size
        got[raw.decode()] = body[offset : offset + size]
        offset += size
    assert got == {digests[p]: data for p, data in files.items()}
    one = digests["part-07.bin"]
    ranged = api.get(f"{API}/blobs/{one}", headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206 and ranged.content == files["part-07.bin"][10:20]
    again = api.post(f"{API}/blobs/pack", params={"project": P}, content=pack(*got.items()))
    assert again.json() == {"received": 40, "stored": 0}
    assert [f for f in store_files(store) - before if f.startswith("packs/")] == packs
    assert verify(srv.app.state.backend.store).ok


def _corrupt_packs() -> Iterator[tuple[str, bytes, list[str]]]:
    good1, good2, other = blob(5000), blob(7000), blob(6000)
    liar = (blob(6000)[0], other[1])  # announced under a digest its bytes do not have
    yield "bad-frame", pack(good1, liar, good2), [good1[0], good2[0], liar[0], other[0]]
    whole = pack(good1, good2)
    yield "truncated", whole[:-10], [good1[0], good2[0]]
    yield "cut-header", pack(good1) + whole[-5:][:3], [good1[0]]
    bad_name = FRAME.pack(b"z" * 64, 3) + b"abc"
    yield "not-a-digest", pack(good1) + bad_name, [good1[0]]
    many = [blob(3000) for _ in range(20)]  # enough for a pack file, written as it is parsed
    yield "liar-after-many", pack(*many, liar), [d for d, _ in many] + [liar[0]]


@pytest.mark.parametrize("case", list(_corrupt_packs()), ids=lambda c: c[0])
def test_a_corrupt_pack_stores_nothing(srv, api, case):
    _name, body, digests = case
    store = srv.app.state.settings.dir
    before = store_files(store)
    response = api.post(f"{API}/blobs/pack", params={"project": P}, content=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "DigestMismatchError"
    assert store_files(store) == before
    assert missing(api, digests) == sorted(set(digests))


def test_a_pack_over_the_request_limit_mid_stream_stores_nothing(srv, api, monkeypatch):
    """The server stores frames while the body arrives: a body that turns out too large, with
    frames already written, gets a 413 and leaves nothing behind (no pack, no temp file)."""
    import tessera.server.app

    monkeypatch.setattr(tessera.server.app, "MAX_PACK_BYTES", 40_000)
    frames = [blob(3000) for _ in range(20)]  # 60 KB: over the limit two thirds in
    store = srv.app.state.settings.dir
    before = store_files(store)
    response = api.post(
        f"{API}/blobs/pack", params={"project": P}, content=chunked(pack(*frames), 4096)
    )
    assert response.status_code == 413, response.text
    assert "pack" in response.json()["message"]
    assert store_files(store) == before
    assert missing(api, [d for d, _ in frames]) == sorted(d for d, _ in frames)


def test_a_pack_upload_cut_off_mid_body_stores_nothing(srv, api):
    frames = [blob(3000) for _ in range(40)]
    body = pack(*frames)
    store = srv.app.state.settings.dir
    before = store_files(store)

    def cut_off() -> Iterator[bytes]:
        yield body[: len(body) // 2]
        raise ConnectionError("the client went away")

    with pytest.raises(ConnectionError):
        api.post(
            f"{API}/blobs/pack",
            params={"project": P},
            content=cut_off(),
            headers={"Content-Length": str(len(body))},
        )
    deadline = time.monotonic() + 10
    while store_files(store) != before and time.monotonic() < deadline:
        time.sleep(0.05)  # the server notices the cut on its own schedule
    assert store_files(store) == before
    assert missing(api, [d for d, _ in frames]) == sorted(d for d, _ in frames)
    response = api.post(f"{API}/blobs/pack", params={"project": P}, content=body)
    assert response.json() == {"received": 40, "stored": 40}  # and it still serves


def test_a_blob_that_changed_size_since_it_was_hashed_is_not_sent(srv, api, tmp_path):
    """Pack bodies are streamed with a Content-Length planned from the blobs' sizes: a file
    that grew or shrank since (or a damaged store) stops the upload with a clear error."""
    from tessera.backend.http import HttpBackend

    store = srv.app.state.settings.dir
    before = store_files(store)
    frames = dict(blob(3000) for _ in range(20))
    sizes = {d: len(b) for d, b in frames.items()}
    changed = sorted(frames)[7]
    sizes[changed] -= 1
    remote = HttpBackend.open(srv.url, srv.admin_token, tmp_path / "cache")
    try:
        with pytest.raises(tessera.DigestMismatchError, match=f"blob {changed} has 3,000 bytes"):
            remote.send_blobs(P, frames.__getitem__, sizes)
    finally:
        remote.close()
    deadline = time.monotonic() + 10
    while store_files(store) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store_files(store) == before
    assert missing(api, sorted(frames)) == sorted(frames)


# -- reading ----------------------------------------------------------------------------------


def test_get_supports_ranges_etags_and_immutable_caching(srv, api):
    data = secrets.token_bytes(300_000)
    response, _manifest, digests = commit(api, "ranged", {"weights.bin": data})
    assert response.status_code == 200, response.text
    digest = digests["weights.bin"]
    url = f"{API}/blobs/{digest}"

    full = api.get(url)
    assert full.status_code == 200 and full.content == data
    assert full.headers["etag"] == f'"{digest}"'
    cache = full.headers["cache-control"]
    assert "immutable" in cache and "max-age=31536000" in cache
    assert full.headers["accept-ranges"] == "bytes"

    part = api.get(url, headers={"Range": "bytes=1000-1999"})
    assert part.status_code == 206
    assert part.content == data[1000:2000]
    assert part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
    tail = api.get(url, headers={"Range": "bytes=-100"})
    assert tail.status_code == 206 and tail.content == data[-100:]
    rest = api.get(url, headers={"Range": f"bytes={len(data) - 5}-"})
    assert rest.status_code == 206 and rest.content == data[-5:]
    assert api.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416

    cached = api.get(url, headers={"If-None-Match": f'"{digest}"'})
    assert cached.status_code == 304 and cached.content == b""
    assert cached.headers["etag"] == f'"{digest}"'
    stale = api.get(url, headers={"If-None-Match": '"something-else"'})
    assert stale.status_code == 200 and stale.content == data

    # a blob no version names is not served, even to the server admin
    orphan, orphan_bytes = blob(10)
    assert api.put(f"{API}/blobs/{orphan}", params={"project": P}, content=orphan_bytes).is_success
    assert api.get(f"{API}/blobs/{orphan}").status_code == 404


# -- committing -------------------------------------------------------------------------------


def test_commit_naming_missing_blobs_is_refused_with_the_list(srv, api):
    files = {"a.bin": secrets.token_bytes(500), "b.bin": secrets.token_bytes(600)}
    files["c.bin"] = secrets.token_bytes(700)
    digests = {p: hash_bytes(d) for p, d in files.items()}
    only_a = pack((digests["a.bin"], files["a.bin"]))
    assert api.post(f"{API}/blobs/pack", params={"project": P}, content=only_a).is_success

    response, manifest, _ = commit(api, "partial", files, upload=False)
    assert response.status_code == 409
    body = response.json()
    assert body["error"] == "MissingBlobsError"
    assert body["missing"] == sorted([digests["b.bin"], digests["c.bin"]])
    assert api.get(f"{API}/resolve", params={"spec": f"{P}/partial:latest"}).status_code == 404

    # a manifest that was never uploaded is itself reported missing
    ghost = Manifest.build([FileEntry("a.bin", digests["a.bin"], 500)], {"ghost": True})
    response = api.post(
        f"{API}/projects/{P}/versions",
        json={"name": "partial", "type": "model", "digest": ghost.digest()},
    )
    assert response.status_code == 409 and response.json()["missing"] == [ghost.digest()]

    # upload what was missing; the same commit now succeeds
    rest = pack(*((digests[p], files[p]) for p in ("b.bin", "c.bin")))
    assert api.post(f"{API}/blobs/pack", params={"project": P}, content=rest).is_success
    response = api.post(
        f"{API}/projects/{P}/versions",
        json={"name": "partial", "type": "model", "digest": manifest},
    )
    assert response.status_code == 200, response.text
    assert response.json()["created"] is True
    assert response.json()["version"]["number"] == 0
    assert response.json()["version"]["file_count"] == 3


# -- size limits ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory):
    """A `tessera server --max-blob-size 1K`."""
    server = ServerProcess(tmp_path_factory.mktemp("limit") / "store", "--max-blob-size", "1K")
    server.start()
    yield server
    server.stop()


@pytest.mark.slow
def test_blobs_over_the_limit_get_a_clear_413(small_server: ServerProcess, tmp_path: Path):
    s = small_server
    store = s.store
    before = store_files(store)
    with s.client(s.admin_token) as c:
        ok, ok_bytes = blob(1024)
        assert c.put(f"{API}/blobs/{ok}", params={"project": P}, content=ok_bytes).is_success
        big, big_bytes = blob(1025)
        for content in (big_bytes, chunked(big_bytes, 100)):
            response = c.put(f"{API}/blobs/{big}", params={"project": P}, content=content)
            assert response.status_code == 413
            message = response.json()["message"]
            assert "1,024 bytes" in message and "--max-blob-size" in message
    assert store_files(store) - before == {
        str(Path("blobs") / ok[:2] / ok[2:4] / ok)
    }  # the 1 KB blob only; nothing of the big one, no temp file

    # through the Python API: a large file (streamed PUT) fails with that message
    weights = tmp_path / "weights.bin"
    weights.write_bytes(os.urandom(5 * 1024 * 1024))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESSERA_TOKEN", s.admin_token or "")
        with tessera.init(project=P, dir=tmp_path / "cache", server=s.url) as run:
            art = tessera.Artifact("weights", type="model")
            art.add_file(weights)
            with pytest.raises(
                tessera.TesseraError, match=r"limit of 1,024 bytes \(--max-blob-size\)"
            ):
                run.log_artifact(art)


@pytest.mark.slow
def test_packed_blobs_over_the_limit_get_a_clear_413(small_server: ServerProcess, tmp_path):
    s = small_server
    with s.client(s.admin_token) as c:
        response = c.post(f"{API}/blobs/pack", params={"project": P}, content=pack(blob(2000)))
        assert response.status_code == 413
        assert "--max-blob-size" in response.json()["message"]
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(2000))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESSERA_TOKEN", s.admin_token or "")
        with tessera.init(project=P, dir=tmp_path / "cache", server=s.url) as run:
            art = tessera.Artifact("small", type="model")
            art.add_file(small)
            with pytest.raises(tessera.TesseraError, match=r"1,024 bytes.*--max-blob-size"):
                run.log_artifact(art)
