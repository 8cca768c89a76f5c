"""Queries beyond one vector's k nearest: several examples combined (Rocchio), and range search.

    rocchio(positives, negatives, alpha, beta, metric)   one query vector from examples (pure numpy)
    range_search(index, queries, threshold, ...)         every row with cosine >= T (or squared L2 <= T)
    rows_of_paths / rows_of_files                         the indexed rows of examples (their vectors:
                                                          SearchIndex.row_vectors / embed_files / embed_pixels)
    drop_rows(hits, rows, limit)                          results without the examples themselves
    read_query_vectors(path) / query_vectors(...)         vectors given by a user (`search --vector`, the
                                                          service's /search/vector), checked the same way

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
A filter (`where`) and the index's removed rows apply inside faiss, through the IDSelector that
Searcher.selector_params builds for `search`; HNSW with few allowed rows (Searcher.exact_rows)
scores them exactly instead, as `search` does.
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import numpy as np

from embedder.errors import ConfigError
from embedder.search.kinds import prepare
from embedder.search.query import Hit, SearchIndex

LOSSY_KINDS = ("ivfsq", "ivfpq")  # scores from codes, not from the vectors
HNSW_RANGE_MIN_EF = 64  # efSearch of a range search over the graph, at least (`_hnsw_range`)
HNSW_RANGE_MAX_EF = 16384  # and at most: past this the graph walk costs about as much as a full scan
MARGIN_SAMPLE = 200  # rows whose neighbours measure the code error (`score_margin`)
_margins: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
FLOAT32_MAX = float(np.finfo(np.float32).max)


def read_query_vectors(path) -> np.ndarray:
    """The vectors of a .npy given as a query: one [dim] or several [n, dim], real numbers, never
    pickled objects. Finiteness is query_vectors' check."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"--vector {path} is not a readable .npy file of numbers ({exc}).") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu" or array.ndim not in (1, 2):
        shown = f"{array.dtype} values of shape {array.shape}" if isinstance(array, np.ndarray) else "several arrays"
        raise ConfigError(f"--vector {path} holds {shown}: give one vector [dim] or several [n, dim] of real numbers.")
    return np.atleast_2d(array)


def query_vectors(vectors, dim: int, metric: str) -> np.ndarray:
    """Query vectors as float32 [n, dim], or a ConfigError: the wrong width, a value that is not finite
    in float32, or (cosine) an all-zero vector. The CLI's --vector and the service share it."""
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ConfigError(f"The query vector has {vectors.shape[-1]} values; this index holds {dim}-d features.")
    bad = ~(np.abs(vectors) <= FLOAT32_MAX)  # NaN compares false: caught too
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        raise ConfigError(f"Query vector {row} holds {vectors[row, col]} at position {col}: every value must be a "
                          f"finite float32 (|x| <= {FLOAT32_MAX:.4g}).")
    if metric != "cosine":
        return vectors.astype(np.float32)
    scale = np.abs(vectors).max(axis=1, keepdims=True)
    if not scale.all():
        raise ConfigError("an all-zero vector has no direction to compare by cosine")
    # Cosine ignores length; scaling in float64 first keeps 1e-45 and 1e38 alike representable.
    return (vectors / scale).astype(np.float32)


class NoDirectionError(ConfigError):
    """The negative examples cancel the positive ones: the combined query has no direction (the
    request's fault, which the service answers with 422)."""


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
            raise NoDirectionError("The negative examples cancel the positive ones: the combined query has no direction. "
                              "Lower --beta, or give other examples.")
        query = query / norm
    return query.astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------ examples


def rows_of_paths(index: SearchIndex, paths) -> list[int]:
    """The row ids of paths as the cache stored them (relative to SOURCE)."""
    missing = [p for p in paths if not index.has_path(p)]
    if missing:
        raise ConfigError(f"{missing[0]!r} is not in the index (paths are as the cache stored them, relative to "
                          f"{index.source}; `embedder search --json` shows them).")
    return [index.row_of_path(p) for p in paths]


def rows_of_files(index: SearchIndex, files) -> list[int]:
    """The row ids of those files that are indexed (and not removed) images, found by their path under SOURCE."""
    from pathlib import Path

    from embedder.data.rows import rows_root

    source = rows_root(index.source).resolve()
    rows = []
    for f in files:
        p = Path(f).resolve()
        rel = p.relative_to(source).as_posix() if p.is_relative_to(source) else str(p)
        # A removed row is never in the results, so there is nothing to leave out (nor to refuse:
        # a query image is embedded from its file, whatever the index holds).
        found = [index.row_of_path(name, removed=True) for name in (rel, str(f)) if index.has_path(name)][:1]
        rows += [r for r in found if not index.is_removed(r)]
    return rows


def drop_rows(hits: list[Hit], rows, limit: int | None = None) -> list[Hit]:
    """`hits` without the rows `rows`, ranked again from 1, at most `limit`."""
    skip = {int(r) for r in rows}
    kept = [h for h in hits if h.id not in skip][:limit]
    return [replace(h, rank=rank) for rank, h in enumerate(kept, start=1)]  # metadata and all kept


# ---------------------------------------------------------------------------- range search


