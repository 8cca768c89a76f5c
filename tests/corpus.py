"""Generated corpora of awkward and broken input, with what each entry should become.

`make_corpus`: a flat folder of awkward and broken image files (tests/test_decode.py).
`make_bad_input_tree`: an imagefolder SOURCE holding every awkward kind of entry -- formats,
broken files, links, odd names, special files, hidden and stray entries -- as `Case`s that say
whether each becomes a feature row, an errors-table entry or an ignored entry, and why
(tests/test_corpus.py, docs/RELIABILITY.md).
"""

from __future__ import annotations

import io
import os
import socket
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from embedder.data.sources import (
    FOLDER_AGAIN,
    HIDDEN,
    LISTED_TWICE,
    NOT_IMAGE,
    OUTSIDE_CLASSES,
    SAME_FILE,
    UNREADABLE_FOLDER,
)
from embedder.names import display_path

# name -> substring expected in the recorded reason
BAD = {
    "zero_bytes.jpg": "empty file",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
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


def big_header_png(width: int, height: int) -> bytes:
    """A 1-bit PNG header claiming width x height, then junk where the pixel data should be:
    decoding fails at once, but only after the size check has let it through."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"not zlib") + _png_chunk(b"IEND", b"")


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


# ----------------------------------------------------------------------------------------
# The bad-input tree: every awkward kind of entry a SOURCE folder can hold, and its outcome
# ----------------------------------------------------------------------------------------

# A kind's fate: a feature row, an errors-table entry, or an ignored entry of the listing.
ROW, ERROR, IGNORED = "row", "error", "ignored"

# What legacy `make_corpus` files are, for the docs table.
LEGACY_KINDS = {
    "plain.jpg": "plain RGB JPEG",
    "gray.png": "grayscale PNG",
    "one_bit.png": "1-bit PNG",
    "palette.png": "palette PNG",
    "rgba.png": "RGBA PNG (alpha gradient)",
    "gray_alpha.png": "grayscale + alpha PNG",
    "palette_transparent.png": "palette PNG, one transparent index",
    "cmyk.jpg": "CMYK JPEG",
    "gray16.png": "16-bit grayscale PNG",
    "exif_rotated.jpg": "EXIF-rotated JPEG",
    "animated.gif": "animated GIF",
    "photo.webp": "lossy WebP",
    "scan.tiff": "TIFF",
    "zero_bytes.jpg": "zero-byte file",
    "truncated.jpg": "truncated JPEG",
    "truncated.png": "truncated PNG",
    "garbage.jpg": "random bytes named .jpg",
    "text_file.png": "text file named .png",
    "bomb.png": "decompression bomb",
}


@dataclass(frozen=True)
class Case:
    """One entry under SOURCE and what the run must make of it.

    `path` is relative to SOURCE (POSIX); a folder entry ends with "/". `reason` is, for an
    error, a fragment of the recorded reason, and for an ignored entry the exact reason.
    `pixels` (rows only) is the RGB image the file must decode to, known without the
    library's decoder; `exact=False` marks lossy files, which need only come close to it.
    """

    kind: str
    path: str
    outcome: str
    reason: str = ""
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)
    exact: bool = True


# SOURCE = tree/list.txt: a file list naming a folder, a quoted name with a comma, a path twice, a missing file.
FILE_LIST = 'path\nformats/x.jpg\n"names/a,comma.png"\nformats/bitmap.bmp\nformats/bitmap.bmp\nnowhere.png\n'
FILE_LIST_CASES = [
    Case("folder named x.jpg in a .txt file list", "formats/x.jpg", ERROR, "is a folder"),
    Case("quoted name with a comma in a file list", "names/a,comma.png", ROW),
    Case("image in a file list", "formats/bitmap.bmp", ROW),
    Case("path listed twice in a file list", "formats/bitmap.bmp", IGNORED, LISTED_TWICE),
    Case("missing file in a file list", "nowhere.png", ERROR, "file not found"),
]

# Files the race step changes after the listing and before the reader opens them.
RACE_DELETED = "special/vanish.png"
RACE_REWRITTEN = "special/rewritten.png"

# Non-UTF-8 bytes, a newline, a comma, a leading dash, spaces and non-ASCII letters.
AWKWARD_NAMES = {
    "non-UTF-8 name (Latin-1 byte)": os.fsdecode(b"caf\xe9.png"),
    "newline in the name": "new\nline.png",
    "comma in the name": "a,comma.png",
    "leading dash": "-dash.png",
    "spaces and unicode": "café ☕.png",
}


def _noise(rng: np.random.Generator, h: int = 12, w: int = 16) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth(h: int = 16, w: int = 24) -> np.ndarray:
    """A gradient with no symmetry: JPEG keeps it close, and a rotation changes it."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x * y) * 255 // ((h - 1) * (w - 1))], -1).astype(np.uint8)


def _save(path: Path, pixels: np.ndarray, **save) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **save)


