"""Reader -> backbone -> cache writer, timed per stage.

Batch contract between the stages (one dict per batch, produced by `BatchReader`):

    indices   int64 [n]            listing rows that decoded, in order
    images    uint8 [n, 3, S, S]   crop-size RGB pixels of those rows
    errors    list[(row, reason)]  listing rows that could not be used, and why
    decode_s  float                seconds spent reading and decoding files
    resize_s  float                seconds spent resizing and cropping

Batches are fixed slices of the pending rows, so which images share a batch never
depends on worker timing, resume points or commit sizes: the same command always feeds
the network the same batches.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from embedder.atomic import WriteLock
from embedder.cache.fingerprint import fingerprint_components
from embedder.cache.reader import CacheSpec, FeatureCache
from embedder.cache.writer import CacheWriter
from embedder.data.decode import DEFAULT_MAX_PIXELS
from embedder.data.sources import Listing, describe_ignored, list_source
from embedder.data.transforms import geometric_transform, read_for_model
from embedder.errors import AllImagesFailedError, BadImageError, EmbedderNotice
from embedder.extract.config import EmbedConfig
from embedder.models.backbone import DEFAULT_STYLE_DIM, BackboneConfig, FrozenBackbone
from embedder.models.registry import Preprocessing
from embedder.models.runtime import resolve_runtime
from embedder.names import display_path

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
    ):
        self.root, self.paths, self.rows = root, paths, rows
        self.batch_size = batch_size
        self.crop = preprocessing.crop_size
        self.resize_size = preprocessing.resize_size
        self.transform = geometric_transform(preprocessing)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __getitem__(self, b: int) -> dict:
        rows = self.rows[b * self.batch_size : (b + 1) * self.batch_size]
        images, ok, errors = [], [], []
        seconds = {"decode": 0.0, "resize": 0.0}
        for row in rows:
            try:
                images.append(read_for_model(self.root / self.paths[row], self.transform, self.resize_size,
                                             self.max_pixels, seconds))
            except BadImageError as exc:
                errors.append((int(row), exc.reason))
                continue
            ok.append(int(row))
        stacked = torch.stack(images) if images else torch.empty((0, 3, self.crop, self.crop), dtype=torch.uint8)
        return {
            "indices": np.asarray(ok, dtype=np.int64),
            "images": stacked,
            "errors": errors,
            "decode_s": seconds["decode"],
            "resize_s": seconds["resize"],
        }


@dataclass
class EmbedReport:
    out: str
    fingerprint: str
    listed: int  # files found in SOURCE (after --limit)
    already_cached: int  # listed files that an earlier run had done (rows or errors)
    embedded: int  # new feature rows written by this run
    errors: list[tuple[str, str]]  # (path, reason) recorded by this run
    total_rows: int  # feature rows in the finished cache
    ignored: int  # files under SOURCE that are not rows (not image names, hidden, outside classes, links)
    wall_s: float
    stage_s: dict[str, float] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    ignored_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def up_to_date(self) -> bool:
        return self.embedded == 0 and not self.errors

    @property
    def images_per_s(self) -> float:
        done = self.embedded + len(self.errors)
        return done / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> str:
        if self.up_to_date:
            return (
                f"{self.out} is up to date: all {self.listed} files of SOURCE are cached "
                f"({self.total_rows} rows). Nothing to do."
            )
        lines = [
            f"wrote {self.out}  ({self.total_rows} rows, fingerprint {self.fingerprint[:12]})",
            f"  images embedded : {self.embedded}  ({self.images_per_s:.1f} img/s over {self.wall_s:.1f} s)",
            f"  already cached  : {self.already_cached}",
            *([f"  layers          : {', '.join(json.loads(self.config['layers']))} (the first is /features)"]
              if "layers" in self.config else []),
            f"  errors          : {len(self.errors)}" + (" (see the errors table: embedder info --errors)" if self.errors else ""),
        ]
        if self.ignored:
            lines.append(f"  ignored files   : {describe_ignored(self.ignored_by_reason)}")
        for path, reason in self.errors[:5]:
            lines.append(f"    {display_path(path)}: {reason}")
        if len(self.errors) > 5:
            lines.append(f"    ... and {len(self.errors) - 5} more")
        lines.append("  time per stage  : " + ", ".join(f"{k} {v:.2f}s" for k, v in self.stage_s.items()))
        lines.append("                    (decode and resize run in the reader workers, in parallel with the model;")
        lines.append("                     'wait' is the time the model stage waited for them)")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "out": self.out,
            "fingerprint": self.fingerprint,
            "listed": self.listed,
            "already_cached": self.already_cached,
            "embedded": self.embedded,
            "errors": [{"path": p, "reason": r} for p, r in self.errors],
            "total_rows": self.total_rows,
            "ignored": self.ignored,
            "ignored_by_reason": self.ignored_by_reason,
            "wall_s": self.wall_s,
            "images_per_s": self.images_per_s,
            "stage_s": self.stage_s,
            "config": self.config,
        }


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


def load_backbone(
    model: str,
    weights: str = "DEFAULT",
    *,
    layer: str | None = None,
    normalize: str = "none",
    image_size: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    memory_layout: str = "auto",
    pool: str = "avg",
    extra_layers: tuple[str, ...] = (),
    style_layers: tuple[str, ...] = (),
    style_dim: int = DEFAULT_STYLE_DIM,
    compile: bool = False,
) -> FrozenBackbone:
    """An eval-locked backbone with `auto` settings resolved exactly as `embedder embed` resolves them."""
    runtime = resolve_runtime(device, precision, memory_layout)
    return FrozenBackbone.from_config(
        BackboneConfig(
            model=model,
            weights=weights,
            layer=layer,
            pool=pool,
            normalize=normalize,
            image_size=image_size,
            device=runtime.device,
            precision=runtime.precision,
            channels_last=runtime.channels_last,
            extra_layers=tuple(extra_layers),
            style_layers=tuple(style_layers),
            style_dim=style_dim,
            compile=compile,
        )
    )


def backbone_for(config: EmbedConfig) -> FrozenBackbone:
    return load_backbone(
        config.model,
        config.weights,
        layer=config.layer,
        normalize=config.normalize,
        image_size=config.image_size,
        device=config.device,
        precision=config.precision,
        memory_layout=config.memory_layout,
        pool=config.pool,
        extra_layers=tuple(n for n in config.outputs[1:] if n is not None),
        style_layers=config.style_layers,
        style_dim=config.style_dim,
        compile=config.compile,
    )


def embed(config: EmbedConfig, backbone: FrozenBackbone | None = None, command: str | None = None,
          lock: WriteLock | None = None) -> EmbedReport:
    """Embed every image of `config.source` into the cache `config.out` (create, resume or append).

    `lock`: the cache's write lock, when the caller holds it already (the CLI takes it first thing)."""
    if lock is not None:
        return _embed_locked(config, backbone, command, lock)
    # The lock first: a second run into the same cache is refused at once, before it spends
    # tens of seconds building a model.
    with WriteLock(Path(config.out)) as taken:
        return _embed_locked(config, backbone, command, taken)


