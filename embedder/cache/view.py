"""One cache over many files: the HDF5 virtual view, and the schema-v1 pieces every cache file shares.

A view is a small cache file whose row datasets -- `/features`, every `/layers/<name>`,
`/labels`, `/paths`, every `/columns/<name>` -- are HDF5 virtual datasets over the same datasets of other finished
files (its *members*), in member order, so the rows are read where they lie and nothing is
copied. Two kinds of cache are views (layout and attributes: `embedder.cache.reader`):

    CACHE.h5   during a fresh run, over the committed parts CACHE.h5.partial/part-*.h5
               (`complete = False`; `embedder.cache.writer`)
    OUT.h5     a sharded cache, over the finished shards OUT.h5.shards/shard-*.h5
               (attribute `shards` = the number of shards mapped; `embedder.cache.shards`)

Both are written here, by `write_view`, so both map every layer the same way and carry the
same attributes as a self-contained cache: `FeatureCache` and every command read a view as is.
Members are named relative to the view's folder, so a view moves with its members.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from embedder.atomic import atomic_replace, discard, temp_file
from embedder.cache import columns
from embedder.cache.reader import SCHEMA_VERSION, STR, CacheSpec
from embedder.names import encode_path


@dataclass(frozen=True)
class Member:
    """One finished file a view maps."""

    file: str  # relative to the view's folder
    rows: int
    path_width: int  # bytes per path of its fixed-width /paths: a virtual dataset cannot map vlen strings
    column_widths: dict[str, int] = field(default_factory=dict)  # the same, for each str column
    errors: int = 0  # rows of its errors table
    error_widths: tuple[int, int] | None = None  # bytes of its fixed-width /errors/path, /errors/reason


def merged(file: str, members: list[Member]) -> Member:
    """The member that a view of `members`, written at `file`, is to a view over it: a run's view
    maps its parts through such block views, so each commit maps a few blocks and the last parts
    rather than every part (mapping every part at each commit was quadratic over a run)."""
    with_errors = [m.error_widths for m in members if m.errors]
    names = {c for m in members for c in m.column_widths}
    return Member(
        file, sum(m.rows for m in members), max(m.path_width for m in members),
        {c: max(m.column_widths.get(c, 1) for m in members) for c in names},
        sum(m.errors for m in members),
        (max(w[0] for w in with_errors), max(w[1] for w in with_errors)) if with_errors else None,
    )


def write_view(
    out: Path, spec: CacheSpec, classes: list[str], members: list[Member], errors: list[tuple[str, str]], *,
    complete: bool, ignored: dict | None = None, shards: int | None = None,
    guard: Callable[[Path], AbstractContextManager] | None = None,
) -> int:
    """Replace `out`, atomically, by a cache whose rows are those of `members`, in order. Returns its rows.

    `errors`: the errors table (copied), or None: the members' own errors tables, mapped like the
    rows (every member's errors fixed-width: a run's view is rewritten at each commit, and copying
    every error each time made a run of mostly missing files quadratic). `shards`: the attribute a
    sharded cache's view carries. `guard(tmp)`: a context the write runs in (the writer's disk-full check)."""
    tmp = temp_file(out)
    try:
        with guard(tmp) if guard is not None else nullcontext():
            rows = write_view_file(tmp, spec, classes, members, errors, complete=complete, ignored=ignored,
                                   shards=shards)
            atomic_replace(tmp, out)
    except BaseException:
        discard(tmp)
        raise
    return rows


def write_view_file(
    tmp: Path, spec: CacheSpec, classes: list[str], members: list[Member], errors: list[tuple[str, str]], *,
    complete: bool, ignored: dict | None = None, shards: int | None = None,
) -> int:
    """The view's file at `tmp` (not yet in place)."""
    total = sum(m.rows for m in members)
    # The core driver builds the (small) file in memory and writes it in one go, so a failed
    # write is a plain OSError, not a broken HDF5 handle.
    with h5py.File(tmp, "w", driver="core", backing_store=True) as f:
        if total:
            width = max(m.path_width for m in members)
            widths = {c: max(m.column_widths.get(c, 1) for m in members) for c, k in spec.columns.items() if k == "str"}
            for name, (shape, dtype, fill) in _row_datasets(spec, h5py.string_dtype("utf-8", width), widths).items():
                f.create_virtual_dataset(name, _layout(name, shape, dtype, members, total), fillvalue=fill)
        else:  # nothing to map: empty datasets of the right widths (a view with no member yet)
            for name, (shape, dtype, _) in _row_datasets(spec, STR, {}).items():
                f.create_dataset(name, shape=(0, *shape), dtype=dtype)
        f.create_dataset("classes", data=np.array(list(classes), dtype=object), dtype=STR)
        if errors is None:
            _map_errors(f, members)
        else:
            write_errors(f, errors)
        link_primary(f, spec)
        write_attrs(f, spec, rows=total, complete=complete, ignored=ignored)
        if shards is not None:
            f.attrs["shards"] = shards
    return total


