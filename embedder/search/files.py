"""The files of a saved index folder: meta.json (how it was built), index.faiss (the searcher),
rows.h5 (the row table), and the feature cache it was built from (exact vectors for lossy kinds).

    IndexFiles(index_dir)       meta.json read and checked; .open() -> (RowTable, Searcher); .cache_vectors(ids)
    ArrayParts(X, metric, ...)  the same for an array in memory (embedder.Index.from_array): an exact flat
                                index and its row table, no folder, no cache
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from embedder.cache.reader import FeatureCache
from embedder.errors import ConfigError
from embedder.outputs import INDEX, expect
from embedder.search.kinds import factory_string, load_faiss, new_index, prepare, set_knob
from embedder.search.rows import ArrayRows, RowTable
from embedder.search.searcher import Searcher


@contextmanager
def _c_stdout_to_stderr():
    """Send what C code prints on stdout to stderr: faiss announces on-disk lists with a printf,
    which would land in front of `search --json` output."""
    import ctypes

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)  # C's own stdout buffer, before fd 1 points back
        os.dup2(saved, 1)
        os.close(saved)


class IndexFiles:
    """An index folder, its meta.json read (ConfigError when it is not a complete index)."""

    def __init__(self, index_dir):
        self.dir = Path(index_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            expect(self.dir, INDEX)  # names what is there instead (a feature cache, nothing)
            raise ConfigError(f"{self.dir} has no meta.json: not a complete index. Rebuild it with `embedder index`.")
        self.meta = json.loads(meta_path.read_text())

    def open(self) -> tuple[RowTable, Searcher]:
        """(the row table of rows.h5, the searcher of index.faiss opened with its tuned knob)."""
        faiss = load_faiss()
        # On-disk lists are found next to index.faiss, wherever the folder has moved since.
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if self.meta.get("on_disk") else 0
        with _c_stdout_to_stderr():
            index = faiss.read_index(str(self.dir / "index.faiss"), flags)
        knob = next((k for k in ("nprobe", "efSearch") if k in self.meta["params"]), None)
        if knob:
            set_knob(index, knob, self.meta["params"][knob])
        rows = RowTable.read(self.dir / "rows.h5", str(self.dir))
        if self.meta["kind"] == "ivf":
            ivf = faiss.extract_index_ivf(index)
            # Removed rows leave gaps in the ids, which an array direct map cannot hold.
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable if len(rows.removed) else faiss.DirectMap.Array)
        return rows, Searcher(index, self.meta["kind"], self.meta["metric"], len(rows))

    def cache_vectors(self, ids) -> np.ndarray:
        """The cache's exact vectors of rows `ids` (any order, repeats allowed)."""
        ids = np.asarray(ids, dtype=np.int64)
        order = np.unique(ids)  # h5py reads increasing rows
        path = self.meta.get("cache")
        if not path or not Path(path).is_file():
            raise ConfigError(f"This {self.meta['kind']} index keeps compressed codes, so this query reads exact "
                              f"vectors from its cache, which is not at {path}. Put the cache back there, or rebuild "
                              "the index with --kind flat, ivf or hnsw.")
        with FeatureCache(path, layer=self.meta.get("layer"), live=False) as cache:  # ids are stored rows
            found = cache.features(order)
        return np.asarray(found[np.searchsorted(order, ids)], dtype=np.float32)


class ArrayParts:
    """The in-memory counterpart of IndexFiles: an exact (flat) index over an array's rows and their
    row table, so that a `SearchIndex` over them answers what an index folder answers (the same
    search, filters, range search and `embedder.search.ask.answer`).

    Parameters
    ----------
    vectors : numpy.ndarray
        ``[n, D]`` finite float32 vectors (`embedder.Index.from_array` checks them).
    metric : {"cosine", "l2"}
    names : list of str or None
        A name per row.
    columns : dict of str to numpy.ndarray
        Per-row columns a filter can name (`ArrayRows`).
    """

    dir = None  # no folder

    def __init__(self, vectors: np.ndarray, metric: str, names: list[str] | None, columns: dict[str, np.ndarray]):
        n, dim = vectors.shape
        self.meta = {"kind": "flat", "metric": metric, "dim": int(dim), "params": {}}
        index = new_index(factory_string("flat"), dim, metric)
        index.add(prepare(vectors, metric))
        self._parts = ArrayRows(n, names, columns), Searcher(index, "flat", metric, n)

    def open(self) -> tuple[RowTable, Searcher]:
        """(the row table, the searcher of the flat index), as IndexFiles.open gives them."""
        return self._parts

    def cache_vectors(self, ids) -> np.ndarray:
        """Never needed: a flat index gives its rows' vectors back exactly (`SearchIndex.row_vectors`)."""
        raise ConfigError("An index made from an array has no cache: its vectors are the index's own.")
