"""A generated corpus of awkward and broken image files, with what each should become."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# name -> substring expected in the recorded reason
BAD = {
    "zero_bytes.jpg": "empty file",
    "truncated.jpg": "truncated",
    "truncated.png": "",
    "garbage.jpg": "not an image",
    "text_file.png": "not an image",
    "bomb.png": "decompression bomb",
}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid-looking 1-bit PNG whose header claims 10^10 pixels, in a few hundred bytes."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + (width + 7) // 8) * 16)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def _jpeg_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def make_corpus(root: Path, seed: int = 0) -> dict[str, str]:
    """Write good-but-awkward and bad files into the flat folder `root`.

    Returns {file name: "ok" or the expected reason fragment}.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    expected: dict[str, str] = {}

    def good(name: str, image: Image.Image, **save):
        image.save(root / name, **save)
        expected[name] = "ok"

    good("plain.jpg", rgb, quality=90)
    good("gray.png", rgb.convert("L"))
    good("one_bit.png", rgb.convert("1"))
    good("palette.png", rgb.convert("P"))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))))
    good("rgba.png", rgba)
    good("gray_alpha.png", rgba.convert("LA"))
    pal = rgb.convert("P")
    pal.info["transparency"] = 0
    good("palette_transparent.png", pal, transparency=0)
    good("cmyk.jpg", rgb.convert("CMYK"), quality=90)
    wide = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    good("gray16.png", Image.fromarray(wide))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise for display
    good("exif_rotated.jpg", rgb, exif=exif.tobytes(), quality=90)
    good("animated.gif", rgb.convert("P"), save_all=True, append_images=[rgb.rotate(90).convert("P")])
    good("photo.webp", rgb)
    good("scan.tiff", rgb)

    (root / "zero_bytes.jpg").write_bytes(b"")
    data = _jpeg_bytes(rgb, quality=90)
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "garbage.jpg").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (root / "text_file.png").write_text("this is not a picture\n")
    (root / "bomb.png").write_bytes(bomb_png())
    expected.update(BAD)
    return expected
