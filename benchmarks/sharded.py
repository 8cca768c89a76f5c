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
from embedder.cache.reader import FeatureCache
from embedder.extract.config import EmbedConfig
from embedder.extract.local import embed


def _mean_pixels(work: Path) -> float:
    from PIL import Image

    sizes = [Image.open(p).size for p in (work / "src" / "x").glob("*.jpg")]
    return float(np.mean([w * h for w, h in sizes]))


def run(quick: bool = False) -> None:
    import ray

    from embedder.cache.shards import shards_dir
    from embedder.extract.config import RayOptions
    from embedder.extract.ray import embed_ray

    model, n, batch, shard, rounds = ("resnet18", 64, 16, 32, 1) if quick else ("resnet50", 128, 16, 32, 2)
    work = Path(tempfile.mkdtemp(prefix="embedder-bench-"))
    try:
        make_jpegs(work / "src" / "x", n)
        common = {"source": str(work / "src"), "model": model, "weights": "none", "batch_size": batch, "workers": 1,
                      "device": "cpu", "precision": "fp32", "memory_layout": "channels_last", "progress": False}
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        print(f"   ray.init      : {time.perf_counter() - t0:.1f} s")
        local_rates, ray_rates, prep_rates = [], [], []
        try:
            for r in range(rounds):  # alternate, so drifting load on a shared machine hits both sides
                local = embed(EmbedConfig.of(out=str(work / f"local{r}.h5"), **common))
                local_rates.append(local.embedded / local.wall_s)
                prep_rates.append(n / (local.stage_s["decode"] + local.stage_s["resize"]))
                t0 = time.perf_counter()
                report = embed_ray(EmbedConfig.of(out=str(work / f"ray{r}.h5"), **common),
                                   RayOptions(shard_size=shard, actors=1, cpus_per_actor=2.0))
                wall = time.perf_counter() - t0
                assert report.total_rows == n
                markers = [json.loads(p.read_text()) for p in shards_dir(work / f"ray{r}.h5").glob("*.done")]
                busy = sum(m["wall_s"] for m in markers)
                ray_rates.append(n / busy)
                print(f"   round {r + 1}       : local {local_rates[-1]:5.1f} img/s end to end | ray, 1 actor, "
                      f"{ray_rates[-1]:5.1f} img/s inside its {len(markers)} shards of {shard} "
                      f"({wall:.1f} s run, {wall - busy:.1f} s of it start-up and scheduling)")
        finally:
            ray.shutdown()
        print(f"   best          : local {max(local_rates):.1f} img/s, ray per worker {max(ray_rates):.1f} img/s "
              f"({max(ray_rates) / max(local_rates):.2f}x); {model}, batch {batch}, {n} images, 1 reader worker")
        print(f"   decode+resize : {max(prep_rates):.1f} img/s per reader process (JPEGs of "
              f"~{_mean_pixels(work) / 1e6:.2f} MP)")
        with FeatureCache(work / "local0.h5") as a, FeatureCache(work / "ray0.h5") as b:
            print(f"   same features : {np.array_equal(a.features(), b.features())}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
