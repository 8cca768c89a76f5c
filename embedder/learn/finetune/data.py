"""The images of a finetuning run: datasets over a listing, augmentation, the loaders.

Images are decoded with `embedder.data.decode.load_rgb` and cropped on uint8 tensors in the
loader workers (4x less data to move than float32); conversion to float and the
normalisation happen on the device, in `FinetuneNetwork`, as in `FrozenBackbone`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2

from embedder.data.decode import DEFAULT_MAX_PIXELS
from embedder.data.sources import Listing
from embedder.data.splits import Splits
from embedder.data.transforms import geometric_transform, read_for_model
from embedder.errors import BadImageError
from embedder.models.registry import Preprocessing


def train_transform(pre: Preprocessing) -> v2.Compose:
    """uint8 [3, H, W] -> uint8 [3, crop, crop]: random area/aspect crop and a horizontal flip."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(pre.crop_size, interpolation=InterpolationMode(pre.interpolation), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    )


class ImageRows(Dataset):
    """Item i: listing row `rows[i]` decoded and transformed, or the reason it could not be.

    A bad file is one failed item, never an exception: `collate_rows` drops it and the
    training loop records it, so one corrupt JPEG cannot end a long run.
    """

    def __init__(
        self,
        listing: Listing,
        rows: np.ndarray,
        transform: v2.Compose,
        resize_size: int | None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        """`resize_size`: the shorter side `transform` resizes to (None when it only crops)."""
        self.root, self.paths, self.labels = listing.root, listing.paths, listing.labels
        self.members = listing.members  # tar sources: each row's bytes are read by offset
        self.rows = np.asarray(rows, dtype=np.int64)
        self.transform = transform
        self.resize_size = resize_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        try:
            path = self.paths[row]
            source = self.root / path if self.members is None else self.members[path].read()
            image = read_for_model(source, self.transform, self.resize_size, self.max_pixels)
        except BadImageError as exc:
            return {"row": row, "error": exc.reason}
        return {"row": row, "image": image, "label": int(self.labels[row])}


def collate_rows(items: list[dict]) -> dict:
    """Stack the items that decoded; pass the failures on as (row, reason)."""
    ok = [it for it in items if "image" in it]
    return {
        "images": torch.stack([it["image"] for it in ok]) if ok else torch.empty((0, 3, 1, 1), dtype=torch.uint8),
        "labels": torch.tensor([it["label"] for it in ok], dtype=torch.int64),
        "rows": [it["row"] for it in ok],
        "errors": [(it["row"], it["error"]) for it in items if "error" in it],
    }


def _seed_worker(worker_id: int) -> None:
    # DataLoader already seeds each worker's torch RNG (which the v2 transforms use) from the
    # loader's generator; seed numpy and `random` from it too, so any transform is reproducible.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)



@dataclass
class SplitSets:
    """The datasets of one run: augmented training images, eval-transformed val and test images."""

    train: ImageRows
    val: ImageRows
    test: ImageRows

    @classmethod
    def of(cls, listing: Listing, splits: Splits, pre: Preprocessing, max_pixels: int) -> SplitSets:
        eval_tf = geometric_transform(pre)  # the weights' own eval transform
        return cls(
            train=ImageRows(listing, splits.train, train_transform(pre), None, max_pixels),
            val=ImageRows(listing, splits.val, eval_tf, pre.resize_size, max_pixels),
            test=ImageRows(listing, splits.test, eval_tf, pre.resize_size, max_pixels),
        )


def make_loader(
    dataset: ImageRows, batch_size: int, seed: int, workers: int, *, shuffle: bool, keep: bool, pin_memory: bool
) -> DataLoader:
    """Batches of `collate_rows`. `keep`: the workers stay up between epochs (no process start-up each time)."""
    # The shuffling generator is seeded, and DataLoader derives each worker's torch seed
    # (which drives the random crops and flips) from it: same seed, same batches, same pixels.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
        collate_fn=collate_rows,
        pin_memory=pin_memory,
        worker_init_fn=_seed_worker if workers else None,
        persistent_workers=keep and workers > 0,
    )