def _encoded(pixels: np.ndarray, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **save)
    return buf.getvalue()


def _formats(root: Path, rng: np.random.Generator) -> list[Case]:
    """Image formats and pixel layouts that must decode to known pixels (class `formats`)."""
    d, cases = root / "formats", []

    def row(kind: str, name: str, pixels: np.ndarray, exact: bool = True) -> None:
        cases.append(Case(kind, f"formats/{name}", ROW, pixels=pixels, exact=exact))

    for kind, name, save in [("TIFF", "scan.tiff", {}), ("WebP (lossless)", "photo.webp", {"lossless": True}),
                             ("BMP", "bitmap.bmp", {}), ("PPM", "portable.ppm", {}),
                             ("upper-case extension", "SHOUT.PNG", {})]:
        px = _noise(rng)
        _save(d / name, px, **save)
        row(kind, name, px)
    wide = rng.integers(0, 65536, (12, 16), dtype=np.uint16)
    Image.fromarray(wide).save(d / "gray16.png")  # 16-bit PNG: scaled by 255/65535, not clipped
    row("16-bit grayscale PNG", "gray16.png", np.repeat(np.rint(wide / 257).astype(np.uint8)[..., None], 3, 2))
    palette, index = rng.integers(0, 256, (16, 3), dtype=np.uint8), rng.integers(0, 16, (12, 16), dtype=np.uint8)
    pal = Image.fromarray(index, mode="P")
    pal.putpalette(palette.flatten().tolist())
    pal.save(d / "palette_alpha.png", transparency=0)  # index 0 transparent: composited over white
    row("palette PNG with transparency", "palette_alpha.png", np.where((index == 0)[..., None], 255, palette[index]))
    frames = [Image.fromarray(rng.integers(0, 16, (12, 16), dtype=np.uint8), mode="P") for _ in range(2)]
    for f in frames:
        f.putpalette(palette.flatten().tolist())
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    row("animated GIF (first frame)", "animated.gif", palette[np.asarray(frames[0])])
    smooth = _smooth()
    Image.fromarray(smooth).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    row("CMYK JPEG", "cmyk.jpg", smooth, exact=False)
    cases += _exif_pair(d, smooth)
    px = np.array([[[200, 30, 90]]], dtype=np.uint8)
    _save(d / "one_pixel.png", px)
    row("1x1 image", "one_pixel.png", px)
    px = _noise(rng, 300, 2)
    _save(d / "tall.png", px)
    row("extreme aspect ratio 2x300 (within the limit)", "tall.png", px)
    px = _noise(rng)
    _save(d / "x.jpg" / "inner.png", px)  # a folder with an image name is a folder
    row("image inside a folder named x.jpg", "x.jpg/inner.png", px)
    return cases


