"""Querying a saved index: by vector, by cached row id, or by image through the cache's own backbone.

SearchIndex is the facade over an index folder's three parts, each in its own module:
    IndexFiles  (embedder.search.files)     meta.json, opening index.faiss and rows.h5, the cache's vectors
                                            (ArrayParts: the same for an array in memory, `SearchIndex.of_array`)
    RowTable    (embedder.search.rows)      what each row id is: path, label, metadata; removed rows; filters
    Searcher    (embedder.search.searcher)  the faiss index: k nearest and range, under a selector
A query of examples, range, filter and exclusions is a Query (embedder.search.ask), answered there.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import numpy as np

from embedder.data.rows import row_location
from embedder.errors import CacheMismatchError, ConfigError
from embedder.search.files import ArrayParts, IndexFiles
from embedder.search.filters import Filter
from embedder.search.kinds import prepare
from embedder.search.rows import MASKS_KEPT, Hit, RowTable  # noqa: F401 - Hit and MASKS_KEPT: their old home
from embedder.search.searcher import EXACT_BLOCK, EXACT_ROWS, HNSW_FILTERED_EF, Searcher  # noqa: F401


class SearchIndex:
    """A saved index, ready to answer queries by vector, by cached row id, or by image."""

    def __init__(self, index_dir, weights_path: str | None = None, runtime: str = "auto"):
        """An index folder, opened; or `ArrayParts` (an array's rows in memory: `of_array`)."""
        self.files: IndexFiles | ArrayParts = index_dir if isinstance(index_dir, ArrayParts) else IndexFiles(index_dir)
        self.rows: RowTable
        self.searcher: Searcher
        self.rows, self.searcher = self.files.open()
        self.weights_path = weights_path
        self.runtime = runtime
        self._backbone = None
        self._backbone_lock = threading.Lock()

    @classmethod
    def open(cls, index_dir, weights_path: str | None = None, runtime: str = "auto") -> SearchIndex:
        return cls(index_dir, weights_path, runtime)

    @classmethod
    def of_array(cls, vectors: np.ndarray, metric: str, names: list[str] | None = None,
                 columns: dict[str, np.ndarray] | None = None) -> SearchIndex:
        """An exact index over the rows of an array, in memory, answering what a folder's index answers.

        Parameters
        ----------
        vectors : numpy.ndarray
            ``[n, D]`` finite float32 vectors.
        metric : {"cosine", "l2"}
        names : list of str, optional
            A name per row (its ``path``).
        columns : dict of str to numpy.ndarray, optional
            Per-row columns a filter can name (as `embedder.search.filters.as_column` gives them).

        Returns
        -------
        SearchIndex
            With no folder (`dir` None) and no model: queries by image need an index folder.
        """
        return cls(ArrayParts(vectors, metric, names, columns or {}))

    @property
    def in_memory(self) -> bool:
        """Whether the index is an array's, held in memory (`of_array`), rather than a folder's."""
        return isinstance(self.files, ArrayParts)

    # -- what it is: the parts' attributes, under their old names ----------------------------
    dir = property(lambda self: self.files.dir)
    meta = property(lambda self: self.files.meta)
    index = property(lambda self: self.searcher.index, doc="the faiss index")
    metric = property(lambda self: self.searcher.metric)
    paths = property(lambda self: self.rows.paths)
    labels = property(lambda self: self.rows.labels)
    classes = property(lambda self: self.rows.classes)
    removed = property(lambda self: self.rows.removed)
    columns = property(lambda self: self.rows.columns)

    @property
    def exact_rows(self) -> int:
        """HNSW: filters keeping at most this many rows are searched exactly (the searcher's)."""
        return self.searcher.exact_rows

    @exact_rows.setter
    def exact_rows(self, value: int) -> None:
        self.searcher.exact_rows = value

    @property
    def ntotal(self) -> int:
        """Rows of the index, removed ones included: row ids run from 0 to ntotal - 1."""
        return len(self.rows)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def source(self) -> str:
        return str(self.meta["source"])

    def image_path(self, row_id: int) -> str:
        """Where the row's image lies: a file, `<shard>.tar/<member>` or a URL (embedder.data.rows)."""
        return row_location(self.source, self.paths[row_id])

    def has_path(self, path: str) -> bool:
        return self.rows.has_path(path)

    def row_of_path(self, path: str, removed: bool = False) -> int:
        """The row id of a path as the cache stored it; RemovedRowError for a removed row unless `removed`."""
        if not self.rows.has_path(path):
            raise KeyError(f"{path!r} is not in the index (paths are relative to {self.source}).")
        return self.rows.row_of_path(path, removed)

    def is_removed(self, row_id: int) -> bool:
        return self.rows.is_removed(row_id)

    # -- filters -------------------------------------------------------------------------------
    def filter_columns(self) -> dict[str, np.ndarray]:
        """What a filter can name: id, path, label ("" when unlabelled), then rows.h5's /columns."""
        return self.rows.filter_columns()

    def parse_filter(self, where: str | Filter | None) -> Filter | None:
        """A filter parsed against this index's columns, its mask computed and remembered (FilterError
        for a bad one); None for no filter or an empty one."""
        if isinstance(where, str) and not where.strip():
            return None
        where = self.rows.parse_filter(where)
        self.allowed(where)
        return where

    def allowed(self, where: str | Filter | None = None) -> np.ndarray | None:
        """Mask of the rows a search may return (kept by `where`, not removed); None when every row
        the faiss index holds may be returned, so no selector is needed. FilterError for a bad filter."""
        return self.rows.allowed(where, hide_removed=self.removed_in_faiss)

    @property
    def removed_in_faiss(self) -> bool:
        """Whether removed rows are still in the faiss index (hidden by the selector) or removed in place."""
        return bool(len(self.removed)) and self.searcher.ntotal == self.ntotal

    def row_metadata(self, row_id: int) -> dict:
        """{column: value} of one row, as JSON values: a null (NaN, INT_NULL; embedder.data.metadata) is None."""
        return self.rows.metadata(row_id)

    def search(self, queries: np.ndarray, k: int = 10, where: str | Filter | None = None) -> list[list[Hit]]:
        """The k nearest rows of each query among those `where` keeps (every row when None), never a
        removed one; fewer than k only when fewer rows are allowed."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise ConfigError(f"Query vectors have {queries.shape[1]} dimensions; the index has {self.dim}.")
        if k < 1:
            raise ConfigError("k must be at least 1.")
        allowed = self.allowed(where)
        if allowed is not None:
            k = min(k, int(allowed.sum()))
            if k == 0:
                return [[] for _ in range(len(queries))]
        return self.rows.hits(*self.searcher.search(prepare(queries, self.metric), k, allowed))

    def selector_params(self, allowed: np.ndarray, k: int):
        """The searcher's faiss parameters that return only the `allowed` rows (Searcher.selector_params)."""
        return self.searcher.selector_params(allowed, k)

    def check_ids(self, ids) -> list[int]:
        """`ids` as ints; ConfigError for an id out of range, RemovedRowError for a removed row."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.ntotal]
        if bad:
            raise ConfigError(f"Row id {bad[0]} is not in the index (ids run from 0 to {self.ntotal - 1}).")
        self.rows.check_not_removed(ids)
        return ids

    def row_vectors(self, ids) -> np.ndarray:
        """The indexed vectors of row ids, shape (n, D) (exact ones from the cache where the index
        keeps lossy codes). ConfigError for an id out of range, RemovedRowError for a removed row."""
        ids = self.check_ids(ids)
        if not ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.searcher.reconstructs:
            return np.stack([self.index.reconstruct(i) for i in ids])
        return self.cache_vectors(ids)

    def cache_vectors(self, ids) -> np.ndarray:
        """The cache's exact vectors of rows `ids` (any order, repeats allowed)."""
        return self.files.cache_vectors(ids)

    def search_ids(self, ids: list[int], k: int = 10, where: str | Filter | None = None) -> list[list[Hit]]:
        """The neighbours of indexed rows, by row id (`row_vectors`' errors for a bad one)."""
        return self.search(self.row_vectors(ids), k, where)

    # -- queries by image ----------------------------------------------------------------------
    def backbone(self):
        """The cache's backbone, rebuilt and checked against the fingerprint (once)."""
        with self._backbone_lock:  # a service's threads may ask at once; build it only once
            if self._backbone is None:
                self._backbone = query_backbone(self.meta["components"], self.weights_path, self.runtime)
        return self._backbone

    def adopt_backbone(self, other: SearchIndex) -> None:
        """Take `other`'s backbone, already built, when both index the same features (a new generation
        of the same index, opened by a running service): no second load of the model."""
        same = (other.meta.get("components") == self.meta.get("components")
                and (other.weights_path, other.runtime) == (self.weights_path, self.runtime))
        if same and other._backbone is not None:
            with self._backbone_lock:
                self._backbone = self._backbone or other._backbone

    def embed_pixels(self, images, max_pixels: int | None = None) -> np.ndarray:
        """Features of decoded uint8 RGB tensors [3, H, W]; BadImageError for unusable ones."""
        import torch

        from embedder.data.decode import DEFAULT_MAX_PIXELS
        from embedder.data.transforms import apply_guarded, geometric_transform

        backbone = self.backbone()
        pre = backbone.preprocessing
        transform = geometric_transform(pre)
        limit = max_pixels or DEFAULT_MAX_PIXELS
        batch = torch.stack([apply_guarded(transform, img, pre.resize_size, limit) for img in images])
        return backbone(batch).cpu().numpy()

    def embed_files(self, files: list[str], batch_size: int | None = None) -> tuple[np.ndarray, list[str], list]:
        """(features of the readable files, those files, [(file, reason)] for the others)."""
        from embedder.extract.core import embed_images

        feats, errors = embed_images(self.backbone(), files, batch_size=batch_size)
        failed = {p for p, _ in errors}
        ok = [str(f) not in failed for f in files]  # the rows of failed files are NaN
        return feats[ok], [f for f, good in zip(files, ok) if good], errors

    def search_pixels(self, images, k: int = 10, max_pixels: int | None = None,
                      where: str | None = None) -> list[list[Hit]]:
        """Queries given as decoded uint8 RGB tensors [3, H, W]; BadImageError for unusable ones."""
        self.allowed(where)  # a bad filter is refused before any image is embedded
        return self.search(self.embed_pixels(images, max_pixels), k, where)

    def search_files(self, files: list[str], k: int = 10, batch_size: int | None = None, where: str | None = None):
        """(hits per readable file, [(file, reason)] for the others)."""
        self.allowed(where)  # a bad filter is refused before any image is embedded
        feats, ok, errors = self.embed_files(files, batch_size)
        return list(zip(ok, self.search(feats, k, where) if len(feats) else [])), errors


def query_backbone(components: dict, weights_path: str | None = None, runtime: str = "auto"):
    """Rebuild the backbone a cache was embedded with, refusing any difference in the fingerprint.

    `runtime` auto: the one the cache was made with, or torch where ONNX Runtime is not installed."""
    from embedder.cache.fingerprint import component_differences, fingerprint_components
    from embedder.cache.vectors import imported_refusal
    from embedder.models.onnx import versions
    from embedder.models.space import FeatureSpace

    refusal = imported_refusal(components)
    if refusal:
        raise ConfigError(refusal)
    space = FeatureSpace.from_components(components, weights_path)
    if runtime == "auto":
        runtime = space.runtime if versions() is not None else "torch"
    # Queried eagerly (compile=False) and on `runtime`: see the differences ignored below.
    backbone = replace(space, compile=False, runtime=runtime).load()
    if space.precision == "int8":  # the cache's own quantised graph (embedder.models.quantize)
        from embedder.models.quantize import cached

        record = json.loads(components["quantization"])
        backbone.use_quantized(cached(backbone, record), record)
    mine = fingerprint_components(backbone, components.get("feature_dtype", "float32"))
    # A cache embedded with --compile is queried eagerly: the two agree to a cosine of 0.9999998
    # (benchmarks/compiled.py), far below what a ranking can notice, and compiling a query
    # backbone would cost every search process 18-26 s (benchmarks/compiled.py). Nor does the
    # runtime matter to a query: ONNX Runtime and torch agree to a cosine of 0.99999 or better
    # (checked whenever a session opens, embedder.models.onnx). --jpeg-draft changes how the
    # cache's files were decoded, not the backbone a query image goes through.
    diff = component_differences(components, mine, ignore={"compile", "runtime", "jpeg_draft"})
    if diff:
        raise CacheMismatchError(
            "the index's cache",
            diff,
            "Queries by image need the exact backbone configuration of the cache; install the versions it "
            "records, or re-embed and re-index with this one.",
        )
    return backbone
