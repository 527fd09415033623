"""Who may do what on a real server: every endpoint x every kind of caller, tokens, login.

The permission matrix is built from ``app.routes`` (everything under ``/api/``): an endpoint
added without a matrix entry fails ``test_every_route_has_a_matrix_entry`` (and every column of
the matrix).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import tessera
from conftest import ServerProcess, ThreadedServer, make_images
from tessera.store.hashing import hash_bytes

P = "secretproj"  # the private project under test; its name must never leak to outsiders
Q = "otherproj"  # the outsider's own project

# Callers: no token, a revoked token (of a user who *was* a writer of P), the three roles of P,
# a member (admin) of another project only, and the server admin.
CALLERS = ["anonymous", "revoked", "reader", "writer", "padmin", "outsider", "admin"]
RANK = {"reader": 1, "writer": 2, "padmin": 3}


# -- the world every matrix cell runs against ------------------------------------------------------


@dataclass
class World:
    server: ThreadedServer
    tokens: dict[str, str | None]
    run_id: str
    dataset_id: int
    table_id: int
    dataset_digest: str
    image_digest: str
    pixels: str
    q_run_id: str
    counter: list[int] = field(default_factory=lambda: [0])

    def headers(self, caller: str) -> dict[str, str]:
        token = self.tokens[caller]
        return {"Authorization": f"Bearer {token}"} if token else {}

    def fresh_victim_token(self) -> str:
        """The id of a new live token of a user nobody but the server admin may touch."""
        auth = self.server.app.state.auth
        victim = auth.ensure_user("victim")
        from tessera.server.auth import hash_token, new_token

        return auth.create_token(victim, "victim", hash_token(new_token())).id

    def fresh_blob(self) -> tuple[str, bytes]:
        self.counter[0] += 1
        data = secrets.token_bytes(64) + str(self.counter[0]).encode()
        return hash_bytes(data), data


def _api_log(server: ThreadedServer, token: str, project: str, images: Path, cache: Path):
    """Log a run with a dataset, metrics and predictions through the Python API; return the
    ids the matrix needs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESSERA_TOKEN", token)
        with tessera.init(project=project, name="r", dir=cache, server=server.url) as run:
            dsv = run.log_dataset(tessera.Dataset.from_folder(images, name="ds"))
            run.log({"loss": 0.5})
            scores = np.random.default_rng(0).random((dsv.num_samples, 3)).astype("float32")
            table = run.log_predictions(dsv, dsv.ids, pred=scores.argmax(1), scores=scores)
            return {
                "run_id": run.id,
                "dataset_id": dsv._record.id,
                "table_id": table._record.id,
                "dataset_digest": dsv.digest,
                "image_digest": dsv.image_digest(dsv.ids[0]),
                "pixels": dsv.table(["pixels"]).column("pixels")[0].as_py(),
            }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("authworld")
    server = ThreadedServer(root / "server-store")
    tokens: dict[str, str | None] = {
        "anonymous": None,
        "admin": server.admin_token,
        "reader": server.token_for("rita", P, "reader"),
        "writer": server.token_for("walt", P, "writer"),
        "padmin": server.token_for("paula", P, "admin"),
        "outsider": server.token_for("oscar", Q, "admin"),
        "revoked": server.token_for("rex", P, "writer"),
    }
    images = make_images(root / "imgs", 6)
    ids = _api_log(server, tokens["writer"], P, images, root / "cache-w")
    other_images = make_images(root / "other-imgs", 3, seed=1)
    q_ids = _api_log(server, tokens["outsider"], Q, other_images, root / "cache-o")
    # rex revokes his own token: from now on it must be refused everywhere.
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {tokens['revoked']}"}
    ) as c:
        assert c.get("/api/v1/me").status_code == 200
        (mine,) = c.get("/api/v1/tokens").json()
        assert c.delete(f"/api/v1/tokens/{mine['id']}").status_code == 200
        assert c.get("/api/v1/me").status_code == 401
    yield World(server, tokens, q_run_id=q_ids["run_id"], **ids)
    server.stop()


# -- the matrix ----------------------------------------------------------------------------------


