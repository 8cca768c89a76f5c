"""Curation: label-mistake detection on digits, and duplicates at scale through an ANN index.

    python -m benchmarks curate [--quick]
    python -m benchmarks.curate --rows 1000000      # the dedup part at another size (default 200,000)

Part 1, label mistakes: the digits sample (1,797 images; --quick: every third) embedded with
efficientnet_lite0 as benchmarks/tutorial.py does, 5% of the labels flipped to another class
(seeded), then `embedder curate`. Reported: precision at the number of flipped labels (of the
rows ranked most likely mislabelled, how many were flipped), the recall of the confident-learning
issues, and the wall time.

Part 2, duplicates at scale: N x 512 clustered synthetic vectors (N/1000 centres, rows of one
cluster at cosine ~0.5) with 1% of the rows replaced by planted near-copies (groups of 2 to 4, noise 0.01
of the vectors' scale: cosine >= 0.99 to their original). Each method runs in a fresh
subprocess reporting its peak RSS (VmHWM):
    ivf     `embedder dedup --kind ivf` (what auto picks past 50,000 rows while raw vectors fit
            the budget): range search in blocks, nprobe 8
    ivfsq   the same through IVF-SQ8 (4x less index memory)
    exact   the exact blocked search (IndexFlat range search, 16,384 queries per block, as
            `dedup` did before): timed on its first block of queries and the full time
            extrapolated (every block scans all N rows, so the total is that block's time
            times N / 16,384: quadratic in N)
Recall is of the planted pairs (random vectors of this kind never reach cosine 0.95 by chance;
any other pair found is counted as extra).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

EXACT_TIMED_ROWS = 16_384  # query rows the exact search is timed on (one block)
THRESHOLD = 0.95

DEDUP = """
import json, sys, time
import faiss, numpy as np, scipy.sparse.csgraph  # noqa: F401 - libraries, loaded before the baseline
from embedder.search.dedup import find_duplicates
def kib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])
base = kib("VmRSS")
t = time.perf_counter()
found = find_duplicates(sys.argv[1], float(sys.argv[2]), kind=sys.argv[3])
print(json.dumps({"base": base, "peak": kib("VmHWM"), "s": time.perf_counter() - t, "kind": found.kind,
                  "groups": found.groups}))
"""

EXACT = """
import json, sys, time
import faiss, numpy as np
from embedder.cache.reader import FeatureCache
from embedder.search.kinds import prepare
def kib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])
base = kib("VmRSS")
limit = int(sys.argv[3])
t = time.perf_counter()
with FeatureCache(sys.argv[1]) as cache:
    rows = len(cache)
    index = faiss.IndexFlatIP(cache.dim)
    for b in cache.iter_blocks(16384):
        index.add(prepare(b.features, "cosine"))
    build = time.perf_counter() - t
    done = 0
    for b in cache.iter_blocks(16384):
        index.range_search(prepare(b.features, "cosine"), float(sys.argv[2]))
        done += len(b.features)
        if done >= limit:
            break
print(json.dumps({"base": base, "peak": kib("VmHWM"), "build_s": build, "search_s": time.perf_counter() - t - build,
                  "queries": done, "rows": rows}))
