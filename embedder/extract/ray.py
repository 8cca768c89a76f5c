"""`embedder embed --backend ray`: the same extraction, sharded over a Ray cluster with Ray Data.

The plan (which rows form which shard) and the files are `embedder.cache.shards`; this module only
schedules. The listing becomes a Ray dataset with one row per pending shard, and
`map_batches` runs an actor pool over it: each actor builds the eval-locked backbone once
(with `num_gpus` per actor on GPU nodes) and embeds one shard per call, writing the shard's
cache file and then its marker straight to the shared filesystem. Only small summaries
travel back to the driver, which refreshes the virtual view `OUT` as shards finish.
A killed run loses at most the shards in flight (and those resume from their own parts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from embedder.atomic import file_sha256
from embedder.cache.reader import CacheSpec, FeatureCache
from embedder.cache.shards import Shard, ShardJob, ShardSet, lock_output, write_json
from embedder.cache.writer import CacheWriter
from embedder.data.sources import list_source
from embedder.errors import AllImagesFailedError, ConfigError
from embedder.extract.config import EmbedConfig, RayOptions
from embedder.extract.core import StageTimer, _run_batches
from embedder.names import display_path


def _ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ConfigError("--backend ray needs Ray Data: pip install 'embedder[ray]'") from exc
    return ray


def _spec_for(config: EmbedConfig, listing, command: str):
    """Build the backbone here and return (spec, backbone): what a local run would fingerprint."""
    return _spec_at(config, listing.root, listing.layout, command)


def _spec_at(config: EmbedConfig, root: Path, layout: str, command: str):
    from embedder.cache.fingerprint import fingerprint_components
    from embedder.extract.core import backbone_for

    backbone = backbone_for(config)
    spec = CacheSpec(
        components=fingerprint_components(backbone, config.feature_dtype),
        source=str(root if layout != "filelist" else Path(config.source).resolve()),
        feature_dim=backbone.feature_dim,
        layout=layout,
        command=command,
    )
    return spec, backbone


class ShardEmbedder:
    """A Ray Data actor: holds one eval-locked backbone, embeds one shard per call."""

    def __init__(self, config: EmbedConfig, job):
        from embedder.cache.fingerprint import fingerprint_components
        from embedder.errors import CacheMismatchError
        from embedder.extract.core import backbone_for

        self.config, self.job = config, job
        spec = job.spec
        self.backbone = backbone_for(config)
        mine = CacheSpec(fingerprint_components(self.backbone, config.feature_dtype), spec.source, spec.feature_dim)
        diff = mine.differences(spec.components, spec.source)
        if diff:  # e.g. a CPU-only driver planned for GPU workers: say which settings to pin
            raise CacheMismatchError(
                "this worker", diff, "Pin --device, --precision and --memory-layout so every node resolves them alike."
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        markers = [
            embed_shard(self.config, self.backbone, self.job, {key: batch[key][i] for key in batch})
            for i in range(len(batch["shard"]))
        ]
        return {
            "shard": np.array([m["shard"] for m in markers]),
            "rows": np.array([m["rows"] for m in markers]),
            "errors": np.array([m["errors"] for m in markers]),
            "embedded": np.array([m["embedded"] for m in markers]),
            "resumed": np.array([m["resumed"] for m in markers]),
            "wall_s": np.array([m["wall_s"] for m in markers]),
            "stage_s": np.array([json.dumps(m["stage_s"]) for m in markers]),
            "host": np.array([m["host"] for m in markers]),
        }


def embed_ray(config: EmbedConfig, options: RayOptions | None = None, command: str | None = None, lock=None):
    """Embed `config.source` into the sharded cache `config.out` on Ray. Returns an `EmbedReport`.

    `lock`: the cache's write lock, when the caller holds it already (the CLI takes it first thing)."""
    options = options or RayOptions()
    if config.extra_layers or config.style:
        raise ConfigError(
            "--backend ray stores one layer per cache for now (the shards' view maps /features only). "
            "Run one Ray embed per --layer, or use the local backend for several layers and --style."
        )
    ray = _ray()
    t_start = time.perf_counter()
    # The lock first: a second run into the same cache is refused before Ray starts or a model is built.
    with lock_output(config.out, held=lock):
        listing = list_source(config.source, config.layout, config.limit)
        command = command if command is not None else config.command_line(backend="ray")
        started_here = not ray.is_initialized()
        if started_here:
            _init(ray, options.address, config.progress)
        try:
            return _embed_on_ray(ray, config, options, listing, command, t_start)
        finally:
            if started_here:
                ray.shutdown()


def _init(ray, address: str | None, progress: bool) -> None:
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=progress, logging_level="WARNING")
    except (ConnectionError, TimeoutError) as exc:
        raise ConfigError(
            f"Cannot join the Ray cluster at {address}: {exc}. Start one with `ray start --head` (and pass "
            "--address auto), or leave out --address to run on a Ray instance started here."
        ) from None