@dataclass
class Entry:
    """One endpoint: who may call it, and one request to make.

    ``need``: ``public`` (anyone, no token needed), ``user`` (any valid token; lists are
    filtered), ``reader`` / ``writer`` / ``padmin`` (that role in project P, or server admin),
    ``server-admin`` (only the server admin; others see 404, as if it did not exist).
    ``marker``: for filtered lists, a string that must appear exactly when the caller may read P.
    """

    need: str
    request: Callable[[World], tuple[str, dict[str, Any]]]
    marker: Callable[[World], str] | None = None


def _pack(w: World) -> bytes:
    digest, data = w.fresh_blob()
    return struct.pack(">64sQ", digest.encode(), len(data)) + data


def _import_body(w: World) -> dict[str, Any]:
    record = w.server.app.state.backend.run(w.run_id)
    from tessera import wire

    return {"record": wire.dump(record)}


def _put_blob(w: World) -> tuple[str, dict[str, Any]]:
    digest, data = w.fresh_blob()
    return f"/api/v1/blobs/{digest}?project={P}", {"content": data}


MATRIX: dict[tuple[str, str], Entry] = {
    # service and documentation
    ("GET", "/api/v1/openapi.json"): Entry("public", lambda w: ("/api/v1/openapi.json", {})),
    ("GET", "/api/v1/docs"): Entry("public", lambda w: ("/api/v1/docs", {})),
    ("GET", "/api/v1/health"): Entry("public", lambda w: ("/api/v1/health", {})),
    ("GET", "/api/v1/stats"): Entry("user", lambda w: ("/api/v1/stats", {})),
    ("GET", "/api/v1/me"): Entry("user", lambda w: ("/api/v1/me", {})),
    # tokens and members
    ("POST", "/api/v1/tokens"): Entry("user", lambda w: ("/api/v1/tokens", {"json": {}})),
    ("GET", "/api/v1/tokens"): Entry("user", lambda w: ("/api/v1/tokens", {})),
    ("DELETE", "/api/v1/tokens/{token_id}"): Entry(
        "server-admin", lambda w: (f"/api/v1/tokens/{w.fresh_victim_token()}", {})
    ),
    ("PUT", "/api/v1/projects/{project}/members/{user_name}"): Entry(
        "padmin", lambda w: (f"/api/v1/projects/{P}/members/newbie", {"json": {"role": "reader"}})
    ),
    ("GET", "/api/v1/projects/{project}/members"): Entry(
        "reader", lambda w: (f"/api/v1/projects/{P}/members", {})
    ),
    # blobs
    ("POST", "/api/v1/blobs/missing"): Entry(
        "writer",
        lambda w: ("/api/v1/blobs/missing", {"json": {"project": P, "digests": [w.image_digest]}}),
    ),
    ("PUT", "/api/v1/blobs/{digest}"): Entry("writer", _put_blob),
    ("POST", "/api/v1/blobs/pack"): Entry(
        "writer", lambda w: (f"/api/v1/blobs/pack?project={P}", {"content": _pack(w)})
    ),
    ("GET", "/api/v1/blobs/{digest}"): Entry(
        "reader", lambda w: (f"/api/v1/blobs/{w.image_digest}", {})
    ),
    ("POST", "/api/v1/blobs/fetch"): Entry(
        "reader", lambda w: ("/api/v1/blobs/fetch", {"json": {"digests": [w.image_digest]}})
    ),
    # runs
    ("POST", "/api/v1/projects/{project}/runs"): Entry(
        "writer", lambda w: (f"/api/v1/projects/{P}/runs", {"json": {}})
    ),
    ("PUT", "/api/v1/projects/{project}/runs/{run_id}"): Entry(
        "writer",
        lambda w: (f"/api/v1/projects/{P}/runs/{secrets.token_hex(8)}", {"json": _import_body(w)}),
    ),
    ("GET", "/api/v1/projects/{project}/runs"): Entry(
        "reader", lambda w: (f"/api/v1/projects/{P}/runs", {})
    ),
    ("GET", "/api/v1/runs"): Entry("user", lambda w: ("/api/v1/runs", {}), lambda w: P),
    ("GET", "/api/v1/runs/{run_id}"): Entry("reader", lambda w: (f"/api/v1/runs/{w.run_id}", {})),
    ("PATCH", "/api/v1/runs/{run_id}"): Entry(
        "writer", lambda w: (f"/api/v1/runs/{w.run_id}", {"json": {"heartbeat": True}})
    ),
    ("POST", "/api/v1/runs/{run_id}/metrics"): Entry(
        "writer",
        lambda w: (
            f"/api/v1/runs/{w.run_id}/metrics",
            {"json": {"step": 1000, "values": {"acc": 0.5}, "summary": {"acc": 0.5}}},
        ),
    ),
    ("GET", "/api/v1/runs/{run_id}/metrics"): Entry(
        "reader", lambda w: (f"/api/v1/runs/{w.run_id}/metrics", {})
    ),
    ("POST", "/api/v1/runs/{run_id}/uses"): Entry(
        "writer",
        lambda w: (f"/api/v1/runs/{w.run_id}/uses", {"json": {"version_id": w.dataset_id}}),
    ),
    ("GET", "/api/v1/runs/{run_id}/versions"): Entry(
        "reader", lambda w: (f"/api/v1/runs/{w.run_id}/versions", {})
    ),
    ("GET", "/api/v1/runs/{run_id}/tables"): Entry(
        "reader", lambda w: (f"/api/v1/runs/{w.run_id}/tables", {})
    ),
    # artifacts, versions, tables, samples
    ("GET", "/api/v1/projects"): Entry("user", lambda w: ("/api/v1/projects", {}), lambda w: P),
    ("GET", "/api/v1/artifacts"): Entry("user", lambda w: ("/api/v1/artifacts", {}), lambda w: P),
    ("GET", "/api/v1/projects/{project}/artifacts/{artifact}/versions"): Entry(
        "reader", lambda w: (f"/api/v1/projects/{P}/artifacts/ds/versions", {})
    ),
    ("GET", "/api/v1/versions"): Entry("user", lambda w: ("/api/v1/versions", {}), lambda w: P),
    ("GET", "/api/v1/resolve"): Entry("reader", lambda w: (f"/api/v1/resolve?spec={P}/ds:v0", {})),
    ("POST", "/api/v1/projects/{project}/versions"): Entry(
        "writer",
        lambda w: (
            f"/api/v1/projects/{P}/versions",
            {"json": {"name": "ds", "type": "dataset", "digest": w.dataset_digest}},
        ),
    ),
    ("GET", "/api/v1/versions/{version_id}"): Entry(
        "reader", lambda w: (f"/api/v1/versions/{w.dataset_id}", {})
    ),
    ("GET", "/api/v1/versions/{version_id}/lineage"): Entry(
        "reader", lambda w: (f"/api/v1/versions/{w.dataset_id}/lineage", {})
    ),
    ("GET", "/api/v1/versions/{version_id}/table"): Entry(
        "reader", lambda w: (f"/api/v1/versions/{w.table_id}/table", {})
    ),
    ("GET", "/api/v1/tables"): Entry("user", lambda w: ("/api/v1/tables", {}), lambda w: P),
    ("POST", "/api/v1/samples/find"): Entry(
        "user",
        lambda w: (
            "/api/v1/samples/find",
            {"json": {"digests": [w.image_digest], "pixels": [w.pixels]}},
        ),
        lambda w: w.image_digest,
    ),
}


