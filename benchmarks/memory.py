"""Peak memory: extraction must not grow with the dataset; an index build must keep to its budget.

    python -m benchmarks memory [--quick]

Each measured run is a fresh subprocess that reports its own peak RSS (`ru_maxrss`) and
the peak of its children (the reader workers), so one run's allocations cannot hide
another's.

1. Extraction: `embedder.embed` (resnet18, random init, default settings) over N and 10 N
   small JPEGs. Goal: the 10 N run peaks at no more than 1.2x the N run.
2. Index build: `build_index` on a synthetic 512-d cache under `--memory-budget`, with the
   kind chosen by the budget. Reported: the RSS the build added on top of the process
   after imports (Python, torch, FAISS), against the budget. Goal: added RSS <= budget.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.extraction import make_jpegs

EMBED = """
import json, resource, sys
from embedder.extract.config import EmbedConfig
from embedder.extract.local import embed
embed(EmbedConfig.of(source=sys.argv[1], model="resnet18", weights="none", out=sys.argv[2], progress=False))
print(json.dumps({"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""

INDEX = """
import json, sys
import faiss, faiss.contrib.exhaustive_search, tqdm.auto  # noqa: F401 - libraries, loaded before the baseline
from embedder.search.build import build_index
def kib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])
base = kib("VmRSS")  # resident after imports, right before the build
meta = build_index(sys.argv[1], sys.argv[2], memory_budget=int(sys.argv[3]), progress=False)
peak = kib("VmHWM")  # the high-water mark, build included
print(json.dumps({"base": base, "peak": peak, "kind": meta["kind"], "recall": meta["recall_at_10"]}))
"""


def _run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def extraction(quick: bool, work: Path) -> None:
    n = 40 if quick else 400
    print("# extraction: resnet18 (random init, default settings) over N and 10 N JPEGs, fresh process each")
    print(f"{'images':>8}{'main MiB':>10}{'worker MiB':>12}{'total MiB':>11}")
    totals = {}
    for count in (n, 10 * n):
        folder = work / f"jpegs{count}"
        make_jpegs(folder / "x", count, seed=count, scale=0.5)  # small photos, so that 10 N stays quick
        r = _run(EMBED, str(folder), str(work / f"c{count}.h5"))
        totals[count] = (r["self"] + r["workers"]) / 1024
        print(f"{count:>8}{r['self'] / 1024:>10.0f}{r['workers'] / 1024:>12.0f}{totals[count]:>11.0f}")
    ratio = totals[10 * n] / totals[n]
    print(f"peak RSS, 10 N / N: {ratio:.3f}x (goal <= 1.2x)")


def index_build(quick: bool, work: Path) -> None:
    from benchmarks.search import clustered, write_cache

    # Budgets that walk the auto ladder: ivfpq, ivfsq, hnsw (quick: ivfsq, hnsw).
    cases = ([(100_000, 128 << 20), (100_000, 512 << 20)] if quick
             else [(400_000, 256 << 20), (400_000, 512 << 20), (400_000, 2 << 30)])
    print("# index build under --memory-budget (512-d clustered vectors, kind chosen by the budget)")
    print(f"{'vectors':>9}{'budget MiB':>12}{'kind':>7}{'added RSS MiB':>15}{'within':>8}{'recall@10':>11}")
    done = set()
    for n, budget in cases:
        cache = work / f"v{n}.h5"
        if n not in done:
            write_cache(cache, clustered(n, 512, centers=1000, seed=0))
            done.add(n)
        r = _run(INDEX, str(cache), str(work / f"idx{n}-{budget}"), str(budget))
        added = (r["peak"] - r["base"]) / 1024
        ok = "yes" if added <= budget / 2**20 else "NO"
        print(f"{n:>9}{budget / 2**20:>12.0f}{r['kind']:>7}{added:>15.0f}{ok:>8}{r['recall']:>11.3f}")


def run(quick: bool = False) -> None:
    work = Path(tempfile.mkdtemp(prefix="embedder-bench-"))
    try:
        extraction(quick, work)
        index_build(quick, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
