"""The seed workflow against a real server: no image byte travels after the dataset."""

import numpy as np

import tessera
from conftest import make_images


def test_seed_workflow_over_http(tmp_path, remote):
    images = make_images(tmp_path / "imgs", 30)
    with tessera.init(project="p", dir=tmp_path / "cache-a") as run:
        dsv = run.log_dataset(tessera.Dataset.from_folder(images, name="testset"))
    after_dataset = remote.stats()
    assert after_dataset["blobs_stored"] == 30 + 2  # images, sample table, manifest
    for round_ in range(5):
        with tessera.init(project="p", name=f"eval{round_}", dir=tmp_path / "cache-b") as run:
            dsv = run.use_dataset("testset")
            scores = np.random.default_rng(round_).random((30, 3)).astype("float32")
            table = tessera.Table(columns=["image", "pred"])
            for path in sorted(images.rglob("*.jpg"))[:10]:
                table.add_data(tessera.Image(path), 1)
            run.log_predictions(dsv, dsv.ids, pred=scores.argmax(1), scores=scores)
            run.log({"eval": table})
    stats = remote.stats()
    sent = stats["blob_bytes_received"] - after_dataset["blob_bytes_received"]
    # 5 rounds x (predictions parquet + its manifest + a table parquet + its manifest):
    # a few KB each, and not one of the images (each ~1 KB+ of JPEG).
    assert stats["blobs_received"] - after_dataset["blobs_received"] <= 5 * 4
    assert sent < 5 * 4 * 4096
    comparison = tessera.compare("testset", dir=tmp_path / "cache-c")
    assert len(comparison.runs) == 5