def expected_status(caller: str, need: str) -> int:
    if need == "public":
        return 200
    if caller in ("anonymous", "revoked"):
        return 401
    if caller == "admin" or need == "user":
        return 200
    if need == "server-admin":
        return 404  # someone else's token: "no live token of yours"
    if caller == "outsider":
        return 404  # a private project looks absent to non-members
    return 200 if RANK[caller] >= RANK[need] else 403


def can_read_p(caller: str) -> bool:
    return caller in ("reader", "writer", "padmin", "admin")


def api_routes(app: Any) -> set[tuple[str, str]]:
    """Every (method, path) the app serves under /api/ (the web UI's pages, mounted on the same
    app, sign in by cookie and are not part of this matrix)."""
    return {
        (method, route.path)
        for route in app.routes
        for method in (getattr(route, "methods", None) or ())
        if method != "HEAD" and route.path.startswith("/api/")
    }


def test_every_route_has_a_matrix_entry(world: World) -> None:
    routes = api_routes(world.server.app)
    assert routes - set(MATRIX) == set(), "endpoints without a permission-matrix entry"
    assert set(MATRIX) - routes == set(), "matrix entries for endpoints that no longer exist"


def _check_column(world: World, caller: str) -> list[str]:
    """Every endpoint called as ``caller``; returns the cells that disagree with the matrix."""
    wrong = []
    with httpx.Client(base_url=world.server.url, headers=world.headers(caller), timeout=60) as c:
        for (method, route), entry in sorted(MATRIX.items()):
            if (method, route) not in api_routes(world.server.app):
                wrong.append(f"{method} {route}: in the matrix but not served")
                continue
            url, kwargs = entry.request(world)
            response = c.request(method, url, **kwargs)
            want = expected_status(caller, entry.need)
            if response.status_code != want:
                wrong.append(
                    f"{method} {route}: {response.status_code} (want {want}) {response.text[:120]}"
                )
                continue
            if entry.marker is not None and want == 200:
                shown = entry.marker(world) in response.text
                if shown != can_read_p(caller):
                    wrong.append(
                        f"{method} {route}: P's data {'shown' if shown else 'hidden'} to {caller}"
                    )
    return wrong