"""


def label_mistakes(quick: bool, work: Path) -> None:
    from benchmarks.tutorial import digits_sample
    from embedder.curate.config import CurateConfig
    from embedder.curate.run import run_curate
    from embedder.extract.config import EmbedConfig
    from embedder.extract.local import embed

    digits = digits_sample(work, quick)
    cache = work / "digits.h5"
    t = time.perf_counter()
    embed(EmbedConfig.of(source=str(digits), model="efficientnet_lite0", out=str(cache), progress=False))
    embed_s = time.perf_counter() - t
    with h5py.File(cache, "r+") as f:  # flip 5% of the labels, seeded, each to another class
        labels = f["labels"][:]
        rng = np.random.default_rng(0)
        flipped = rng.choice(len(labels), size=round(0.05 * len(labels)), replace=False)
        k = len(f["classes"])
        labels[flipped] = (labels[flipped] + rng.integers(1, k, len(flipped))) % k
        f["labels"][:] = labels
    t = time.perf_counter()
    summary = run_curate(CurateConfig(str(cache), out=str(work / "report"), gallery=0, progress=False))
    curate_s = time.perf_counter() - t
    import pyarrow.parquet as pq

    table = pq.read_table(work / "report" / "scores.parquet", columns=["mistake_rank", "label_issue"]).to_pydict()
    rank, issue = np.array(table["mistake_rank"]), np.array(table["label_issue"])
    top = np.argsort(rank)[: len(flipped)]
    precision = len(set(top.tolist()) & set(flipped.tolist())) / len(flipped)
    lm = summary["label_mistakes"]
    print(f"# part 1: digits, {len(labels)} images, efficientnet_lite0 features (embedded in {embed_s:.1f} s), "
          f"{len(flipped)} labels flipped (5%, seed 0)")
    print(f"precision@{len(flipped)} {precision:.3f}; confident-learning issues {lm['issues']} "
          f"(of them flipped: {int(issue[flipped].sum())}, recall {issue[flipped].mean():.3f}); "
          f"{lm['folds']}-fold out-of-fold accuracy {100 * lm['out_of_fold_accuracy']:.1f}% (C {lm['C']:.3g}); "
          f"curate {curate_s:.1f} s")


def planted(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """Clustered vectors with planted near-copy groups over 1% of the rows, and the planted pairs."""
    rng = np.random.default_rng(seed)
    # Centres as large as the noise: rows of one cluster sit at cosine ~0.5, far from the threshold.
    centres = rng.normal(size=(max(16, n // 1000), d)).astype(np.float32)
    X = np.empty((n, d), np.float32)
    for start in range(0, n, 65536):
        m = min(65536, n - start)
        X[start : start + m] = centres[rng.integers(0, len(centres), m)] + rng.normal(size=(m, d)).astype(np.float32)
    rows = rng.permutation(n)[: n // 100]
    pairs: set[tuple[int, int]] = set()
    start = 0
    while start < len(rows) - 1:
        size = min(int(rng.integers(2, 5)), len(rows) - start)
        group = np.sort(rows[start : start + size])
        for r in group[1:]:
            X[r] = X[group[0]] + 0.01 * np.abs(X[group[0]]).mean() * rng.normal(size=d).astype(np.float32)
        pairs |= {(int(a), int(b)) for i, a in enumerate(group) for b in group[i + 1 :]}
        start += size
    return X, pairs


def _run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def duplicates(rows: int, work: Path, d: int = 512) -> None:
    from benchmarks.search import write_cache

    t = time.perf_counter()
    X, truth = planted(rows, d)
    cache = work / "dup.h5"
    write_cache(cache, X)
    del X
    print(f"# part 2: {rows:,} x {d} clustered vectors, {len(truth):,} planted pairs (1% of rows in groups of 2-4), "
          f"threshold cosine >= {THRESHOLD}; cache written in {time.perf_counter() - t:.0f} s")
    print(f"{'method':<26}{'time s':>10}{'peak RSS MiB':>14}{'recall':>9}{'extra':>7}")
    for kind in ("ivf", "ivfsq"):
        r = _run(DEDUP, str(cache), str(THRESHOLD), kind)
        found = {(a, b) for g in r["groups"] for i, a in enumerate(g) for b in g[i + 1 :]}
        recall = len(found & truth) / len(truth)
        print(f"{'ann (' + r['kind'] + ')':<26}{r['s']:>10.1f}{(r['peak'] - r['base']) / 1024:>14.0f}"
              f"{recall:>9.4f}{len(found - truth):>7}")
    limit = min(rows, EXACT_TIMED_ROWS)
    r = _run(EXACT, str(cache), str(THRESHOLD), str(limit))
    full = r["build_s"] + r["search_s"] * rows / r["queries"]
    how = "" if r["queries"] >= rows else f" (timed on {r['queries']:,} queries, extrapolated)"
    print(f"{'exact blocked (flat)':<26}{full:>10.1f}{(r['peak'] - r['base']) / 1024:>14.0f}{'1.0000':>9}{'-':>7}{how}")


def run(quick: bool = False, rows: int | None = None) -> None:
    work = Path(tempfile.mkdtemp(prefix="embedder-bench-"))
    try:
        if rows is None:
            label_mistakes(quick, work)
        duplicates(rows or (50_000 if quick else 200_000), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="rows of the dedup part (e.g. 1000000)")
    run(rows=ap.parse_args().rows)
