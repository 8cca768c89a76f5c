"""`embedder.Index`: a similarity index from an array, from a cache, or opened from its folder.

One class over `embedder.search.query.SearchIndex`, which is either a saved index folder (built by
`embedder.search.build.build_index`) or an exact faiss index over an array in memory
(`SearchIndex.of_array`: the same row table and searcher interfaces, no folder). `Index.search`
takes plain arrays (vectors, or integer row ids) and answers with arrays (`Neighbours`), the way
faiss does, or a `Query`, answered for both kinds by `embedder.search.ask.answer` as for the CLI
and the service.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from embedder.errors import ConfigError
from embedder.extract.images import ImageError, ImageInput, features_of
from embedder.search.ask import Query, answer
from embedder.search.config import METRICS
from embedder.search.filters import as_column
from embedder.search.queries import query_vectors
from embedder.search.query import Hit, SearchIndex


class Neighbours(NamedTuple):
    """The answer of `Index.search`: row i answers query i, column j is its (j+1)-th nearest row.

    Fewer than k hits (a filter that keeps fewer rows, a query image that failed) pad `ids` with
    -1, `scores` with NaN and `paths` with None, as faiss pads with -1.

    Attributes
    ----------
    scores : numpy.ndarray
        float32 ``[n, k]``: cosine similarity (metric cosine, higher is nearer), else squared L2 distance.
    ids : numpy.ndarray
        int64 ``[n, k]``: row ids, i.e. rows of the array or of the cache.
    paths : list of list of str, or None
        The rows' paths (or the names given to `Index.from_array`); None if the index has none.
    """

    scores: np.ndarray  # float32 [n, k]: cosine similarity (metric cosine, higher is nearer), else squared L2
    ids: np.ndarray  # int64 [n, k]: row ids, i.e. rows of the array or of the cache
    paths: list[list[str | None]] | None  # the rows' paths (or the names given to from_array); None if it has none


class Index:
    """A similarity index over feature vectors, searched with plain arrays, row ids or a `Query`.

    Build one with `Index.from_array` (in memory), `Index.build` (a folder, from a feature cache,
    as ``embedder index`` builds it) or `Index.open` (a folder built before).

    Attributes
    ----------
    metric : str
        ``"cosine"`` (scores are cosine similarities, higher is nearer) or ``"l2"`` (squared
        distances, lower is nearer).
    dim : int
        Width of the vectors.
    paths : list of str or None
        Row i's path (an opened or built index: as the cache stores it, relative to its source), or
        the names given to `from_array`; None when there are none.
    meta : dict or None
        An index folder's ``meta.json`` (kind, parameters, recall, the cache's fingerprint); None
        for an array index.

    Examples
    --------
    >>> index = Index.from_array(X, paths=files)
    >>> scores, ids, paths = index.search(X[:3], k=5)   # or index.search([0, 1, 2], k=5): by row id
    >>> index = Index.open("photos.index")
    >>> scores, ids, paths = index.search(index.extract(["query.jpg"]), k=5)   # by image
    """

    def __init__(self, searcher: SearchIndex):
        """Use `from_array`, `build` or `open`."""
        self._searcher = searcher
        self.metric: str = searcher.metric
        self.dim: int = int(searcher.dim)
        self.paths: list[str] | None = list(searcher.paths) if searcher.paths and searcher.rows.named else None
        self.meta: dict | None = None if searcher.in_memory else searcher.meta

    def __len__(self) -> int:
        return int(self._searcher.ntotal)

    def __repr__(self) -> str:
        where = f"{self._searcher.dir}, {self.meta['kind']}" if self.meta else "in memory, flat"
        return f"Index({len(self)} x {self.dim}, {self.metric}, {where})"

    @classmethod
    def from_array(cls, X: np.ndarray, paths: Sequence[str] | None = None, *, metric: str = "cosine",
                   columns: dict[str, Sequence] | None = None) -> Index:
        """An exact index over the rows of an array, in memory (no file is written).

        Parameters
        ----------
        X : numpy.ndarray
            ``[n, D]`` vectors (e.g. `embedder.extract`'s features, or a cache's); every value finite.
        paths : sequence of str, optional
            A name for each row (its image's path), returned with the hits and filterable as ``path``.
        metric : {"cosine", "l2"}
            Cosine similarity (rows are scaled to unit length), or squared Euclidean distance.
        columns : dict of str to sequence, optional
            Per-row metadata that a search's ``where`` filter (or a `Query`'s) can name, besides
            ``id`` and ``path``.

        Returns
        -------
        Index
            Searched with arrays or with a `Query`, as an index folder is (`SearchIndex.of_array`).
        """
        if metric not in METRICS:
            raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}.")
        X = np.asarray(X)
        if X.ndim != 2 or not len(X):
            raise ConfigError(f"X should be an [n, D] array with at least one row, got shape {X.shape}.")
        X = query_vectors(X, X.shape[1], "l2")  # refuses NaN rows (an image that failed) and infinities
        for name, values in {"paths": paths, **(columns or {})}.items():
            if values is not None and len(values) != len(X):
                raise ConfigError(f"{name} has {len(values)} values for the {len(X)} rows of X.")
        names = [str(p) for p in paths] if paths is not None else None
        return cls(SearchIndex.of_array(X, metric, names, {k: as_column(v) for k, v in (columns or {}).items()}))

    @classmethod
    def build(cls, cache: str | os.PathLike, out: str | os.PathLike, *, kind: str = "auto", metric: str = "cosine",
              layer: str | None = None, memory_budget: int | None = None, target_recall: float = 0.95,
              seed: int = 0, on_disk: bool = False, overwrite: bool = False, progress: bool = False) -> Index:
        """Build an index folder from a feature cache, as ``embedder index CACHE --out OUT`` does, and open it.

        Parameters
        ----------
        cache : path
            A feature cache (``.h5``) written by `embed`.
        out : path
            The index folder to write. Rebuilt if it holds an index of the same cache; anything else
            is refused unless ``overwrite``.
        kind, metric, layer, memory_budget, target_recall, seed, on_disk : optional
            As the ``embedder index`` flags of the same names and defaults (``kind="auto"`` picks the
            kind from the cache's size and the memory budget; the search knob is tuned to
            ``target_recall``).
        overwrite : bool
            Replace an ``out`` that holds another cache's index.
        progress : bool
            Show a progress bar on stderr.

        Returns
        -------
        Index
            The built index, opened.
        """
        from embedder.search.build import build_index

        build_index(cache, out, kind=kind, metric=metric, memory_budget=memory_budget, target_recall=target_recall,
                    seed=seed, progress=progress, on_disk=on_disk, layer=layer, overwrite=overwrite)
        return cls.open(out)

    @classmethod
    def open(cls, index_dir: str | os.PathLike, *, weights_path: str | None = None, runtime: str = "auto") -> Index:
        """Open an index folder built by `Index.build` or ``embedder index``.

        Parameters
        ----------
        index_dir : path
            The folder (``index.faiss``, ``rows.h5``, ``meta.json``).
        weights_path, runtime : optional
            For queries by image: the cache's weights file if it was embedded with one, and the
            runtime that embeds the query images (as ``embedder search --weights / --runtime``).

        Returns
        -------
        Index
        """
        return cls(SearchIndex.open(Path(index_dir), weights_path=weights_path, runtime=runtime))

    def search(self, queries: Query | np.ndarray | Sequence[float] | Sequence[int] | int, k: int = 10, *,
               where: str | None = None) -> Neighbours:
        """The k nearest rows of each query.

        Parameters
        ----------
        queries : Query or array-like
            A `Query` (examples as row ids or vectors, negatives, a range, a filter, rows to exclude:
            answered as ``embedder search`` and the service answer it, by any index, `from_array`'s
            too; `k` and `where` are then the Query's own); or float vectors, ``[n, D]`` or one
            ``[D]``; or integer row ids (an int, a list of ints, an integer array), each searched with
            its own indexed vector (the row itself then comes first).
            A row that is all NaN (an image that failed in `embedder.extract` or `extract`) gets no
            hits: its row of the answer is padding.
        k : int
            Neighbours per query (fewer when fewer rows are allowed).
        where : str, optional
            A filter over the rows' columns (``id``, ``path``, an opened index's ``label`` and
            metadata columns, `from_array`'s ``columns``), in ``embedder search --where``'s language.

        Returns
        -------
        Neighbours
            ``(scores, ids, paths)``, each ``[n, min(k, len(index))]``.
        """
        if isinstance(queries, Query):
            return self._answer(queries)
        if k < 1:
            raise ConfigError("k must be at least 1.")
        searcher, width = self._searcher, min(k, len(self))
        ids = _as_row_ids(queries)
        if ids is not None:
            return self._neighbours(searcher.search(searcher.row_vectors(ids), k, where), width)
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            query_vectors(queries, self.dim, self.metric)  # raises: the wrong width
        failed = np.isnan(queries).all(axis=1)
        hits: list[list[Hit]] = [[] for _ in range(len(queries))]  # an image that failed: a row of no hits
        if not failed.all():
            found = iter(searcher.search(query_vectors(queries[~failed], self.dim, self.metric), k, where))
            hits = [[] if bad else next(found) for bad in failed]
        return self._neighbours(hits, width)

    def extract(self, images: Sequence[ImageInput], *, batch_size: int | None = None,
                errors: Literal["raise", "return"] = "raise") -> np.ndarray | tuple[np.ndarray, list[ImageError]]:
        """Features of images in this index's feature space, ready for `search`.

        The backbone is the one the index's cache was embedded with, rebuilt from its fingerprint
        (refused if this installation would compute other features), as ``embedder search --image``
        rebuilds it. Only an opened or built index has one.

        Parameters
        ----------
        images : sequence of path, bytes, PIL.Image.Image, numpy.ndarray or torch.Tensor
            As `embedder.extract` takes them.
        batch_size : int, optional
            Images per forward pass (default: ``--batch-size auto``'s).
        errors : {"raise", "return"}
            As `embedder.extract`: raise at the first image that fails, or return ``(features, errors)``
            with a NaN row for each failed image (`search` answers such a row with no hits).

        Returns
        -------
        features : numpy.ndarray
            float32 ``[len(images), D]``, row i for image i.
        errors : list of ImageError
            Only with ``errors="return"``.
        """
        if self._searcher.in_memory:
            raise ConfigError("An index made from an array has no model: get features with "
                              "embedder.extract(images, model=...) and the settings the array was made with.")
        if errors not in ("raise", "return"):
            raise ConfigError(f"errors must be 'raise' or 'return', got {errors!r}.")
        features, failed = features_of(self._searcher.backbone(), images, batch_size, on_error=errors)
        return (features, failed) if errors == "return" else features

    def vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The indexed vectors of some rows.

        Parameters
        ----------
        ids : sequence of int
            Row ids.

        Returns
        -------
        ndarray of shape (len(ids), dim), float32
            The rows as indexed (unit length under cosine).
        """
        return np.asarray(self._searcher.row_vectors(np.asarray(ids, dtype=np.int64).reshape(-1)), dtype=np.float32)

    def _answer(self, query: Query) -> Neighbours:
        """A Query, through the one place that answers it for the CLI and the service too (an array's
        index as a folder's)."""
        hits = answer(self._searcher, query)
        return self._neighbours(hits, max((len(h) for h in hits), default=0))

    def _neighbours(self, hits: list[list[Hit]], width: int) -> Neighbours:
        scores = np.full((len(hits), width), np.nan, dtype=np.float32)
        ids = np.full((len(hits), width), -1, dtype=np.int64)
        for q, row in enumerate(hits):
            scores[q, :len(row)] = [h.score for h in row]
            ids[q, :len(row)] = [h.id for h in row]
        paths = None if self.paths is None else [[h.path for h in row] + [None] * (width - len(row)) for row in hits]
        return Neighbours(scores, ids, paths)


def _as_row_ids(queries) -> np.ndarray | None:
    """Integer queries as row ids [n]; None for vectors (floats)."""
    if isinstance(queries, (int, np.integer)) and not isinstance(queries, bool):
        return np.asarray([queries], dtype=np.int64)
    array = np.asarray(queries)
    if array.dtype.kind in "iu" and array.ndim <= 1:
        return array.astype(np.int64).reshape(-1)
    return None