def range_search(index: SearchIndex, queries: np.ndarray, threshold: float, max_results: int | None = None,
                 where: str | None = None) -> list[list[Hit]]:
    """Per query, every row `where` keeps (every row when None; never a removed one) with cosine
    similarity >= threshold (metric cosine) or squared L2 distance <= threshold (metric l2), best
    first (ties by row id), at most `max_results`."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if queries.shape[1] != index.dim:
        raise ConfigError(f"Query vectors have {queries.shape[1]} dimensions; the index has {index.dim}.")
    if max_results is not None and max_results < 1:
        raise ConfigError("max_results must be at least 1.")
    allowed = index.allowed(where)
    cosine = index.metric == "cosine"
    lossy = index.meta["kind"] in LOSSY_KINDS
    margin = score_margin(index) if lossy else 0.0
    # faiss keeps scores > radius (inner product) or < radius (L2): one float further keeps T itself.
    bound = float(np.finfo(np.float32).max)  # a far-out range (any finite float) means "none" or "all", not inf
    radius = np.float32(min(max(threshold - margin if cosine else threshold + margin, -bound), bound))
    radius = float(np.nextafter(radius, np.float32(-np.inf if cosine else np.inf)))
    q = prepare(queries, index.metric)
    found = _found(index, q, radius, allowed)
    out = []
    for n, (row_ids, row_scores) in enumerate(found):
        if lossy:
            row_scores = exact_scores(index, q[n], row_ids)
            keep = row_scores >= threshold if cosine else row_scores <= threshold
            row_ids, row_scores = row_ids[keep], row_scores[keep]
        order = np.lexsort((row_ids, -row_scores if cosine else row_scores))[:max_results]
        out.append(index.rows.hits(row_scores[order][None], row_ids[order][None])[0])
    return out


def _found(index: SearchIndex, q: np.ndarray, radius: float, allowed: np.ndarray | None):
    """[(ids, scores)] per query within `radius`, among the `allowed` rows (None: all)."""
    if allowed is not None and not allowed.any():
        return [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in q]
    hnsw = index.meta["kind"] == "hnsw"
    if hnsw and allowed is not None and allowed.sum() <= index.searcher.exact_rows:
        return _exact_range(index, q, radius, np.flatnonzero(allowed))
    params = None if allowed is None else index.searcher.selector_params(allowed, 1)
    return _hnsw_range(index, q, radius, params) if hnsw else index.searcher.range(q, radius, params)


def _exact_range(index: SearchIndex, q: np.ndarray, radius: float, rows: np.ndarray):
    """Searcher.range computed exactly over `rows` (HNSW keeps its vectors), scored as faiss scores them."""
    x = index.searcher.vectors(rows)
    cosine = index.metric == "cosine"
    scores = q @ x.T if cosine else (q * q).sum(1)[:, None] - 2 * q @ x.T + (x * x).sum(1)[None]
    keep = scores > radius if cosine else scores < radius
    return [(rows[keep[n]], scores[n][keep[n]].astype(np.float32)) for n in range(len(q))]


def _hnsw_range(index: SearchIndex, q: np.ndarray, radius: float, params=None):
    """Searcher.range over the graph, with efSearch at least twice the rows found: a graph walk finds
    few more rows in range than its width (recall 0.61 at efSearch 16 for 250 rows in range,
    1.0 at 256), so a query that fills half of it is asked again four times wider."""
    from embedder.search.kinds import load_faiss

    faiss = load_faiss()
    found: list = [None] * len(q)
    pending = np.arange(len(q))
    # A filter's parameters come with an efSearch already widened for the allowed fraction.
    ef = max(int(index.meta["params"].get("efSearch", 16)), HNSW_RANGE_MIN_EF, getattr(params, "efSearch", 0))
    while len(pending):
        p = faiss.SearchParametersHNSW()
        p.efSearch = ef
        if params is not None and getattr(params, "sel", None) is not None:
            p.sel = params.sel  # a caller's selector (e.g. a filter) still applies
        for n, hit in zip(pending, index.searcher.range(q[pending], radius, p)):
            found[n] = hit
        last = ef >= HNSW_RANGE_MAX_EF
        pending = np.asarray([n for n in pending if 2 * len(found[n][0]) >= ef and not last], dtype=np.int64)
        ef = min(4 * ef, HNSW_RANGE_MAX_EF)
    return found


def exact_scores(index: SearchIndex, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Scores of one prepared query against rows `ids`, from the cache's exact vectors."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.float32)
    x = prepare(index.cache_vectors(ids), index.metric)  # lossy kinds only: their codes are not exact
    if index.metric == "cosine":
        return (x @ query).astype(np.float32)
    return ((x - query) ** 2).sum(axis=1).astype(np.float32)


def score_margin(index: SearchIndex) -> float:
    """Twice the largest gap between the index's scores and the exact ones, over the 10 neighbours
    of up to MARGIN_SAMPLE of its own rows (measured once per open index)."""
    if index in _margins:
        return _margins[index]
    rows = np.unique(np.linspace(0, index.ntotal - 1, min(MARGIN_SAMPLE, index.ntotal)).astype(np.int64))
    q = prepare(index.cache_vectors(rows), index.metric)
    approx, found = index.searcher.index.search(q, min(10, index.ntotal))
    gaps = [np.abs(approx[n][found[n] >= 0] - exact_scores(index, q[n], found[n][found[n] >= 0])).max(initial=0.0)
            for n in range(len(q))]
    _margins[index] = 2.0 * float(max(gaps, default=0.0)) + 1e-6
    return _margins[index]
