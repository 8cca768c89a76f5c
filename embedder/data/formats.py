"""What a SOURCE entry is, told from its name alone: an image file (by its extension) or a URL (by its scheme).

The listing (embedder.data.sources), the table reader (embedder.data.table) and the fetcher
(embedder.data.fetch) all ask these questions; the answers live here, below all three.
"""

from __future__ import annotations

IMAGE_EXTENSIONS = frozenset(
    [".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"]
)
URL_SCHEMES = ("http://", "https://")


def is_url(path: str) -> bool:
    return path[:8].lower().startswith(URL_SCHEMES)
