"""Webdataset tar shards against a folder: the same JPEGs, both through `embedder.embed`.

    python -m benchmarks tar [--quick]

The JPEGs of benchmarks/extraction.py's `make_jpegs` are written to a folder and packed into
tar shards of 50 (each image with a `.cls` member). Both sources are embedded by the same
backbone, batch size and reader-worker setting, alternating round by round, each into a fresh
cache. Prints images/s of each (best round), the ratio tar / folder (above 1: tar is faster),
the decode stage's seconds (reading included), and checks that the features are bit-identical.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.extraction import make_jpegs
from embedder.cache.reader import FeatureCache
from embedder.extract.config import EmbedConfig
from embedder.extract.core import load_backbone
from embedder.extract.local import embed


def _pack(files: list[Path], shards: Path, per_shard: int = 50) -> None:
    shards.mkdir(parents=True)
    for s in range(0, len(files), per_shard):
        with tarfile.open(shards / f"{s // per_shard:05d}.tar", "w") as tar:
            for i, f in enumerate(files[s : s + per_shard]):
                tar.add(f, arcname=f.name)
                info = tarfile.TarInfo(f"{f.stem}.cls")
                data = str(i % 4).encode()
                info.size = len(data)
                tar.addfile(info, fileobj=io.BytesIO(data))


def _features(out: Path) -> dict[str, np.ndarray]:
    with FeatureCache(out) as c:
        return {p.rsplit("/", 1)[-1]: row for p, row in zip(c.paths, c.features())}


def reader_rate(source: str, preprocessing, rounds: int, fetch=None) -> float:
    """Best images/s of the reader stage alone (list, read, decode, resize; no model), in this process."""
    from embedder.data.sources import list_source
    from embedder.extract.core import BatchReader

    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        listing = list_source(source)
        reader = BatchReader(listing.root, listing.paths, np.arange(len(listing)), 32, preprocessing,
                             members=listing.members, fetch=fetch)
        n = sum(len(reader[b]["indices"]) for b in range(len(reader)))
        best = max(best, n / (time.perf_counter() - t0))
    return best


def run(quick: bool = False) -> None:
    model, n, rounds = ("resnet18", 64, 2) if quick else ("resnet18", 200, 4)
    work = Path(tempfile.mkdtemp(prefix="embedder-bench-tar-"))
    try:
        files = make_jpegs(work / "images", n)
        _pack(files, work / "shards")
        backbone = load_backbone(model, "none")
        sources = {"folder": work / "images", "tar shards": work / "shards"}
        wall = {name: [] for name in sources}
        decode = {name: [] for name in sources}
        for r in range(rounds):
            order = list(sources) if r % 2 == 0 else list(reversed(sources))  # neither always runs first
            for name in order:
                src = sources[name]
                out = work / f"{name.split()[0]}-{r}.h5"
                report = embed(EmbedConfig.of(source=str(src), model=model, out=str(out), weights="none",
                                           batch_size=32, workers=0, progress=False), backbone=backbone)
                wall[name].append(report.wall_s)
                decode[name].append(report.stage_s["decode"])
        same = _features(work / "folder-0.h5")
        other = _features(work / "tar-0.h5")
        identical = same.keys() == other.keys() and all(np.array_equal(same[k], other[k]) for k in same)
        print(f"# {model}, {n} JPEGs, {len(list((work / 'shards').iterdir()))} shards, batch 32, workers 0, "
              f"{rounds} rounds")
        # The best round of each: on shared cores the others' load only ever slows a round down.
        best = {name: min(w) for name, w in wall.items()}
        fast = {name: min(d) for name, d in decode.items()}
        print(f"{'source':<14}{'img/s':>8}{'decode s':>10}   (best of {rounds} rounds)")
        for name in sources:
            print(f"{name:<14}{n / best[name]:>8.1f}{fast[name]:>10.2f}")
        print(f"tar / folder throughput: {best['folder'] / best['tar shards']:.2f}x; decode stage "
              f"{fast['folder'] / fast['tar shards']:.2f}x; features bit-identical: {identical}")
        # The reader alone, where the input side's cost is not hidden behind the model's.
        rates = {name: [] for name in sources}
        for r in range(rounds):
            for name in (sources if r % 2 == 0 else list(reversed(sources))):
                rates[name].append(reader_rate(str(sources[name]), backbone.preprocessing, 1))
        folder, tar = max(rates["folder"]), max(rates["tar shards"])
        print(f"reader only (list + read + decode + resize, 1 process): folder {folder:.0f} img/s, tar shards "
              f"{tar:.0f} img/s, tar / folder {tar / folder:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
