"""The geometric half of preprocessing, applied where images are read.

Resize and centre-crop run on uint8 tensors in the reader workers (4x less data to
move than float32); conversion to float and normalisation happen inside the backbone,
on its device. Every parameter comes from the backbone's `Preprocessing`, which the
registry reads from the weights' own transforms.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode, v2

from embedder.data.decode import load_rgb, load_rgb_bytes
from embedder.errors import BadImageError, ConfigError


@dataclass(frozen=True)
class Preprocessing:
    """Eval-time geometry and normalisation: resize the shorter side, centre-crop, normalise."""

    resize_size: int  # shorter side after resize, in pixels
    crop_size: int  # side of the square centre crop fed to the network
    interpolation: str  # "bilinear" or "bicubic" (torchvision InterpolationMode value)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    antialias: bool = True

    def with_image_size(self, size: int) -> Preprocessing:
        """Scale the crop to `size`, keeping the weights' resize/crop ratio (e.g. 256/224): torchvision's
        weights transforms take both sizes and define no rule between them. timm models take timm's own
        sizes instead (BackboneSpec.preprocessing_for, embedder.models.catalog.timm_preprocessing)."""
        if size < 8:
            raise ConfigError(f"--image-size must be at least 8 pixels, got {size}.")
        resize = round(size * self.resize_size / self.crop_size)
        return dataclasses.replace(self, resize_size=resize, crop_size=size)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def preprocessing_from_transforms(transforms) -> Preprocessing:
    """Read the geometry and normalisation out of a torchvision `ImageClassification` transform."""
    return Preprocessing(
        resize_size=int(transforms.resize_size[0]),
        crop_size=int(transforms.crop_size[0]),
        interpolation=transforms.interpolation.value,
        mean=tuple(float(v) for v in transforms.mean),
        std=tuple(float(v) for v in transforms.std),
        antialias=bool(transforms.antialias),
    )


def geometric_transform(pre: Preprocessing) -> v2.Compose:
    """uint8 [3, H, W] -> uint8 [3, crop, crop]: shorter side to `resize_size`, then centre crop."""
    return v2.Compose(
        [
            v2.Resize(pre.resize_size, interpolation=InterpolationMode(pre.interpolation), antialias=pre.antialias),
            v2.CenterCrop(pre.crop_size),
        ]
    )


def read_for_model(path: str | os.PathLike | bytes, transform, resize_size: int | None, max_pixels: int,
                   seconds: dict[str, float] | None = None, *, jpeg_draft: bool = False,
                   info: dict | None = None) -> torch.Tensor:
    """Decode one file and run `transform` on it (the reader stage of extraction and training).

    Raises BadImageError with the reason. `seconds`, if given, accumulates the time spent in
    "decode" and in "resize" (the transform). `jpeg_draft`: decode JPEGs reduced by libjpeg's
    DCT scaling, their shorter side still >= `resize_size` (not the exact pixels: an opt-in).
    `info`: receives the file's size and mtime and the image's own width and height (`load_rgb`).
    `path` may be the encoded bytes themselves (a tar member; `info` then gets no size or mtime)."""
    import time

    t0 = time.perf_counter()
    try:
        # The decoder's own [H, W, 3] layout: resizing it gives the same bits 2-6x faster.
        draft = resize_size if jpeg_draft else None
        if isinstance(path, bytes):  # a tar member's bytes: the same decoder as a file's
            image = load_rgb_bytes(path, max_pixels, jpeg_min_side=draft, contiguous=False, info=info)
        else:
            image = load_rgb(path, max_pixels, jpeg_min_side=draft, contiguous=False, info=info)
    finally:
        t1 = time.perf_counter()
        if seconds is not None:
            seconds["decode"] = seconds.get("decode", 0.0) + t1 - t0
    try:
        return apply_guarded(transform, image, resize_size, max_pixels)
    finally:
        if seconds is not None:
            seconds["resize"] = seconds.get("resize", 0.0) + time.perf_counter() - t1


def apply_guarded(transform, image: torch.Tensor, resize_size: int | None, max_pixels: int) -> torch.Tensor:
    """Run a resizing transform, turning its failures into BadImageError.

    Resizing the shorter side of a 1 x 100000 banner to 256 px would allocate gigabytes,
    so such images are refused before the transform runs.
    """
    if resize_size is not None:
        h, w = image.shape[-2:]
        scale = resize_size / min(h, w)
        if h * w * scale * scale > max_pixels:
            raise BadImageError(
                f"extreme aspect ratio: {w}x{h} would be resized to {round(w * scale)}x{round(h * scale)} pixels"
            )
    try:
        return transform(image)
    except Exception as exc:  # noqa: BLE001 - one unusable image, never a dead run
        raise BadImageError(f"cannot resize: {exc.__class__.__name__}: {exc}") from None
