"""Settings of `info` and `merge`, declared once (embedder.options)."""

from __future__ import annotations

from dataclasses import dataclass

from embedder.options import option


@dataclass(frozen=True)
class InfoConfig:
    cache: str = option(positional=True, path=True, metavar="CACHE.h5|INDEX_DIR",
                        help="feature cache, or index folder, to describe")
    errors: bool = option(False, help="list every file in the errors table")


@dataclass(frozen=True)
class MergeConfig:
    cache: str = option(positional=True, path=True,
                        help="the sharded cache OUT.h5 (a virtual view), or its OUT.h5.shards folder")
    out: str = option(path=True, help="single HDF5 cache to write")
    overwrite: bool = option(False, help="replace --out if it exists")