def _exif_pair(d: Path, smooth: np.ndarray) -> list[Case]:
    """A JPEG stored sideways with EXIF orientation 6, and its pixels saved already upright (PNG)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the stored image must be turned 90 degrees clockwise to view it
    Image.fromarray(smooth).save(d / "exif_rotated.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(d / "exif_rotated.jpg") as img:  # the stored pixels, orientation not applied
        stored = np.asarray(img.convert("RGB"))
    upright = np.ascontiguousarray(np.rot90(stored, k=-1))  # clockwise, without PIL's exif_transpose
    _save(d / "exif_upright.png", upright)
    return [Case("EXIF-rotated JPEG", "formats/exif_rotated.jpg", ROW, pixels=upright),
            Case("its pixels saved upright", "formats/exif_upright.png", ROW, pixels=upright)]


def _broken(root: Path, rng: np.random.Generator) -> list[Case]:
    """Files that cannot give a row; each must be an error with its reason (class `broken`)."""
    d = root / "broken"
    d.mkdir(parents=True)
    jpeg, png = _encoded(_smooth(), "JPEG", quality=95), _encoded(_noise(rng), "PNG")
    bad_crc = bytearray(png)
    bad_crc[bad_crc.find(b"IDAT") + 10] ^= 0xFF  # one flipped byte inside the compressed pixels
    files = [
        ("zero-byte file", "zero.jpg", b"", "empty file (0 bytes)"),
        ("truncated JPEG", "truncated.jpg", jpeg[: len(jpeg) // 2], "truncated image"),
        ("truncated PNG", "truncated.png", png[: len(png) // 2], "truncated image"),
        ("corrupt PNG data", "corrupt.png", bytes(bad_crc), "corrupt image data"),
        ("text file named .jpg", "text.jpg", b"this is not a picture\n", "not an image"),
        ("random bytes named .png", "random.png", rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(), "not an image"),
        ("decompression bomb (10^10 pixels claimed)", "bomb.png", bomb_png(), "decompression bomb"),
        ("extreme aspect ratio 70000x1 (resize would be too big)", "banner.png",
         _encoded(np.zeros((1, 70_000, 3), np.uint8), "PNG"), "extreme aspect ratio"),
    ]
    for _, name, data, _ in files:
        (d / name).write_bytes(data)
    return [Case(kind, f"broken/{name}", ERROR, reason) for kind, name, _, reason in files]


def _links(root: Path, outside: Path, rng: np.random.Generator) -> list[Case]:
    """Symbolic and hard links (class `links`); `formats/` must exist already."""

    d = root / "links"
    (d / "sub").mkdir(parents=True)
    far = _noise(rng)
    _save(outside / "far.png", far)
    (d / "far.png").symlink_to(outside / "far.png")
    (d / "alias.png").symlink_to("../formats/bitmap.bmp")
    os.link(root / "formats" / "scan.tiff", d / "hard.tiff")
    (d / "loop.jpg").symlink_to("loop.jpg")
    (d / "broken.jpg").symlink_to("missing.jpg")
    (d / "sub" / "up").symlink_to("..")  # links/sub/up/sub/up/... : a cycle
    (d / "formats_again").symlink_to("../formats")
    return [
        Case("symlink to an image outside SOURCE", "links/far.png", ROW, pixels=far),
        Case("symlink to an image inside SOURCE", "links/alias.png", IGNORED, SAME_FILE),
        Case("hard link to an image inside SOURCE", "links/hard.tiff", IGNORED, SAME_FILE),
        Case("symlink to itself", "links/loop.jpg", ERROR, "symbolic link loop"),
        Case("broken symlink", "links/broken.jpg", ERROR, "broken symbolic link"),
        Case("directory symlink cycle (sub/up -> ..)", "links/sub/up/", IGNORED, FOLDER_AGAIN),
        Case("directory symlink to a folder inside SOURCE", "links/formats_again/", IGNORED, FOLDER_AGAIN),
    ]


def _names(root: Path, rng: np.random.Generator) -> list[Case]:
    """Awkward file names, each an ordinary image (class `names`)."""
    cases = []
    for kind, name in AWKWARD_NAMES.items():
        px = _noise(rng)
        (root / "names").mkdir(exist_ok=True)
        (root / "names" / name).write_bytes(_encoded(px, "PNG"))
        cases.append(Case(kind, f"names/{name}", ROW, pixels=px))
    return cases


def _special(root: Path, rng: np.random.Generator) -> list[Case]:
    """Special files, hidden and non-image entries, and the two files the race step changes (class `special`)."""

    d = root / "special"
    d.mkdir(parents=True)
    os.mkfifo(d / "pipe.jpg")  # opening it for reading would block until a writer comes
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(d / "sock.png"))  # the socket file stays after the socket is closed
    _save(d / ".hidden.png", _noise(rng))
    _save(d / ".thumbs" / "thumb.png", _noise(rng))
    (d / "notes.txt").write_text("not an image\n")
    _save(root / RACE_DELETED, _noise(rng))
    _save(root / RACE_REWRITTEN, race_contents()[0])
    return [
        Case("FIFO named pipe.jpg", "special/pipe.jpg", ERROR, "not a regular file"),
        Case("socket named sock.png", "special/sock.png", ERROR, "not a regular file"),
        Case("hidden file", "special/.hidden.png", IGNORED, HIDDEN),
        Case("hidden folder (not walked)", "special/.thumbs/", IGNORED, HIDDEN),
        Case("non-image file", "special/notes.txt", IGNORED, NOT_IMAGE),
        Case("deleted between listing and reading", RACE_DELETED, ERROR, "file not found"),
        Case("rewritten between listing and reading", RACE_REWRITTEN, ROW, pixels=race_contents()[1]),
    ]


def _top(root: Path, rng: np.random.Generator) -> list[Case]:
    """Entries beside the class folders: with --layout imagefolder none of them is a row."""

    _save(root / "stray.png", _noise(rng))
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "list.txt").write_text(FILE_LIST)
    return [
        Case("image outside the class folders (--layout imagefolder)", "stray.png", IGNORED, OUTSIDE_CLASSES),
        Case("hidden folder at the top", ".git/", IGNORED, HIDDEN),
        Case("file list beside the classes (not an image name)", "list.txt", IGNORED, NOT_IMAGE),
    ]


def _legacy(root: Path) -> list[Case]:
    """The flat `make_corpus` files as one more class folder, with the outcomes it promises."""
    cases = []
    for name, outcome in make_corpus(root / "legacy").items():
        kind = f"legacy: {LEGACY_KINDS[name]}"
        cases.append(Case(kind, f"legacy/{name}", ROW) if outcome == "ok" else Case(kind, f"legacy/{name}", ERROR, outcome))
    return cases


def race_contents() -> tuple[np.ndarray, np.ndarray]:
    """The pixels RACE_REWRITTEN holds when listed, and those it holds when read."""
    rng = np.random.default_rng(1234)
    return _noise(rng), _noise(rng)


def race_after_listing(root: Path) -> None:
    """What another process does between the listing and the reading: delete one file, rewrite another."""
    (root / RACE_DELETED).unlink()
    _save(root / RACE_REWRITTEN, race_contents()[1])


def make_bad_input_tree(root: Path, outside: Path, seed: int = 0) -> list[Case]:
    """Write the imagefolder tree of every awkward kind under `root` (and link targets under `outside`)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    outside.mkdir(parents=True)
    cases = _formats(root, rng) + _broken(root, rng) + _links(root, outside, rng) + _names(root, rng)
    return cases + _special(root, rng) + _top(root, rng) + _legacy(root)


