"""Features of images given in memory, row i for image i: paths, encoded bytes, PIL images, uint8 arrays.

The same reader as `embed`: `embedder.data.decode`'s rules (EXIF orientation, alpha over white,
16-bit rescaled, decompression bombs refused), then the backbone's own resize and centre crop
(`embedder.data.transforms`), in fixed batches of the inputs in their given order. For the same
files in the same order and batch size, the rows are `embed`'s, bit for bit (tests/test_public_api.py).

An image that cannot be used is a row of NaN and an `ImageError`, so rows stay aligned with the
inputs; `on_error="raise"` raises a `SourceError` at the first one instead. An input that is no
image at all (a float array, a number) is the caller's mistake: a `ConfigError` before any work.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from embedder.data.decode import DEFAULT_MAX_PIXELS, load_rgb_bytes, load_rgb_image
from embedder.data.transforms import apply_guarded, geometric_transform, read_for_model
from embedder.errors import BadImageError, ConfigError, SourceError
from embedder.models.backbone import FrozenBackbone
from embedder.models.batchsize import batch_size_for
from embedder.names import display_path

# What one image may be: a file path, a file's encoded bytes, a PIL image, a uint8 [H, W, C] array
# (C = 1, 3 or 4; or [H, W] gray) or a uint8 [C, H, W] tensor (torchvision's `read_image` layout).
ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor


class ImageError(NamedTuple):
    """One image that could not be used: where it was in the input, what it was, and why.

    Attributes
    ----------
    index : int
        Its position in the images given; that row of the features is NaN.
    image : str
        Its path, or what was given (``"PIL image 640x480 RGBA"``, ``"array (32, 32, 3) uint8"``).
    reason : str
        The reader's reason, as ``embed`` records it in a cache's errors table.
    """

    index: int  # its position in the images given: its row of the features is NaN
    image: str  # its path, or what was given ("PIL image 640x480 RGBA", "array (32, 32, 3) uint8")
    reason: str  # the reader's reason, as `embed` records it in a cache's errors table


def as_image_list(images: Sequence[ImageInput] | np.ndarray | torch.Tensor) -> list[ImageInput]:
    """The images of a sequence, a uint8 [N, H, W, C] array or a [N, C, H, W] tensor, each checked.

    Parameters
    ----------
    images : sequence of ImageInput, numpy.ndarray or torch.Tensor
        What `embedder.extract` was given.

    Returns
    -------
    list of ImageInput

    Raises
    ------
    ConfigError
        Anything that is not a list of images (a lone image: pass ``[image]``), or an input of
        the wrong kind (a float array, a number).
    """
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        images = list(images)
    elif isinstance(images, (str, os.PathLike, bytes, Image.Image, np.ndarray, torch.Tensor)):
        raise ConfigError(f"images should be a list of images (a lone image: [image]), got {describe(images)}.")
    images = list(images)
    for i, image in enumerate(images):
        _check_input(i, image)
    return images


def _check_input(i: int, image) -> None:
    if isinstance(image, (str, os.PathLike, bytes, Image.Image)):
        return
    if isinstance(image, (np.ndarray, torch.Tensor)):
        if image.dtype not in (np.uint8, torch.uint8):
            raise ConfigError(f"images[{i}] is {describe(image)}: arrays and tensors should hold uint8 pixels "
                              "(0-255); convert with (x * 255).round().astype(np.uint8) if yours are in [0, 1].")
        channels = image.shape[-1] if isinstance(image, np.ndarray) else image.shape[0]
        if image.ndim == 2 and isinstance(image, np.ndarray) or image.ndim == 3 and channels in (1, 3, 4):
            return
        raise ConfigError(f"images[{i}] is {describe(image)}: arrays should be [H, W, C] and tensors [C, H, W], "
                          "with C = 1, 3 or 4.")
    raise ConfigError(f"images[{i}] is {describe(image)}: give a path, encoded bytes, a PIL image or a uint8 array.")


def describe(image: object) -> str:
    """What an input was, for an error message.

    Parameters
    ----------
    image : object
        One input.

    Returns
    -------
    str
        Its path, or its kind and size (``"PIL image 640x480 RGBA"``).
    """
    if isinstance(image, (str, os.PathLike)):
        return display_path(os.fspath(image))
    if isinstance(image, bytes):
        return f"{len(image)} bytes"
    if isinstance(image, Image.Image):
        return f"PIL image {image.width}x{image.height} {image.mode}"
    if isinstance(image, (np.ndarray, torch.Tensor)):
        kind = "array" if isinstance(image, np.ndarray) else "tensor"
        return f"{kind} {tuple(image.shape)} {str(image.dtype).removeprefix('torch.')}"
    return f"a {type(image).__name__}"


def pixels_of(image: ImageInput, transform: Callable[[torch.Tensor], torch.Tensor], resize_size: int,
              max_pixels: int) -> torch.Tensor:
    """One input as the network's crop, read as `embed` reads a file.

    Parameters
    ----------
    image : ImageInput
        One checked input (`as_image_list`).
    transform : callable
        The backbone's resize and centre crop (`embedder.data.transforms.geometric_transform`).
    resize_size : int
        The shorter side after resizing (refuses extreme aspect ratios before the transform).
    max_pixels : int
        Larger images are refused as decompression bombs.

    Returns
    -------
    torch.Tensor
        uint8 ``[3, crop, crop]``.

    Raises
    ------
    BadImageError
        The image cannot be used; ``.reason`` says why.
    """
    if isinstance(image, (str, os.PathLike)):
        return read_for_model(image, transform, resize_size, max_pixels)
    if isinstance(image, bytes):
        pixels = load_rgb_bytes(image, max_pixels, contiguous=False,
                                raise_limit="raise it with max_pixels= if the image is genuine")
    elif isinstance(image, torch.Tensor):
        image = image.cpu()
        pixels = image.expand(3, -1, -1) if image.shape[0] == 1 else image
        if image.shape[0] == 4:  # alpha: composited over white, as a file's
            pixels = load_rgb_image(Image.fromarray(image.permute(1, 2, 0).numpy()), max_pixels, contiguous=False)
    elif isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3:
        # The decoders' own [H, W, 3] memory: resized to the same bits as the file of these pixels.
        array = np.ascontiguousarray(image)
        pixels = torch.from_numpy(array if array.flags.writeable else array.copy()).permute(2, 0, 1)
    elif isinstance(image, np.ndarray):
        pixels = load_rgb_image(Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[2] == 1
                                                else image), max_pixels, contiguous=False)
    else:
        pixels = load_rgb_image(image, max_pixels, contiguous=False)
    if min(pixels.shape[-2:]) < 1:
        raise BadImageError(f"empty image: {tuple(pixels.shape)}")
    return apply_guarded(transform, pixels, resize_size, max_pixels)


def features_of(backbone: FrozenBackbone, images: Sequence[ImageInput], batch_size: int | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, on_error: str = "return") -> tuple[np.ndarray, list[ImageError]]:
    """Features of images with a built backbone: the loop under `embedder.extract` and `embed_images`.

    Parameters
    ----------
    backbone : FrozenBackbone
        Any backbone (or classifier network) that takes uint8 crops.
    images : sequence of ImageInput
        As `embedder.extract` takes them.
    batch_size : int, optional
        Images per forward pass; None: ``--batch-size auto``'s for the backbone's device.
    max_pixels : int
        Larger images are refused as decompression bombs.
    on_error : {"return", "raise"}
        ``"raise"``: a SourceError naming the first image that fails, before any later batch runs.

    Returns
    -------
    features : numpy.ndarray
        float32 ``[len(images), D]``: row i is images[i], a row of NaN where it failed.
    errors : list of ImageError
        The failed images, in input order (empty with ``on_error="raise"``).
    """
    images = as_image_list(images)
    batch_size = batch_size or batch_size_for(str(backbone.device))
    pre = backbone.preprocessing
    transform = geometric_transform(pre)
    out = np.full((len(images), backbone.feature_dim), np.nan, dtype=np.float32)
    errors: list[ImageError] = []
    for start in range(0, len(images), batch_size):
        rows, crops = [], []
        for i in range(start, min(start + batch_size, len(images))):
            try:
                crops.append(pixels_of(images[i], transform, pre.resize_size, max_pixels))
            except BadImageError as exc:
                if on_error == "raise":
                    raise SourceError(f"{describe(images[i])} (image {i}) cannot be used: {exc.reason}. "
                                      'Pass errors="return" to get a row of NaN for it instead.') from None
                errors.append(ImageError(i, describe(images[i]), exc.reason))
                continue
            rows.append(i)
        if rows:  # the failed images leave the batch, as in `embed`: the same batches, the same bits
            out[rows] = backbone(torch.stack(crops)).float().cpu().numpy()
    return out, errors