def _embed_locked(config: EmbedConfig, backbone, command: str | None, lock: WriteLock) -> EmbedReport:
    t_start = time.perf_counter()
    listing = list_source(config.source, config.layout, config.limit)
    backbone = backbone or backbone_for(config)
    spec = CacheSpec(
        components=fingerprint_components(backbone, config.feature_dtype),
        source=str(listing.root if listing.layout != "filelist" else Path(config.source).resolve()),
        feature_dim=backbone.feature_dim,
        layers=dict(backbone.outputs) if len(backbone.outputs) > 1 else {},
        layout=listing.layout,
        command=command if command is not None else config.command_line(),
    )
    timer = StageTimer()
    new_errors: list[tuple[str, str]] = []
    if config.pool == "none":
        mib = sum(backbone.outputs.values()) * (2 if config.feature_dtype == "float16" else 4) * 1000 / 2**20
        warnings.warn(f"--pool none stores whole maps: {dict(backbone.outputs)} values per image, "
                      f"{mib:.0f} MiB per 1000 images.", EmbedderNotice, stacklevel=2)
    if config.compile and config.progress:
        warnings.warn(f"--compile: the first batch compiles {config.model} (tens of seconds on a CPU).",
                      EmbedderNotice, stacklevel=2)
    embedded = 0
    with CacheWriter(config.out, spec, listing, overwrite=config.overwrite, commit_every=config.commit_every,
                     lock=lock) as writer:
        pending = writer.pending
        already = len(listing) - len(pending)
        if len(pending):
            embedded = _run_batches(config, backbone, listing, writer, timer, new_errors)
        total_rows = writer.finish()
    wall = time.perf_counter() - t_start
    report = EmbedReport(
        out=str(config.out),
        fingerprint=spec.fingerprint,
        listed=len(listing),
        already_cached=already,
        embedded=embedded,
        errors=new_errors,
        total_rows=total_rows,
        ignored=len(listing.ignored),
        wall_s=wall,
        stage_s={k: round(v, 3) for k, v in timer.seconds.items()},
        config={k: str(v) for k, v in spec.components.items()},
        ignored_by_reason=listing.ignored_counts(),
    )
    if total_rows == 0:
        with FeatureCache(config.out) as cache:
            errors = cache.errors
        sample = "; ".join(f"{display_path(p)}: {r}" for p, r in errors[:3])
        raise AllImagesFailedError(
            f"No image of {config.source} could be used ({len(errors)} failed, e.g. {sample}). "
            f"Check that SOURCE holds images; the reasons are in {config.out} (embedder info --errors)."
        )
    return report


