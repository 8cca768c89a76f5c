"""The HDF5 feature cache: schema, fingerprint and block reads.

Layout of a finished cache (`schema_version` 1)::

    /features        float32|float16 [N, D]  chunked (~1 MiB), resizable along N
    /paths           UTF-8 [N]                relative to SOURCE (absolute if outside it)
    /labels          int64 [N]                index into /classes, -1 when unlabelled
    /classes         UTF-8 [C]
    /errors/path     UTF-8 [E]                files that could not be used ...
    /errors/reason   UTF-8 [E]                ... and why
    attrs: schema_version, fingerprint, one attribute per fingerprint component,
           fingerprint_components (JSON), source, layout, feature_dim, feature_dtype,
           committed_rows, complete, command

Writing (and why a kill cannot corrupt a cache) lives in `embedder.cache_writer`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from embedder.errors import CacheError

SCHEMA_VERSION = 1
PARTIAL_SUFFIX = ".partial"
STR = h5py.string_dtype("utf-8")
FEATURE_DTYPES = ("float32", "float16")


def fingerprint_of(components: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CacheSpec:
    """What a run asks the cache to hold. `components` define the feature space."""

    components: dict[str, str]
    source: str
    feature_dim: int
    layout: str = "imagefolder"
    command: str = ""

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.components)

    @property
    def feature_dtype(self) -> str:
        return self.components.get("feature_dtype", "float32")

    def differences(self, components: dict[str, str], source: str) -> dict[str, tuple[object, object]]:
        """Fields that differ, as {field: (cached value, requested value)}."""
        diff = {
            k: (components.get(k), self.components.get(k))
            for k in sorted(set(components) | set(self.components))
            if components.get(k) != self.components.get(k)
        }
        if source != self.source:
            diff["source"] = (source, self.source)
        return diff


def chunk_rows(dim: int, itemsize: int) -> int:
    return max(1, (1 << 20) // max(1, dim * itemsize))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_replace(tmp: Path, final: Path) -> None:
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------


@dataclass
class Block:
    start: int
    features: np.ndarray
    labels: np.ndarray

    @property
    def stop(self) -> int:
        return self.start + len(self.features)


class FeatureCache:
    """Read-only view of a cache. Nothing is loaded whole unless asked for.

    >>> with FeatureCache("feats.h5") as cache:
    ...     for block in cache.iter_blocks(65536):
    ...         use(block.features, block.labels)
    """

    def __init__(self, path: str | os.PathLike, require_complete: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise CacheError(f"No feature cache at {self.path}. Create it with `embedder embed SOURCE --out {path}`.")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:
            raise CacheError(f"{self.path} is not a readable HDF5 file: {exc}") from exc
        attrs = self._f.attrs
        if "schema_version" not in attrs or "fingerprint" not in attrs:
            self._f.close()
            raise CacheError(f"{self.path} is an HDF5 file but not an embedder feature cache.")
        if int(attrs["schema_version"]) > SCHEMA_VERSION:
            self._f.close()
            raise CacheError(
                f"{self.path} has schema version {int(attrs['schema_version'])}, newer than this embedder "
                f"understands ({SCHEMA_VERSION}). Upgrade embedder."
            )
        if require_complete and not self.complete:
            message = (
                f"{self.path} is incomplete ({self.committed_rows} rows committed): its run was interrupted. "
                f"Rerun `{attrs.get('command', '') or 'the embed command'}` to finish it."
            )
            self._f.close()
            raise CacheError(message)
        if not self.complete:
            missing = [s.file_name for s in self._virtual_sources() if not (self.path.parent / s.file_name).exists()]
            if missing:
                self._f.close()
                raise CacheError(f"{self.path} is incomplete and its part files are gone ({missing[0]} ...).")

    def _virtual_sources(self):
        ds = self._f["features"]
        return ds.virtual_sources() if ds.is_virtual else []

    # metadata ------------------------------------------------------------------------------
    @property
    def attrs(self) -> h5py.AttributeManager:
        return self._f.attrs

    @property
    def fingerprint(self) -> str:
        return str(self._f.attrs["fingerprint"])

    @property
    def components(self) -> dict[str, str]:
        return json.loads(self._f.attrs["fingerprint_components"])

    @property
    def source(self) -> str:
        return str(self._f.attrs["source"])

    @property
    def complete(self) -> bool:
        return bool(self._f.attrs["complete"])

    @property
    def committed_rows(self) -> int:
        return int(self._f.attrs["committed_rows"])

    @property
    def dim(self) -> int:
        return int(self._f["features"].shape[1])

    def __len__(self) -> int:
        return int(self._f["features"].shape[0])

    @property
    def classes(self) -> list[str]:
        return list(self._f["classes"].asstr()[:])

    # rows ----------------------------------------------------------------------------------
    @property
    def labels(self) -> np.ndarray:
        return self._f["labels"][:]

    @property
    def paths(self) -> list[str]:
        return list(self._f["paths"].asstr()[:]) if len(self) else []

    @property
    def errors(self) -> list[tuple[str, str]]:
        g = self._f["errors"]
        if not len(g["path"]):
            return []
        return list(zip(g["path"].asstr()[:], g["reason"].asstr()[:]))

    def features(self, rows: slice | np.ndarray | None = None) -> np.ndarray:
        ds = self._f["features"]
        return ds[:] if rows is None else ds[rows]

    def iter_blocks(self, block_rows: int = 65536) -> Iterator[Block]:
        """Stream (features, labels) in row order, `block_rows` at a time."""
        ds, labels = self._f["features"], self._f["labels"]
        for start in range(0, len(self), block_rows):
            stop = min(start + block_rows, len(self))
            yield Block(start, ds[start:stop], labels[start:stop])

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_cache(path: str | os.PathLike, require_complete: bool = True) -> FeatureCache:
    return FeatureCache(path, require_complete=require_complete)