@pytest.mark.parametrize(
    "caller",
    [
        *CALLERS,
    ],
)
def test_permission_matrix(world: World, caller: str) -> None:
    assert set(MATRIX) == api_routes(world.server.app)
    wrong = _check_column(world, caller)
    assert not wrong, f"{caller}:\n" + "\n".join(wrong)


def test_anonymous_callers_are_refused_everywhere(world: World) -> None:
    """Whatever the exact status, a caller without a token reads and writes nothing private."""
    leaks = []
    with httpx.Client(base_url=world.server.url, timeout=60) as c:
        for (method, route), entry in sorted(MATRIX.items()):
            if entry.need == "public":
                continue
            url, kwargs = entry.request(world)
            response = c.request(method, url, **kwargs)
            if response.status_code < 400 and (P in response.text or method != "GET"):
                leaks.append(f"{method} {route}: {response.status_code} {response.text[:100]}")
    assert not leaks


def test_token_lists_show_only_your_own_tokens(world: World) -> None:
    for caller in ("reader", "outsider"):
        with httpx.Client(base_url=world.server.url, headers=world.headers(caller)) as c:
            users = {t["user"] for t in c.get("/api/v1/tokens").json()}
            me = c.get("/api/v1/me").json()["user"]
            assert users == {me}
    with httpx.Client(base_url=world.server.url, headers=world.headers("admin")) as c:
        users = {t["user"] for t in c.get("/api/v1/tokens").json()}
    assert {"admin", "rita", "walt", "oscar"} <= users
    with httpx.Client(base_url=world.server.url, headers=world.headers("padmin")) as c:
        response = c.post("/api/v1/tokens", json={"user": "rita"})
        assert response.status_code == 403  # a project admin is not a server admin
        response = c.post("/api/v1/tokens", json={"admin": True})
        assert response.status_code == 403


def test_project_admins_manage_members(world: World) -> None:
    w = world
    admin = httpx.Client(base_url=w.server.url, headers=w.headers("padmin"))
    writer = httpx.Client(base_url=w.server.url, headers=w.headers("writer"))
    newcomer = w.server.token_for("nina")
    nina = httpx.Client(base_url=w.server.url, headers={"Authorization": f"Bearer {newcomer}"})
    with admin, writer, nina:
        assert nina.get(f"/api/v1/projects/{P}/runs").status_code == 404
        # a writer may not grant roles, not even reader
        response = writer.put(f"/api/v1/projects/{P}/members/nina", json={"role": "reader"})
        assert response.status_code == 403
        assert admin.put(f"/api/v1/projects/{P}/members/nina", json={"role": "reader"}).is_success
        assert nina.get(f"/api/v1/projects/{P}/runs").status_code == 200
        assert nina.post(f"/api/v1/projects/{P}/runs", json={}).status_code == 403
        assert admin.put(f"/api/v1/projects/{P}/members/nina", json={"role": "writer"}).is_success
        assert nina.post(f"/api/v1/projects/{P}/runs", json={}).status_code == 200
        members = dict(
            (m["user"], m["role"]) for m in admin.get(f"/api/v1/projects/{P}/members").json()
        )
        assert members["nina"] == "writer" and members["paula"] == "admin"
        # removal takes effect at once
        assert admin.put(f"/api/v1/projects/{P}/members/nina", json={"role": None}).is_success
        assert nina.get(f"/api/v1/projects/{P}/runs").status_code == 404
        response = admin.put(f"/api/v1/projects/{P}/members/nina", json={"role": "owner"})
        assert response.status_code == 400


