"""Keeping a collection in step: sync cost against a full run, watch latency, and an unchanged sync at scale.

    python -m benchmarks sync [--quick]

Part 1: a folder of N JPEGs (benchmarks/extraction.py's `make_jpegs`, scale 0.5) is embedded by
efficientnet_lite0 (shipped weights) into a fresh cache; then 1% of the files are rewritten
(new pixels, new mtime) and the same `embed` runs again (the sync). Both runs use the same
backbone object, so model building is in neither; listing, stat and comparison are in both.
Prints both times and their ratio (the issue's bound: sync <= 5% of the full run).

Part 2: `embedder.search.watch.watch` follows the folder with an index (flat) kept in step,
and `embedder serve`'s app (uvicorn in a thread) answers from that index; images arrive one
at a time (written under a hidden name, renamed in, as a copy tool does) and each arrival's
latency is the time until the service's /search/vector, asked with the image's own vector
(computed beforehand), returns its path first. Prints the median and 95th percentile, the
requests that were not 200, and what a sync cycle spends (embed, index update).

Part 3: the cost of a sync that finds nothing to do on 100,000 paths: a cache of 100,000 rows
(8-wide vectors, size and mtime columns matching empty files on disk) and a folder of the
same 100,000 files; times listing + stat + comparison (`CacheWriter` opening the cache, which
reads the record and classifies every path) and, in a second pass, its Python peak memory
(tracemalloc, which slows such code, so the time is from the first pass).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.extraction import make_jpegs
from embedder.extract.config import EmbedConfig
from embedder.extract.core import backbone_for, with_runtime
from embedder.extract.local import embed


def _config(src: Path, out: Path, quick: bool) -> EmbedConfig:
    if quick:
        return EmbedConfig.of(source=str(src), model="resnet18", weights="none", image_size=64, out=str(out),
                           progress=False)
    return EmbedConfig.of(source=str(src), model="efficientnet_lite0", out=str(out), progress=False)


def part1(work: Path, n: int, quick: bool) -> None:
    src, out = work / "photos", work / "c.h5"
    make_jpegs(src, n, scale=0.5)
    config = with_runtime(_config(src, out, quick))
    backbone = backbone_for(config)
    t0 = time.perf_counter()
    full = embed(config, backbone=backbone)
    full_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    changed = sorted(src.iterdir())[:: 100][: max(1, n // 100)]
    for path in changed:
        array = rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
        Image.fromarray(array).save(path, quality=90)
    t0 = time.perf_counter()
    again = embed(config, backbone=backbone)
    sync_s = time.perf_counter() - t0
    print(f"# part 1: {n} JPEGs, {config.space.model}, {full.embedded} embedded in {full_s:.1f} s (full run)")
    print(f"  sync of {len(changed)} changed files ({again.sync}): {sync_s:.2f} s, stages {again.stage_s}")
    print(f"  sync / full = {sync_s / full_s:.3%}  (bound: 5%)")


def part2(work: Path, arrivals: int, quick: bool) -> None:
    from embedder.extract.core import embed_images
    from embedder.search.watch import watch
    from embedder.serve.app import create_app
    from embedder.serve.server import serve_in_thread

    src, out, idx = work / "watched", work / "w.h5", work / "idx"
    make_jpegs(src, 20, seed=5, scale=0.5)
    spare = make_jpegs(work / "spare", arrivals, seed=6, scale=0.5)
    config = with_runtime(_config(src, out, quick))
    vectors, _ = embed_images(backbone_for(config), spare)  # each arrival's query vector, ready beforehand
    stop, cycles, ready = threading.Event(), [], threading.Event()

    def on_sync(report, mode):
        cycles.append(report)
        ready.set()

    thread = threading.Thread(target=watch, args=(config, idx), kwargs={"quiet": 0.3, "stop": stop, "on_sync": on_sync})
    thread.start()
    latencies, statuses = [], []
    try:
        ready.wait(600)
        with serve_in_thread(create_app(idx)) as (host, port):
            url = f"http://{host}:{port}/search/vector"
            for i, path in enumerate(spare):
                name = f"new_{i:03d}.jpg"
                tmp = src / f".{name}.part"
                shutil.copyfile(path, tmp)
                t0 = time.perf_counter()
                os.replace(tmp, src / name)
                while _top_hit(url, vectors[i], statuses) != name:
                    time.sleep(0.05)
                latencies.append(time.perf_counter() - t0)
    finally:
        stop.set()
        thread.join()
    lat = np.array(latencies)
    walls = [c.wall_s for c in cycles[1:]]
    print(f"# part 2: watch + index (flat) + embedder serve, {arrivals} arrivals one at a time, settle 0.3 s, "
          f"{config.space.model}")
    print(f"  file appears -> the service returns it: median {np.median(lat):.2f} s, p95 "
          f"{np.percentile(lat, 95):.2f} s, max {lat.max():.2f} s; {len(statuses)} requests, "
          f"{sum(s != 200 for s in statuses)} not 200")
    print(f"  {len(cycles) - 1} syncs, each (embed + index update) median {statistics.median(walls):.2f} s; "
          f"embed stages of the last: {cycles[-1].embed.stage_s}")


def _top_hit(url: str, vector: np.ndarray, statuses: list[int]) -> str | None:
    """The path of the service's first hit for `vector` (None on a failed request, recorded in `statuses`)."""
    import json
    import urllib.error
    import urllib.request

    body = json.dumps({"vector": [float(v) for v in vector], "k": 1}).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            statuses.append(r.status)
            hits = json.loads(r.read())["hits"]
    except urllib.error.HTTPError as e:
        statuses.append(e.code)
        return None
    return hits[0]["path"] if hits else None


