"""The errors table's cost: a listing of mostly missing files through the real CacheWriter.

    python -m benchmarks errors [--quick]

N listing rows (N = 25,000, 50,000, 100,000, 200,000; quick: 10,000 and 40,000) of which 95%
fail ("file not found: ..." reasons of ~80 characters, paths of ~60), fed to CacheWriter.add
in batches of 64 with the default --commit-every (512), then finish(); the model is left out,
so what is timed is the writer alone. Each N runs in a fresh subprocess that reports its wall
time and the RSS it added on top of the process after imports (VmHWM - VmRSS before). Goal:
time and added memory grow linearly with N (the per-row cost stays flat as N doubles).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ONE = """
import json, resource, sys, time
import numpy as np, h5py  # noqa: F401 - libraries, loaded before the baseline
from pathlib import Path
from embedder.cache.reader import CacheSpec
from embedder.cache.writer import CacheWriter
from embedder.data.sources import Listing
def kib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])
n, out = int(sys.argv[1]), Path(sys.argv[2])
paths = [f"photos/2024/folder_{i // 1000:04d}/IMG_{i:08d}_missing.jpg" for i in range(n)]
listing = Listing(out.parent, paths, np.full(n, -1, dtype=np.int64), [], "filelist")
spec = CacheSpec({"model": "synthetic", "dim": "16"}, str(out.parent), 16, layout="filelist")
base = kib("VmRSS")
t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
with CacheWriter(out, spec, listing, commit_every=512) as w:
    for start in range(0, n, 64):
        idx = np.arange(start, min(start + 64, n))
        ok = idx[idx % 20 == 0]
        errors = [(int(i), f"file not found: {paths[i]} (No such file or directory)") for i in idx if i % 20]
        w.add(ok, np.ones((len(ok), 16), np.float32), errors)
    t_add = time.perf_counter() - t0
    w.finish()
c1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime  # less moved by other jobs than the wall time
print(json.dumps({"n": n, "add_s": t_add, "wall_s": time.perf_counter() - t0, "cpu_s": cpu,
                  "added_mib": (kib("VmHWM") - base) / 1024}))
"""


def measure(n: int, pythonpath: str | None = None) -> dict:
    """One N in a fresh process; `pythonpath`: another checkout's embedder (a before/after comparison)."""
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
    with tempfile.TemporaryDirectory() as tmp:
        # cwd: the temporary folder, so that `-c` does not put this checkout first on sys.path
        out = subprocess.run([sys.executable, "-c", ONE, str(n), f"{tmp}/c.h5"], check=True, capture_output=True,
                             text=True, env=env, cwd=tmp)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> list[dict]:
    sizes = (10_000, 40_000) if quick else (25_000, 50_000, 100_000, 200_000)
    print(f"   {'rows':>8} {'errors':>8} {'add+commits s':>14} {'total s':>8} {'cpu s':>6} {'us/row':>7} "
          f"{'added MiB':>10}")
    results = []
    for n in sizes:
        r = measure(n)
        results.append(r)
        print(f"   {n:>8,} {n - n // 20:>8,} {r['add_s']:>14.2f} {r['wall_s']:>8.2f} {r['cpu_s']:>6.2f} "
              f"{1e6 * r['wall_s'] / n:>7.1f} "
              f"{r['added_mib']:>10.1f}")
    return results


def compare(against: str, sizes=(25_000, 50_000, 100_000, 200_000), repeats: int = 3) -> None:
    """This checkout against the tree at `against` (e.g. `git archive REF embedder | tar -x -C DIR`),
    each N in turn for both, `repeats` times interleaved; the best of each (the run least slowed by
    other jobs on a shared machine)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print(f"   {'rows':>8} {'before s':>9} {'cpu s':>6} {'us/row':>7} {'MiB':>6} "
          f"{'after s':>8} {'cpu s':>6} {'us/row':>7} {'MiB':>6} {'ratio':>6}")
    for n in sizes:
        runs = {"before": [], "after": []}
        for _ in range(repeats):
            runs["before"].append(measure(n, against))
            runs["after"].append(measure(n, here))
        b, a = (min(runs[k], key=lambda r: r["wall_s"]) for k in ("before", "after"))
        print(f"   {n:>8,} {b['wall_s']:>9.2f} {b['cpu_s']:>6.2f} {1e6 * b['wall_s'] / n:>7.1f} {b['added_mib']:>6.1f} "
              f"{a['wall_s']:>8.2f} {a['cpu_s']:>6.2f} {1e6 * a['wall_s'] / n:>7.1f} {a['added_mib']:>6.1f} "
              f"{b['wall_s'] / a['wall_s']:>6.2f}", flush=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.errors", description=__doc__)
    ap.add_argument("--against", required=True, help="a folder holding another tree's embedder/ package")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", type=lambda s: tuple(int(x) for x in s.split(",")),
                    default=(25_000, 50_000, 100_000, 200_000))
    args = ap.parse_args()
    compare(args.against, args.sizes, args.repeats)
