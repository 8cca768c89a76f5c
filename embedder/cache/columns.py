"""The `/columns` group of a cache file (and of an index's rows.h5): one 1-D dataset per column.

Kinds, null values and the built-in columns are those of `embedder.data.metadata`. On disk:
int64, float64 and bool datasets as such; str columns as UTF-8 strings, variable-length in a
finished cache, fixed-width (the longest value's bytes) where an HDF5 virtual dataset must map
them (the parts of a run, the shards of a Ray run). A file without the group (caches written
before columns existed) has no columns; every reader treats that as an empty table.
"""

from __future__ import annotations

import h5py
import numpy as np

from embedder.data.metadata import as_kind, kind_of, null_of
from embedder.errors import CacheError, did_you_mean

GROUP = "columns"
STR = h5py.string_dtype("utf-8")


def kinds_in(f: h5py.File | h5py.Group) -> dict[str, str] | None:
    """{name: kind} of the columns stored in `f`, or None when it has no /columns group."""
    if GROUP not in f:
        return None
    return {name: kind_of_dataset(ds) for name, ds in f[GROUP].items()}


def kind_of_dataset(ds: h5py.Dataset) -> str:
    if h5py.check_string_dtype(ds.dtype) is not None:
        return "str"
    return kind_of(np.zeros(0, ds.dtype))


def str_width(values: np.ndarray) -> int:
    """Bytes per value of a fixed-width string dataset holding `values` (at least 1)."""
    return max((len(v.encode("utf-8")) for v in values), default=1) or 1


def h5_dtype(kind: str, width: int | None = None):
    """The HDF5 dtype of a column: `width` bytes fixed-width for str when given, else variable-length."""
    if kind == "str":
        return STR if width is None else h5py.string_dtype("utf-8", max(1, width))
    return np.dtype(kind)


def write_columns(f: h5py.File | h5py.Group, kinds: dict[str, str], values: dict[str, np.ndarray], *,
                  fixed_width: bool = False, resizable: bool = False) -> None:
    """/columns/<name> for every column of `kinds` (`values` aligned with the file's rows); no group without columns."""
    if not kinds:
        return
    group = f.require_group(GROUP)
    for name, kind in kinds.items():
        data = as_kind(values[name], kind)
        width = str_width(data) if kind == "str" and fixed_width else None
        if kind == "str":
            data = np.array([v.encode("utf-8") for v in data], dtype=h5_dtype("str", width)) if width else data
        extra = {"maxshape": (None,), "chunks": (min(65536, max(len(data), 1)),)} if resizable else {}
        group.create_dataset(name, data=data, dtype=h5_dtype(kind, width), shape=(len(data),), track_times=False,
                             **extra)


def read_columns(f: h5py.File | h5py.Group, names=None, rows=None, what: str = "") -> dict[str, np.ndarray]:
    """{name: values} of the stored columns `names` (all by default) at `rows` (all by default)."""
    stored = kinds_in(f) or {}
    names = list(stored) if names is None else list(names)
    unknown = [n for n in names if n not in stored]
    if unknown:
        have = ", ".join(stored) if stored else "none (written before columns existed: re-embed to add them)"
        raise CacheError(f"{what or f.file.filename} has no column {unknown[0]!r}.{did_you_mean(unknown[0], stored)} "
                         f"Its columns: {have}.")
    out = {}
    for name in names:
        ds = f[f"{GROUP}/{name}"]
        if stored[name] == "str":
            view = ds.asstr()
            data = view[()] if rows is None else view[rows]
            out[name] = as_kind(np.atleast_1d(data), "str")
        else:
            out[name] = ds[()] if rows is None else ds[rows]
    return out


def null_columns(kinds: dict[str, str], n: int) -> dict[str, np.ndarray]:
    """Columns of `n` rows that have no values (rows of a cache written before columns existed)."""
    from embedder.data.metadata import nulls

    return {name: nulls(name, kind, n) for name, kind in kinds.items()}


def fill_value(name: str, kind: str):
    """The fill of a virtual dataset's unmapped rows (none in a view of finished members)."""
    return None if kind == "str" else null_of(name, kind)


def differences(cached: dict[str, str], requested: dict[str, str]) -> str:
    """'' when the two column sets agree, else one sentence naming the columns that differ."""
    parts = []
    only_cached = [n for n in cached if n not in requested]
    only_new = [n for n in requested if n not in cached]
    retyped = [f"{n} ({cached[n]} -> {requested[n]})" for n in cached if n in requested and cached[n] != requested[n]]
    if only_cached:
        parts.append(f"only in the cache: {', '.join(only_cached)}")
    if only_new:
        parts.append(f"only in this run: {', '.join(only_new)}")
    if retyped:
        parts.append(f"of another kind: {', '.join(retyped)}")
    return "; ".join(parts)


def take(values: dict[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    return {name: v[rows] for name, v in values.items()}


def concat(parts: list[dict[str, np.ndarray]], kinds: dict[str, str]) -> dict[str, np.ndarray]:
    out = {}
    for name, kind in kinds.items():
        arrays = [p[name] for p in parts]
        out[name] = np.concatenate(arrays) if arrays else as_kind([], kind)
    return out


__all__ = ["GROUP", "differences", "kind_of", "kinds_in", "null_columns", "read_columns", "write_columns"]
