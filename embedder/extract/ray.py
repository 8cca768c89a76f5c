"""`embedder embed --backend ray`: the same extraction, sharded over a Ray cluster with Ray Data.

This driver only plans and schedules. The plan (which rows form which shard) and the files
are `embedder.cache.shards`; the embedding is the one embed core,
`embedder.extract.core.embed_into`, run by `embed_shard` once per shard into the shard's own
`CacheWriter`, over the local run's batches (`BatchGrid`). Any SOURCE reads: a tar SOURCE is
sharded along its tar shards, and each task carries its rows' members and their rows of the
SOURCE's own table (`ShardSet.task`). The listing becomes a Ray dataset with one row per
pending shard, and `map_batches` runs an actor pool over it: each actor builds the eval-locked backbone once
(with `num_gpus` per actor on GPU nodes) and embeds one shard per call, writing the shard's
cache file -- every layer, `--style` included -- and then its marker straight to the shared
filesystem. Only small summaries travel back to the driver, which refreshes the virtual view
`OUT` as shards finish. A killed run loses at most the shards in flight (and those resume
from their own parts).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

import h5py
import numpy as np

from embedder.atomic import WriteLock, file_sha256
from embedder.cache.fingerprint import component_differences, fingerprint_components
from embedder.cache.reader import CacheSpec, FeatureCache
from embedder.cache.shards import Shard, ShardJob, ShardSet, lock_output, write_json
from embedder.cache.sync import changes_since
from embedder.cache.writer import CacheWriter
from embedder.data.sources import Listing, list_source
from embedder.errors import CacheMismatchError, ConfigError
from embedder.extract.config import EmbedConfig, RayOptions
from embedder.extract.core import (
    backbone_for,
    cache_spec,
    column_kinds,
    embed_into,
    known_columns,
    load_metadata,
    require_rows,
    with_runtime,
)
from embedder.extract.local import EmbedReport
from embedder.models.backbone import FrozenBackbone


def _ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ConfigError("--backend ray needs Ray Data: pip install 'embedder[ray]'") from exc
    return ray


def _spec_here(config: EmbedConfig, listing: Listing, command: str) -> CacheSpec:
    """The spec a local run would record, with the backbone built in this process (a Ray task
    runs it on a worker when the work runs on GPUs). Only the listing's root and layout count."""
    return cache_spec(config, listing, backbone_for(config), command)


class ShardEmbedder:
    """A Ray Data actor: holds one eval-locked backbone, embeds one shard per call."""

    def __init__(self, config: EmbedConfig, job: ShardJob):
        self.config, self.job = config, job
        self.backbone = backbone_for(config)
        mine = fingerprint_components(self.backbone, config.feature_dtype, jpeg_draft=config.jpeg_draft)
        diff = component_differences(job.spec.components, mine)
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


def embed_ray(config: EmbedConfig, options: RayOptions | None = None, command: str | None = None,
              lock: WriteLock | None = None) -> EmbedReport:
    """Embed `config.source` into the sharded cache `config.out` on Ray. Returns an `EmbedReport`.

    Several `--layer`s and `--style` work as on the local backend: every shard stores every layer.
    `lock`: the cache's write lock, when the caller holds it already (the CLI takes it first thing)."""
    if config.space.precision in ("int8", "fast"):
        raise ConfigError(f"--precision {config.space.precision} calibrates and checks its fidelity card in one "
                          "process: use --backend local (or --precision fp32 on Ray).")
    if config.retry_errors:
        raise ConfigError("--retry-errors works with --backend local: a sharded cache's errors live in its "
                          "shards. Merge it (`embedder merge`) and retry into the merged cache.")
    if config.hash or config.refresh_urls:
        raise ConfigError("--hash and --refresh-urls sync a cache with --backend local only (a Ray rerun adds new "
                          "files): run `embedder embed SOURCE --out OUT` without --backend ray to sync it.")
    options = options or RayOptions()
    ray = _ray()
    started = time.perf_counter()
    # The lock first: a second run into the same cache is refused before Ray starts or a model is built.
    with lock_output(config.out, held=lock):
        config = with_runtime(config)
        listing = list_source(config.source, config.layout, config.limit, config.table_columns())
        _refuse_changes(config, listing)
        command = command if command is not None else config.command_line(backend="ray")
        started_here = not ray.is_initialized()
        if started_here:
            _init(ray, options.address, config.progress)
        try:
            return _embed_on_ray(ray, config, options, listing, command, started)
        finally:
            if started_here:
                ray.shutdown()


