"""Shared fixtures. Every test gets its own store folder; nothing is mocked."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each test in its own folder, with no TESSERA_* settings leaking in."""
    for key in list(os.environ):
        if key.startswith("TESSERA_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


def make_files(root: Path, count: int, size: int = 1000, seed: int = 0) -> Path:
    """``count`` files of random bytes under ``root`` (in a few sub-folders)."""
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = root / f"d{i % 7}" / f"f{i:05d}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(rng.randbytes(size))
    return root


def blob_files(store: Path) -> list[Path]:
    """Every blob file of a store *folder* (the embedded layout only; tests about the store
    under test use ``stored_blobs``)."""
    return [p for p in (store / "blobs").rglob("*") if p.is_file()]


# The stores of the servers that the ``_backend`` fixture started, by URL: a test of the "http"
# kind inspects the server's store, not its client's cache folder.
_TESTED_SERVER_STORES: dict[str, Path] = {}


@contextmanager
def tested_store(store: Path) -> Iterator[Any]:
    """The ``Store`` a test's ``tessera`` calls with ``dir=store`` write to: the folder's own
    (with ``$TESSERA_CATALOG``/``$TESSERA_BLOBS`` as tessera resolves them), or, when
    ``$TESSERA_SERVER`` is a server the ``_backend`` fixture started, that server's store."""
    from tessera.store import Store

    server_store = _TESTED_SERVER_STORES.get(os.environ.get("TESSERA_SERVER", ""))
    opened = Store.open(server_store or store, local_only=server_store is not None)
    try:
        yield opened
    finally:
        opened.close()


def stored_blobs(store: Path) -> dict[str, int]:
    """``{digest: size}`` of every blob the store under test holds (folder, bucket or server)."""
    with tested_store(store) as opened:
        return {info.digest: info.size for info in opened.blobs.list()}


def read_blob(store: Path, digest: str) -> bytes:
    with tested_store(store) as opened:
        return opened.blobs.read(digest)


def store_state(store: Path) -> dict[str, object]:
    """What a failed operation must leave unchanged: catalog rows (but run heartbeats and
    summaries, which move on their own) and the set of blobs, of the store under test."""
    import sqlalchemy as sa

    with tested_store(store) as opened, opened.catalog.engine.connect() as db:
        state: dict[str, object] = {
            table: sorted(map(repr, db.execute(sa.text(f"SELECT * FROM {table}")).fetchall()))
            for table in ("projects", "artifacts", "versions", "aliases", "lineage", "metrics")
        }
        state["runs"] = sorted(
            map(tuple, db.execute(sa.text("SELECT id, name, status, config FROM runs")))
        )
        state["blobs"] = sorted(info.digest for info in opened.blobs.list())
    return state


# -- a real server ---------------------------------------------------------------------------------


class ServerProcess:
    """``tessera server`` in a child process on 127.0.0.1, with its first admin token."""

    def __init__(self, store: Path, *extra: str):
        import socket
        import subprocess
        import sys

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.store = store
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra = extra
        self.log = store.parent / f"server-{self.port}.log"
        self._sys = sys
        self._subprocess = subprocess
        self.process: subprocess.Popen[bytes] | None = None
        self.admin_token: str | None = None

    def start(self) -> ServerProcess:
        import time

        import httpx

        self.process = self._subprocess.Popen(
            [
                self._sys.executable,
                "-c",
                "from tessera.cli import main; main()",
                "server",
                "--dir",
                str(self.store),
                "--port",
                str(self.port),
                *self.extra,
            ],
            stdout=open(self.log, "ab"),  # noqa: SIM115 - the child owns it
            stderr=self._subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tessera server exited: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"tessera server did not start: {self.log.read_text()}")
        if self.admin_token is None:
            for line in self.log.read_text().splitlines():
                if line.strip().startswith("tsr_"):
                    self.admin_token = line.strip()
        return self

    def stop(self, kill: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            self.process.wait(30)
        self.process = None

    def client(self, token: str | None = None):
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def stats(self) -> dict[str, int]:
        with self.client(self.admin_token) as c:
            return c.get("/api/v1/stats").json()

    def token_for(self, user: str, project: str | None = None, role: str | None = None) -> str:
        """A new token for ``user`` (created if new), with ``role`` in ``project``."""
        with self.client(self.admin_token) as c:
            token = c.post("/api/v1/tokens", json={"user": user, "name": "test"}).json()["token"]
            if project is not None:
                response = c.put(f"/api/v1/projects/{project}/members/{user}", json={"role": role})
                response.raise_for_status()
        return token


@pytest.fixture
def server(tmp_path: Path):
    """A running ``tessera server`` on its own store; stopped after the test."""
    proc = ServerProcess(tmp_path / "server-store").start()
    yield proc
    proc.stop()


@pytest.fixture
def remote(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> ServerProcess:
    """Point tessera.init() at the server (as the admin) through the environment."""
    monkeypatch.setenv("TESSERA_SERVER", server.url)
    monkeypatch.setenv("TESSERA_TOKEN", server.admin_token or "")
    return server


def make_images(root: Path, count: int, size: int = 24, classes: int = 3, seed: int = 0) -> Path:
    """``count`` small JPEGs in the class-per-subfolder layout ``root/c<k>/img<i>.jpg``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:04d}.jpg", quality=90)
    return root


class ThreadedServer:
    """The real app under a real uvicorn on 127.0.0.1, in a thread of the test process: starts
    in a fraction of a second, so every test can have a fresh server and store."""

    def __init__(self, store: Path, public_read: bool = False, max_blob_bytes: int | None = None):
        import socket
        import threading

        import uvicorn

        from tessera.server.app import DEFAULT_MAX_BLOB_BYTES, Settings, create_app
        from tessera.server.auth import hash_token, new_token
        from tessera.store import Store
        from tessera.store.catalog import AuthCatalog

        created = Store.open(store, create=True)
        auth = AuthCatalog(created.catalog)
        admin = auth.ensure_user("admin", is_admin=True)
        self.admin_token = new_token()
        auth.create_token(admin, "test admin", hash_token(self.admin_token))
        created.close()
        settings = Settings(store, public_read, max_blob_bytes or DEFAULT_MAX_BLOB_BYTES)
        self.app = create_app(settings)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        import time

        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("threaded tessera server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.app.state.backend.close()

    def stats(self) -> dict[str, int]:
        return self.app.state.counters.snapshot()

    def token_for(self, user: str, project: str | None = None, role: str | None = None) -> str:
        from tessera.server.auth import hash_token, new_token
        from tessera.store.catalog import AuthCatalog

        auth: AuthCatalog = self.app.state.auth
        record = auth.ensure_user(user)
        token = new_token()
        auth.create_token(record, "test", hash_token(token))
        if project is not None:
            auth.set_member(project, record, role)
        return token


STORE_KINDS = ["local", "http", "postgres", "s3", "postgres+s3"]
# The kinds most tests run on: PostgreSQL and S3 each alone add little to them together, and
# the CI time budget is finite (every kind runs the core round trips).
MAIN_KINDS = ["local", "http", "postgres+s3"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``both_backends`` run against every kind of store: the embedded folder
    (SQLite + files), a server, and {PostgreSQL, SQLite} x {folder, S3 bucket}."""
    marker = metafunc.definition.get_closest_marker("both_backends")
    if marker:
        metafunc.parametrize("backend_kind", marker.kwargs.get("kinds", STORE_KINDS))


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory):
    from services import Postgres

    server = Postgres(tmp_path_factory.mktemp("postgres"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory):
    from services import SeaweedFS

    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(seaweedfs, monkeypatch: pytest.MonkeyPatch):
    """AWS_* variables pointing at the test bucket; returns the SeaweedFS service."""
    for key, value in seaweedfs.env().items():
        monkeypatch.setenv(key, value)
    return seaweedfs


@pytest.fixture
def backend_kind() -> str:
    return "local"


class StoreEnv:
    """Where the ``tessera`` calls of a test go for one kind of store, as the ``TESSERA_*``
    variables that say so: nothing (the folder given as ``dir``), a fresh threaded server
    (``dir`` becomes its client's cache), a fresh PostgreSQL database, a fresh prefix of the
    S3 bucket."""

    def __init__(self, kind: str, root: Path, request: pytest.FixtureRequest):
        self.kind = kind
        self.env: dict[str, str] = {}
        self.server: ThreadedServer | None = None
        if "postgres" in kind:
            self.env["TESSERA_CATALOG"] = request.getfixturevalue("postgres").new_database()
        if "s3" in kind:
            s3 = request.getfixturevalue("seaweedfs")
            self.env.update(s3.env())
            self.env["TESSERA_BLOBS"] = s3.new_prefix()
        if kind == "http":
            self.server = ThreadedServer(root / "server-store")
            self.env["TESSERA_SERVER"] = self.server.url
            self.env["TESSERA_TOKEN"] = self.server.admin_token
            _TESTED_SERVER_STORES[self.server.url] = root / "server-store"

    def activate(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for key in ("TESSERA_SERVER", "TESSERA_TOKEN", "TESSERA_CATALOG", "TESSERA_BLOBS"):
            monkeypatch.delenv(key, raising=False)
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)

    def close(self) -> None:
        if self.server is not None:
            _TESTED_SERVER_STORES.pop(self.server.url, None)
            self.server.stop()


@pytest.fixture(autouse=True)
def _backend(
    _isolate: None,  # first: it clears every TESSERA_* variable
    backend_kind: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
):
    """Point the test's own tessera calls at a fresh store of the kind under test (but a test
    that reads a store from ``shared_stores`` works in that store's environment instead)."""
    if backend_kind == "local" or "shared_stores" in request.fixturenames:
        yield None
        return
    env = StoreEnv(backend_kind, tmp_path, request)
    env.activate(monkeypatch)
    yield env.server
    env.close()


class SharedStores:
    """Stores built once per session and kind, for tests that only read them: ``get(key,
    kind, build)`` builds with ``build(folder)`` under a store environment of its own the
    first time, and activates that environment (for the calling test) every time."""

    def __init__(self, factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
        self._factory = factory
        self._request = request
        self._built: dict[tuple[str, str], tuple[StoreEnv, Path, Any]] = {}

    def get(
        self, key: str, kind: str, build: Any, monkeypatch: pytest.MonkeyPatch
    ) -> tuple[Path, Any]:
        if (key, kind) not in self._built:
            root = self._factory.mktemp(f"{key}-{kind.replace('+', '-')}")
            env = StoreEnv(kind, root, self._request)
            with pytest.MonkeyPatch.context() as mp:
                env.activate(mp)
                made = build(root / "store")
            self._built[(key, kind)] = (env, root / "store", made)
        env, folder, made = self._built[(key, kind)]
        env.activate(monkeypatch)
        return folder, made

    def close(self) -> None:
        for env, _, _ in self._built.values():
            env.close()


@pytest.fixture(scope="session")
def shared_stores(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    stores = SharedStores(tmp_path_factory, request)
    yield stores
    stores.close()
