"""FAISS indexes built from a feature cache, and searching them.

`build_index` streams the cache block by block (adding vectors never loads the whole
cache), trains IVF / PQ on a seeded sample, tunes the search parameter (nprobe or
efSearch) until recall@10 against exact search reaches the target on held-out queries,
and saves atomically: everything is written into a temporary folder that replaces
INDEX_DIR only when complete.

INDEX_DIR holds:
    index.faiss   the FAISS index; faiss id = cache row
    rows.h5       paths, labels, classes of the rows (the mapping back to images)
    meta.json     fingerprint and components of the cache, kind, metric, parameters and why
                  they were chosen, build time, recall@10 against exact search

Memory: `--memory-budget` bounds the whole build, not just the index. Three quarters of it
go to the index itself; the rest to working buffers (the block being added or compared,
the training sample), whose sizes are derived from the budget.

Choice of `--kind auto` (memory as estimated for the index alone, against 3/4 of the budget):
    flat     N <= 50,000 and N*D*4 bytes fit the budget: exact search, nothing to tune
    hnsw     the graph (N * (4D + 2*32*4) bytes) fits the budget: fastest single queries
    ivf      IVF with raw vectors (N * (4D + 8) bytes) fits
    ivfsq    IVF with 8-bit scalar-quantised vectors (N * (D + 8) bytes) fits: 4x smaller,
             trains in seconds, recall close to raw (0.976 where 64-byte PQ gave 0.355 at
             100k x 512: benchmarks/compressed.py)
    ivfpq    otherwise: IVF + product quantisation with as many bytes per vector as fit
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from embedder.atomic import staged_dir
from embedder.cache.reader import STR, FeatureCache, read_paths
from embedder.errors import CacheMismatchError, ConfigError
from embedder.names import encode_path

KINDS = ("auto", "flat", "ivf", "hnsw", "ivfsq", "ivfpq")
INVERTED_LIST_KINDS = ("ivf", "ivfsq", "ivfpq")  # the kinds whose lists can live on disk
METRICS = ("cosine", "l2")
EVAL_K = 10


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - a dependency, but say how to get it
        raise ConfigError("Similarity search needs FAISS: pip install faiss-cpu") from exc
    return faiss


@dataclass
class Hit:
    rank: int  # 1-based
    id: int  # row in the cache and the index
    path: str
    label: str | None
    score: float  # cosine similarity (metric cosine) or squared L2 distance (metric l2)

    def as_dict(self) -> dict:
        return {"rank": self.rank, "id": self.id, "path": self.path, "label": self.label, "score": self.score}


def _prepare(x: np.ndarray, metric: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.maximum(norms, 1e-12)
    return x


def choose_kind(n: int, dim: int, budget: int) -> tuple[str, str]:
    flat = n * dim * 4
    if n <= 50_000 and flat <= budget:
        return "flat", f"{n} vectors ({flat / 2**20:.1f} MiB) are few enough for exact search"
    hnsw = n * (dim * 4 + 2 * 32 * 4)
    if hnsw <= budget:
        return "hnsw", f"{n} vectors: the HNSW graph ({hnsw / 2**20:.0f} MiB) fits the budget ({budget / 2**20:.0f} MiB)"
    ivf = _index_bytes("ivf", n, dim)
    if ivf <= budget:
        return "ivf", f"HNSW would need {hnsw / 2**20:.0f} MiB; IVF with raw vectors ({ivf / 2**20:.0f} MiB) fits"
    sq = _index_bytes("ivfsq", n, dim)
    if sq <= budget:
        return "ivfsq", (f"raw vectors need {ivf / 2**20:.0f} MiB > budget {budget / 2**20:.0f} MiB; "
                         f"8-bit scalar-quantised ones ({sq / 2**20:.0f} MiB) fit")
    return "ivfpq", (f"raw vectors need {ivf / 2**20:.0f} MiB, 8-bit ones {sq / 2**20:.0f} MiB > budget "
                     f"{budget / 2**20:.0f} MiB: IVF-PQ compresses them further")


def _index_bytes(kind: str, n: int, dim: int, pq_m: int = 0) -> int:
    """Memory of an inverted-list index's vectors and ids (the coarse quantizer aside)."""
    return n * ({"ivf": 4 * dim, "ivfsq": dim, "ivfpq": pq_m}[kind] + 8)