def _refuse_changes(config: EmbedConfig, listing: Listing) -> None:
    """A Ray rerun adds new files only: one whose SOURCE changed or lost files since is refused, naming
    the local run that syncs (embedder.cache.sync), rather than leaving stale rows without a word."""
    if config.overwrite or config.limit is not None:
        return
    plan = changes_since(config.out, listing)
    if plan is not None and (plan.changed or plan.gone):
        raise ConfigError(
            f"{plan.changed} files of SOURCE changed and {plan.gone} are gone since {config.out} was made, and "
            f"--backend ray adds new files only. Sync it with a local run (merge a sharded cache first: `embedder "
            f"merge {config.out} --out ONE.h5`, then `embedder embed {config.source} --out ONE.h5` without "
            "--backend ray), or remake it with --overwrite.")


def _init(ray, address: str | None, progress: bool) -> None:
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=progress, logging_level="WARNING")
    except (ConnectionError, TimeoutError) as exc:
        raise ConfigError(
            f"Cannot join the Ray cluster at {address}: {exc}. Start one with `ray start --head` (and pass "
            "--address auto), or leave out --address to run on a Ray instance started here."
        ) from None


def _embed_on_ray(ray, config: EmbedConfig, options: RayOptions, listing: Listing, command: str,
                  started: float) -> EmbedReport:
    gpus = _gpus_per_actor(ray, config, options)
    metadata = load_metadata(config, listing)
    spec = replace(_plan_spec(ray, config, options, listing, command, gpus), columns=column_kinds(metadata))
    _, unlisted = known_columns(listing, metadata)
    shard_set = ShardSet(config.out, spec, listing, options.shard_size, config.batch_size)
    shard_set.prepare(overwrite=config.overwrite)
    pending = shard_set.pending()
    already = len(listing) - sum(len(s) for s in pending)
    shard_set.write_view()  # from the first second on, OUT opens (incomplete until every shard is done)
    summaries = _run_pool(ray, config, options, shard_set, pending, gpus) if pending else []
    total_rows, complete = shard_set.write_view()
    report = EmbedReport.of_run(
        config, spec, listing, started,
        # Rows a shard had committed before an earlier run was killed were cached, not embedded, now.
        already_cached=already + sum(s["resumed"] for s in summaries),
        embedded=sum(s["embedded"] for s in summaries),
        errors=_errors_of(shard_set, {s["shard"] for s in summaries}),
        total_rows=total_rows,
        stage_s=_stage_sums(summaries),
        unlisted=unlisted,
        notes=metadata.notes if metadata else [],
    )
    if complete:
        require_rows(config, total_rows)
    return report


def _gpus_per_actor(ray, config: EmbedConfig, options: RayOptions) -> float:
    if options.gpus_per_actor is not None:
        return options.gpus_per_actor
    return 1.0 if config.space.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _plan_spec(ray, config: EmbedConfig, options: RayOptions, listing: Listing, command: str,
               gpus: float) -> CacheSpec:
    """The cache spec, resolved where the work runs: a GPU node resolves `auto` device and
    precision differently from a CPU-only driver, and the fingerprint must be the workers'."""
    if gpus == 0:
        return _spec_here(config, listing, command)
    # The task needs the listing's root and layout, not its (possibly hundreds of millions of) rows.
    stub = Listing(listing.root, [], np.zeros(0, np.int64), listing.classes, listing.layout)
    remote = ray.remote(num_gpus=gpus, num_cpus=options.cpus_per_actor)(_spec_here)
    return ray.get(remote.remote(config, stub, command))


def _errors_of(shard_set: ShardSet, shards: set[int]) -> list[tuple[str, str]]:
    """The errors tables of the shards this run embedded, in row order."""
    errors: list[tuple[str, str]] = []
    for shard in shard_set.shards:
        if shard.number in shards:
            with FeatureCache(shard_set.dir / f"{shard.name}.h5") as c:
                errors += c.errors
    return errors


def _run_pool(ray, config: EmbedConfig, options: RayOptions, shard_set: ShardSet, pending, gpus: float) -> list[dict]:
    """Embed the pending shards on an actor pool; returns one summary per shard embedded."""
    from embedder.progress import bar as progress_bar

    actors = options.actors
    if actors is None:
        res = ray.cluster_resources()
        share = res.get("GPU", 0) / gpus if gpus > 0 else res.get("CPU", 1) / options.cpus_per_actor
        actors = max(1, min(len(pending), int(share)))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # The listing as a dataset: one row per pending shard, carrying that shard's rows (ShardSet.task).
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
    bar = progress_bar(total=len(pending), unit="shard", desc="embed (ray)", enabled=config.progress)
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


