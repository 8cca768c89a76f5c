"""Schemathesis hooks for the search service: its `format: binary` fields are images.

    SCHEMATHESIS_HOOKS=benchmarks.schemathesis_hooks schemathesis run --checks all URL/openapi.json

A schema cannot say "the bytes of a PNG", so without this every schema-valid upload is
random bytes, which the server rightly refuses (400) and `positive_data_acceptance` counts
as a failure. With it, positive cases are small real images of every mode and format the
service reads, and reach 200; negative cases (wrong types, missing parts) are unchanged.
Non-images, truncated files and bombs are tested by hand in tests/test_service.py.
"""

from __future__ import annotations

import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
MODES = ("RGB", "L", "RGBA", "P", "1")
WITHOUT_ALPHA = {"JPEG": ("RGB", "L"), "BMP": ("RGB", "L", "P", "1")}


@st.composite
def image_bytes(draw) -> bytes:
    """A small image file: random size (1-96 px a side), mode, format and pixels."""
    width, height = draw(st.integers(1, 96)), draw(st.integers(1, 96))
    fmt, mode = draw(st.sampled_from(FORMATS)), draw(st.sampled_from(MODES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    image = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA").convert(mode)
    if mode not in WITHOUT_ALPHA.get(fmt, MODES):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


schemathesis.openapi.format("binary", image_bytes())