# A user without read permission (the test runs it as `nobody` when it runs as root).
UNREADABLE_CASES = [
    Case("readable image beside them", "ok.png", ROW),
    Case("unreadable file (mode 000)", "locked.png", ERROR, "permission denied"),
    Case("unreadable folder (mode 000)", "closed/", IGNORED, f"{UNREADABLE_FOLDER} (Permission denied)"),
]


def make_unreadable_tree(root: Path) -> list[Case]:
    rng = np.random.default_rng(7)
    for name in ("ok.png", "locked.png", "closed/inside.png"):
        _save(root / name, _noise(rng))
    for path in (root / "locked.png", root / "closed"):
        os.chmod(path, 0)
    for path in (root, root.parent):
        os.chmod(path, 0o755)
    return UNREADABLE_CASES


def docs_rows(cases: list[Case]) -> list[str]:
    """The `## Bad input` table rows of docs/RELIABILITY.md (kind | file | outcome | reason)."""
    return [f"| {c.kind} | `{display_path(c.path)}` | {c.outcome} | {c.reason or '-'} |" for c in cases]


def png_bytes(pixels: np.ndarray) -> bytes:
    """The exact bytes the corpus writes for an image saved as PNG (PIL's encoder is deterministic)."""
    return _encoded(pixels, "PNG")
