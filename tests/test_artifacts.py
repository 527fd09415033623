"""Artifacts and versions: logging, aliases, lineage, references, and every bad input."""

import numpy as np
import pytest

import tessera
from conftest import make_files, store_state, stored_blobs
from tessera.errors import (
    ConflictError,
    DigestMismatchError,
    InvalidNameError,
    InvalidPathError,
    NotFoundError,
)

both = pytest.mark.both_backends


def _artifact(root, name="data", type="dataset"):
    art = tessera.Artifact(name, type=type)
    art.add_dir(root)
    return art


@both
def test_versions_aliases_and_lineage(tmp_path, store_dir):
    src = make_files(tmp_path / "src", 10)
    with tessera.init(project="p", name="maker", dir=store_dir) as run:
        v0 = run.log_artifact(_artifact(src), aliases=["prod"])
        (src / "d0" / "f00000.bin").write_bytes(b"changed")
        v1 = run.log_artifact(_artifact(src))
        assert (v0.version, v1.version) == ("v0", "v1")
        assert v0.aliases == ("latest", "prod")
        assert v1.aliases == ("latest",)
        assert v0.digest != v1.digest
        again = run.log_artifact(_artifact(src), aliases=["prod"])  # identical: same version
        assert again == v1 and again.aliases == ("latest", "prod")
    with tessera.init(project="p", name="user", dir=store_dir) as run:
        assert run.use_artifact("data").version == "v1"
        assert run.use_artifact("data:v0").version == "v0"
        assert run.use_artifact("data:prod").version == "v1"  # the alias moved
        assert run.use_artifact("p/data:latest").version == "v1"
    with tessera.open_store(store_dir) as store:
        lineage = store.lineage("p/data:v0")
        assert [r.name for r in lineage["logged"]] == ["maker"]
        assert [r.name for r in lineage["used"]] == ["user"]
        assert [v.version for v in store.versions("p", "data")] == ["v0", "v1"]
        user = next(r for r in store.runs("p") if r.name == "user")
        io = store.inputs_outputs(user.id)
        assert sorted(v.version for v in io["used"]) == ["v0", "v1"] and io["logged"] == []


@both
def test_cross_project_use(tmp_path, store_dir):
    src = make_files(tmp_path / "src", 3)
    with tessera.init(project="a", dir=store_dir) as run:
        run.log_artifact(_artifact(src))
    with tessera.init(project="b", dir=store_dir) as run:
        assert run.use_artifact("a/data:v0").file_count == 3
        with pytest.raises(NotFoundError, match="no artifact 'data' in project 'b'"):
            run.use_artifact("data:v0")


@both
def test_unknown_version_lists_what_exists(tmp_path, store_dir):
    src = make_files(tmp_path / "src", 2)
    with tessera.init(project="p", dir=store_dir) as run:
        run.log_artifact(_artifact(src), aliases=["best"])
        with pytest.raises(NotFoundError, match=r"versions: v0; aliases: best, latest"):
            run.use_artifact("data:v5")
        with pytest.raises(NotFoundError, match="no artifact 'nope'.*artifacts there: data"):
            run.use_artifact("nope:v0")


@both
def test_metadata_and_add_bytes_and_open(tmp_path, store_dir):
    with tessera.init(project="p", dir=store_dir) as run:
        art = tessera.Artifact("cfg", type="config", description="d", metadata={"k": [1, 2]})
        art.add_bytes(b"{}", "conf/a.json")
        v = run.log_artifact(art)
        assert v.metadata == {"k": [1, 2]}
        assert v.description == "d"
        with v.open("conf/a.json") as f:
            assert f.read() == b"{}"
        with pytest.raises(NotFoundError, match="no file 'missing' in p/cfg:v0; it has 1 files"):
            v.open("missing")


