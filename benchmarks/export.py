"""export-vectors streams: peak memory at N and 10 N rows must not grow with the cache.

    python -m benchmarks export [--quick]

A synthetic 512-d float32 cache with two metadata columns (a float and a string) besides the
built-in ones is written at N and 10 N rows (N = 20,000; quick: 5,000); each export (Parquet,
and clip-retrieval's npy layout) runs in a fresh subprocess that reports the RSS it added
on top of the process after imports (VmHWM - VmRSS before the export), and its wall time.
Goal: the 10 N export adds no more than 1.2x what the N export adds (blocks of 16,384 rows,
32 MiB of vectors each, are what memory holds).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

EXPORT = """
import json, sys, time
import pyarrow, pyarrow.parquet, h5py, tqdm.auto  # noqa: F401 - libraries, loaded before the baseline
from embedder.cache.vectors import export_vectors
def kib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])
base = kib("VmRSS")
t0 = time.perf_counter()
report = export_vectors(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
print(json.dumps({"base": base, "peak": kib("VmHWM"), "wall_s": time.perf_counter() - t0, "rows": report.rows}))
"""


def write_cache(path: Path, n: int, d: int = 512, seed: int = 0) -> None:
    """A real cache (the real writer) of `n` random rows with two user columns."""
    from embedder.cache.reader import CacheSpec
    from embedder.cache.writer import CacheWriter
    from embedder.data.metadata import BUILTIN, as_kind
    from embedder.data.sources import Listing

    rng = np.random.default_rng(seed)
    listing = Listing(path.parent, [f"img/{i:07d}.jpg" for i in range(n)], np.full(n, -1, np.int64), [], "flat")
    columns = {"score": rng.random(n), "tag": as_kind([f"tag-{i % 97}" for i in range(n)], "str")}
    spec = CacheSpec({"model": "synthetic"}, str(path.parent), d, layout="flat",
                     columns={**BUILTIN, "score": "float64", "tag": "str"})
    with CacheWriter(path, spec, listing, commit_every=65536, columns=columns) as w:
        for start in range(0, n, 65536):
            rows = np.arange(start, min(n, start + 65536))
            w.add(rows, rng.normal(size=(len(rows), d)).astype(np.float32), [])
        w.finish()


def _run(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", EXPORT, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> None:
    n = 5_000 if quick else 20_000
    work = Path(tempfile.mkdtemp(prefix="embedder-export-bench-"))
    try:
        print("# export-vectors: 512-d float32 cache + metadata columns, fresh process per export")
        print(f"{'rows':>9}{'format':>9}{'added RSS MiB':>15}{'wall s':>8}{'rows/s':>10}")
        added = {}
        for rows in (n, 10 * n):
            cache = work / f"c{rows}.h5"
            write_cache(cache, rows)
            for fmt in ("parquet", "npy"):
                r = _run(str(cache), str(work / f"{fmt}{rows}"), fmt)
                added[rows, fmt] = (r["peak"] - r["base"]) / 1024
                print(f"{rows:>9}{fmt:>9}{added[rows, fmt]:>15.0f}{r['wall_s']:>8.1f}{rows / r['wall_s']:>10.0f}")
                shutil.rmtree(work / f"{fmt}{rows}")
            cache.unlink()
        for fmt in ("parquet", "npy"):
            ratio = added[10 * n, fmt] / added[n, fmt]
            print(f"{fmt}: added RSS, 10 N / N: {ratio:.2f}x (goal <= 1.2x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
