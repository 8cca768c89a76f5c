"""One query value, answered in one place. The CLI turns its flags into a Query, the service its
request; `answer` does the rest (Rocchio, k nearest or range, the filter, leaving the examples
out), and each front end only formats the hits.

    Example.of_id(row) / Example.of_vector(v, row=None)   one example: an indexed row, or a vector
                                                          (an embedded image, a given vector)
    Query(positives, negatives=(), k=K, threshold=None, where=None, combine=False, alpha=ALPHA,
          beta=BETA, exclude_examples=False, exclude=())
    answer(index, query) -> [[Hit]]                       one list of hits per query vector: one per
                                                          positive, or one when the examples combine

The defaults are declared here once: `embedder search`'s options and the service take them from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from embedder.errors import ConfigError

if TYPE_CHECKING:  # the options of `embedder search` read the defaults below without loading faiss and h5py
    from embedder.search.filters import Filter
    from embedder.search.query import Hit, SearchIndex

K = 10  # neighbours per query
ALPHA = 1.0  # weight of the positives' mean in a combined query (Rocchio)
BETA = 0.75  # weight of the negatives' mean subtracted from it


@dataclass(frozen=True)
class Example:
    """One example: an indexed row (`id`, its vector read from the index), or a `vector` [D]."""

    id: int | None = None
    vector: np.ndarray | None = field(default=None, compare=False)
    row: int | None = None  # the indexed row the example is, left out of the hits by exclude_examples

    @classmethod
    def of_id(cls, row_id: int) -> Example:
        return cls(id=int(row_id), row=int(row_id))

    @classmethod
    def of_vector(cls, vector, row: int | None = None) -> Example:
        """A vector (an embedded image: `row` is its file's indexed row, when it has one)."""
        return cls(vector=np.asarray(vector, dtype=np.float32).reshape(-1), row=None if row is None else int(row))


@dataclass(frozen=True)
class Query:
    """What to search for, and how: the one value that the CLI, the service and `Index.search` answer.

    Parameters
    ----------
    positives : tuple of Example
        The examples searched for: each its own query, or one combined query (`combined`).
    negatives : tuple of Example
        Examples the combined query moves away from (Rocchio); any negative combines.
    k : int or None
        Neighbours per query; with a threshold, the most rows per range (None: all of them).
    threshold : float, optional
        Range search: every row with cosine >= T (metric cosine) or squared L2 <= T (l2).
    where : Filter or str, optional
        A filter over the index's columns (text is parsed once, by `answer`).
    combine : bool
        One query from all the positives: ``alpha * mean(positives) - beta * mean(negatives)``.
    alpha, beta : float
        Rocchio's weights (alpha > 0, beta >= 0).
    exclude_examples : bool
        Leave the examples' own indexed rows out of the hits (each query its own example's; a combined
        query all of them).
    exclude : tuple of int
        More rows left out of every query's hits.
    """

    positives: tuple[Example, ...]
    negatives: tuple[Example, ...] = ()
    k: int | None = K
    threshold: float | None = None
    where: Filter | str | None = None
    combine: bool = False
    alpha: float = ALPHA
    beta: float = BETA
    exclude_examples: bool = False
    exclude: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "positives", tuple(self.positives))
        object.__setattr__(self, "negatives", tuple(self.negatives))
        object.__setattr__(self, "exclude", tuple(int(r) for r in self.exclude))
        if self.k is None and self.threshold is None:
            raise ConfigError("k may be left out (every row in range) only for a range search: give a threshold.")
        if self.k is not None and self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}.")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ConfigError(f"The range's bound must be a finite number, got {self.threshold}.")
        if not (self.alpha > 0 and self.beta >= 0):
            raise ConfigError(f"alpha must be > 0 and beta >= 0, got {self.alpha} and {self.beta}.")

    @property
    def combined(self) -> bool:
        """One query from all the examples: asked for, or implied by a negative."""
        return self.combine or bool(self.negatives)


def answer(index: SearchIndex, query: Query) -> list[list[Hit]]:
    """The hits of `query`, with their metadata: one list per positive, or one list when combined.

    Errors: ConfigError for a bad example (an id out of range, vectors of the wrong width, negatives
    that cancel the positives), RemovedRowError for a removed example row, FilterError for a bad filter."""
    from embedder.search.queries import drop_rows, range_search, rocchio

    where = index.parse_filter(query.where)
    vectors = _vectors(index, query.positives)
    skip = [[] if e.row is None else [e.row] for e in query.positives]
    if query.combined:
        if not len(vectors):
            raise ConfigError("A combined query needs at least one positive example.")
        negatives = _vectors(index, query.negatives)
        vectors = rocchio(vectors, negatives, query.alpha, query.beta, index.metric)[None]
        skip = [[e.row for e in (*query.positives, *query.negatives) if e.row is not None]]
    if not len(vectors):
        return []
    skip = [[*(rows if query.exclude_examples else []), *query.exclude] for rows in skip]
    extra = max(map(len, skip))  # asked for beyond k, as the examples may take places
    if query.threshold is not None:
        cap = None if query.k is None else query.k + extra
        found = range_search(index, vectors, query.threshold, cap, where=where)
    else:
        found = index.search(vectors, query.k + extra, where)
    return [drop_rows(hits, rows, query.k) for hits, rows in zip(found, skip)]


def _vectors(index: SearchIndex, examples: tuple[Example, ...]) -> np.ndarray:
    """The examples' vectors, in order: indexed rows read from the index (their errors first), vectors as given."""
    ids = [e.id for e in examples if e.id is not None]
    stored = iter(index.row_vectors(ids)) if ids else iter(())
    given = [e.vector for e in examples if e.id is None]
    if any(v is None for v in given):
        raise ConfigError("An example needs a row id or a vector.")
    rows = [next(stored) if e.id is not None else e.vector for e in examples]
    return np.stack(rows).astype(np.float32) if rows else np.zeros((0, index.dim), dtype=np.float32)
