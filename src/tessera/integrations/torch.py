"""PyTorch: a ``Dataset`` over a dataset version whose items carry their sample ids.

Works with a multi-worker ``DataLoader`` and its default collate, so every batch has
``batch["id"]`` beside ``batch["image"]`` and ``batch["label"]``::

    loader = DataLoader(TorchDataset(dsv, transform=preprocess), batch_size=64, num_workers=2)
    with run.predictions(dsv) as p:
        for batch in loader:
            scores = model(batch["image"]).softmax(1)
            p.add(ids=batch["id"], pred=scores.argmax(1), scores=scores)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tessera.api.dataset import BlobReader, DatasetVersion


class TorchDataset(Dataset):
    """Items are ``{"id": str, "image": tensor, "label": int}``.

    Without ``transform`` the image is the stored original as a uint8 tensor, CHW (as
    ``torchvision.io.read_image`` gives it); with one, ``transform`` receives the PIL image.
    Only ids, digests and labels are held, so the object pickles cheaply into workers.
    """

    def __init__(self, dataset: DatasetVersion, transform: Callable[[Any], Any] | None = None):
        if not isinstance(dataset, DatasetVersion):
            raise TypeError(f"TorchDataset takes a DatasetVersion, got {type(dataset).__name__}")
        table = dataset.table(["id", "image", "label"])
        self.ids: list[str] = table.column("id").to_pylist()
        self._digests: list[str] = table.column("image").to_pylist()
        labels = table.column("label").to_pylist()
        self._labels = [-1 if label is None else int(label) for label in labels]
        dataset._backend.fetch(self._digests)  # a remote store: have every image locally first
        self._reader: BlobReader = dataset.blob_reader()
        self.transform = transform
        self.classes = dataset.classes

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        digest = self._digests[index]
        if self.transform is not None:
            image = self.transform(self._reader.open_image(digest))
        else:
            array = self._reader.decode(digest)
            if array.ndim == 2:
                array = array[:, :, None]
            # np.asarray(PIL image) is read-only; (1, H, W) views of grey images are already
            # contiguous, so ascontiguousarray would not copy: ask for a writable array.
            image = torch.from_numpy(np.require(array.transpose(2, 0, 1), requirements=["C", "W"]))
        return {"id": self.ids[index], "image": image, "label": self._labels[index]}
