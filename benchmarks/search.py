"""Flat, IVF and HNSW side by side on clustered synthetic vectors, through embedder's own build.

    python -m benchmarks search [--quick]      # full: 1,000,000 x 512; quick: 100,000 x 512

Each kind is built by `embedder.index.build_index` from a real cache file (streamed, tuned
to recall@10 >= 0.95 on held-out rows), then queried through `SearchIndex`: single-query
latency p50/p99 over 500 queries and batch throughput over 2,000 queries, with recall@10
of fresh queries (drawn from the same clusters, not indexed) against exact numpy search.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from embedder.cache import CacheSpec
from embedder.cache_writer import CacheWriter
from embedder.index import SearchIndex, build_index
from embedder.sources import Listing


def clustered(n: int, d: int, centers: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)).astype(np.float32) * 4
    return c[rng.integers(0, centers, n)] + rng.normal(size=(n, d)).astype(np.float32)


def write_cache(path: Path, X: np.ndarray) -> None:
    n, d = X.shape
    listing = Listing(path.parent, [f"v{i:07d}" for i in range(n)], np.full(n, -1, np.int64), [], "flat")
    spec = CacheSpec({"model": "synthetic"}, str(path.parent), d, layout="flat")
    with CacheWriter(path, spec, listing, commit_every=10**9) as w:
        for start in range(0, n, 65536):
            rows = np.arange(start, min(n, start + 65536))
            w.add(rows, X[rows], [])
        w.finish()


def exact_top10(X: np.ndarray, Q: np.ndarray) -> np.ndarray:
    xx = (X * X).sum(1)
    out = []
    for q in Q:
        d = xx - 2 * X @ q
        top = np.argpartition(d, 10)[:10]
        out.append(top[np.argsort(d[top])])
    return np.array(out)


def run(quick: bool = False) -> None:
    n, d = (100_000, 512) if quick else (1_000_000, 512)
    work = Path(tempfile.mkdtemp(prefix="embedder-bench-"))
    try:
        data = clustered(n + 2500, d, centers=1000, seed=0)
        X, Q = data[:n], data[n:]
        t0 = time.perf_counter()
        write_cache(work / "c.h5", X)
        print(f"# {n} x {d} clustered vectors, cache written in {time.perf_counter() - t0:.1f} s")
        truth = exact_top10(X, Q[:200])
        print(f"{'kind':<6}{'build s':>9}{'index MiB':>11}{'recall@10':>11}{'p50 ms':>8}{'p99 ms':>8}{'batch q/s':>11}  params")
        for kind in ("flat", "ivf", "hnsw"):
            meta = build_index(work / "c.h5", work / kind, kind=kind, metric="l2", progress=False)
            index = SearchIndex.open(work / kind)
            found = np.array([[h.id for h in hits] for hits in index.search(Q[:200], 10)])
            recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
            lat = []
            for q in Q[:500]:
                t = time.perf_counter()
                index.index.search(q[None, :], 10)  # the FAISS call alone: what a query costs
                lat.append(1000 * (time.perf_counter() - t))
            t = time.perf_counter()
            index.index.search(Q[500:2500], 10)
            qps = 2000 / (time.perf_counter() - t)
            size = (work / kind / "index.faiss").stat().st_size / 2**20
            knob = {k: v for k, v in meta["params"].items() if k in ("nlist", "nprobe", "M", "efSearch")}
            print(f"{kind:<6}{meta['build_s']:>9.1f}{size:>11.0f}{recall:>11.3f}{np.percentile(lat, 50):>8.2f}"
                  f"{np.percentile(lat, 99):>8.2f}{qps:>11.0f}  {knob}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
