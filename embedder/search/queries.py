"""Queries beyond one vector's k nearest: several examples combined (Rocchio), and range search.

    rocchio(positives, negatives, alpha, beta, metric)   one query vector from examples (pure numpy)
    range_search(index, queries, threshold, ...)         every row with cosine >= T (or squared L2 <= T)
    example_vectors / embed_files / rows_of_files        the vectors and indexed rows of examples
    drop_rows(hits, rows, limit)                          results without the examples themselves

Range search, per index kind (faiss `range_search` answers for all five):
    flat               exact: every row with score >= T, the scores exact
    ivf, hnsw          the rows the index reaches (the lists the tuned nprobe visits; the graph
                       walk, widened until efSearch is at least twice the rows found, `_hnsw_range`),
                       with exact scores: every row returned passes, a few rows that pass are
                       missed (recall >= 0.95 in tests/test_queries.py)
    ivfsq, ivfpq       their codes give approximate scores, so faiss is asked for a wider range
                       (T loosened by twice the largest code error seen on the index's own rows,
                       `score_margin`), and the candidates are re-scored with the cache's exact
                       vectors: every row returned passes, with its exact score. Needs the cache.
"""

from __future__ import annotations

import weakref

import numpy as np

from embedder.cache.reader import FeatureCache
from embedder.errors import ConfigError
from embedder.search.kinds import prepare
from embedder.search.query import Hit, SearchIndex

LOSSY_KINDS = ("ivfsq", "ivfpq")  # scores from codes, not from the vectors
HNSW_RANGE_MIN_EF = 64  # efSearch of a range search over the graph, at least (`_hnsw_range`)
HNSW_RANGE_MAX_EF = 16384  # and at most: past this the graph walk costs about as much as a full scan
MARGIN_SAMPLE = 200  # rows whose neighbours measure the code error (`score_margin`)
_margins: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def rocchio(positives: np.ndarray, negatives: np.ndarray | None = None, alpha: float = 1.0, beta: float = 0.75,
            metric: str = "cosine") -> np.ndarray:
    """One query from examples: alpha * mean(positives) - beta * mean(negatives), shape (D,).

    Under cosine each example is first made unit length, as the index's rows are (`prepare`),
    so every example weighs the same, and the result is unit length. Under l2 the vectors are
    taken as they are and the result is that point."""
    pos = np.atleast_2d(np.asarray(positives, dtype=np.float64))
    if pos.shape[0] == 0:
        raise ConfigError("A combined query needs at least one positive example.")
    neg = np.zeros((0, pos.shape[1])) if negatives is None else np.atleast_2d(np.asarray(negatives, np.float64))
    if neg.shape[0] and neg.shape[1] != pos.shape[1]:
        raise ConfigError(f"Negative examples have {neg.shape[1]} dimensions; the positives have {pos.shape[1]}.")
    if metric == "cosine":
        pos, neg = _unit(pos), _unit(neg)
    query = alpha * pos.mean(axis=0) - (beta * neg.mean(axis=0) if len(neg) else 0.0)
    if metric == "cosine":
        norm = np.linalg.norm(query)
        if norm < 1e-6 * max(alpha, beta, 1.0):
            raise ConfigError("The negative examples cancel the positive ones: the combined query has no direction. "
                              "Lower --beta, or give other examples.")
        query = query / norm
    return query.astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------ examples


def embed_files(index: SearchIndex, files: list[str], batch_size: int = 32):
    """(features of the readable files, those files, [(file, reason)] for the others)."""
    from embedder.extract.core import embed_images

    feats, errors = embed_images(index.backbone(), files, batch_size=batch_size)
    failed = {p for p, _ in errors}
    return feats, [f for f in files if str(f) not in failed], errors


def embed_pixels(index: SearchIndex, images, max_pixels: int | None = None) -> np.ndarray:
    """Features of decoded uint8 RGB tensors [3, H, W] (as `SearchIndex.search_pixels` embeds them)."""
    import torch

    from embedder.data.decode import DEFAULT_MAX_PIXELS
    from embedder.data.transforms import apply_guarded, geometric_transform

    backbone = index.backbone()
    pre = backbone.preprocessing
    transform = geometric_transform(pre)
    batch = torch.stack([apply_guarded(transform, img, pre.resize_size, max_pixels or DEFAULT_MAX_PIXELS)
                         for img in images])
    return backbone(batch).cpu().numpy()


