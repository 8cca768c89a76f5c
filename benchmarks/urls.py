"""http(s) URL input from a loopback server against a folder of the same JPEGs, through `embed`.

    python -m benchmarks urls [--quick]

The JPEGs of benchmarks/extraction.py's `make_jpegs` are served by tests/loopback.py's HTTP
server on 127.0.0.1 (a process of its own, sharing the two cores with the run), once
answering at once and once after a delay standing in for a network's round trip. Prints:

  * fetch only: downloads/s and MB/s of `Fetcher` (16 threads) for each delay, best round;
  * reader only: images/s of the reader stage (read or fetch, decode, resize; no model) for
    the folder and the URL list;
  * end to end: images/s of `embed` from the folder and from a URL list (same backbone, batch
    size and reader setting, alternating round by round, best round of each), the ratio
    URL / folder, and whether the features are bit-identical.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from benchmarks.extraction import make_jpegs
from benchmarks.tar import reader_rate
from embedder.cache.reader import FeatureCache
from embedder.data.fetch import Fetcher, FetchSettings
from embedder.extract.config import EmbedConfig
from embedder.extract.core import load_backbone
from embedder.extract.local import embed

DELAYS = (0.0, 0.05)


@contextmanager
def served(folder: Path, delay: float):
    """tests/loopback.py's server in a process of its own, as a real server would be; yields its base URL."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.loopback", str(folder), "--latency", str(delay)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def _features(out: Path) -> dict[str, np.ndarray]:
    with FeatureCache(out) as c:
        return {p.rsplit("/", 1)[-1]: row for p, row in zip(c.paths, c.features())}


def _fetch_only(folder: Path, names: list[str], delay: float) -> tuple[float, float]:
    """(downloads/s, MB/s) of fetching every image once on a fresh Fetcher."""
    with served(folder, delay) as base:
        fetcher = Fetcher(FetchSettings())
        urls = [f"{base}/img/{n}" for n in names]
        t0 = time.perf_counter()
        fetcher.prefetch(urls)
        size = sum(len(fetcher.get(u).data) for u in urls)
        s = time.perf_counter() - t0
    return len(urls) / s, size / s / 2**20


def _embed_rounds(work: Path, model: str, names: list[str], delay: float, rounds: int) -> dict[str, float]:
    """Best images/s of the folder and of the URL list over `rounds` alternating rounds."""
    backbone = load_backbone(model, "none")
    best = {"folder": 0.0, "urls": 0.0}
    with served(work / "images", delay) as base:
        (work / "urls.txt").write_text("".join(f"{base}/img/{n}\n" for n in names))
        sources = {"folder": work / "images", "urls": work / "urls.txt"}
        for r in range(rounds):
            for name in (sources if r % 2 == 0 else list(reversed(sources))):
                out = work / f"{name}-{delay}-{r}.h5"
                report = embed(EmbedConfig.of(source=str(sources[name]), model=model, out=str(out), weights="none",
                                           batch_size=32, workers=0, progress=False), backbone=backbone)
                assert not report.errors, report.errors[:3]
                best[name] = max(best[name], len(names) / report.wall_s)
    return best


def _reader_rates(work: Path, names: list[str], delay: float, rounds: int) -> tuple[float, float]:
    """Best images/s of the reader stage alone (no model): the folder, and the URL list."""
    pre = load_backbone("resnet18", "none").preprocessing
    with served(work / "images", delay) as base:
        (work / "urls-reader.txt").write_text("".join(f"{base}/img/{n}\n" for n in names))
        folder = reader_rate(str(work / "images"), pre, rounds)
        urls = reader_rate(str(work / "urls-reader.txt"), pre, rounds, FetchSettings())
    return folder, urls


def run(quick: bool = False) -> None:
    model, n, rounds = ("resnet18", 64, 2) if quick else ("resnet18", 200, 3)
    work = Path(tempfile.mkdtemp(prefix="embedder-bench-urls-"))
    try:
        names = sorted(f.name for f in make_jpegs(work / "images", n))
        mb = sum((work / "images" / f).stat().st_size for f in names) / 2**20
        print(f"# {n} JPEGs ({mb:.1f} MB) served from 127.0.0.1; fetch threads 16; {model} random init, batch 32, "
              f"workers 0, best of {rounds} rounds")
        print(f"{'delay':>8}{'fetch/s':>10}{'MB/s':>8}{'reader: folder':>16}{'URL':>7}{'ratio':>7}"
              f"{'embed: folder':>15}{'URL':>7}{'ratio':>7}   (img/s)")
        for delay in DELAYS:
            per_s, mb_s = max(_fetch_only(work / "images", names, delay) for _ in range(rounds))  # best round
            r_folder, r_urls = _reader_rates(work, names, delay, rounds)
            best = _embed_rounds(work, model, names, delay, rounds)
            print(f"{delay * 1000:>6.0f}ms{per_s:>10.0f}{mb_s:>8.1f}{r_folder:>16.0f}{r_urls:>7.0f}"
                  f"{r_urls / r_folder:>6.2f}x{best['folder']:>15.1f}{best['urls']:>7.1f}"
                  f"{best['urls'] / best['folder']:>6.2f}x")
        same, other = _features(work / "folder-0.0-0.h5"), _features(work / "urls-0.0-0.h5")
        identical = same.keys() == other.keys() and all(np.array_equal(same[k], other[k]) for k in same)
        print(f"features bit-identical (URL vs folder): {identical}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
