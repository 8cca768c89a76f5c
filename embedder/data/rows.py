"""Where a cache row's image lies, after the run: a file, a tar member or a URL.

A cache stores SOURCE (a folder, a file list, a table, the tar shards' folder) and each row's
path as the listing gave it. `row_location` turns the two into one string: an absolute file
path (a file list's and a table's paths are relative to the list's folder, not to the list),
`<shards folder>/<shard>.tar/<member>` for a tar row, or the URL itself. `read_location` reads
the bytes back from any of these, `load_location_rgb` the pixels (thumbnails, result grids).
"""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path

from embedder.data.decode import DEFAULT_MAX_PIXELS, load_rgb, load_rgb_bytes
from embedder.data.fetch import FetchSettings
from embedder.data.fetch import fetch as fetch_one
from embedder.data.formats import is_url
from embedder.data.table import TABLE_SOURCE_SUFFIXES, TEXT_TABLE_SUFFIXES
from embedder.data.tar import MAX_MEMBER_BYTES
from embedder.errors import BadImageError

LIST_SUFFIXES = (".txt", *TEXT_TABLE_SUFFIXES, *TABLE_SOURCE_SUFFIXES)  # SOURCEs whose rows start from their folder
_TAR_ROW = re.compile(r"^(.*?\.tar)/(.+)$", re.IGNORECASE)


def rows_root(source: str | os.PathLike) -> Path:
    """The folder a cache's relative paths start from: SOURCE, or a file list's / table's folder."""
    src = Path(source)
    return src.parent if src.suffix.lower() in LIST_SUFFIXES and not src.is_dir() else src


def row_location(source: str | os.PathLike, path: str) -> str:
    """One row's image as a single string: a URL, or an absolute path (a tar row's inside its shard)."""
    if is_url(path) or os.path.isabs(path):
        return path
    return str(rows_root(source) / path)


def tar_member_of(location: str) -> tuple[Path, str] | None:
    """(shard, member name) where `location` is `.../<shard>.tar/<member>` and the shard is a file."""
    m = _TAR_ROW.match(location)
    if m is None or not Path(m.group(1)).is_file():
        return None
    return Path(m.group(1)), m.group(2)


def location_exists(location: str) -> bool | None:
    """Whether the image is still there: None for a URL (not checked: that would fetch it)."""
    if is_url(location):
        return None
    if os.path.exists(location):
        return True
    return tar_member_of(location) is not None  # a tar row: its shard is there


def read_location(location: str, fetch: FetchSettings | None = None) -> bytes:
    """The encoded bytes of a row's image; BadImageError with the reason."""
    if is_url(location):
        return fetch_one(location, fetch or FetchSettings()).data
    member = None if os.path.exists(location) else tar_member_of(location)
    if member is not None:
        return _tar_bytes(*member)
    try:
        with open(location, "rb") as f:
            return f.read()
    except OSError as exc:
        raise BadImageError(f"cannot read {location}: {exc.strerror or exc}") from None


def load_location_rgb(location: str, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None,
                      fetch: FetchSettings | None = None):
    """A row's image as a [3, H, W] uint8 tensor: a file through `load_rgb` (its checks: folders,
    FIFOs that would block, broken links, each with its reason), a tar member or a URL from its bytes."""
    if is_url(location):
        return load_rgb_bytes(fetch_one(location, fetch or FetchSettings()).data, max_pixels, min_side=min_side)
    member = None if os.path.lexists(location) else tar_member_of(location)
    if member is not None:
        return load_rgb_bytes(_tar_bytes(*member), max_pixels, min_side=min_side)
    return load_rgb(location, max_pixels, min_side=min_side)


def _tar_bytes(shard: Path, name: str) -> bytes:
    """The member's bytes as the listing read them (embedder.data.tar): past damaged headers, the
    last member of the name, links followed, nothing over MAX_MEMBER_BYTES allocated."""
    try:
        with tarfile.open(shard, mode="r:", ignore_zeros=True) as tar:
            info = tar.getmember(name)
            if info.size > MAX_MEMBER_BYTES:
                raise BadImageError(f"tar member of {info.size:,} bytes is over the {MAX_MEMBER_BYTES >> 20:,} MB cap")
            f = tar.extractfile(info)
            if f is not None:
                return f.read()
    except KeyError:
        pass
    except (tarfile.TarError, OSError) as exc:
        raise BadImageError(f"cannot read tar shard {shard}: {exc}") from None
    raise BadImageError(f"{name} is no longer a member of {shard}")
