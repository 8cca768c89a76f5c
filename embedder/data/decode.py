"""Read one image file into an RGB uint8 tensor, or raise BadImageError with a reason.

Correctness rules, each of which some popular tool gets wrong:
  * EXIF orientation is applied (phone photos are stored sideways);
  * transparency is composited over white, not dropped (dropping alpha exposes
    whatever colour the transparent pixels happen to hold, often black);
  * 16-bit and 32-bit integer images are rescaled to 8 bits, not clipped;
  * CMYK, palette, grayscale and the rest are converted with PIL's own conversions;
  * truncated files are errors (PIL's LOAD_TRUNCATED_IMAGES stays off), and images
    with more than `max_pixels` pixels are refused *before* decoding (decompression bombs),
    the refusal quoting that limit (not PIL's own, which this check replaces).

A caller that will shrink the image anyway (a search query, a thumbnail) may pass
`min_side`: the image is then decoded small, its shorter side still at least `min_side`.
JPEG uses libjpeg's scaled decoding (`Image.draft`, 1/2 to 1/8 of the size, a fraction of
the memory and time); other formats are box-reduced by a whole factor right after decoding,
before orientation and the colour conversions copy the pixels (alpha is premultiplied
for it, so the rules above still hold). `jpeg_min_side` does the first half alone: JPEGs are
DCT-scaled, every other format is decoded at full size (`embed --jpeg-draft`).

Exact JPEG decoding takes the cheapest path: files that are JPEGs by their magic bytes are
decoded by `torchvision.io.decode_jpeg` (the same libjpeg-turbo work, without PIL's unpacking
into 4-byte pixels and the copy out of them), whose pixels are bit-identical to PIL's on every
kind of JPEG tested (tests/test_decode.py); PIL still reads the header first, for the size
check and the orientation. Every other format, any JPEG torchvision refuses and any JPEG to be
turned upright goes to PIL.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import re
import stat
import warnings
from typing import TYPE_CHECKING

import numpy as np
import PIL
from PIL import Image, UnidentifiedImageError

from embedder.errors import BadImageError

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default limit (~ 9459 x 9459)
# The fingerprint's "decoder". JPEGs decoded by torchvision keep it: their pixels are PIL's, bit for
# bit (tests/test_decode.py), and torchvision's version is a fingerprint component of its own.
DECODER = f"PIL-{PIL.__version__}"

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
# Modes Image.reduce averages correctly (it premultiplies LA and RGBA itself); palettes and
# 16-bit modes are converted to RGB first.
_REDUCIBLE_MODES = {"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"}
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = {Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                Image.Transpose.ROTATE_90}
_RAISE_LIMIT = "raise it with --max-pixels if the image is genuine"
_PIL_PIXELS = re.compile(r"\((\d+) pixels\)")
_WIDE_INT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_JPEG_MODES = {"RGB", "L", "CMYK"}  # every mode PIL gives a JPEG (YCbCr, RGB, gray, CMYK and YCCK files)
# A JPEG whose file is far larger than its pixels can take (data after the image's end) is left
# to PIL, which reads only up to the end of the image instead of the whole file.
_JPEG_MAX_BYTES_PER_PIXEL, _JPEG_MAX_METADATA_BYTES = 8, 16 << 20


def load_rgb(
    path: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    min_side: int | None = None,
    jpeg_min_side: int | None = None,
    contiguous: bool = True,
    info: dict | None = None,
) -> torch.Tensor:
    """Decode `path` to a [3, H, W] uint8 tensor with EXIF orientation applied.

    `min_side`: decode small (JPEGs DCT-scaled, other formats box-reduced), the shorter side still
    >= `min_side`. `jpeg_min_side`: DCT-scale JPEGs alone, as far as their shorter side stays >= it.
    `contiguous=False`: the same pixels as a view of the decoder's [H, W, 3] memory, which
    torchvision resizes 2-6x faster than a contiguous copy, to the same bits (tests/test_decode.py).
    `info`, if given, receives the file's `size` (bytes) and `mtime` from the stat the checks make,
    and the image's own `width` and `height` as shown (orientation applied, before any reduction)."""
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
    if info is not None:
        info.update(size=st.st_size, mtime=st.st_mtime)
    pixels = _decode(path, st.st_size, max_pixels, min_side, _RAISE_LIMIT, jpeg_min_side, info)
    return pixels.contiguous() if contiguous else pixels