def test_a_digest_is_not_a_capability(world: World) -> None:
    """A member of another project who knows the digest of one of P's images cannot GET it."""
    w = world
    digest = w.image_digest
    with httpx.Client(base_url=w.server.url, headers=w.headers("outsider")) as c:
        response = c.get(f"/api/v1/blobs/{digest}")
        assert response.status_code == 404
        assert response.json()["error"] == "NotFoundError"
        # not with a Range or a conditional request either
        assert c.get(f"/api/v1/blobs/{digest}", headers={"Range": "bytes=0-9"}).status_code == 404
        response = c.get(f"/api/v1/blobs/{digest}", headers={"If-None-Match": f'"{digest}"'})
        assert response.status_code == 404
        # nor among many in one fetch: nothing at all is sent then
        response = c.post("/api/v1/blobs/fetch", json={"digests": [digest]})
        assert response.status_code == 404
        assert response.json()["error"] == "NotFoundError"
    # while the reader of P gets the bytes, which hash to the digest, alone or in frames
    with httpx.Client(base_url=w.server.url, headers=w.headers("reader")) as c:
        assert hash_bytes(c.get(f"/api/v1/blobs/{digest}").content) == digest
        body = c.post("/api/v1/blobs/fetch", json={"digests": [digest, digest]}).content
        for _ in range(2):
            raw, size = struct.unpack_from(">64sQ", body)
            assert raw.decode() == digest
            assert hash_bytes(body[72 : 72 + size]) == digest
            body = body[72 + size :]
        assert body == b""


def test_a_digest_cannot_be_laundered_through_a_manifest(world: World) -> None:
    """The outsider commits, in their own project, a manifest naming P's image without ever
    sending its bytes; the server must not then serve them P's image."""
    from tessera.store.manifest import FileEntry, Manifest

    w = world
    digest = w.image_digest
    size = len(w.server.app.state.backend.store.blobs.read(digest))
    manifest = Manifest.build([FileEntry("stolen.jpg", digest, size)]).to_bytes()
    with httpx.Client(base_url=w.server.url, headers=w.headers("outsider")) as c:
        put = c.put(f"/api/v1/blobs/{hash_bytes(manifest)}?project={Q}", content=manifest)
        assert put.status_code == 200
        c.post(
            f"/api/v1/projects/{Q}/versions",
            json={"name": "loot", "type": "model", "digest": hash_bytes(manifest)},
        )
        assert c.get(f"/api/v1/blobs/{digest}").status_code == 404
        assert c.post("/api/v1/blobs/fetch", json={"digests": [digest]}).status_code == 404


# POST endpoints that only read (a list of digests is too long for a URL).
READING_POSTS = {("POST", "/api/v1/blobs/fetch")}


