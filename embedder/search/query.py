"""Querying a saved index: by vector, by cached row id, or by image through the cache's own backbone."""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from embedder.cache.columns import read_columns
from embedder.cache.reader import FeatureCache, read_paths
from embedder.data.metadata import INT_NULL
from embedder.data.rows import row_location
from embedder.errors import CacheMismatchError, ConfigError, RemovedRowError
from embedder.outputs import INDEX, expect
from embedder.search.filters import as_column, compile_mask
from embedder.search.kinds import INVERTED_LIST_KINDS, inner, load_faiss, prepare, set_knob

# HNSW with at most this many allowed rows searches them exactly: cheaper than a graph walk
# that mostly meets excluded nodes, and exact (benchmarks/filters.py).
EXACT_ROWS = 4096
HNSW_FILTERED_EF = 1024  # the widest efSearch a filtered HNSW search widens its tuned one to
EXACT_BLOCK = 65536  # rows reconstructed at a time by the exact fallback of a filtered search
MASKS_KEPT = 32  # filters whose masks are remembered (a service sees the same few again and again)


@dataclass
class Hit:
    rank: int  # 1-based
    id: int  # row in the cache and the index
    path: str
    label: str | None
    score: float  # cosine similarity (metric cosine) or squared L2 distance (metric l2)
    metadata: dict | None = None  # the row's metadata columns, when the index has them (JSON values)

    def as_dict(self) -> dict:
        doc = {"rank": self.rank, "id": self.id, "path": self.path, "label": self.label, "score": self.score}
        if self.metadata is not None:
            doc["metadata"] = self.metadata
        return doc


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