def _pq_bytes(n: int, dim: int, budget: int) -> int:
    for m in (64, 48, 32, 24, 16, 12, 8, 4):
        if dim % m == 0 and n * (m + 8) <= budget:
            return m
    return next(m for m in (4, 2, 1) if dim % m == 0)


def _nlist(n: int) -> int:
    return int(min(65536, max(16, 2 ** round(math.log2(4 * math.sqrt(n))))))


def _sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def _read_rows(cache: FeatureCache, rows: np.ndarray, metric: str, window: int = 65536) -> np.ndarray:
    # One contiguous read per window of rows: HDF5 point selection is slow.
    out = []
    for start in range(0, len(cache), window):
        sel = rows[(rows >= start) & (rows < start + window)]
        if len(sel):
            block = cache.features(slice(start, min(start + window, len(cache))))
            out.append(block[sel - start])
    return _prepare(np.concatenate(out), metric)


def _recall(found: np.ndarray, truth: np.ndarray, queries: np.ndarray, k: int) -> float:
    """recall@k with the query's own row (if indexed) removed from both lists: a self-match is no achievement."""
    hits = 0
    for q, f, t in zip(queries, found, truth):
        f = [i for i in f if i != q and i >= 0][:k]
        t = [i for i in t if i != q][:k]
        hits += len(set(f) & set(t))
    return hits / (k * len(queries))


def build_index(
    cache_path,
    out_dir,
    kind: str = "auto",
    metric: str = "cosine",
    memory_budget: int | None = None,
    target_recall: float = 0.95,
    seed: int = 0,
    progress: bool = True,
    block_rows: int = 65536,
    n_eval: int = 500,
    on_disk: bool = False,
    layer: str | None = None,
) -> dict:
    """Build, tune, evaluate and atomically save an index of the cache. Returns the metadata.

    `on_disk` (ivf, ivfsq, ivfpq; automatic when the index would not fit `memory_budget`): one index
    per shard of the cache (its virtual-dataset sources, else blocks of `block_rows`), all
    sharing the trained quantizer, merged into one inverted-list file on disk with faiss
    `contrib.ondisk`. Search then memory-maps the lists; the results equal an in-memory build.

    Crash safety: the build holds INDEX_DIR's write lock (`.INDEX_DIR.lock`) and writes into a
    hidden temporary folder that replaces INDEX_DIR in one step, so a kill leaves the old index
    or the new one; the next build removes what a killed one left.
    """
    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    if metric not in METRICS:
        raise ConfigError(f"--metric must be cosine or l2, got {metric!r}.")
    if not 0 < target_recall <= 1:
        raise ConfigError("--target-recall must be in (0, 1].")
    with staged_dir(out_dir) as tmp, FeatureCache(cache_path, layer=layer) as cache:  # tmp becomes INDEX_DIR
        return _build(cache, cache_path, tmp, kind, metric, memory_budget, target_recall, seed, progress,
                      block_rows, n_eval, on_disk)


