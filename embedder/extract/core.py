"""The one embed core: a slice of a listing -> backbone -> cache writer, timed per stage.

`embed_into(writer, backbone, config)` embeds the rows a `CacheWriter` still lacks (the rows
of its listing not yet in its cache) and finishes the cache. Both drivers are built on it
and on `cache_spec` (listing + backbone + config -> the `CacheSpec` a cache records) and
`require_rows` (a finished run that kept no row is an error): the local driver
(`embedder.extract.local.embed`) runs it once over the whole listing, the Ray driver
(`embedder.extract.ray`) once per shard, each shard being the listing of its own writer.

Batch contract between the stages (one dict per batch, produced by `BatchReader`):

    indices   int64 [n]            listing rows that decoded, in order
    images    uint8 [n, 3, S, S]   crop-size RGB pixels of those rows
    errors    list[(row, reason)]  listing rows that could not be used, and why
    decode_s  float                seconds spent reading and decoding files
    resize_s  float                seconds spent resizing and cropping
    columns   {name: array [n]}    what reading learnt of those rows: the built-in columns size
                                   (int64 bytes), mtime (float64), width, height (int64, the
                                   image's own size) of `embedder.data.metadata`

Batches are fixed slices of the pending rows, so which images share a batch never
depends on worker timing, resume points or commit sizes: the same command always feeds
the network the same batches.
"""

from __future__ import annotations

import contextlib
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from embedder.cache.fingerprint import fingerprint_components
from embedder.cache.reader import CacheSpec, FeatureCache, recorded_components
from embedder.cache.writer import CacheWriter
from embedder.data.decode import DEFAULT_MAX_PIXELS
from embedder.data.fetch import Fetcher, FetchSettings
from embedder.data.formats import is_url
from embedder.data.metadata import BUILTIN, READ_COLUMNS, MetadataTable, merge_tables, null_of, read_table, split_column
from embedder.data.sources import Listing
from embedder.data.transforms import geometric_transform, read_for_model
from embedder.data.workers import die_with_parent
from embedder.errors import AllImagesFailedError, BadImageError
from embedder.extract.config import EmbedConfig
from embedder.extract.images import features_of
from embedder.models.backbone import FrozenBackbone
from embedder.models.registry import Preprocessing
from embedder.models.runtime import resolve_runtime
from embedder.models.space import FeatureSpace, check_settings, recorded_settings, takes_settings
from embedder.names import display_path
from embedder.progress import bar as progress_bar

STAGES = ("decode", "resize", "wait", "transfer", "model", "write")