def load_rgb_bytes(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    min_side: int | None = None,
    raise_limit: str = _RAISE_LIMIT,
    jpeg_min_side: int | None = None,
    contiguous: bool = True,
    info: dict | None = None,
) -> torch.Tensor:
    """`load_rgb` for bytes already in memory (uploads, tar members), with the same rules and reasons.

    `raise_limit` ends a decompression-bomb refusal: how the limit is raised where the caller runs.
    `info` receives the image's `width` and `height` (the caller knows the size and mtime).
    """
    pixels = _decode(io.BytesIO(data), len(data), max_pixels, min_side, raise_limit, jpeg_min_side, info)
    return pixels.contiguous() if contiguous else pixels


def load_rgb_image(img: Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS, *, contiguous: bool = True) -> torch.Tensor:
    """`load_rgb` for an image already opened (a PIL image given to the Python API): the same size check,
    EXIF orientation and colour rules, so a file and `Image.open` of it give the same pixels."""
    w, h = img.size
    if w * h > max_pixels:
        raise BadImageError(f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                            "(raise it with max_pixels= if the image is genuine)")
    try:
        img.load()  # an image opened lazily from a truncated file fails here, as the file would
        array = np.array(_to_rgb(_turn(img, _orientation(img))), dtype=np.uint8)
    except OSError as exc:
        raise BadImageError(f"corrupt image data: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - one unusable image, never a dead run
        raise BadImageError(f"corrupt image: {exc.__class__.__name__}: {exc}") from None
    import torch

    pixels = torch.from_numpy(array).permute(2, 0, 1)  # [H, W, 3] memory, as the decoders give it
    return pixels.contiguous() if contiguous else pixels


def shown_size(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes as shown (EXIF orientation applied), from the header alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            turned = _orientation(img) in _SWAPS_SIDES
    return (h, w) if turned else (w, h)


def _decode(source, size: int, max_pixels: int, min_side: int | None, raise_limit: str,
            jpeg_min_side: int | None = None, info: dict | None = None) -> torch.Tensor:
    """[3, H, W] pixels in [H, W, 3] memory (either decoder's own layout); `info` as in `load_rgb`."""
    if size == 0:
        raise BadImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # The size check below, against `max_pixels`, replaces PIL's warning at its own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision",
                                    DeprecationWarning)
            # One open file for the header and the pixels: a file replaced in between cannot slip
            # past the size check.
            with _opened(source) as fp, Image.open(fp) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise BadImageError(
                        f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                        f"({raise_limit})"
                    )
                draft = min_side or jpeg_min_side
                exact = None if draft else _exact_jpeg(img, fp, size)
                if exact is not None:  # never one to turn upright
                    if info is not None:
                        info.update(width=w, height=h)
                    return exact
                if draft and img.format == "JPEG":
                    img.draft(None, (draft, draft))  # scaled IDCT: both sides stay >= draft
                img.load()
                turn = _orientation(img)  # read first: a reduced copy may not carry the file's tags
                if info is not None:
                    info.update(width=h, height=w) if turn in _SWAPS_SIDES else info.update(width=w, height=h)
                rgb = _to_rgb(_turn(_reduce(img, min_side), turn))
                # Copied out while the file is open: closing it releases a plain RGB file's pixels.
                array = np.array(rgb, dtype=np.uint8)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError("not an image: no decoder recognises the file format") from None
    except Image.DecompressionBombError as exc:
        raise BadImageError(_pil_bomb(str(exc), max_pixels, raise_limit)) from None
    except PermissionError:
        raise BadImageError("permission denied (the file cannot be read by this user)") from None
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg.lower():
            raise BadImageError(f"truncated image: {msg}") from None
        raise BadImageError(f"corrupt image data: {msg}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is one bad file, never a dead run
        raise BadImageError(f"corrupt image: {exc.__class__.__name__}: {exc}") from None
    import torch  # here, not at the top: configs read DEFAULT_MAX_PIXELS, and must not load torch

    return torch.from_numpy(array).permute(2, 0, 1)


def _opened(source):
    """A path opened for reading, or the in-memory stream itself."""
    return open(source, "rb") if isinstance(source, (str, os.PathLike)) else contextlib.nullcontext(source)


def _exact_jpeg(img: Image.Image, fp, size: int) -> torch.Tensor | None:
    """`img`'s RGB pixels decoded by torchvision, or None where PIL decodes it.

    PIL told the format from the file's magic bytes (a .jpg that is a PNG is not a JPEG here, a
    JPEG named .png is). The pixels are bit-identical to PIL's (tests/test_decode.py proves it
    on every kind of JPEG), which is why caches keep the "decoder" component they had. A JPEG
    torchvision refuses (truncated, corrupt) goes back to PIL, whose reason is the one recorded."""
    decode = _jpeg_decoder()
    w, h = img.size
    if (decode is None or img.format != "JPEG" or img.mode not in _JPEG_MODES
            or size > _JPEG_MAX_BYTES_PER_PIXEL * w * h + _JPEG_MAX_METADATA_BYTES):
        return None
    # A photo to be turned upright is PIL's: its transpose costs 4 ms at 2 MP, any turn of the
    # decoded tensor (torch's strided copy, numpy's) 7-24 ms, more than torchvision saves.
    if _orientation(img) is not None:
        return None
    fp.seek(0)
    import torch

    data = torch.frombuffer(bytearray(fp.read()), dtype=torch.uint8)
    try:
        return decode(data)  # [3, H, W] in [H, W, 3] memory, as PIL's pixels: what comes next runs alike
    except Exception:  # noqa: BLE001 - PIL decodes it again: its pixels, or its reason
        return None


@functools.cache
def _jpeg_decoder():
    """torchvision's JPEG decoder to RGB, or None where this torchvision has none (deprecated in 0.29)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    return functools.partial(decode_jpeg, mode=ImageReadMode.RGB)


def _pil_bomb(message: str, max_pixels: int, raise_limit: str) -> str:
    # PIL refuses outright at twice its own MAX_IMAGE_PIXELS, inside Image.open (or while
    # loading a frame), before the size reaches us: quote our limit, not PIL's.
    found = _PIL_PIXELS.search(message)
    pixels = int(found.group(1)) if found else None
    if pixels is None or pixels > max_pixels:
        shown = f"{pixels} pixels" if pixels else "the image"
        return f"decompression bomb: {shown} exceeds the limit of {max_pixels} ({raise_limit})"
    return (f"decompression bomb: {pixels} pixels exceeds PIL's own hard limit of {2 * Image.MAX_IMAGE_PIXELS} "
            "(PIL.Image.MAX_IMAGE_PIXELS), which a higher limit here does not lift")


def _reduce(img: Image.Image, min_side: int | None) -> Image.Image:
    """Box-reduce by the largest whole factor that keeps the shorter side >= `min_side`."""
    factor = min(img.size) // min_side if min_side else 1
    if factor < 2:
        return img
    if img.mode == "1":
        img = img.convert("L")  # 1 byte a pixel, not RGB's 4
    elif img.mode not in _REDUCIBLE_MODES:
        img = _to_rgb(img)  # averaging palette indices or 16-bit codes would be meaningless
    if img.mode not in ("LA", "RGBA"):
        return img.reduce(factor)
    # Image.reduce premultiplies alpha into a full-size copy; strip by strip (whole boxes
    # each, so the result is the same) that copy stays a few MB instead of doubling the peak.
    w, h = img.size
    out = Image.new(img.mode, (-(-w // factor), -(-h // factor)))
    rows = factor * max(1, (4 << 20) // (4 * w * factor))
    for top in range(0, h, rows):
        out.paste(img.crop((0, top, w, min(top + rows, h))).reduce(factor), (0, top // factor))
    return out


def _orientation(img: Image.Image) -> Image.Transpose | None:
    """The transposition that shows `img` upright (EXIF tag 0x0112), as ImageOps.exif_transpose applies it."""
    try:
        return _TRANSPOSE.get(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - broken EXIF: keep the pixels as stored
        return None


def _turn(img: Image.Image, method: Image.Transpose | None) -> Image.Image:
    return img if method is None else img.transpose(method)


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
