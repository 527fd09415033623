"""Shared fixtures. Every test gets its own store folder; nothing is mocked."""

from __future__ import annotations

import os
from pathlib import Path

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
    """Every blob file on disk (what the store really holds)."""
    return [p for p in (store / "blobs").rglob("*") if p.is_file()]


def store_state(store: Path) -> dict[str, object]:
    """What a failed operation must leave unchanged: catalog rows (but run heartbeats and
    summaries, which move on their own) and the set of blob files."""
    import sqlite3

    db = sqlite3.connect(store / "catalog.db")
    try:
        state: dict[str, object] = {
            table: sorted(map(repr, db.execute(f"SELECT * FROM {table}").fetchall()))
            for table in ("projects", "artifacts", "versions", "aliases", "lineage", "metrics")
        }
        state["runs"] = sorted(db.execute("SELECT id, name, status, config FROM runs").fetchall())
    finally:
        db.close()
    state["blobs"] = sorted(p.name for p in blob_files(store))
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


@pytest.fixture(autouse=True)
def _backend(
    backend_kind: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
):
    """Point the test's own tessera calls at the kind of store under test, through the
    environment: TESSERA_SERVER/TOKEN for a fresh threaded server (``dir`` becomes the local
    cache), TESSERA_CATALOG for a fresh PostgreSQL database, TESSERA_BLOBS for a fresh prefix
    of the S3 bucket."""
    if "postgres" in backend_kind:
        pg = request.getfixturevalue("postgres")
        monkeypatch.setenv("TESSERA_CATALOG", pg.new_database())
    if "s3" in backend_kind:
        s3 = request.getfixturevalue("s3_env")
        monkeypatch.setenv("TESSERA_BLOBS", s3.new_prefix())
    if backend_kind != "http":
        yield None
        return
    server = ThreadedServer(tmp_path / "server-store")
    monkeypatch.setenv("TESSERA_SERVER", server.url)
    monkeypatch.setenv("TESSERA_TOKEN", server.admin_token)
    yield server
    server.stop()
