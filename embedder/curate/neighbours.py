"""Scores from the nearest neighbours of each row: outliers, uniqueness, leaks, representatives.

Similarity is cosine on L2-normalised features throughout, and distance is 1 - similarity
(in [0, 2]).
    outlier_score   the distance to the k-th nearest other row (`-k`, default 10): a row far
                    from even its k-th neighbour sits where the data is thin
    uniqueness      0.6 d1 + 0.3 d2 + 0.1 d3 over the distances to the 3 nearest other rows
                    (FiftyOne Brain's weighting), divided by its maximum over the dataset: in
                    [0, 1], 1 for the most unique row, near 0 for a row with near copies
    representative  per class, k-means (`--representatives` centres) on the class's rows;
                    the row nearest each centre is representative number 1, 2, ... in order of
                    the clusters' sizes (largest first)
    leak_of         for a val/test row, the train row most similar to it, when the similarity
                    reaches `--leak-threshold`
Neighbours come from an exact faiss index up to EXACT_ROWS rows and an HNSW graph above, or
from an existing cosine index of the cache (`--index`), searched in blocks.
"""

from __future__ import annotations

import numpy as np

from embedder.errors import ConfigError
from embedder.search.dedup import EXACT_ROWS
from embedder.search.kinds import factory_string, load_faiss, new_index

UNIQUENESS_WEIGHTS = (0.6, 0.3, 0.1)
BLOCK_ROWS = 8192


def _index_of(X: np.ndarray):
    """A cosine index over unit rows X: exact when few, HNSW when many."""
    faiss = load_faiss()
    if len(X) <= EXACT_ROWS:
        index = faiss.IndexFlatIP(X.shape[1])
        index.add(X)
        return index
    index = new_index(factory_string("hnsw"), X.shape[1], "cosine")
    index.add_with_ids(X, np.arange(len(X), dtype=np.int64))
    faiss.downcast_index(faiss.downcast_index(index).index).hnsw.efSearch = 128
    return index


def neighbours(X: np.ndarray, k: int, search=None) -> tuple[np.ndarray, np.ndarray]:
    """(similarities [n, k], ids [n, k]) of each unit row's k nearest other rows, best first.
    `search(block, k)` -> (sims, ids) replaces the index built here (an INDEX_DIR's)."""
    if len(X) < 2:
        raise ConfigError("Neighbour scores need at least 2 rows.")
    k = min(k, len(X) - 1)
    if search is None:
        index = _index_of(X)

        def search(block, kk):
            return index.search(block, kk)

    sims, ids = np.zeros((len(X), k), np.float32), np.zeros((len(X), k), np.int64)
    for start in range(0, len(X), BLOCK_ROWS):
        block = X[start : start + BLOCK_ROWS]
        s, i = search(block, k + 1)
        own = np.arange(start, start + len(block))[:, None]
        # Drop the row itself; where an exact copy outranked it, drop the last hit instead.
        drop = np.where((i == own).any(axis=1), (i == own).argmax(axis=1), k)
        keep = np.ones_like(i, dtype=bool)
        keep[np.arange(len(block)), drop] = False
        sims[start : start + len(block)] = s[keep].reshape(len(block), k)
        ids[start : start + len(block)] = i[keep].reshape(len(block), k)
    return sims, ids


def outlier_scores(sims: np.ndarray, k: int) -> np.ndarray:
    return 1.0 - sims[:, min(k, sims.shape[1]) - 1].astype(np.float64)


def uniqueness(sims: np.ndarray) -> np.ndarray:
    w = np.array(UNIQUENESS_WEIGHTS[: sims.shape[1]])
    score = (1.0 - sims[:, : len(w)].astype(np.float64)) @ (w / w.sum())
    top = score.max()
    return score / top if top > 0 else np.zeros_like(score)


def representatives(X: np.ndarray, labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Rank (1 = most representative) of each class's representative rows, 0 elsewhere."""
    from sklearn.cluster import KMeans

    rank = np.zeros(len(X), dtype=np.int64)
    for c in np.unique(labels[labels >= 0]):
        rows = np.flatnonzero(labels == c)
        m = min(per_class, len(rows))
        km = KMeans(n_clusters=m, n_init=3, random_state=seed).fit(X[rows])
        sizes = np.bincount(km.labels_, minlength=m)
        taken: set[int] = set()
        for r, centre in enumerate(np.argsort(-sizes, kind="stable"), start=1):
            order = np.argsort(-(X[rows] @ km.cluster_centers_[centre]), kind="stable")
            best = next(int(rows[j]) for j in order if int(rows[j]) not in taken)
            taken.add(best)
            rank[best] = r
    return rank


def leaks(X: np.ndarray, split: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(train row most similar to each row, its similarity): -1 and NaN for train rows; the
    caller keeps those at or over `threshold`."""
    train = np.flatnonzero(split == "train")
    others = np.flatnonzero(split != "train")
    nearest, sim = np.full(len(X), -1, np.int64), np.full(len(X), np.nan)
    if len(train) == 0 or len(others) == 0:
        return nearest, sim
    index = _index_of(np.ascontiguousarray(X[train]))
    for start in range(0, len(others), BLOCK_ROWS):
        rows = others[start : start + BLOCK_ROWS]
        s, i = index.search(np.ascontiguousarray(X[rows]), 1)
        nearest[rows] = train[i[:, 0]]
        sim[rows] = s[:, 0]
    return nearest, sim
