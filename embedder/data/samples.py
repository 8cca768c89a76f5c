"""Sample datasets made from data that installed packages ship: no download.

  digits      scikit-learn's handwritten digits: 1797 8x8 grayscale PNGs, 10 classes
              (ImageFolder: digits/<0-9>/<n>.png)
  lfw_subset  scikit-image's LFW subset: 200 25x25 grayscale crops, faces vs. non-faces,
              laid out like the classic transfer-learning tutorial
              (lfw_subset/{train,val}/{face,non_face}/<n>.png, 70/30 per class, seeded)
  photos      scikit-image's bundled photographs as JPEG (flat folder, no labels), for
              sanity checks with real pretrained weights (chelsea.jpg is a tabby cat)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from embedder.outputs import SAMPLES as SAMPLE_DATASET
from embedder.outputs import write_dir

SAMPLES = ("digits", "lfw_subset", "photos")
PROBE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # RGB photographs, for checks on natural images
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "logo")


class Samples(dict):
    """{name: folder} of the sample datasets, with what this call did: `written` (made now) and
    `existing` (already complete), each {name: images}."""

    def __init__(self):
        super().__init__()
        self.written: dict[str, int] = {}
        self.existing: dict[str, int] = {}

    def summary(self) -> str:
        return "\n".join(
            f"{path}: " + (f"wrote {self.written[name]} images" if name in self.written
                           else f"already there ({self.existing[name]} images)")
            for name, path in self.items()
        )


def make_samples(out: str | os.PathLike = "data", only: list[str] | None = None) -> Samples:
    """Write the sample datasets under `out`; existing complete ones are left alone."""
    from embedder.errors import ConfigError

    chosen = list(only) if only else list(SAMPLES)
    unknown = sorted(set(chosen) - set(SAMPLES))
    if unknown:
        raise ConfigError(f"Unknown sample(s) {unknown}; choose from {', '.join(SAMPLES)}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    makers: dict[str, Callable[[Path], int]] = {"digits": _digits, "lfw_subset": _lfw_subset, "photos": _photos}
    made = Samples()
    for name in chosen:
        target = out / name
        marker = target / ".complete"
        if marker.exists():
            made.existing[name] = int(marker.read_text().strip())
        else:
            # Built in a temporary folder that replaces the target in one step: an interrupted
            # run leaves nothing half-made, and the next one removes its leftovers.
            with write_dir(target, SAMPLE_DATASET, flag="OUT") as (tmp, _):  # never over a folder of the user's
                count = makers[name](tmp)
                (tmp / ".complete").write_text(f"{count}\n")
            made.written[name] = count
        made[name] = target
    return made


def _digits(folder: Path) -> int:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; stretch to 0..255 without changing the 8x8 images.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for n, (image, target) in enumerate(zip(images, digits.target)):
        d = folder / str(int(target))
        d.mkdir(exist_ok=True)
        Image.fromarray(image, mode="L").save(d / f"{n:04d}.png")
    return len(images)


def _lfw_subset(folder: Path) -> int:
    from skimage.data import lfw_subset

    images = np.round(lfw_subset() * 255.0).astype(np.uint8)  # first 100 faces, then 100 non-faces
    labels = np.array(["face"] * 100 + ["non_face"] * 100)
    rng = np.random.default_rng(0)
    for cls in ("face", "non_face"):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_train = round(0.7 * len(idx))
        for split, rows in (("train", idx[:n_train]), ("val", idx[n_train:])):
            d = folder / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in rows:
                Image.fromarray(images[i], mode="L").save(d / f"{i:03d}.png")
    return len(images)


def _photos(folder: Path) -> int:
    import skimage.data

    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        image = Image.fromarray(array)
        if image.mode == "RGBA":
            image.save(folder / f"{name}.png")  # keep the transparency: it exercises alpha handling
        else:
            image.save(folder / f"{name}.jpg", quality=95)
    return len(PHOTOS)


def probe_photos() -> list:
    """The RGB sample photos as uint8 [3, H, W] tensors, from scikit-image's bundled data (no files written):
    natural images for checks that noise would mislead (a runtime's round-off, embedder.models.onnx)."""
    import skimage.data
    import torch

    return [torch.from_numpy(np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])).permute(2, 0, 1)
            for name in PROBE_PHOTOS]
