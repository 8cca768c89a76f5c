"""Inverted-list indexes with raw, 8-bit and PQ-coded vectors: what each byte per vector buys.

    python -m benchmarks compressed [--quick]   # full: 100,000 x 512 + real digit features

The measurement behind `--kind auto`'s ladder below raw IVF: ivfsq (8-bit scalar
quantiser, D + 8 bytes per vector) before ivfpq (m + 8 bytes). Each kind is built by
`embedder.search.build.build_index` from a real cache, with the search knob tuned to recall@10
0.95 (or the best it reaches), then scored on fresh queries against exact search.

Synthetic clustered vectors are a hard case for coding: a vector's true neighbours are
its cluster mates, ranked by isotropic noise that a coarse code cannot resolve. Full mode
adds the 1,797 digit images embedded with the shipped EfficientNet-Lite0 (1280-d).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.search import clustered, digit_features, exact_top10, recall_at_10, write_cache
from embedder.search.build import build_index
from embedder.search.query import SearchIndex

KINDS = ("ivf", "ivfsq", "ivfpq")


def compare(cache: Path, work: Path, Q: np.ndarray, truth: np.ndarray, metric: str, own_rows=None) -> None:
    print(f"{'kind':<7}{'B/vector':>9}{'build s':>9}{'recall@10':>11}{'p50 ms':>8}  params")
    for kind in KINDS:
        meta = build_index(cache, work / kind, kind=kind, metric=metric, progress=False)
        index = SearchIndex.open(work / kind)
        n = index.ntotal
        k = 10 if own_rows is None else 11
        hits = index.search(Q, k)
        if own_rows is None:
            found = [[h.id for h in hs] for hs in hits]
        else:  # queries are cached rows: their own row is no neighbour
            found = [[h.id for h in hs if h.id != r][:10] for r, hs in zip(own_rows, hits)]
        recall = recall_at_10(found, truth)
        lat = []
        for q in Q:
            t = time.perf_counter()
            index.index.search(np.ascontiguousarray(q[None, :]), k)
            lat.append(1000 * (time.perf_counter() - t))
        size = (work / kind / "index.faiss").stat().st_size
        knob = {p: v for p, v in meta["params"].items() if p in ("nlist", "nprobe", "pq_m", "pq_nbits", "sq")}
        print(f"{kind:<7}{size / n:>9.0f}{meta['build_s']:>9.1f}{recall:>11.3f}{np.percentile(lat, 50):>8.2f}  "
              f"{knob}{'' if meta['target_reached'] else '  (target 0.95 not reached)'}")


def synthetic(quick: bool, work: Path) -> None:
    n, d = (10_000, 256) if quick else (100_000, 512)
    data = clustered(n + 200, d, centers=max(10, n // 400), seed=0)
    X, Q = data[:n], data[n:]
    write_cache(work / "c.h5", X)
    print(f"# {n} x {d} clustered vectors (400 per cluster), l2, 200 fresh queries")
    compare(work / "c.h5", work, Q, exact_top10(X, Q), "l2")


def digits(work: Path) -> None:
    cache, X, rows, truth = digit_features(work)
    print("\n# real features: 1,797 digits x 1280 (EfficientNet-Lite0), cosine, queries = 300 cached rows")
    compare(cache, work, X[rows], truth, "cosine", own_rows=rows)


def run(quick: bool = False) -> None:
    work = Path(tempfile.mkdtemp(prefix="embedder-bench-"))
    try:
        synthetic(quick, work)
        if not quick:
            (work / "real").mkdir()
            digits(work / "real")
    finally:
        shutil.rmtree(work, ignore_errors=True)
