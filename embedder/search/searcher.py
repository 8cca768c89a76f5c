"""The searcher of an index: its faiss index, asked for the k nearest or for a range, inside faiss
under a selector of the allowed rows. Works on prepared vectors and row ids; what a row is
(path, label, metadata) is the row table's business (embedder.search.rows).
"""

from __future__ import annotations

import math

import numpy as np

from embedder.search.kinds import INVERTED_LIST_KINDS, faiss_metric, inner, load_faiss

# HNSW with at most this many allowed rows searches them exactly: cheaper than a graph walk
# that mostly meets excluded nodes, and exact (benchmarks/filters.py).
EXACT_ROWS = 4096
HNSW_FILTERED_EF = 1024  # the widest efSearch a filtered HNSW search widens its tuned one to
EXACT_BLOCK = 65536  # rows reconstructed at a time by the exact fallback of a filtered search


class Searcher:
    """A faiss index of `rows` row ids (removed ones included), of kind `kind` (embedder.search.kinds)."""

    exact_rows = EXACT_ROWS  # HNSW: filters keeping at most this many rows are searched exactly

    def __init__(self, index, kind: str, metric: str, rows: int):
        self.index, self.kind, self.metric, self.rows = index, kind, metric, rows

    @property
    def reconstructs(self) -> bool:
        """Whether the index gives back its rows' vectors exactly (flat, hnsw, ivf keep them)."""
        return self.kind in ("flat", "hnsw", "ivf")

    @property
    def ntotal(self) -> int:
        """Rows in the faiss index itself: fewer than `rows` once removed rows were taken out in place."""
        return int(self.index.ntotal)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The indexed (prepared) vectors of `rows`, which flat, HNSW and IVF keep exactly."""
        return np.ascontiguousarray(self.index.reconstruct_batch(np.asarray(rows, np.int64)), dtype=np.float32)

    def search(self, x: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k nearest of prepared queries `x` among the `allowed` rows (None: every
        row faiss holds); ids -1 past the rows found. k at most the allowed rows."""
        if allowed is None:
            return self.index.search(x, min(k, self.ntotal))
        return self._search_allowed(x, k, allowed)

    def _search_allowed(self, x: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Search inside faiss with a bitmap selector of the allowed rows, keeping the tuned knob.

        HNSW with few allowed rows (EXACT_ROWS) searches them exactly instead. An approximate
        index can still return fewer than k under a selective selector (HNSW's walk and IVF's
        few probed lists meet too few allowed rows). Those queries are searched again
        completely: IVF kinds with every list probed (still inside faiss, same codes and scores),
        HNSW exactly over the allowed rows' own vectors."""
        faiss = load_faiss()
        rows = int(allowed.sum())
        if self.kind == "hnsw" and rows <= self.exact_rows:
            return self.exact_among(x, k, np.flatnonzero(allowed))
        params = self.selector_params(allowed, k)
        scores, ids = self.index.search(x, k, params=params)
        short = np.flatnonzero((ids >= 0).sum(axis=1) < k)
        if len(short):
            if self.kind in INVERTED_LIST_KINDS:
                nlist = faiss.extract_index_ivf(self.index).nlist
                again = self.index.search(x[short], k, params=faiss.SearchParametersIVF(sel=params.sel, nprobe=nlist))
            else:
                again = self.exact_among(x[short], k, np.flatnonzero(allowed))
            scores[short], ids[short] = again
        return scores, ids

    def selector_params(self, allowed: np.ndarray, k: int):
        """Search parameters that let faiss return only the `allowed` rows (a bitmap selector, in
        `sel`), with the index's tuned knob. HNSW's efSearch is divided by the square root of the
        allowed fraction (up to HNSW_FILTERED_EF): a walk that meets mostly excluded nodes needs a
        wider beam to keep its recall among the allowed ones (100k x 128, 10% allowed: recall@10
        0.84 at the tuned efSearch 32, 0.98 at 101, 0.999 at 320 for 1.6x the time)."""
        faiss = load_faiss()
        selector = faiss.IDSelectorBitmap(np.packbits(allowed, bitorder="little"))
        # faiss's wrappers keep the bitmap alive with the selector, and the selector with the parameters.
        return self._params(selector, int(allowed.sum()) / max(self.rows, 1), k)

    def _params(self, selector, fraction: float, k: int):
        """selector_params' parameters for a selector that allows `fraction` of the rows."""
        faiss = load_faiss()
        if self.kind in INVERTED_LIST_KINDS:
            return faiss.SearchParametersIVF(sel=selector, nprobe=faiss.extract_index_ivf(self.index).nprobe)
        if self.kind == "hnsw":
            ef = inner(self.index).hnsw.efSearch
            fraction = max(fraction, 1e-9)
            ef = max(ef, min(HNSW_FILTERED_EF, math.ceil(max(ef / math.sqrt(fraction), 2 * k / fraction))))
            return faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
        return faiss.SearchParameters(sel=selector)

    def exact_among(self, x: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of `x` among `rows` (reconstructed in blocks; flat and HNSW), as faiss scores them."""
        faiss = load_faiss()
        metric, ip = faiss_metric(self.metric), self.metric == "cosine"
        scores, found = [], []
        for s in range(0, len(rows), EXACT_BLOCK):  # faiss.knn per block; the blocks' top-k merged below
            block = rows[s:s + EXACT_BLOCK]
            d, i = faiss.knn(x, self.vectors(block), min(k, len(block)), metric=metric)
            scores.append(d)
            found.append(block[i])
        scores, found = np.hstack(scores), np.hstack(found)
        order = np.argsort(-scores if ip else scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(found, order, 1)

    def range(self, q: np.ndarray, radius: float, params=None) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(ids, scores)] per prepared query within `radius`, as faiss's range search gives them."""
        lims, scores, ids = self.index.range_search(q, radius, **({"params": params} if params is not None else {}))
        return [(ids[lims[n]:lims[n + 1]], scores[lims[n]:lims[n + 1]]) for n in range(len(q))]
