"""`embedder compact CACHE.h5`: rewrite a synced cache with its live rows only, in one atomic step.

The live rows are written sorted by path (Python's string order of the stored paths), which is
the order in which `embed` lists a folder: so a compacted cache of a folder equals, dataset by
dataset and bit for bit, a fresh `embed` of that folder as it is now (features, labels, paths,
classes, columns, errors; the errors sorted by path too). For a file list, a table or tar
shards, whose listings keep their own order, it equals a fresh embed of the same files listed
in path order.

The new file is written beside the cache under a temporary name and replaces it with one
rename (embedder.atomic), under the cache's write lock: a kill leaves the old cache or the
compacted one. Row numbers change, so an index of the cache must be rebuilt afterwards (its
`index --update` says so); the compacted file's `generation` is one more than the old one's.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from embedder.atomic import WriteLock, atomic_replace, discard, remove_leftovers, temp_file
from embedder.cache.columns import write_columns
from embedder.cache.reader import PARTIAL_SUFFIX, STR, FeatureCache
from embedder.cache.rowstate import dead_counts
from embedder.cache.view import link_primary, write_attrs, write_errors
from embedder.cache.writer import create_paths, create_rows
from embedder.errors import CacheError
from embedder.outputs import CACHE, expect

BLOCK_ROWS = 65536


def compact_cache(path) -> dict:
    """Rewrite `path` without its superseded and removed rows. Returns {rows, dropped, generation, status}."""
    path = Path(path).absolute()
    expect(path, CACHE)
    with WriteLock(path):
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        if partial.exists():
            raise CacheError(f"{path} has an interrupted run's parts in {partial}: finish it first (rerun its embed "
                             "command), then compact.")
        remove_leftovers(path)
        with FeatureCache(path, require_complete=True, live=False) as stored:
            dead = dead_counts(stored.row_state)
            dropped = dead["superseded"] + dead["removed"]
            generation = stored.generation
            if not dropped:
                return {"cache": str(path), "status": "compact", "rows": len(stored), "dropped": 0,
                        "generation": generation}
        tmp = temp_file(path)
        try:
            with FeatureCache(path, require_complete=True) as live:
                rows = _write_compacted(live, tmp, generation + 1)
            atomic_replace(tmp, path)
        except BaseException:
            discard(tmp)
            raise
    return {"cache": str(path), "status": "compacted", "rows": rows, "dropped": dropped, "generation": generation + 1}


def _write_compacted(live: FeatureCache, tmp: Path, generation: int) -> int:
    """The live rows of `live`, sorted by path, as one finished cache at `tmp`. Returns its rows."""
    spec = live.spec
    paths = live.paths
    order = np.array(sorted(range(len(paths)), key=paths.__getitem__), dtype=np.int64)
    with h5py.File(tmp, "w") as f:
        rows = create_rows(f, spec, len(order))
        labels = live.labels
        for begin in range(0, len(order), BLOCK_ROWS):
            block = order[begin : begin + BLOCK_ROWS]
            sorted_block = np.sort(block)  # h5py reads increasing rows
            back = np.searchsorted(sorted_block, block)
            for name, ds in rows.items():
                if name == "labels":
                    ds[begin : begin + len(block)] = labels[block]
                else:
                    layer = live.primary_layer if name == "features" else name.removeprefix("layers/")
                    ds[begin : begin + len(block)] = live.layer_rows(layer, sorted_block)[back]
        create_paths(f, [paths[i] for i in order], fixed_width=h5py.check_string_dtype(live.h5file["paths"].dtype).length
                     is not None)
        if spec.columns:
            values = live.columns(list(spec.columns))
            write_columns(f, spec.columns, {n: v[order] for n, v in values.items()}, resizable=True)
        f.create_dataset("classes", data=np.array(live.classes, dtype=object), dtype=STR, track_times=False)
        write_errors(f, sorted(live.errors))
        link_primary(f, spec)
        write_attrs(f, spec, rows=len(order), complete=True, ignored=live.ignored_counts)
        f.attrs["generation"] = generation
    return len(order)