def _build(cache: FeatureCache, cache_path, tmp: Path, kind: str, metric: str, memory_budget: int | None,
           target_recall: float, seed: int, progress: bool, block_rows: int, n_eval: int, on_disk: bool) -> dict:
    """Everything of `build_index` between the lock and the swap: the index and its files in `tmp`."""
    from tqdm.auto import tqdm

    faiss = _faiss()
    t0 = time.perf_counter()
    n, dim = len(cache), cache.dim
    if n == 0:
        raise ConfigError(f"{cache_path} has no rows to index.")
    budget = memory_budget or (4 << 30)
    index_budget = budget * 3 // 4
    # Up to four copies of a block are alive at once (read, normalised, masked, FAISS's own),
    # and the training sample is one more buffer: together they keep to the last quarter.
    work_rows = max(1024, budget // 4 // (5 * dim * 4))
    block_rows = min(block_rows, work_rows)
    why = "chosen with --kind"
    if kind == "auto":
        kind, why = choose_kind(n, dim, index_budget)
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    params: dict = {}
    if on_disk and kind not in INVERTED_LIST_KINDS:
        raise ConfigError(f"--on-disk needs --kind ivf, ivfsq or ivfpq (inverted lists), not {kind}.")
    if kind == "flat":
        index = faiss.IndexFlat(dim, faiss_metric)
    elif kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, 32, faiss_metric)
        hnsw.hnsw.efConstruction = 80
        # Rows are added out of order (the tuning queries last), so ids are mapped explicitly.
        index = faiss.IndexIDMap2(hnsw)
        params.update(M=32, efConstruction=80)
    else:
        # 10,000 points is the floor for sound k-means (8-bit PQ needs 39 x 256), whatever the budget.
        train_size = min(max(40 * _nlist(n), 10_000), max(work_rows, 10_000), n)
        nlist = min(_nlist(n), max(1, train_size // 39))  # FAISS wants >= 39 training points per list
        quantizer = faiss.IndexFlat(dim, faiss_metric)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss_metric)
        elif kind == "ivfsq":
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                  faiss_metric)
            params.update(sq="8bit")
        else:
            m = _pq_bytes(n, dim, index_budget)
            nbits = 8 if n >= 256 * 39 else 4
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, nbits, faiss_metric)
            params.update(pq_m=m, pq_nbits=nbits)
        params["nlist"] = nlist
        train_rows = _sample_rows(n, train_size, seed)
        index.train(_read_rows(cache, train_rows, metric, block_rows))
        params["trained_on"] = len(train_rows)
        size = _index_bytes(kind, n, dim, params.get("pq_m", 0))
        if not on_disk and size > index_budget:
            on_disk, why = True, f"{why}; its {size / 2**20:.0f} MiB exceed the budget, so its lists live on disk"

    # Tuning queries must be *fresh*: a query that is itself in an HNSW graph lands on its own
    # node and finds its neighbours through its own links, which overstates recall (efSearch 16
    # gave 0.995 on indexed rows but 0.91 on new queries at 100k x 512). So the query rows are
    # held out of the index while the knob is tuned, and added last, under their own row ids.
    # (Merged on-disk lists take no later additions; the on-disk kinds, all IVF, are tuned on
    # indexed rows with their own row excluded, which agrees with fresh queries for IVF.)
    knob = "nprobe" if kind in INVERTED_LIST_KINDS else {"hnsw": "efSearch"}.get(kind)
    q_rows = _sample_rows(n, n_eval, seed + 1)
    held_out = q_rows if knob and not on_disk and n > 2 * len(q_rows) else q_rows[:0]
    keep = np.ones(n, dtype=bool)
    keep[held_out] = False
    with tqdm(total=n, unit="vec", desc=f"index ({kind})", disable=not progress or on_disk) as bar:
        if on_disk:
            params["on_disk_shards"] = _add_on_disk(index, cache, metric, block_rows, tmp, progress, kind)
        else:
            for block in cache.iter_blocks(block_rows):
                rows, mask = np.arange(block.start, block.stop), keep[block.start:block.stop]
                _add(index, _prepare(block.features, metric), rows, mask)
                bar.update(int(mask.sum()))

        # Recall@10 against exact search over the same indexed rows, and tuning of the search knob.
        from faiss.contrib.exhaustive_search import knn_ground_truth

        queries = _read_rows(cache, q_rows, metric, block_rows)
        indexed = np.flatnonzero(keep)
        k = min(EVAL_K + (0 if len(held_out) else 1), len(indexed))
        db_blocks = (_prepare(b.features[keep[b.start:b.stop]], metric) for b in cache.iter_blocks(block_rows))
        _, truth = knn_ground_truth(queries, db_blocks, k, metric_type=faiss_metric)
        truth = indexed[truth]
        exclude = np.full(len(q_rows), -1) if len(held_out) else q_rows  # an indexed query's own row is no hit
        kk = k if len(held_out) else k - 1
        tuning = []
        values = []
        if knob == "nprobe":
            values = [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if v <= params["nlist"]]
        elif knob == "efSearch":
            values = [16, 32, 64, 128, 256, 512]
        if knob:
            for v in values:
                _set_knob(index, knob, v)
                _, found = index.search(queries, k)
                recall = _recall(found, truth, exclude, kk)
                tuning.append({knob: v, "recall_at_10": recall})
                if recall >= target_recall:
                    break
            params[knob] = tuning[-1][knob]
        else:
            _, found = index.search(queries, k)
            recall = _recall(found, truth, exclude, kk)
        if len(held_out):
            _add(index, queries, held_out, np.ones(len(held_out), bool))
            bar.update(len(held_out))
    meta = {
        "format": "embedder-index/1",
        "cache": str(Path(cache_path).resolve()),
        "fingerprint": cache.fingerprint,
        "components": cache.components,
        "layer": cache.layer,
        "source": cache.source,
        "kind": kind,
        "on_disk": on_disk,
        "metric": metric,
        "why": why,
        "params": params,
        "tuning": tuning,
        "ntotal": int(index.ntotal),
        "dim": dim,
        "memory_budget": budget,
        "recall_at_10": recall,
        "target_recall": target_recall,
        "target_reached": recall is not None and recall >= target_recall,
        "eval_queries": len(q_rows),
        "eval_queries_held_out": bool(len(held_out)),
        "build_s": time.perf_counter() - t0,
        "faiss_version": faiss.__version__,
    }
    _save(tmp, index, cache, meta)
    return meta