def test_public_read_server(tmp_path: Path) -> None:
    """--public-read: anonymous callers read every project, but write nothing."""
    server = ThreadedServer(tmp_path / "public-store", public_read=True)
    try:
        images = make_images(tmp_path / "imgs", 4)
        writer = server.token_for("walt", P, "writer")
        ids = _api_log(server, writer, P, images, tmp_path / "cache")
        w = World(server, {"anonymous": None}, q_run_id=ids["run_id"], **ids)
        before = server.app.state.backend.runs(P)
        wrong, refused = [], []
        with httpx.Client(base_url=server.url, timeout=60) as anon:
            for (method, route), entry in sorted(MATRIX.items()):
                url, kwargs = entry.request(w)
                response = anon.request(method, url, **kwargs)
                # reads: public pages, P's resources, and the filtered lists
                reads = method == "GET" or (method, route) in READING_POSTS
                if (reads and entry.need in ("public", "reader")) or entry.marker:
                    if response.status_code != 200:
                        wrong.append(f"{method} {route}: {response.status_code}, want 200")
                    elif entry.marker is not None and entry.marker(w) not in response.text:
                        wrong.append(f"{method} {route}: P's data hidden from anonymous")
                else:  # writes, and what only a signed-in user has (me, tokens, stats)
                    refused.append((method, route, response.status_code))
        assert not wrong, "\n".join(wrong)
        # Every write, and everything that needs a user (me, tokens, stats), is refused with 401.
        assert {m for m, _route, _s in refused} == {"GET", "POST", "PUT", "PATCH", "DELETE"}
        assert [r for r in refused if r[2] != 401] == []
        assert server.app.state.backend.runs(P) == before
        with httpx.Client(base_url=server.url) as anon:
            image = anon.get(f"/api/v1/blobs/{w.image_digest}")
            assert image.status_code == 200 and hash_bytes(image.content) == w.image_digest
    finally:
        server.stop()


def test_admin_token_for_an_existing_user_makes_them_admin(world: World) -> None:
    w = world
    w.server.token_for("ursula")
    with httpx.Client(base_url=w.server.url, headers=w.headers("admin")) as c:
        created = c.post("/api/v1/tokens", json={"user": "ursula", "admin": True})
        assert created.status_code == 200
    me = httpx.get(
        f"{w.server.url}/api/v1/me", headers={"Authorization": f"Bearer {created.json()['token']}"}
    ).json()
    assert me["admin"] is True


# -- the command line: a real `tessera server`, and `tessera token` / `tessera login` ----------------


def tessera_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    return subprocess.run(
        [sys.executable, "-c", "from tessera.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env={**clean, "COLUMNS": "200", **(env or {})},
        timeout=180,
    )


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory):
    """A `tessera server` started twice on the same store; the logs of both starts."""
    server = ServerProcess(tmp_path_factory.mktemp("cliserver") / "store")
    server.start()
    first_log = server.log.read_text()
    server.stop()
    server.start()
    server.first_log = first_log  # type: ignore[attr-defined]
    server.second_log = server.log.read_text()[len(first_log) :]  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.mark.slow
def test_first_start_prints_an_admin_token_once(cli_server: ServerProcess) -> None:
    printed = [line.strip() for line in cli_server.first_log.splitlines() if "tsr_" in line]  # type: ignore[attr-defined]
    assert len(printed) == 1 and printed[0] == cli_server.admin_token
    assert "tsr_" not in cli_server.second_log  # type: ignore[attr-defined]
    assert "serving" in cli_server.second_log  # type: ignore[attr-defined]
    with cli_server.client(cli_server.admin_token) as c:  # it survived the restart
        assert c.get("/api/v1/me").json() == {"user": "admin", "admin": True, "roles": {}}


def _catalog_bytes(store: Path) -> bytes:
    return b"".join(p.read_bytes() for p in store.glob("catalog.db*"))