@both
def test_references_are_hashed_not_copied(tmp_path, store_dir):
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 100_000)
    folder = make_files(tmp_path / "refdir", 3)
    with tessera.init(project="p", dir=store_dir) as run:
        art = tessera.Artifact("refs", type="dataset")
        art.add_reference(big.as_uri())
        art.add_reference(folder.as_uri(), name="folder")
        v = run.log_artifact(art)
    entries = {e.path: e for e in v.files()}
    assert entries["big.bin"].ref == big.as_uri()
    assert len([p for p in entries if p.startswith("folder/")]) == 3
    assert 100_000 not in stored_blobs(store_dir).values()  # only the manifest was stored
    assert (v.download(tmp_path / "dl") / "big.bin").read_bytes() == b"x" * 100_000
    big.write_bytes(b"y" * 100_000)  # the referenced file changes behind our back
    with pytest.raises(DigestMismatchError, match="big.bin"):
        v.download(tmp_path / "dl2")
    assert not (tmp_path / "dl2" / "big.bin").exists()


@both
def test_bad_inputs_leave_the_store_unchanged(tmp_path, store_dir):
    src = make_files(tmp_path / "src", 3)
    with tessera.init(project="p", dir=store_dir) as run:
        run.log_artifact(_artifact(src))
        before = store_state(store_dir)
        art = tessera.Artifact("other", type="dataset")
        with pytest.raises(InvalidPathError, match=r"'\.\.'"):
            art.add_file(src / "d0" / "f00000.bin", name="../escape.bin")
        with pytest.raises(InvalidPathError, match="absolute"):
            art.add_file(src / "d0" / "f00000.bin", name="/etc/x")
        with pytest.raises(InvalidPathError, match="absolute"):
            art.add_bytes(b"", "/root/x")
        with pytest.raises(NotFoundError, match="no file at"):
            art.add_file(tmp_path / "missing.bin")
        with pytest.raises(NotFoundError, match="not a folder"):
            art.add_dir(tmp_path / "missing")
        with pytest.raises(NotFoundError, match="not a regular file"):
            art.add_file(src)
        art.add_file(src / "d0" / "f00000.bin", name="x.bin")
        with pytest.raises(InvalidPathError, match="already in artifact"):
            art.add_file(src / "d1" / "f00001.bin", name="x.bin")
        with pytest.raises(InvalidPathError, match="only file://"):
            art.add_reference("s3://bucket/key")
        with pytest.raises(InvalidNameError):
            tessera.Artifact("bad name", type="dataset")
        with pytest.raises(InvalidNameError, match="version numbers"):
            run.log_artifact(_artifact(src), aliases=["v2"])
        with pytest.raises(ConflictError, match="has type 'dataset', not 'model'"):
            run.log_artifact(_artifact(src, type="model"))
        with pytest.raises(ValueError, match="has no files"):
            run.log_artifact(tessera.Artifact("empty", type="dataset"))
        with pytest.raises(TypeError, match="tessera.Artifact"):
            run.log_artifact("data")
        # a file that vanished between add_file and log_artifact
        gone = tmp_path / "gone.bin"
        gone.write_bytes(b"soon gone")
        art = tessera.Artifact("vanishing", type="dataset")
        art.add_file(gone)
        gone.unlink()
        with pytest.raises(NotFoundError, match="no longer exists"):
            run.log_artifact(art)
        assert store_state(store_dir) == before


@both
def test_versions_stay_readable_after_their_run_and_browser_end(store_dir):
    """A version object outlives the run (or browser) it came from, on every kind of store:
    logging predictions on a dataset version from a finished run used to fail over HTTP with
    "the client has been closed"."""
    dataset = tessera.Dataset("d", classes=["x", "y"])
    dataset.add("a", np.zeros((2, 2), np.uint8), "x")
    dataset.add("b", np.ones((2, 2), np.uint8), "y")
    with tessera.init(project="p", name="maker", dir=store_dir) as run:
        logged = run.log_dataset(dataset)
    with tessera.open_store(store_dir) as store:
        browsed = store.artifact("p/d:v0")
    for version in (logged, browsed):
        assert version.ids == ["a", "b"] and version.label("b") == 1
        assert [r.name for r in version.lineage()["logged"]] == ["maker"]
        with tessera.init(project="p", dir=store_dir) as run:
            table = run.log_predictions(version, ["b", "a"], pred=[1, 0])
        assert table.to_pandas()["pred"].tolist() == [1, 0]
