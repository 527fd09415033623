"""PyTorch: a multi-worker DataLoader over a dataset version yields ids beside the pixels, so
predictions computed on transformed batch tensors are logged against the right samples."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from torch.utils.data import DataLoader

import tessera
from conftest import MAIN_KINDS, stored_blobs
from tessera.integrations.torch import TorchDataset
from test_datasets import (
    CLASSES,
    N_SEED,
    SEED_PROJECT,
    SEED_SPEC,
    added_kinds,
    copy_store,
    seed_store,
    shared_seed,
)

both = pytest.mark.both_backends(kinds=MAIN_KINDS)

CENTRES = torch.tensor([0.3, 0.5, 0.7])


@pytest.fixture(scope="session")
def seed(tmp_path_factory):
    return seed_store(tmp_path_factory)


class ToFloatTensor:
    """Like torchvision's ToTensor: PIL image -> float32 CHW in [0, 1]."""

    def __call__(self, image: PILImage.Image) -> torch.Tensor:
        array = np.asarray(image, dtype=np.float32) / 255
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def model(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A deterministic "model": mean brightness, softly bucketed into the three classes."""
    brightness = images.mean(dim=(1, 2, 3))
    scores = (-50 * (brightness[:, None] - CENTRES) ** 2).softmax(1)
    return scores.argmax(1), scores, brightness


# Not over HTTP: the seed logged afresh and fetched blob by blob takes ~25 s there.
@pytest.mark.both_backends(kinds=["local", "postgres+s3"])
def test_dataloader_evaluation_logs_predictions_on_the_right_samples(tmp_path, seed):
    store = copy_store(seed, tmp_path / "store")
    images = seed.images
    with tessera.init(project=SEED_PROJECT, name="torch-eval", dir=store) as run:
        dsv = run.use_dataset("seed:v0")
        data = TorchDataset(dsv, transform=ToFloatTensor())
        assert len(data) == N_SEED and data.classes == CLASSES
        loader = DataLoader(
            data,
            batch_size=64,
            shuffle=True,
            num_workers=2,
            generator=torch.Generator().manual_seed(0),
        )
        seen: list[str] = []
        first_batch = None
        before = stored_blobs(store)
        with run.predictions(dsv, name="torch") as p:
            for batch in loader:
                assert isinstance(batch["id"], list) and batch["image"].shape[1:] == (3, 32, 32)
                assert batch["image"].dtype == torch.float32
                assert batch["label"].tolist() == [
                    CLASSES.index(images.labels[sid]) for sid in batch["id"]
                ]
                pred, scores, brightness = model(batch["image"])
                p.add(ids=batch["id"], pred=pred, scores=scores, brightness=brightness)
                seen.extend(batch["id"])
                if first_batch is None:
                    first_batch = batch
        tv = run.tables()[-1]
        assert added_kinds(store, before) == ["manifest", "parquet"]
        assert sorted(seen) == images.ids and seen != images.ids  # every sample, shuffled

        stored = tv.to_arrow().to_pydict()
        assert stored["id"] == seen
        recomputed = {}
        for sid in stored["id"]:
            original = PILImage.fromarray(dsv.array(sid))  # the stored original, by id
            recomputed[sid] = model(ToFloatTensor()(original)[None])
        # brightness tells the images apart, so rows logged under the wrong ids would show:
        # pairing every row with its neighbour's sample fails almost everywhere
        shifted = stored["id"][1:] + stored["id"][:1]
        wrong = [
            stored["brightness"][i] != pytest.approx(float(recomputed[sid][2][0]), abs=1e-6)
            for i, sid in enumerate(shifted)
        ]
        assert sum(wrong) > 0.95 * N_SEED
        for i, sid in enumerate(stored["id"]):
            pred, scores, brightness = recomputed[sid]
            assert stored["pred"][i] == int(pred[0]), sid
            np.testing.assert_allclose(stored["scores"][i], scores[0].numpy(), atol=1e-6)
            assert stored["brightness"][i] == pytest.approx(float(brightness[0]), abs=1e-6)
        assert len(set(stored["pred"])) >= 2  # the buckets are not all one class

        # The loader's float tensors, wrapped as images, are still the dataset's images.
        assert first_batch is not None
        table = tessera.Table(columns=["image", "pred"])
        for image, pred in zip(first_batch["image"], model(first_batch["image"])[0], strict=True):
            table.add_data(tessera.Image(image), CLASSES[int(pred)])
        before = stored_blobs(store)
        with warnings.catch_warnings():
            warnings.simplefilter("error", tessera.UnmatchedImagesWarning)
            view = run.log_table("batch-view", table)
        assert added_kinds(store, before) == ["manifest", "parquet"]
        assert view.to_arrow().column("id").to_pylist() == first_batch["id"]
        assert {ref.dataset for ref in view.to_pandas()["image"]} == {SEED_SPEC}


@both
def test_items_without_a_transform_are_uint8_chw(seed, backend_kind, shared_stores, monkeypatch):
    images = seed.images
    with tessera.open_store(shared_seed(seed, backend_kind, shared_stores, monkeypatch)) as browser:
        dsv = browser.artifact(SEED_SPEC)
        data = TorchDataset(dsv)
        for index in (0, 17, N_SEED - 1):
            item = data[index]
            sid = images.ids[index]
            assert item["id"] == sid
            assert item["label"] == CLASSES.index(images.labels[sid])
            assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 32, 32)
            np.testing.assert_array_equal(
                item["image"].numpy(), images.arrays[sid].transpose(2, 0, 1)
            )


@both
def test_a_grey_image_without_a_label(tmp_path):
    grey = tessera.Dataset("grey")
    grey.add("g", np.arange(12, dtype=np.uint8).reshape(3, 4))
    with tessera.init(project="p", dir=tmp_path / "store") as run:
        item = TorchDataset(run.log_dataset(grey))[0]
        assert item["label"] == -1  # no label
        np.testing.assert_array_equal(item["image"].numpy(), np.arange(12).reshape(1, 3, 4))
        with pytest.raises(TypeError, match="TorchDataset takes a DatasetVersion"):
            TorchDataset("grey:v0")
