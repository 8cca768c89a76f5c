"""Filtered search against unfiltered search: flat, IVF and HNSW under a 10% and a 1% filter.

    python -m benchmarks filters [--quick]      # full: 100,000 x 128; quick: 20,000 x 128

Each kind is built by `embedder.search.build.build_index` (tuned to recall@10 >= 0.95), then
given a metadata column `bucket` (uniform in 0..99) in rows.h5 `/columns`, so `bucket < 10`
keeps 10% of the rows and `bucket == 7` 1%. For each filter: single-query latency p50/p99
over 300 queries through `SearchIndex.search(q, 10, where=...)` (the filter's mask is computed
once and remembered, as a service sees the same filters again), batch throughput over 1,000
queries, recall@10 against exact numpy search among the allowed rows, and how many results
came back (always 10: the shortfall fallback). The parse + mask cost of each filter is shown
on its own.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from benchmarks.search import clustered, write_cache
from embedder.search.build import build_index
from embedder.search.filters import compile_mask
from embedder.search.query import SearchIndex

FILTERS = {"none": None, "10%": "bucket < 10", "1%": "bucket == 7"}


def exact_allowed(Xn: np.ndarray, Qn: np.ndarray, allowed: np.ndarray | None, k: int = 10) -> np.ndarray:
    s = Qn @ Xn.T
    if allowed is not None:
        s[:, ~allowed] = -np.inf
    return np.argsort(-s, axis=1)[:, :k]


def measure(index: SearchIndex, Q: np.ndarray, where: str | None, truth: np.ndarray) -> dict:
    index.search(Q[:1], 10, where=where)  # the mask, computed once
    times = []
    for q in Q[:300]:
        t0 = time.perf_counter()
        index.search(q[None], 10, where=where)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    hits = index.search(Q, 10, where=where)
    batch_s = time.perf_counter() - t0
    found = [[h.id for h in q] for q in hits]
    recall = np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])
    return {"p50_ms": 1e3 * np.percentile(times, 50), "p99_ms": 1e3 * np.percentile(times, 99),
            "qps": len(Q) / batch_s, "recall": recall, "min_hits": min(len(f) for f in found)}


def run(quick: bool = False) -> None:
    n, d = (20_000, 128) if quick else (100_000, 128)
    X = clustered(n, d, centers=100, seed=0)
    Q = clustered(1000, d, centers=100, seed=0)[:1000] + np.random.default_rng(1).normal(size=(1000, d)).astype(
        np.float32)
    bucket = np.random.default_rng(2).integers(0, 100, n)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    columns = {"id": np.arange(n), "bucket": bucket}
    masks = {}
    for name, where in FILTERS.items():
        if where is not None:
            t0 = time.perf_counter()
            masks[name] = compile_mask(where, columns)
            print(f"   filter {where!r}: keeps {masks[name].mean():.2%} of {n} rows; parse + mask "
                  f"{1e3 * (time.perf_counter() - t0):.2f} ms")
    truth = {name: exact_allowed(Xn, Qn, masks.get(name)) for name in FILTERS}
    tmp = Path(tempfile.mkdtemp(prefix="bench-filters-"))
    try:
        write_cache(tmp / "c.h5", X)
        print(f"   {n} x {d}, k = 10, cosine\n")
        print(f"   {'kind':<6}{'filter':<8}{'p50 ms':>9}{'p99 ms':>9}{'batch q/s':>11}{'recall@10':>11}"
              f"{'min hits':>10}{'p50 vs none':>13}")
        for kind in ("flat", "ivf", "hnsw"):
            t0 = time.perf_counter()
            build_index(tmp / "c.h5", tmp / kind, kind=kind, progress=False)
            with h5py.File(tmp / kind / "rows.h5", "a") as f:
                f.create_group("columns").create_dataset("bucket", data=bucket)
            index = SearchIndex.open(tmp / kind)
            knob = {k: v for k, v in index.meta["params"].items() if k in ("nprobe", "efSearch")}
            print(f"   {kind} built in {time.perf_counter() - t0:.1f} s {knob or ''}")
            base = None
            for name, where in FILTERS.items():
                r = measure(index, Q, where, truth[name])
                base = base or r["p50_ms"]
                print(f"   {kind:<6}{name:<8}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['qps']:>11.0f}"
                      f"{r['recall']:>11.3f}{r['min_hits']:>10}{r['p50_ms'] / base:>12.2f}x")
            shutil.rmtree(tmp / kind)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
