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
from embedder.errors import CacheMismatchError, ConfigError
from embedder.search.kinds import load_faiss, prepare, set_knob


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

    def __init__(self, index_dir, weights_path: str | None = None, runtime: str = "auto"):
        self.dir = Path(index_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise ConfigError(f"No index at {self.dir}. Build one with `embedder index CACHE.h5 --out {self.dir}`.")
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
            # The cache's metadata columns (rows.h5 /columns, embedder.cache.columns); {} for older indexes.
            self.columns: dict[str, np.ndarray] = read_columns(f) if "columns" in f else {}
        self._row = {p: i for i, p in enumerate(self.paths)}
        self.metric = self.meta["metric"]
        self.weights_path = weights_path
        self.runtime = runtime
        self._backbone = None
        self._backbone_lock = threading.Lock()
        # Exact indexes can give back their vectors, so search by id needs no cache file.
        self._reconstructs = self.meta["kind"] in ("flat", "hnsw", "ivf")
        if self.meta["kind"] == "ivf":
            faiss.extract_index_ivf(self.index).make_direct_map()

    @classmethod
    def open(cls, index_dir, weights_path: str | None = None, runtime: str = "auto") -> SearchIndex:
        return cls(index_dir, weights_path, runtime)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def source(self) -> str:
        return str(self.meta["source"])

    def image_path(self, row_id: int) -> Path:
        p = Path(self.paths[row_id])
        return p if p.is_absolute() else Path(self.source) / p

    def has_path(self, path: str) -> bool:
        return path in self._row

    def row_of_path(self, path: str) -> int:
        if path not in self._row:
            raise KeyError(f"{path!r} is not in the index (paths are relative to {self.source}).")
        return self._row[path]

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

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise ConfigError(f"Query vectors have {queries.shape[1]} dimensions; the index has {self.dim}.")
        if k < 1:
            raise ConfigError("k must be at least 1.")
        scores, ids = self.index.search(prepare(queries, self.metric), min(k, self.ntotal))
        return self._hits(scores, ids)

    def search_ids(self, ids: list[int], k: int = 10) -> list[list[Hit]]:
        bad = [i for i in ids if not 0 <= i < self.ntotal]
        if bad:
            raise IndexError(f"Row id {bad[0]} is not in the index (0 .. {self.ntotal - 1}).")
        if self._reconstructs:
            vectors = np.stack([self.index.reconstruct(int(i)) for i in ids])
        else:  # PQ codes are lossy: take the exact vectors from the cache
            with FeatureCache(self.meta["cache"], layer=self.meta.get("layer")) as cache:
                vectors = np.stack([cache.features(slice(i, i + 1))[0] for i in ids])
        return self.search(vectors, k)

    # -- queries by image ----------------------------------------------------------------------
    def backbone(self):
        """The cache's backbone, rebuilt and checked against the fingerprint (once)."""
        with self._backbone_lock:  # a service's threads may ask at once; build it only once
            if self._backbone is None:
                self._backbone = query_backbone(self.meta["components"], self.weights_path, self.runtime)
        return self._backbone

    def search_pixels(self, images, k: int = 10, max_pixels: int | None = None) -> list[list[Hit]]:
        """Queries given as decoded uint8 RGB tensors [3, H, W]; BadImageError for unusable ones."""
        import torch

        from embedder.data.decode import DEFAULT_MAX_PIXELS
        from embedder.data.transforms import apply_guarded, geometric_transform

        backbone = self.backbone()
        pre = backbone.preprocessing
        transform = geometric_transform(pre)
        limit = max_pixels or DEFAULT_MAX_PIXELS
        batch = torch.stack([apply_guarded(transform, img, pre.resize_size, limit) for img in images])
        return self.search(backbone(batch).cpu().numpy(), k)

    def search_files(self, files: list[str], k: int = 10, batch_size: int = 32):
        """(hits per readable file, [(file, reason)] for the others)."""
        from embedder.extract.core import embed_images

        feats, errors = embed_images(self.backbone(), files, batch_size=batch_size)
        failed = {p for p, _ in errors}
        ok = [f for f in files if str(f) not in failed]
        return list(zip(ok, self.search(feats, k) if len(feats) else [])), errors


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