def row_vectors(index: SearchIndex, ids) -> np.ndarray:
    """The indexed vectors of row ids (exact ones from the cache where the index keeps codes)."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < index.ntotal]
    if bad:
        raise ConfigError(f"Row id {bad[0]} is not in the index (ids run from 0 to {index.ntotal - 1}).")
    if not ids:
        return np.zeros((0, index.dim), dtype=np.float32)
    if index._reconstructs:
        return np.stack([index.index.reconstruct(i) for i in ids])
    return _cache_rows(index, ids)


def rows_of_paths(index: SearchIndex, paths) -> list[int]:
    """The row ids of paths as the cache stored them (relative to SOURCE)."""
    missing = [p for p in paths if not index.has_path(p)]
    if missing:
        raise ConfigError(f"{missing[0]!r} is not in the index (paths are as the cache stored them, relative to "
                          f"{index.source}; `embedder search --json` shows them).")
    return [index.row_of_path(p) for p in paths]


def rows_of_files(index: SearchIndex, files) -> list[int]:
    """The row ids of those files that are indexed images (found by their path under SOURCE)."""
    from pathlib import Path

    source = Path(index.source).resolve()
    rows = []
    for f in files:
        p = Path(f).resolve()
        rel = p.relative_to(source).as_posix() if p.is_relative_to(source) else str(p)
        if index.has_path(rel):
            rows.append(index.row_of_path(rel))
        elif index.has_path(str(f)):
            rows.append(index.row_of_path(str(f)))
    return rows


def drop_rows(hits: list[Hit], rows, limit: int | None = None) -> list[Hit]:
    """`hits` without the rows `rows`, ranked again from 1, at most `limit`."""
    skip = {int(r) for r in rows}
    kept = [h for h in hits if h.id not in skip][:limit]
    return [Hit(rank, h.id, h.path, h.label, h.score) for rank, h in enumerate(kept, start=1)]


# ---------------------------------------------------------------------------- range search


def range_search(index: SearchIndex, queries: np.ndarray, threshold: float, max_results: int | None = None,
                 params=None) -> list[list[Hit]]:
    """Per query, every row with cosine similarity >= threshold (metric cosine) or squared L2
    distance <= threshold (metric l2), best first (ties by row id), at most `max_results`.

    `params`: faiss SearchParameters passed through (e.g. an IDSelector)."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if queries.shape[1] != index.dim:
        raise ConfigError(f"Query vectors have {queries.shape[1]} dimensions; the index has {index.dim}.")
    if max_results is not None and max_results < 1:
        raise ConfigError("max_results must be at least 1.")
    cosine = index.metric == "cosine"
    lossy = index.meta["kind"] in LOSSY_KINDS
    margin = score_margin(index) if lossy else 0.0
    # faiss keeps scores > radius (inner product) or < radius (L2): one float further keeps T itself.
    radius = np.float32(threshold - margin if cosine else threshold + margin)
    radius = float(np.nextafter(radius, np.float32(-np.inf if cosine else np.inf)))
    q = prepare(queries, index.metric)
    found = _hnsw_range(index, q, radius, params) if index.meta["kind"] == "hnsw" else _range(index, q, radius, params)
    out = []
    for n, (row_ids, row_scores) in enumerate(found):
        if lossy:
            row_scores = exact_scores(index, q[n], row_ids)
            keep = row_scores >= threshold if cosine else row_scores <= threshold
            row_ids, row_scores = row_ids[keep], row_scores[keep]
        order = np.lexsort((row_ids, -row_scores if cosine else row_scores))[:max_results]
        out.append(index._hits(row_scores[order][None], row_ids[order][None])[0])
    return out


def _range(index: SearchIndex, q: np.ndarray, radius: float, params=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(ids, scores)] per query, as faiss's range search gives them."""
    lims, scores, ids = index.index.range_search(q, radius, **({"params": params} if params is not None else {}))
    return [(ids[lims[n]:lims[n + 1]], scores[lims[n]:lims[n + 1]]) for n in range(len(q))]


def _hnsw_range(index: SearchIndex, q: np.ndarray, radius: float, params=None):
    """_range over the graph, with efSearch at least twice the rows found: a graph walk finds
    few more rows in range than its width (recall 0.61 at efSearch 16 for 250 rows in range,
    1.0 at 256), so a query that fills half of it is asked again four times wider."""
    from embedder.search.kinds import load_faiss

    faiss = load_faiss()
    found: list = [None] * len(q)
    pending = np.arange(len(q))
    ef = max(int(index.meta["params"].get("efSearch", 16)), HNSW_RANGE_MIN_EF)
    while len(pending):
        p = faiss.SearchParametersHNSW()
        p.efSearch = ef
        if params is not None and getattr(params, "sel", None) is not None:
            p.sel = params.sel  # a caller's selector (e.g. a filter) still applies
        for n, hit in zip(pending, _range(index, q[pending], radius, p)):
            found[n] = hit
        last = ef >= HNSW_RANGE_MAX_EF
        pending = np.asarray([n for n in pending if 2 * len(found[n][0]) >= ef and not last], dtype=np.int64)
        ef = min(4 * ef, HNSW_RANGE_MAX_EF)
    return found


def exact_scores(index: SearchIndex, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Scores of one prepared query against rows `ids`, from the cache's exact vectors."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.float32)
    x = prepare(row_vectors(index, ids), index.metric)
    if index.metric == "cosine":
        return (x @ query).astype(np.float32)
    return ((x - query) ** 2).sum(axis=1).astype(np.float32)


def score_margin(index: SearchIndex) -> float:
    """Twice the largest gap between the index's scores and the exact ones, over the 10 neighbours
    of up to MARGIN_SAMPLE of its own rows (measured once per open index)."""
    if index in _margins:
        return _margins[index]
    rows = np.unique(np.linspace(0, index.ntotal - 1, min(MARGIN_SAMPLE, index.ntotal)).astype(np.int64))
    q = prepare(_cache_rows(index, rows), index.metric)
    approx, found = index.index.search(q, min(10, index.ntotal))
    gaps = [np.abs(approx[n][found[n] >= 0] - exact_scores(index, q[n], found[n][found[n] >= 0])).max(initial=0.0)
            for n in range(len(q))]
    _margins[index] = 2.0 * float(max(gaps, default=0.0)) + 1e-6
    return _margins[index]


def _cache_rows(index: SearchIndex, ids) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    order = np.unique(ids)  # h5py reads increasing rows
    with _cache(index) as cache:
        found = cache.features(order)
    return np.asarray(found[np.searchsorted(order, ids)], dtype=np.float32)


def _cache(index: SearchIndex) -> FeatureCache:
    from pathlib import Path

    path = index.meta.get("cache")
    if not path or not Path(path).is_file():
        raise ConfigError(f"This {index.meta['kind']} index keeps compressed codes, so this query reads exact vectors "
                          f"from its cache, which is not at {path}. Put the cache back there, or rebuild the index "
                          "with --kind flat, ivf or hnsw.")
    return FeatureCache(path, layer=index.meta.get("layer"))