def _row_datasets(spec: CacheSpec, path_dtype, str_widths: dict[str, int]
                  ) -> dict[str, tuple[tuple[int, ...], object, object]]:
    """{dataset: (row shape, dtype, fill value)} of the datasets with one row per cache row.
    Unmapped rows (none in a view of finished members) would read as NaN features, label -1.
    `str_widths`: bytes of each str column (fixed-width, as in the members; variable-length when absent)."""
    dtype = spec.feature_dtype
    return {
        "features": ((spec.feature_dim,), dtype, np.nan),
        **{f"layers/{name}": ((dim,), dtype, np.nan) for name, dim in spec.extra_layers.items()},
        "labels": ((), np.int64, -1),
        "paths": ((), path_dtype, None),
        **{f"{columns.GROUP}/{name}": ((), columns.h5_dtype(kind, str_widths.get(name)), columns.fill_value(name, kind))
           for name, kind in spec.columns.items()},
    }


def _layout(name: str, shape: tuple[int, ...], dtype, members: list[Member], total: int) -> h5py.VirtualLayout:
    layout = h5py.VirtualLayout((total, *shape), dtype=dtype)
    start = 0
    for m in members:
        if m.rows:  # an empty member has no rows to map (and h5py refuses empty selections)
            layout[start : start + m.rows] = h5py.VirtualSource(m.file, name, shape=(m.rows, *shape))
        start += m.rows
    return layout


# ----------------------------------------------------------------------------------------
# What every cache file has: attributes, errors table, the primary layer's link
# ----------------------------------------------------------------------------------------


def write_attrs(f: h5py.File, spec: CacheSpec, rows: int, complete: bool, ignored: dict | None = None) -> None:
    """The cache attributes of schema v1 (see embedder.cache.reader)."""
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["fingerprint"] = spec.fingerprint
    f.attrs["fingerprint_components"] = json.dumps(spec.components, sort_keys=True)
    for key, value in spec.components.items():
        f.attrs[key] = value
    f.attrs["source"] = spec.source
    f.attrs["layout"] = spec.layout
    f.attrs["feature_dim"] = spec.feature_dim
    f.attrs["feature_dtype"] = spec.feature_dtype
    if spec.layers:
        f.attrs["layers"] = json.dumps(spec.layers)  # {name: width}, the primary (/features) first
    if spec.aliases:
        f.attrs["layer_aliases"] = json.dumps(spec.aliases)  # {node: alias}, for display only
    if spec.names:
        f.attrs["layer_names"] = json.dumps(spec.names)  # {name: layer}, what `--layer` resolves with
    f.attrs["committed_rows"] = rows
    f.attrs["complete"] = complete
    f.attrs["command"] = spec.command
    f.attrs["ignored"] = json.dumps(ignored or {})
    if spec.fidelity:
        f.attrs["fidelity"] = spec.fidelity


def write_errors(f: h5py.File, errors: list[tuple[str, str]], fixed_width: bool = False) -> None:
    """/errors/path and /errors/reason; `fixed_width`: as fixed-width strings, which a view can map."""
    g = f.create_group("errors")
    if not fixed_width:
        paths = np.array([encode_path(p) for p, _ in errors], dtype=object)
        g.create_dataset("path", data=paths, dtype=STR, shape=(len(errors),))
        g.create_dataset("reason", data=np.array([r for _, r in errors], dtype=object), dtype=STR,
                         shape=(len(errors),))
        return
    for name, values in (("path", [encode_path(p) for p, _ in errors]),
                         ("reason", [r.encode("utf-8", "backslashreplace") for _, r in errors])):
        dtype = h5py.string_dtype("utf-8", max((len(v) for v in values), default=1) or 1)
        g.create_dataset(name, data=np.array(values, dtype=dtype), dtype=dtype, shape=(len(values),))


def error_widths(f: h5py.File) -> tuple[int, int] | None:
    """The bytes of a file's fixed-width errors table, or None where it is variable-length."""
    ds = f["errors/path"], f["errors/reason"]
    if any(h5py.check_string_dtype(d.dtype) is None or h5py.check_string_dtype(d.dtype).length is None for d in ds):
        return None
    return ds[0].dtype.itemsize, ds[1].dtype.itemsize


def _map_errors(f: h5py.File, members: list[Member]) -> None:
    """/errors as virtual datasets over the members' errors tables, in member order."""
    total = sum(m.errors for m in members)
    if not total:
        write_errors(f, [])
        return
    for i, name in enumerate(("path", "reason")):
        width = max(m.error_widths[i] for m in members if m.errors)
        layout = h5py.VirtualLayout((total,), dtype=h5py.string_dtype("utf-8", width))
        start = 0
        for m in members:
            if m.errors:
                layout[start : start + m.errors] = h5py.VirtualSource(m.file, f"errors/{name}", shape=(m.errors,))
            start += m.errors
        f.create_virtual_dataset(f"errors/{name}", layout)


def link_primary(f: h5py.File, spec: CacheSpec) -> None:
    """/layers/<primary> is a hard link to /features: every layer is in /layers, stored once."""
    if spec.layers:
        f[f"layers/{next(iter(spec.layers))}"] = f["features"]
