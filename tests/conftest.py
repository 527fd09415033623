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