class BatchReader(Dataset):
    """Reader stage. Item `b` is the b-th batch of `rows` (indices into `paths`)."""

    def __init__(
        self,
        root: Path,
        paths: list[str],
        rows: np.ndarray,
        batch_size: int,
        preprocessing: Preprocessing,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        jpeg_draft: bool = False,
        members: dict | None = None,
        fetch: FetchSettings | None = None,
    ):
        self.root, self.paths, self.rows = root, paths, rows
        self.members = members  # tar sources: {path: TarMember}, each row's bytes read by offset
        # http(s) rows are fetched; the fetcher's pool and threads are made in the process that reads.
        self.fetcher = Fetcher(fetch or FetchSettings())
        self.batch_size = batch_size
        self.crop = preprocessing.crop_size
        self.resize_size = preprocessing.resize_size
        self.transform = geometric_transform(preprocessing)
        self.max_pixels = max_pixels
        self.jpeg_draft = jpeg_draft

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __getitem__(self, b: int) -> dict:
        rows = self.rows[b * self.batch_size : (b + 1) * self.batch_size]
        self._prefetch(b)
        images, ok, errors = [], [], []
        seconds = {"decode": 0.0, "resize": 0.0}
        read = {name: [] for name in READ_COLUMNS}
        for row in rows:
            info: dict = {}
            try:
                images.append(read_for_model(self._source(self.paths[row], info), self.transform,
                                             self.resize_size, self.max_pixels, seconds,
                                             jpeg_draft=self.jpeg_draft, info=info))
            except BadImageError as exc:
                errors.append((int(row), exc.reason))
                continue
            ok.append(int(row))
            for name in READ_COLUMNS:
                read[name].append(info.get(name, null_of(name, BUILTIN[name])))
        stacked = torch.stack(images) if images else torch.empty((0, 3, self.crop, self.crop), dtype=torch.uint8)
        return {
            "indices": np.asarray(ok, dtype=np.int64),
            "images": stacked,
            "errors": errors,
            "decode_s": seconds["decode"],
            "resize_s": seconds["resize"],
            "columns": {name: np.asarray(values, dtype=BUILTIN[name]) for name, values in read.items()},
        }


    def _prefetch(self, b: int) -> None:
        """Start the downloads of batch `b`'s URLs and of this reader's next batches, enough to keep
        every fetch thread busy (a DataLoader worker reads every num_workers-th batch)."""
        worker = get_worker_info()
        step = worker.num_workers if worker is not None else 1
        ahead = math.ceil(self.fetcher.settings.threads / self.batch_size)
        urls = [self.paths[r] for k in range(b, min(b + step * (ahead + 1), len(self)), step)
                for r in self.rows[k * self.batch_size : (k + 1) * self.batch_size] if is_url(self.paths[r])]
        if urls:
            self.fetcher.prefetch(urls)

    def _source(self, path: str, info: dict):
        """What `read_for_model` reads: the file, a tar member's or a download's bytes (their size and
        mtime into `info`)."""
        if is_url(path):
            fetched = self.fetcher.get(path)
            info.update(size=len(fetched.data), mtime=fetched.mtime)
            return fetched.data
        if self.members is None:
            return self.root / path
        member = self.members[path]
        info.update(size=member.size, mtime=member.mtime)
        return member.read()


class StageTimer:
    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t0


@takes_settings(FeatureSpace.field_names()[2:], documented=FeatureSpace.field_names())
def load_backbone(model: str, weights: str = "DEFAULT", **settings) -> FrozenBackbone:
    """An eval-locked backbone with `auto` settings resolved exactly as `embedder embed` resolves them:
    ``FeatureSpace(model, weights, **settings).load()``; a keyword that is not a setting is a ConfigError.

    Parameters
    ----------
    SETTINGS

    Returns
    -------
    FrozenBackbone
        The eval-locked backbone (`FrozenBackbone.embed` takes a uint8 batch).
    """
    check_settings({"model": model, "weights": weights, **settings})
    return FeatureSpace(model, weights, **settings).load()


def backbone_for(config: EmbedConfig) -> FrozenBackbone:
    return config.space.load()


def with_runtime(config: EmbedConfig) -> EmbedConfig:
    """`config` with `--runtime auto` (and `--precision auto`) made concrete, once per run (so every
    Ray actor runs the same), by `FeatureSpace.resolve`'s precedence: what a cache being resumed or
    appended to was made with, else the fastest for the device and model family."""
    recorded = None if config.overwrite else recorded_components(config.out)
    return replace(config, space=_run_space(config.space, recorded))


def _run_space(space: FeatureSpace, recorded: dict | None) -> FeatureSpace:
    """`with_runtime`'s space: `recorded` are the fingerprint components of the cache being continued."""
    if space.precision == "fast" and resolve_runtime(space.device, "auto").device != "cpu":
        space = replace(space, precision="auto")  # the fast paths are the CPU's; a GPU's default is its fast path
    if recorded is not None:
        # An existing cache keeps its precision (the old bf16 default's too; `fast` keeps what it chose) and
        # its runtime: FeatureSpace.resolve's "recorded" step, taken here so the run's config says so.
        kept = recorded_settings(recorded)
        if space.precision == "fast" and "precision" in kept:
            space = replace(space, precision="auto")
        return replace(space, **{k: v for k, v in kept.items() if getattr(space, k) == "auto"})
    if space.runtime != "auto" or space.precision == "fast":  # fast: embedder.extract.fidelity picks per path
        return space
    return replace(space, runtime=space.resolve().runtime)