@pytest.mark.slow
def test_tokens_through_the_cli(cli_server: ServerProcess) -> None:
    url = cli_server.url
    as_admin = {"TESSERA_SERVER": url, "TESSERA_TOKEN": cli_server.admin_token or ""}
    created = tessera_cli("token", "create", "--name", "ci", "--user", "carol", env=as_admin)
    assert created.returncode == 0, created.stderr
    lines = created.stdout.split()
    token = next(x for x in lines if x.startswith("tsr_"))
    token_id = next(x for x in lines if x.startswith("tok_"))
    as_carol = {"TESSERA_SERVER": url, "TESSERA_TOKEN": token}
    with cli_server.client(token) as c:
        assert c.get("/api/v1/me").json()["user"] == "carol"

    # hashed at rest: the tokens table holds SHA-256 digests, and no byte of the catalog files
    # (database and write-ahead log) holds a token's plaintext.
    db = sqlite3.connect(f"file:{cli_server.store / 'catalog.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT * FROM tokens").fetchall()
        hashes = {r[0] for r in db.execute("SELECT hash FROM tokens")}
    finally:
        db.close()
    assert hashlib.sha256(token.encode()).hexdigest() in hashes
    for secret in (token, cli_server.admin_token):
        assert secret and not any(secret in str(cell) for row in rows for cell in row)
        assert secret.encode() not in _catalog_bytes(cli_server.store)

    # shown once: listing shows ids, never a token again
    listed = tessera_cli("token", "list", env=as_carol)
    assert listed.returncode == 0, listed.stderr
    assert token_id in listed.stdout and "carol" in listed.stdout
    assert "tsr_" not in listed.stdout and "admin" not in listed.stdout

    # revoked: stops working at once
    revoked = tessera_cli("token", "revoke", token_id, env=as_carol)
    assert revoked.returncode == 0, revoked.stderr
    with cli_server.client(token) as c:
        response = c.get("/api/v1/me")
    assert response.status_code == 401 and response.json()["error"] == "NotSignedInError"
    with cli_server.client(cli_server.admin_token) as c:
        (row,) = [t for t in c.get("/api/v1/tokens").json() if t["id"] == token_id]
    assert row["revoked_at"] is not None


@pytest.mark.slow
def test_login_saves_the_token_privately(cli_server: ServerProcess, tmp_path: Path) -> None:
    token = cli_server.token_for("lena", "lenaproj", "writer")
    good, bad = tmp_path / "xdg-good", tmp_path / "xdg-bad"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    command = [sys.executable, "-c", "from tessera.cli import main; main()", "login"]
    # both logins at once (each is a Python start-up)
    procs = [
        subprocess.Popen(
            [*command, cli_server.url + "/", "--token", t],
            env={**clean, "XDG_CONFIG_HOME": str(xdg)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for xdg, t in ((good, token), (bad, "tsr_not-a-real-token"))
    ]
    (good_out, good_err), (_bad_out, bad_err) = (p.communicate(timeout=180) for p in procs)
    assert procs[0].returncode == 0, good_err
    assert "lena" in good_out
    config = good / "tessera" / "config.json"
    assert config.stat().st_mode & 0o777 == 0o600
    assert json.loads(config.read_text()) == {"servers": {cli_server.url: {"token": token}}}
    assert procs[1].returncode == 1 and "Traceback" not in bad_err
    assert not (bad / "tessera" / "config.json").exists()
    # the saved token is the one later commands use (no TESSERA_TOKEN in the environment)
    listed = tessera_cli(
        "token", "list", "--server", cli_server.url, env={"XDG_CONFIG_HOME": str(good)}
    )
    assert listed.returncode == 0, listed.stderr
    assert "lena" in listed.stdout


def test_refusals_do_not_name_private_projects(world: World) -> None:
    with httpx.Client(base_url=world.server.url, headers=world.headers("outsider")) as c:
        for url in (
            f"/api/v1/versions/{world.dataset_id}",
            f"/api/v1/versions/{world.table_id}/lineage",
            f"/api/v1/runs/{world.run_id}",
        ):
            response = c.get(url)
            assert response.status_code == 404
            assert P not in response.text, response.text


def test_sample_lookup_finds_the_match_the_caller_may_read(tmp_path: Path) -> None:
    server = ThreadedServer(tmp_path / "store")
    try:
        images = make_images(tmp_path / "imgs", 3)
        mine = _api_log(server, server.token_for("pia", P, "writer"), P, images, tmp_path / "c1")
        _api_log(server, server.token_for("otto", Q, "writer"), Q, images, tmp_path / "c2")
        reader = server.token_for("rita", P, "reader")
        response = httpx.post(
            f"{server.url}/api/v1/samples/find",
            json={"digests": [mine["image_digest"]]},
            headers={"Authorization": f"Bearer {reader}"},
        )
        assert response.status_code == 200
        match = response.json()["digests"].get(mine["image_digest"])
        assert match is not None and match["version_id"] == mine["dataset_id"]
    finally:
        server.stop()
