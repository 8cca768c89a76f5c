"""Read one image file into an RGB uint8 tensor, or raise BadImageError with a reason.

Correctness rules, each of which some popular tool gets wrong:
  * EXIF orientation is applied (phone photos are stored sideways);
  * transparency is composited over white, not dropped (dropping alpha exposes
    whatever colour the transparent pixels happen to hold, often black);
  * 16-bit and 32-bit integer images are rescaled to 8 bits, not clipped;
  * CMYK, palette, grayscale and the rest are converted with PIL's own conversions;
  * truncated files are errors (PIL's LOAD_TRUNCATED_IMAGES stays off), and images
    with more than `max_pixels` pixels are refused *before* decoding (decompression bombs).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings

import numpy as np
import PIL
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from embedder.errors import BadImageError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default limit (~ 9459 x 9459)
DECODER = f"PIL-{PIL.__version__}"

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_WIDE_INT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def load_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode `path` to a [3, H, W] uint8 tensor with EXIF orientation applied."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        reason = "broken symbolic link (its target is missing)" if os.path.islink(path) else "file not found"
        raise BadImageError(reason) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadImageError("symbolic link loop (the link leads back to itself)") from None
        raise BadImageError(f"cannot read file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise BadImageError("is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise BadImageError("not a regular file (a device, pipe or socket)")  # reading could block forever
    return _decode(path, st.st_size, max_pixels)


def load_rgb_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """`load_rgb` for bytes already in memory (uploads), with the same rules and reasons."""
    return _decode(io.BytesIO(data), len(data), max_pixels)


def _decode(source, size: int, max_pixels: int) -> torch.Tensor:
    if size == 0:
        raise BadImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise BadImageError(
                        f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                        "(raise it with --max-pixels if the image is genuine)"
                    )
                img.load()
                rgb = _to_rgb(_upright(img))
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError("not an image: no decoder recognises the file format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(f"decompression bomb: {exc}") from None
    except PermissionError:
        raise BadImageError("permission denied (the file cannot be read by this user)") from None
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg.lower():
            raise BadImageError(f"truncated image: {msg}") from None
        raise BadImageError(f"corrupt image data: {msg}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is one bad file, never a dead run
        raise BadImageError(f"corrupt image: {exc.__class__.__name__}: {exc}") from None
    array = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - broken EXIF: keep the pixels as stored
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _WIDE_INT_MODES:
        # 16-bit (or 32-bit int) grayscale: map the full 0..65535 range onto 0..255.
        wide = np.asarray(img, dtype=np.float64)
        scaled = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if mode == "F":
        scaled = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
