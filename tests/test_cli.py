"""The command line, run as a user runs it: a real process, exit codes, no tracebacks."""

import os
import subprocess
import sys

import pytest

import tessera
from conftest import make_files


def tessera_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-c", "from tessera.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        timeout=120,
    )


@pytest.fixture
def filled_store(tmp_path, store_dir):
    src = make_files(tmp_path / "src", 3)
    with tessera.init(project="proj", name="maker", dir=store_dir) as run:
        art = tessera.Artifact("data", type="dataset", description="three files")
        art.add_dir(src)
        run.log_artifact(art, aliases=["golden"])
        run.log({"loss": 0.5})
    return store_dir


def test_help_for_every_command():
    result = tessera_cli("--help")
    assert result.returncode == 0
    for command in ("ls", "show", "verify", "gc"):
        assert command in result.stdout
        sub = tessera_cli(command, "--help")
        assert sub.returncode == 0 and "--dir" in sub.stdout


def test_ls_and_show(filled_store):
    result = tessera_cli("ls", "--dir", str(filled_store))
    assert result.returncode == 0 and "proj" in result.stdout
    result = tessera_cli("ls", "proj", "--dir", str(filled_store))
    assert result.returncode == 0
    assert "maker" in result.stdout and "finished" in result.stdout and "loss=0.5" in result.stdout
    assert "data" in result.stdout and "dataset" in result.stdout
    result = tessera_cli("show", "proj/data:golden", env={"TESSERA_DIR": str(filled_store)})
    assert result.returncode == 0, result.stderr
    assert "proj/data:v0" in result.stdout and "d0/f00000.bin" in result.stdout
    assert "logged by: maker" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "proj/data:v9"], "has no version 'v9'; versions: v0"),
        (["show", "data:v0"], "needs a project"),
        (["show", "proj/../x"], "invalid"),
        (["ls", "nope"], "no project 'nope'"),
        (["gc", "--grace", "soon"], "not a duration"),
    ],
)
def test_errors_are_one_line_without_traceback(filled_store, args, message):
    result = tessera_cli(*args, "--dir", str(filled_store))
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_store(tmp_path):
    result = tessera_cli("ls", "--dir", str(tmp_path / "none"))
    assert result.returncode == 1
    assert "no Tessera store" in result.stderr and "Traceback" not in result.stderr


def test_verify_and_gc(filled_store):
    result = tessera_cli("verify", "--dir", str(filled_store))
    assert result.returncode == 0 and "ok" in result.stdout
    with tessera.open_store(filled_store) as store:
        version = store.artifact("proj/data:v0")
        content_blob = version.files()[0].digest
        manifest_blob = version.digest
    blob_path = filled_store / "blobs" / content_blob[:2] / content_blob[2:4] / content_blob
    blob_path.unlink()
    result = tessera_cli("verify", "--dir", str(filled_store))
    assert result.returncode == 1
    assert f"blob {content_blob} is missing" in result.stdout
    result = tessera_cli("gc", "--dry-run", "--grace", "0", "--dir", str(filled_store))
    assert result.returncode == 0 and "would delete 0 blobs" in result.stdout
    manifest_path = filled_store / "blobs" / manifest_blob[:2] / manifest_blob[2:4] / manifest_blob
    manifest_path.unlink()
    result = tessera_cli("gc", "--grace", "0", "--dir", str(filled_store))
    assert result.returncode == 1 and "Nothing was deleted" in result.stderr
