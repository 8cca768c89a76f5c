"""Sharded extraction on Ray Data against the local backend, same machine, same settings.

    python -m benchmarks sharded [--quick]

The figure that feeds the scaling analysis in docs/SCALING.md is the *per-worker* throughput:
images per second of one actor embedding its shards (decode, resize, model, shard write,
marker), read from the shard markers, next to the local backend's end-to-end rate. Ray's own
start-up (cluster, actor, model build) is reported separately: it is paid once per run, not
per image. Both sides produce the same bits (checked). The actor reserves both cores, as the
local run uses them: Ray sets an actor's torch/OpenMP threads to its `num_cpus`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.extraction import make_jpegs
from embedder.cache import FeatureCache
from embedder.config import EmbedConfig
from embedder.extract import embed


def _mean_pixels(work: Path) -> float:
    from PIL import Image

    sizes = [Image.open(p).size for p in (work / "src" / "x").glob("*.jpg")]
    return float(np.mean([w * h for w, h in sizes]))


def run(quick: bool = False) -> None:
    import ray

    from embedder.ray_backend import RayOptions, embed_ray
    from embedder.shards import shards_dir

    model, n, batch, shard = ("resnet18", 64, 16, 32) if quick else ("resnet50", 128, 16, 32)
    work = Path(tempfile.mkdtemp(prefix="embedder-bench-"))
    try:
        make_jpegs(work / "src" / "x", n)
        common = dict(source=str(work / "src"), model=model, weights="none", batch_size=batch, workers=1,
                      device="cpu", precision="fp32", memory_layout="channels_last", progress=False)
        t0 = time.perf_counter()
        local = embed(EmbedConfig(out=str(work / "local.h5"), **common))
        print(f"   local backend : {local.embedded / local.wall_s:6.1f} img/s end to end "
              f"({n} images, {model}, batch {batch}, 1 reader worker, {time.perf_counter() - t0:.1f} s)")
        prep = local.stage_s["decode"] + local.stage_s["resize"]
        print(f"   decode+resize : {n / prep:6.1f} img/s per reader process (JPEG ~{_mean_pixels(work)/1e6:.2f} MP)")
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        t_init = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            report = embed_ray(EmbedConfig(out=str(work / "ray.h5"), **common),
                               RayOptions(shard_size=shard, actors=1, cpus_per_actor=2.0))
            wall = time.perf_counter() - t0
        finally:
            ray.shutdown()
        markers = [json.loads(p.read_text()) for p in sorted(shards_dir(work / "ray.h5").glob("*.done"))]
        busy = sum(m["wall_s"] for m in markers)
        print(f"   ray, 1 actor  : {n / busy:6.1f} img/s per worker inside its shards "
              f"({len(markers)} shards of {shard}), {n / wall:.1f} img/s including actor start-up "
              f"({wall:.1f} s run, {wall - busy:.1f} s not in shards; ray.init {t_init:.1f} s)")
        print(f"   ratio         : {(n / busy) / (local.embedded / local.wall_s):.2f}x per-worker vs local")
        with FeatureCache(work / "local.h5") as a, FeatureCache(work / "ray.h5") as b:
            same = np.array_equal(a.features(), b.features())
        print(f"   same features : {same}")
        assert report.total_rows == n
    finally:
        shutil.rmtree(work, ignore_errors=True)