def _run_batches(config, backbone, listing: Listing, writer: CacheWriter, timer: StageTimer, new_errors) -> int:
    on_gpu = backbone.device.type == "cuda"
    reader = BatchReader(
        listing.root, listing.paths, writer.pending, config.batch_size, backbone.preprocessing, config.max_pixels
    )
    workers = config.resolved_workers()
    loader = DataLoader(
        reader,
        batch_size=None,  # the reader already yields whole batches
        shuffle=False,
        num_workers=workers,
        pin_memory=on_gpu,
        prefetch_factor=4 if workers else None,
    )
    embedded = 0
    bar = tqdm(
        total=len(writer.pending), unit="img", desc="embed", disable=not config.progress, dynamic_ncols=True,
        file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 30.0,  # logs get a line every 30 s
    )
    with bar:
        batches = iter(loader)
        while True:
            with timer("wait"):
                batch = next(batches, None)
            if batch is None:
                break
            timer.seconds["decode"] += batch["decode_s"]
            timer.seconds["resize"] += batch["resize_s"]
            features = {n: np.zeros((0, d), dtype=np.float32) for n, d in backbone.outputs.items()}
            if len(batch["indices"]):
                with timer("transfer"):
                    images = batch["images"].to(backbone.device, non_blocking=True)
                with timer("model"):
                    out = backbone.forward_all(images)
                    if on_gpu:
                        torch.cuda.synchronize()
                with timer("transfer"):
                    features = {n: v.cpu().numpy() for n, v in out.items()}
            if len(features) == 1:
                features = features[backbone.node]  # single-layer caches: exactly the old write path
            with timer("write"):
                writer.add(batch["indices"], features, batch["errors"])
            embedded += len(batch["indices"])
            new_errors += [(listing.paths[i], reason) for i, reason in batch["errors"]]
            bar.update(len(batch["indices"]) + len(batch["errors"]))
            if batch["errors"]:
                bar.set_postfix(errors=len(new_errors))
    return embedded


def embed_images(
    backbone: FrozenBackbone, paths: list[str | Path], batch_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Features for image files, in memory, with the same reader as `embed`.

    Returns (features [n_ok, D], errors [(path, reason)]); rows follow `paths`, minus failures.
    """
    rows = np.arange(len(paths), dtype=np.int64)
    reader = BatchReader(Path("."), [str(p) for p in paths], rows, batch_size, backbone.preprocessing, max_pixels)
    feats, errors = [], []
    for b in range(len(reader)):
        batch = reader[b]
        if len(batch["indices"]):
            feats.append(backbone(batch["images"]).cpu().numpy())
        errors += [(str(paths[i]), reason) for i, reason in batch["errors"]]
    out = np.concatenate(feats) if feats else np.zeros((0, backbone.feature_dim), np.float32)
    return out, errors
