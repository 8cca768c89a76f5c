"""Schemathesis hooks for the search service: its `format: binary` fields are images.

    SCHEMATHESIS_HOOKS=benchmarks.schemathesis_hooks schemathesis run --checks all URL/openapi.json

A schema cannot say "the bytes of a PNG", so without this every schema-valid upload is
random bytes, which the server rightly refuses (400) and `positive_data_acceptance` counts
as a failure. With it, positive cases are small real images of every mode and format the
service reads, and reach 200; negative cases (wrong types, missing parts) are unchanged.
Non-images, truncated files and bombs are tested by hand in tests/test_service.py.
Likewise the row filters (`format: embedder-row-filter`): positive cases are well-formed filters.
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


@st.composite
def row_filter(draw) -> str:
    """A well-formed filter over the columns every index has (id, path, label): schema-valid
    filters must be answered 200, and a schema cannot state the grammar. Malformed filters are
    tested by hand (tests/test_filters.py, tests/test_service.py)."""
    def text(value: str) -> str:
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

    ops = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])
    condition = st.one_of(
        st.builds(lambda op, n: f"id {op} {n}", ops, st.integers(-10, 10**6)),
        st.builds(lambda op, v: f"label {op} {text(v)}", ops, st.text(max_size=8)),
        st.builds(lambda v: f"path glob {text(v)}", st.text(max_size=8)),
        st.builds(lambda ns: f"id in ({', '.join(map(str, ns))})", st.lists(st.integers(0, 100), min_size=1, max_size=4)),
    )
    parts = draw(st.lists(condition, min_size=1, max_size=3))
    joins = draw(st.lists(st.sampled_from([" and ", " or ", " and not "]), min_size=len(parts) - 1,
                          max_size=len(parts) - 1))
    out = parts[0]
    for join, part in zip(joins, parts[1:]):
        out += join + part
    return draw(st.sampled_from(["", out, f"({out})", f"not ({out})"]))


schemathesis.openapi.format("binary", image_bytes())
schemathesis.openapi.format("embedder-row-filter", row_filter())