def _embed_on_ray(ray, config: EmbedConfig, options: RayOptions, listing, command: str, t_start: float):
    from embedder.extract.core import EmbedReport

    gpus = options.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if config.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    if gpus > 0:
        # Fingerprint where the work runs: a GPU node resolves `auto` device/precision differently.
        remote = ray.remote(num_gpus=gpus, num_cpus=options.cpus_per_actor)(_spec_only)
        spec = ray.get(remote.remote(config, listing.root, listing.layout, command))
    else:
        spec, _ = _spec_for(config, listing, command)
    shard_set = ShardSet(config.out, spec, listing, options.shard_size, config.batch_size)
    shard_set.prepare(overwrite=config.overwrite)
    pending = shard_set.pending()
    already = len(listing) - sum(len(s) for s in pending)
    shard_set.write_view()  # from the first second on, OUT opens (incomplete until every shard is done)
    summaries = _run_pool(ray, config, options, shard_set, pending, gpus) if pending else []
    total_rows, complete = shard_set.write_view()
    done = {s["shard"] for s in summaries}
    new_errors: list[tuple[str, str]] = []
    for shard in shard_set.shards:
        if shard.number in done:
            with FeatureCache(shard_set.dir / f"{shard.name}.h5") as c:
                new_errors += c.errors
    report = EmbedReport(
        out=str(config.out),
        fingerprint=spec.fingerprint,
        listed=len(listing),
        # Rows a shard had committed before an earlier run was killed were cached, not embedded, now.
        already_cached=already + sum(s["resumed"] for s in summaries),
        embedded=sum(s["embedded"] for s in summaries),
        errors=new_errors,
        total_rows=total_rows,
        ignored=len(listing.ignored),
        wall_s=time.perf_counter() - t_start,
        stage_s=_stage_sums(summaries),
        config={k: str(v) for k, v in spec.components.items()},
        ignored_by_reason=listing.ignored_counts(),
    )
    if total_rows == 0 and complete:
        with FeatureCache(config.out) as cache:
            errors = cache.errors
        sample = "; ".join(f"{display_path(p)}: {r}" for p, r in errors[:3])
        raise AllImagesFailedError(
            f"No image of {config.source} could be used ({len(errors)} failed, e.g. {sample}). "
            f"Check that SOURCE holds images; the reasons are in {config.out} (embedder info --errors)."
        )
    return report


def _run_pool(ray, config: EmbedConfig, options: RayOptions, shard_set: ShardSet, pending, gpus: float) -> list[dict]:
    """Embed the pending shards on an actor pool; returns one summary per shard embedded."""
    from tqdm.auto import tqdm

    actors = options.actors
    if actors is None:
        res = ray.cluster_resources()
        share = res.get("GPU", 0) / gpus if gpus > 0 else res.get("CPU", 1) / options.cpus_per_actor
        actors = max(1, min(len(pending), int(share)))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # The listing as a dataset: one row per pending shard, carrying that shard's paths and labels.
    ds = ray.data.from_items([shard_set.task(s) for s in pending], override_num_blocks=len(pending))
    out = ds.map_batches(
        ShardEmbedder,
        fn_constructor_kwargs={"config": config, "job": shard_set.job},
        batch_size=1,  # one shard per call: a shard is the unit of work and of resume
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=options.cpus_per_actor,
        num_gpus=gpus,
    )
    summaries = []
    bar = tqdm(total=len(pending), unit="shard", desc="embed (ray)", disable=not config.progress,
               file=sys.stderr, dynamic_ncols=True)
    # The view opens every finished shard: refresh it now and then, not after each of thousands.
    next_view = time.monotonic() + 30
    with bar:
        for row in out.iter_rows():
            summaries.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
            bar.update(1)
            if time.monotonic() >= next_view:
                t0 = time.monotonic()
                shard_set.write_view()
                next_view = time.monotonic() + max(30, 10 * (time.monotonic() - t0))
    return summaries


def _stage_sums(summaries: list[dict]) -> dict[str, float]:
    """Seconds per stage, summed over the shards this run embedded (actors run in parallel)."""
    total: dict[str, float] = {}
    for s in summaries:
        for stage, seconds in json.loads(s["stage_s"]).items():
            total[stage] = round(total.get(stage, 0.0) + seconds, 3)
    return total


def _spec_only(config, root, layout, command):
    return _spec_at(config, root, layout, command)[0]


def embed_shard(config, backbone, job: ShardJob, task: dict) -> dict:
    """Embed one shard (a `ShardSet.task` row) into its own cache file, then write its marker.

    Returns the marker. The shard's cache resumes from its own committed parts if an earlier
    attempt was killed."""
    t0 = time.perf_counter()
    shard = Shard(int(task["shard"]), int(task["start"]), int(task["stop"]))
    listing = job.listing(task["paths"], task["labels"])
    if len(listing) != len(shard):
        raise ValueError(f"{shard.name}: {len(listing)} rows given for [{shard.start}, {shard.stop})")
    h5 = job.folder / f"{shard.name}.h5"
    timer, errors = StageTimer(), []
    config = dataclasses.replace(config, progress=False)
    with CacheWriter(h5, job.spec, listing, commit_every=config.commit_every, fixed_width_paths=True) as w:
        resumed = len(listing) - len(w.pending)
        embedded = _run_batches(config, backbone, listing, w, timer, errors) if len(w.pending) else 0
        rows = w.finish()
    with h5py.File(h5, "r") as f:
        n_errors = len(f["errors/path"])
    marker = {
        "shard": shard.number, "start": shard.start, "stop": shard.stop, "rows": rows, "errors": n_errors,
        "fingerprint": job.spec.fingerprint, "bytes": h5.stat().st_size, "sha256": file_sha256(h5),
        "embedded": embedded, "resumed": resumed, "wall_s": time.perf_counter() - t0,
        "stage_s": {k: round(v, 3) for k, v in timer.seconds.items()}, "host": os.uname().nodename,
    }
    write_json(job.folder / f"{shard.name}.done", marker)
    return marker