def cache_spec(config: EmbedConfig, listing: Listing, backbone: FrozenBackbone, command: str,
               metadata: MetadataTable | None = None, fidelity: str = "") -> CacheSpec:
    """What a cache of `listing` embedded by `backbone` records: fingerprint components, source,
    widths (every layer, the primary first, for a multi-layer cache), the command that resumes it,
    its metadata columns (the built-in ones, and those of the --metadata table) and the fast path's
    fidelity card (JSON, embedder.extract.fidelity)."""
    return CacheSpec(
        components=fingerprint_components(backbone, config.feature_dtype, jpeg_draft=config.jpeg_draft),
        # A file list's (a table's) rows are relative to its own folder, but SOURCE is the list itself.
        source=str(listing.root if listing.layout not in ("filelist", "table") else Path(config.source).resolve()),
        feature_dim=backbone.feature_dim,
        layers=dict(backbone.outputs) if len(backbone.outputs) > 1 else {},
        layout=listing.layout,
        command=command,
        columns=column_kinds(metadata),
        aliases=layer_aliases(backbone),
        fidelity=fidelity,
        names=backbone.layer_names,
    )


def layer_aliases(backbone: FrozenBackbone) -> dict[str, str]:
    """{node: the model's first alias for it} of the layers this run stores (the name the docs use)."""
    named: dict[str, str] = {}
    for alias, node in backbone.spec.layer_aliases.items():
        named.setdefault(node, alias)
    return {node: named[node] for node in (backbone.outputs or {backbone.node: 0}) if node in named}


def column_kinds(metadata: MetadataTable | None) -> dict[str, str]:
    """{name: kind} of the columns an embed run writes."""
    return {**BUILTIN, **(metadata.schema if metadata is not None else {})}


def load_metadata(config: EmbedConfig, listing: Listing) -> MetadataTable | None:
    """The run's metadata columns: those SOURCE gives (`listing.table`) and the --metadata table's, or None."""
    return merge_tables(listing.table, read_table(config.metadata) if config.metadata else None)


def known_columns(listing: Listing, metadata: MetadataTable | None) -> tuple[dict[str, np.ndarray], list[str]]:
    """The columns known before reading, aligned with `listing` (split, --metadata), and the table's
    paths that are not in the listing (the run reports them)."""
    columns = {"split": split_column(listing.paths, listing.layout)}
    unlisted: list[str] = []
    if metadata is not None:
        joined, unlisted = metadata.join(listing.paths)
        columns.update(joined)
    return columns, unlisted


@dataclass
class Embedded:
    """What `embed_into` did to one writer's cache."""

    already_cached: int  # rows of the writer's listing done before (an earlier run, a killed attempt's parts)
    embedded: int  # feature rows written by this call
    errors: list[tuple[str, str]]  # (path, reason) recorded by this call
    total_rows: int  # feature rows in the finished cache
    stage_s: dict[str, float]  # seconds per stage, STAGES order


def embed_into(writer: CacheWriter, backbone: FrozenBackbone, config: EmbedConfig,
               progress: bool | None = None) -> Embedded:
    """Embed the rows `writer` still lacks (`writer.pending`, rows of `writer.listing`), then finish its cache.

    Reads with `config.batch_size`, `max_pixels` and `workers`; `progress` (default
    `config.progress`) shows a bar on stderr."""
    timer, errors = StageTimer(), []
    already = len(writer.listing) - len(writer.pending)
    embedded = 0
    if len(writer.pending):
        embedded = _embed_pending(writer, backbone, config, timer, errors,
                                  config.progress if progress is None else progress)
    total_rows = writer.finish()
    return Embedded(already, embedded, errors, total_rows, {k: round(v, 3) for k, v in timer.seconds.items()})