def embed_shard(config: EmbedConfig, backbone: FrozenBackbone, job: ShardJob, task: dict) -> dict:
    """Embed one shard (a `ShardSet.task` row) into its own cache file, then write its marker.

    Returns the marker. The shard's cache resumes from its own committed parts if an earlier
    attempt was killed."""
    t0 = time.perf_counter()
    shard = Shard(int(task["shard"]), int(task["start"]), int(task["stop"]))
    reads, listing = job.listings(task)
    if len(listing) != len(shard):
        raise ValueError(f"{shard.name}: {len(listing)} rows given for [{shard.start}, {shard.stop})")
    h5 = job.folder / f"{shard.name}.h5"
    # Fixed-width paths: the view over the shards maps each shard's /paths (embedder.cache.view).
    columns, _ = known_columns(listing, load_metadata(config, listing))  # each worker joins its own rows
    with CacheWriter(h5, job.spec, listing, commit_every=config.commit_every, fixed_width_paths=True,
                     columns=columns) as w:
        grid = BatchGrid(w, reads, shard.start - int(task["read_start"]), int(task["read_start"]), config.batch_size)
        done = embed_into(grid, backbone, config, progress=False)  # many actors: no bars, the driver shows shards
    with h5py.File(h5, "r") as f:
        n_errors = len(f["errors/path"])  # this attempt's and those of parts a killed one committed
    marker = {
        "shard": shard.number, "start": shard.start, "stop": shard.stop, "rows": done.total_rows,
        "errors": n_errors, "fingerprint": job.spec.fingerprint, "bytes": h5.stat().st_size,
        "sha256": file_sha256(h5), "embedded": grid.embedded, "resumed": grid.already_cached,
        "wall_s": time.perf_counter() - t0, "stage_s": done.stage_s, "host": os.uname().nodename,
    }
    write_json(job.folder / f"{shard.name}.done", marker)
    return marker


class BatchGrid:
    """A shard's `CacheWriter` as `embed_into` sees it: the batches are the local run's.

    A local run's batches are the listing's rows [k * B, (k + 1) * B). A shard whose first or last
    row lies inside such a batch (a tar shard's length is rarely a multiple of B) is read with
    the rest of that batch (`reads`, rows [read_start, read_stop) of the listing), from the
    batch that holds its first pending row: the network sees the local run's very batches, so
    the features are bit-identical (a batch of another size or make-up can round differently).
    The neighbours' features, errors and columns are dropped here; only the shard's pending rows
    reach the writer. The writer commits at the end of a batch, so a resumed shard starts on a
    batch boundary again."""

    def __init__(self, writer: CacheWriter, reads: Listing, offset: int, read_start: int, batch_size: int):
        self.writer, self.listing, self.offset = writer, reads, offset  # reads[offset + i] is writer row i
        self.mine = np.zeros(len(reads), dtype=bool)
        self.mine[writer.pending + offset] = True
        self.already_cached = len(writer.listing) - len(writer.pending)
        self.embedded = 0  # feature rows of the shard written
        if len(writer.pending):
            first = read_start + offset + int(writer.pending[0])  # the listing row of the first pending row
            self.pending = np.arange(first - first % batch_size - read_start, len(reads), dtype=np.int64)
        else:
            self.pending = np.zeros(0, dtype=np.int64)

    def add(self, indices: np.ndarray, features, errors: list[tuple[int, str]],
            columns: dict[str, np.ndarray] | None = None) -> None:
        # The loader hands numpy arrays over as tensors; one of a single row would index as a scalar.
        indices = np.asarray(indices, dtype=np.int64)
        keep = self.mine[indices]
        if isinstance(features, dict):
            features = {name: np.asarray(value)[keep] for name, value in features.items()}
        else:
            features = np.asarray(features)[keep]
        self.writer.add(indices[keep] - self.offset, features,
                        [(int(i) - self.offset, reason) for i, reason in errors if self.mine[int(i)]],
                        {name: np.asarray(value)[keep] for name, value in (columns or {}).items()})
        self.embedded += int(keep.sum())

    def finish(self) -> int:
        return self.writer.finish()