def part3(work: Path, n: int) -> None:
    from embedder.cache.reader import CacheSpec
    from embedder.cache.writer import CacheWriter
    from embedder.data.metadata import BUILTIN
    from embedder.data.sources import list_source

    src = work / "many"
    for d in range(100):
        (src / f"d{d:02d}").mkdir(parents=True)
    names = [f"d{i % 100:02d}/{i:06d}.jpg" for i in range(n)]
    for name in names:
        (src / name).touch()
    listing = list_source(src, layout="flat")
    stats = [os.stat(src / p) for p in listing.paths]
    columns = {"size": np.array([s.st_size for s in stats]), "mtime": np.array([s.st_mtime for s in stats])}
    spec = CacheSpec({"model": "synthetic"}, str(listing.root), 8, layout="flat", columns=dict(BUILTIN))
    cache = work / "many.h5"
    with CacheWriter(cache, spec, listing, commit_every=10**9, columns={"split": np.full(n, "", object)}) as w:
        w.add(np.arange(n), np.zeros((n, 8), np.float32), [], columns={**columns,
                                                                      "width": np.zeros(n, np.int64),
                                                                      "height": np.zeros(n, np.int64)})
        w.finish()
    timed = _unchanged_sync(src, cache, spec)  # timed without tracemalloc (it slows allocation-heavy code)
    tracemalloc.start()
    _unchanged_sync(src, cache, spec)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    listed_s, total_s, plan, pending = timed
    t0 = time.perf_counter()
    root = str(src)
    for p in listing.paths:
        os.stat(os.path.join(root, p))
    stat_s = time.perf_counter() - t0
    print(f"# part 3: unchanged sync of {n} paths: {total_s:.2f} s ({listed_s:.2f} s listing, "
          f"{total_s - listed_s:.2f} s reading the record + stat + comparison), Python peak {peak / 2**20:.0f} MiB")
    print(f"  found {plan.as_dict()}, {pending} to embed; the bare stat loop alone: {stat_s:.2f} s")


def _unchanged_sync(src: Path, cache: Path, spec):
    from embedder.cache.sync import SyncOptions
    from embedder.cache.writer import CacheWriter
    from embedder.data.sources import list_source

    t0 = time.perf_counter()
    listing = list_source(src, layout="flat")
    listed_s = time.perf_counter() - t0
    with CacheWriter(cache, spec, listing, sync=SyncOptions()) as w:
        plan, pending = w.plan, len(w.pending)
    return listed_s, time.perf_counter() - t0, plan, pending


def run(quick: bool = False) -> None:
    n, arrivals, many = (300, 10, 10_000) if quick else (int(os.environ.get("SYNC_N", "5000")), 50, 100_000)
    parts = os.environ.get("SYNC_PARTS", "123")  # e.g. SYNC_PARTS=3: only the unchanged sync at scale
    work = Path(tempfile.mkdtemp(prefix="embedder-bench-sync-"))
    try:
        if "1" in parts:
            part1(work, n, quick)
        if "2" in parts:
            part2(work, arrivals, quick)
        if "3" in parts:
            part3(work, many)
    finally:
        shutil.rmtree(work, ignore_errors=True)