def _embed_pending(writer: CacheWriter, backbone: FrozenBackbone, config: EmbedConfig, timer: StageTimer,
                   errors: list[tuple[str, str]], progress: bool) -> int:
    """The reader -> model -> writer loop over `writer.pending`. Returns the rows embedded; appends to `errors`."""
    listing = writer.listing
    reader = BatchReader(listing.root, listing.paths, writer.pending, config.batch_size, backbone.preprocessing,
                         config.max_pixels, config.jpeg_draft, listing.members, config.fetch_settings())
    bar = progress_bar(total=len(writer.pending), unit="img", desc="embed", enabled=progress)
    embedded = 0
    with bar, contextlib.closing(reader.fetcher):  # queued downloads dropped if the loop stops early
        for batch in _timed(_loader(reader, config.resolved_workers(), backbone.device.type == "cuda"), timer):
            features = _forward(backbone, batch, timer)
            with timer("write"):
                writer.add(batch["indices"], features, batch["errors"], batch["columns"])
            embedded += len(batch["indices"])
            errors += [(listing.paths[i], reason) for i, reason in batch["errors"]]
            bar.update(len(batch["indices"]) + len(batch["errors"]))
            if batch["errors"]:
                bar.set_postfix(errors=len(errors))
    return embedded


def _loader(reader: BatchReader, workers: int, on_gpu: bool) -> DataLoader:
    return DataLoader(
        reader,
        batch_size=None,  # the reader already yields whole batches
        shuffle=False,
        num_workers=workers,
        pin_memory=on_gpu,
        prefetch_factor=4 if workers else None,
        worker_init_fn=die_with_parent if workers else None,  # a killed run leaves no reader behind
    )


def _timed(loader: DataLoader, timer: StageTimer):
    """The loader's batches; the time spent waiting for each is the stage `wait`, and the
    reader workers' own decode and resize seconds are added to theirs."""
    batches = iter(loader)
    while True:
        with timer("wait"):
            batch = next(batches, None)
        if batch is None:
            return
        timer.seconds["decode"] += batch["decode_s"]
        timer.seconds["resize"] += batch["resize_s"]
        yield batch


def _forward(backbone: FrozenBackbone, batch: dict, timer: StageTimer):
    """The batch's features: {layer: array} for a multi-layer cache, one array for a single-layer one."""
    features = {n: np.zeros((0, d), dtype=np.float32) for n, d in backbone.outputs.items()}
    if len(batch["indices"]):
        with timer("transfer"):
            images = batch["images"].to(backbone.device, non_blocking=True)
        with timer("model"):
            out = backbone.forward_all(images)
            if backbone.device.type == "cuda":
                torch.cuda.synchronize()  # CUDA runs asynchronously: without it, the copy below gets the model's time
        with timer("transfer"):
            features = {n: v.cpu().numpy() for n, v in out.items()}
    if len(features) == 1:
        return features[backbone.node]  # single-layer caches: exactly the old write path
    return features


def require_rows(config: EmbedConfig, total_rows: int) -> None:
    """A finished run whose cache has no row is an error, not an empty cache: say why the images failed."""
    if total_rows:
        return
    with FeatureCache(config.out) as cache:
        errors = cache.errors
    sample = "; ".join(f"{display_path(p)}: {r}" for p, r in errors[:3])
    raise AllImagesFailedError(
        f"No image of {config.source} could be used ({len(errors)} failed, e.g. {sample}). "
        f"Check that SOURCE holds images; the reasons are in {config.out} (embedder info --errors)."
    )


def embed_images(
    backbone: FrozenBackbone, paths: list[str | Path], batch_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Features for image files, in memory, with the same reader as `embed` (`batch_size` None:
    `--batch-size auto`'s, for the backbone's device).

    Returns (features [len(paths), D], errors [(path, reason)]): row i is paths[i], a row of NaN
    where that file could not be used. `embedder.extract(paths, model=backbone, errors="return")`
    is the same with PIL images and arrays too.
    """
    features, failed = features_of(backbone, list(paths), batch_size, max_pixels)
    return features, [(str(paths[e.index]), e.reason) for e in failed]