class SearchIndex:
    """A saved index, ready to answer queries by vector, by cached row id, or by image."""

    exact_rows = EXACT_ROWS  # HNSW: filters keeping at most this many rows are searched exactly

    def __init__(self, index_dir, weights_path: str | None = None, runtime: str = "auto"):
        self.dir = Path(index_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            expect(self.dir, INDEX)  # names what is there instead (a feature cache, nothing)
            raise ConfigError(f"{self.dir} has no meta.json: not a complete index. Rebuild it with `embedder index`.")
        self.meta = json.loads(meta_path.read_text())
        faiss = load_faiss()
        # On-disk lists are found next to index.faiss, wherever the folder has moved since.
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if self.meta.get("on_disk") else 0
        with _c_stdout_to_stderr():
            self.index = faiss.read_index(str(self.dir / "index.faiss"), flags)
        knob = next((k for k in ("nprobe", "efSearch") if k in self.meta["params"]), None)
        if knob:
            set_knob(self.index, knob, self.meta["params"][knob])
        with h5py.File(self.dir / "rows.h5", "r") as f:
            self.paths = read_paths(f["paths"]) if len(f["paths"]) else []
            self.labels = f["labels"][:]
            self.classes = read_paths(f["classes"])
            # Sorted unique row ids hidden from every search (`embedder index INDEX_DIR --remove`).
            self.removed = f["removed"][:].astype(np.int64) if "removed" in f else np.zeros(0, np.int64)
            # The cache's metadata columns (rows.h5 /columns, embedder.cache.columns); {} for older indexes.
            self.columns: dict[str, np.ndarray] = read_columns(f) if "columns" in f else {}
        self._row = {p: i for i, p in enumerate(self.paths)}
        self._removed_set = set(self.removed.tolist())
        self._masks: dict[str | None, np.ndarray | None] = {}
        self._masks_lock = threading.Lock()
        self._table: dict[str, np.ndarray] | None = None
        self.metric = self.meta["metric"]
        self.weights_path = weights_path
        self.runtime = runtime
        self._backbone = None
        self._backbone_lock = threading.Lock()
        # Exact indexes can give back their vectors, so search by id needs no cache file.
        self._reconstructs = self.meta["kind"] in ("flat", "hnsw", "ivf")
        if self.meta["kind"] == "ivf":
            ivf = faiss.extract_index_ivf(self.index)
            # Removed rows leave gaps in the ids, which an array direct map cannot hold.
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable if len(self.removed) else faiss.DirectMap.Array)

    @classmethod
    def open(cls, index_dir, weights_path: str | None = None, runtime: str = "auto") -> SearchIndex:
        return cls(index_dir, weights_path, runtime)

    @property
    def ntotal(self) -> int:
        """Rows of the index, removed ones included: row ids run from 0 to ntotal - 1."""
        return len(self.paths)

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
        return path in self._row

    def row_of_path(self, path: str, removed: bool = False) -> int:
        """The row id of a path as the cache stored it; RemovedRowError for a removed row unless `removed`."""
        if path not in self._row:
            raise KeyError(f"{path!r} is not in the index (paths are relative to {self.source}).")
        if not removed:
            self._check_not_removed([self._row[path]])
        return self._row[path]

    def is_removed(self, row_id: int) -> bool:
        return row_id in self._removed_set

    def _check_not_removed(self, ids) -> None:
        gone = [int(i) for i in ids if int(i) in self._removed_set]
        if gone:
            raise RemovedRowError(f"row {gone[0]} ({self.paths[gone[0]]}) was removed from the index "
                                  f"(`embedder index {self.dir} --remove`); it is never searched nor returned.")

    # -- filters -------------------------------------------------------------------------------
    def filter_columns(self) -> dict[str, np.ndarray]:
        """What a filter can name: id, path, label ("" when unlabelled), then rows.h5's /columns."""
        if self._table is None:
            names = np.array([*self.classes, ""], dtype=str)  # label -1 takes the last: ""
            self._table = {"id": np.arange(self.ntotal, dtype=np.int64), "path": as_column(self.paths),
                           "label": names[self.labels] if self.ntotal else names[:0]}
            self._table.update({k: as_column(v) for k, v in self.columns.items() if k not in self._table})
        return self._table

    def allowed(self, where: str | None = None) -> np.ndarray | None:
        """Mask of the rows a search may return (kept by `where`, not removed); None when every row
        the faiss index holds may be returned, so no selector is needed. FilterError for a bad filter."""
        with self._masks_lock:  # a service's threads share the remembered masks
            if where in self._masks:
                return self._masks[where]
            mask = None if where is None else compile_mask(where, self.filter_columns())
            if len(self.removed) and (where is not None or self.removed_in_faiss):
                mask = np.ones(self.ntotal, bool) if mask is None else mask.copy()
                mask[self.removed] = False
            if len(self._masks) >= MASKS_KEPT:
                self._masks.pop(next(iter(self._masks)))
            self._masks[where] = mask
            return mask

    @property
    def removed_in_faiss(self) -> bool:
        """Whether removed rows are still in the faiss index (hidden by the selector) or removed in place."""
        return bool(len(self.removed)) and int(self.index.ntotal) == self.ntotal

    def row_metadata(self, row_id: int) -> dict:
        """{column: value} of one row, as JSON values: a null (NaN, INT_NULL; embedder.data.metadata) is None."""
        out = {}
        for name, values in self.columns.items():
            value = values[row_id].item() if isinstance(values[row_id], np.generic) else values[row_id]
            missing = (isinstance(value, float) and math.isnan(value)) or (type(value) is int and value == INT_NULL)
            out[name] = None if missing else value
        return out

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        out = []
        for row_scores, row_ids in zip(scores, ids):
            hits = []
            for rank, (s, i) in enumerate(((s, i) for s, i in zip(row_scores, row_ids) if i >= 0), start=1):
                label = self.labels[i]
                hits.append(Hit(rank, int(i), self.paths[i], self.classes[label] if label >= 0 else None, float(s),
                                self.row_metadata(int(i)) if self.columns else None))
            out.append(hits)
        return out

    def search(self, queries: np.ndarray, k: int = 10, where: str | None = None) -> list[list[Hit]]:
        """The k nearest rows of each query among those `where` keeps (every row when None), never a
        removed one; fewer than k only when fewer rows are allowed."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise ConfigError(f"Query vectors have {queries.shape[1]} dimensions; the index has {self.dim}.")
        if k < 1:
            raise ConfigError("k must be at least 1.")
        allowed = self.allowed(where)
        x = prepare(queries, self.metric)
        if allowed is None:
            scores, ids = self.index.search(x, min(k, int(self.index.ntotal)))
        else:
            k = min(k, int(allowed.sum()))
            if k == 0:
                return [[] for _ in range(len(x))]
            scores, ids = self._search_allowed(x, k, allowed)
        return self._hits(scores, ids)

    def _search_allowed(self, x: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Search inside faiss with a bitmap selector of the allowed rows, keeping the tuned knob.

        HNSW with few allowed rows (EXACT_ROWS) searches them exactly instead. An approximate
        index can still return fewer than k under a selective selector (HNSW's walk and IVF's
        few probed lists meet too few allowed rows). Those queries are searched again
        completely: IVF kinds with every list probed (still inside faiss, same codes and scores),
        HNSW exactly over the allowed rows' own vectors."""
        faiss = load_faiss()
        rows = int(allowed.sum())
        if self.meta["kind"] == "hnsw" and rows <= self.exact_rows:
            return self._exact_among(x, k, np.flatnonzero(allowed))
        params = self.selector_params(allowed, k)
        scores, ids = self.index.search(x, k, params=params)
        short = np.flatnonzero((ids >= 0).sum(axis=1) < k)
        if len(short):
            if self.meta["kind"] in INVERTED_LIST_KINDS:
                nlist = faiss.extract_index_ivf(self.index).nlist
                again = self.index.search(x[short], k, params=faiss.SearchParametersIVF(sel=params.sel, nprobe=nlist))
            else:
                again = self._exact_among(x[short], k, np.flatnonzero(allowed))
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
        return self._params(selector, int(allowed.sum()) / max(self.ntotal, 1), k)

    def _params(self, selector, fraction: float, k: int):
        """selector_params' parameters for a selector that allows `fraction` of the rows."""
        faiss = load_faiss()
        kind = self.meta["kind"]
        if kind in INVERTED_LIST_KINDS:
            return faiss.SearchParametersIVF(sel=selector, nprobe=faiss.extract_index_ivf(self.index).nprobe)
        if kind == "hnsw":
            ef = inner(self.index).hnsw.efSearch
            fraction = max(fraction, 1e-9)
            ef = max(ef, min(HNSW_FILTERED_EF, math.ceil(max(ef / math.sqrt(fraction), 2 * k / fraction))))
            return faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
        return faiss.SearchParameters(sel=selector)

    def _exact_among(self, x: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of `x` among `rows` (reconstructed in blocks; flat and HNSW), as faiss scores them."""
        from embedder.search.kinds import faiss_metric

        faiss = load_faiss()
        metric, ip = faiss_metric(self.metric), self.metric == "cosine"
        scores, found = [], []
        for s in range(0, len(rows), EXACT_BLOCK):  # faiss.knn per block; the blocks' top-k merged below
            block = rows[s:s + EXACT_BLOCK]
            d, i = faiss.knn(x, self._vectors(block), min(k, len(block)), metric=metric)
            scores.append(d)
            found.append(block[i])
        scores, found = np.hstack(scores), np.hstack(found)
        order = np.argsort(-scores if ip else scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(found, order, 1)

    def _vectors(self, rows: np.ndarray) -> np.ndarray:
        """The indexed (prepared) vectors of `rows`, which flat and HNSW keep exactly."""
        return np.ascontiguousarray(self.index.reconstruct_batch(rows.astype(np.int64)), dtype=np.float32)

    def row_vectors(self, ids) -> np.ndarray:
        """The indexed vectors of row ids, shape (n, D) (exact ones from the cache where the index
        keeps lossy codes). ConfigError for an id out of range, RemovedRowError for a removed row."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.ntotal]
        if bad:
            raise ConfigError(f"Row id {bad[0]} is not in the index (ids run from 0 to {self.ntotal - 1}).")
        self._check_not_removed(ids)
        if not ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._reconstructs:
            return np.stack([self.index.reconstruct(i) for i in ids])
        return self.cache_vectors(ids)

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

    def search_ids(self, ids: list[int], k: int = 10, where: str | None = None) -> list[list[Hit]]:
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
    from embedder.cache.fingerprint import backbone_settings, component_differences, fingerprint_components
    from embedder.cache.vectors import imported_refusal
    from embedder.extract.core import load_backbone
    from embedder.models.onnx import versions

    refusal = imported_refusal(components)
    if refusal:
        raise ConfigError(refusal)
    settings = backbone_settings(components, weights_path)
    if runtime == "auto":
        runtime = settings["runtime"] if versions() is not None else "torch"
    backbone = load_backbone(**{**settings, "runtime": runtime})
    if settings["precision"] == "int8":  # the cache's own quantised graph (embedder.models.quantize)
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