def _add_on_disk(index, cache: FeatureCache, metric: str, block_rows: int, tmp: Path, progress: bool,
                 kind: str) -> int:
    """Fill the trained, empty `index` through per-shard indexes merged on disk. Returns the shard count."""
    from faiss.contrib.ondisk import merge_ondisk
    from tqdm.auto import tqdm

    from embedder.cache.shards import row_ranges

    faiss = _faiss()
    files = []
    with tqdm(total=len(cache), unit="vec", desc=f"index ({kind}, on disk)", disable=not progress) as bar:
        for k, (start, stop) in enumerate(row_ranges(cache, block_rows)):
            shard = faiss.clone_index(index)  # same trained quantizer (and PQ), no vectors
            for s in range(start, stop, block_rows):
                e = min(s + block_rows, stop)
                shard.add_with_ids(_prepare(cache.features(slice(s, e)), metric), np.arange(s, e, dtype=np.int64))
                bar.update(e - s)
            files.append(tmp / f"shard-{k:05d}.index")
            faiss.write_index(shard, str(files[-1]))
            del shard
    merge_ondisk(index, [str(f) for f in files], str(tmp / "lists.ivfdata"))
    for f in files:
        f.unlink()
    return len(files)


def _add(index, x: np.ndarray, rows: np.ndarray, mask: np.ndarray) -> None:
    """Add the rows of a block that `mask` selects, with faiss id = cache row."""
    if mask.all() and index.ntotal == rows[0] and not isinstance(index, _faiss().IndexIDMap):
        index.add(x)  # in order: the implicit ids are the rows
    elif mask.any():
        index.add_with_ids(np.ascontiguousarray(x[mask]), rows[mask].astype(np.int64))


def _inner(index):
    faiss = _faiss()
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


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


def _set_knob(index, knob: str, value: int) -> None:
    faiss = _faiss()
    if knob == "efSearch":
        _inner(index).hnsw.efSearch = value
    else:
        faiss.extract_index_ivf(index).nprobe = value


def _save(tmp: Path, index, cache: FeatureCache, meta: dict) -> None:
    """Write the index files into `tmp` (which may already hold the on-disk lists)."""
    faiss = _faiss()
    faiss.write_index(index, str(tmp / "index.faiss"))
    with h5py.File(tmp / "rows.h5", "w") as f:
        f.create_dataset("paths", data=_names(cache.paths), dtype=STR)
        f.create_dataset("labels", data=cache.labels)
        f.create_dataset("classes", data=_names(cache.classes), dtype=STR)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


def _names(names: list[str]) -> np.ndarray:
    """Names as the bytes the file system gave (embedder.names), so a Latin-1 name survives."""
    return np.array([encode_path(n) for n in names], dtype=object)


