"""`embedder.extract(images, model)`: features of images in memory, one call, row i for image i.

The Python API's counterpart of `embedder embed`: the model is built as the CLI builds it
(`load_backbone`, with its defaults, which are this function's), and images are read by the same
reader (`embedder.extract.images`), so a file gives the row `embed` caches for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, overload

import numpy as np

from embedder.data.decode import DEFAULT_MAX_PIXELS
from embedder.errors import ConfigError
from embedder.extract.images import ImageError, ImageInput, as_image_list, features_of
from embedder.models.backbone import FrozenBackbone
from embedder.models.space import FeatureSpace, check_settings, takes_settings

ERRORS = ("raise", "return")
# The settings extract takes: FeatureSpace's, with its defaults (its signature and docs generated from the
# fields: takes_settings), less `extra_layers`: extract returns one array, of one output.
MODEL_SETTINGS = tuple(n for n in FeatureSpace.field_names() if n not in ("model", "extra_layers"))
_LOAD_DEFAULTS = FeatureSpace.defaults()


@overload
def extract(images: Sequence[ImageInput], model: str | FrozenBackbone, *, errors: Literal["raise"] = ...,
            **settings: object) -> np.ndarray: ...


@overload
def extract(images: Sequence[ImageInput], model: str | FrozenBackbone, *, errors: Literal["return"],
            **settings: object) -> tuple[np.ndarray, list[ImageError]]: ...


@takes_settings(MODEL_SETTINGS)
def extract(
    images: Sequence[ImageInput],
    model: str | FrozenBackbone,
    *,
    batch_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    errors: Literal["raise", "return"] = "raise",
    **settings: object,
) -> np.ndarray | tuple[np.ndarray, list[ImageError]]:
    """Features of images: a float32 array whose row i is ``images[i]``.

    Parameters
    ----------
    images : sequence of path, bytes, PIL.Image.Image, numpy.ndarray or torch.Tensor
        The images, kinds mixed freely: file paths, a file's encoded bytes, PIL images, uint8
        ``[H, W, C]`` arrays (C = 1, 3 or 4; alpha is composited over white) or uint8 ``[C, H, W]``
        tensors (torchvision's ``read_image`` layout). A uint8 ``[N, H, W, C]`` array or
        ``[N, C, H, W]`` tensor is N images. Files are decoded as ``embedder embed`` decodes them
        (EXIF orientation applied, decompression bombs refused).
    model : str or FrozenBackbone
        A model name (``embedder models`` lists them; ``torchvision:NAME`` and ``timm:NAME`` too),
        or a backbone already built by `load_backbone`, to reuse across calls (the settings below
        then belong to it and must be left at their defaults). The settings are `FeatureSpace`'s, as
        the ``embedder embed`` flags of the same names, with the same defaults (pretrained weights, the
        pooled last stage, fp32 on the CPU); ``precision`` ``int8`` and ``fast`` need calibration
        images: use `embed`.
    SETTINGS
    batch_size : int, optional
        Images per forward pass (default: ``--batch-size auto``'s, 4 on the CPU, 32 on a GPU). The
        same files in the same order and batch size give ``embed``'s rows bit for bit.
    max_pixels : int
        Larger images are refused as decompression bombs.
    errors : {"raise", "return"}
        What an image that cannot be used (missing file, corrupt data) does. ``"raise"`` (the
        default, as ``PIL.Image.open`` and ``torchvision.io.read_image`` do): a `SourceError` naming
        it, at the first one. ``"return"``: its row is NaN, and ``(features, errors)`` is returned.

    Returns
    -------
    features : numpy.ndarray
        float32 ``[len(images), D]``; row i is image i (NaN where it failed, with ``errors="return"``).
    errors : list of ImageError
        Only with ``errors="return"``: ``(index, image, reason)`` of each failed image, in input order.

    Raises
    ------
    SourceError
        An image cannot be used and ``errors="raise"``.
    ConfigError
        A keyword that is not a setting, a setting or an input of the wrong kind (a float array, a lone
        image not in a list).

    Examples
    --------
    >>> X = embedder.extract(["a.jpg", Image.open("b.png"), pixels], model="efficientnet_lite0")
    >>> X, errors = embedder.extract(paths, model="resnet50", layer="layer3", errors="return")
    """
    if errors not in ERRORS:
        raise ConfigError(f"errors must be 'raise' or 'return', got {errors!r}.")
    check_settings(settings, MODEL_SETTINGS)
    images = as_image_list(images)  # a wrong kind of input is refused before the model is built
    if isinstance(model, FrozenBackbone):
        given = [name for name, value in settings.items() if value != _LOAD_DEFAULTS[name]]
        if given:
            raise ConfigError(f"{', '.join(given)} cannot change a backbone already built; pass them to "
                              "load_backbone, or give extract the model's name.")
        backbone = model
    else:
        backbone = FeatureSpace(model, **settings).load()
    features, failed = features_of(backbone, images, batch_size, max_pixels, on_error=errors)
    return (features, failed) if errors == "return" else features