class SearchIndex:
    """A saved index, ready to answer queries by vector, by cached row id, or by image."""

    def __init__(self, index_dir, weights_path: str | None = None):
        self.dir = Path(index_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise ConfigError(f"No index at {self.dir}. Build one with `embedder index CACHE.h5 --out {self.dir}`.")
        self.meta = json.loads(meta_path.read_text())
        faiss = _faiss()
        # On-disk lists are found next to index.faiss, wherever the folder has moved since.
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if self.meta.get("on_disk") else 0
        with _c_stdout_to_stderr():
            self.index = faiss.read_index(str(self.dir / "index.faiss"), flags)
        knob = next((k for k in ("nprobe", "efSearch") if k in self.meta["params"]), None)
        if knob:
            _set_knob(self.index, knob, self.meta["params"][knob])
        with h5py.File(self.dir / "rows.h5", "r") as f:
            self.paths = read_paths(f["paths"]) if len(f["paths"]) else []
            self.labels = f["labels"][:]
            self.classes = read_paths(f["classes"])
        self._row = {p: i for i, p in enumerate(self.paths)}
        self.metric = self.meta["metric"]
        self.weights_path = weights_path
        self._backbone = None
        self._backbone_lock = threading.Lock()
        # Exact indexes can give back their vectors, so search by id needs no cache file.
        self._reconstructs = self.meta["kind"] in ("flat", "hnsw", "ivf")
        if self.meta["kind"] == "ivf":
            faiss.extract_index_ivf(self.index).make_direct_map()

    @classmethod
    def open(cls, index_dir, weights_path: str | None = None) -> SearchIndex:
        return cls(index_dir, weights_path)

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

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        out = []
        for row_scores, row_ids in zip(scores, ids):
            hits = []
            for rank, (s, i) in enumerate(((s, i) for s, i in zip(row_scores, row_ids) if i >= 0), start=1):
                label = self.labels[i]
                hits.append(Hit(rank, int(i), self.paths[i], self.classes[label] if label >= 0 else None, float(s)))
            out.append(hits)
        return out

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise ConfigError(f"Query vectors have {queries.shape[1]} dimensions; the index has {self.dim}.")
        if k < 1:
            raise ConfigError("k must be at least 1.")
        scores, ids = self.index.search(_prepare(queries, self.metric), min(k, self.ntotal))
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
                self._backbone = query_backbone(self.meta["components"], self.weights_path)
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


def query_backbone(components: dict, weights_path: str | None = None):
    """Rebuild the backbone a cache was embedded with, refusing any difference in the fingerprint."""
    import torch

    from embedder.cache.fingerprint import component_differences, fingerprint_components
    from embedder.extract.core import load_backbone
    from embedder.models.registry import get_backbone_spec
    from embedder.models.weights import weights_choice_for

    spec = get_backbone_spec(components["model"])
    crop = json.loads(components["preprocessing"])["crop_size"]
    style = json.loads(components["style"]) if "style" in components else {}
    device = components.get("device_type", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"  # the fingerprint check below reports the difference
    backbone = load_backbone(
        components["model"],
        weights_choice_for(components["weights"], weights_path),
        layer=components["layer"],
        normalize=components["normalization"],
        image_size=None if crop == spec.preprocessing.crop_size else int(crop),
        device=device,
        precision=components["precision"],
        memory_layout=components["memory_layout"],
        pool=components["pooling"],
        style_layers=tuple(style.get("layers", ())),
        style_dim=int(style.get("dim", 0)),
    )
    mine = fingerprint_components(backbone, components.get("feature_dtype", "float32"))
    # A cache embedded with --compile is queried eagerly: the two agree to a cosine of 0.9999998
    # (benchmarks/compiled.py), far below what a ranking can notice, and compiling a query
    # backbone would cost every search process 18-26 s (benchmarks/compiled.py).
    diff = component_differences(components, mine, ignore={"compile"})
    if diff:
        raise CacheMismatchError(
            "the index's cache",
            diff,
            "Queries by image need the exact backbone configuration of the cache; install the versions it "
            "records, or re-embed and re-index with this one.",
        )
    return backbone
