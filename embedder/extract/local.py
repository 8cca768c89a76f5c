"""The local driver: `embedder embed` on this machine, one pass of the embed core over the listing.

`embed` takes the cache's write lock, lists SOURCE, builds the backbone and runs
`embedder.extract.core.embed_into` over the whole listing (create, resume or append: the
`CacheWriter` decides which rows are pending). `EmbedReport` is what every driver returns,
the Ray one (`embedder.extract.ray`) included.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from embedder.atomic import WriteLock
from embedder.cache.reader import CacheSpec, recorded_components, recorded_fidelity
from embedder.cache.sync import SyncOptions
from embedder.cache.writer import CacheWriter
from embedder.data.sources import Listing, describe_ignored, list_source
from embedder.errors import EmbedderNotice
from embedder.extract.config import EmbedConfig
from embedder.extract.core import (
    backbone_for,
    cache_spec,
    embed_into,
    known_columns,
    load_metadata,
    require_rows,
    with_runtime,
)
from embedder.extract.fidelity import FAST_PATHS, card_json, card_lines, prepare
from embedder.models.backbone import FrozenBackbone
from embedder.models.runtime import resolve_runtime
from embedder.names import display_path

UNLISTED_SHOWN = 5  # --metadata paths not in the listing: how many a report names


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
    # --metadata: the table's paths that are not rows of the listing (joined to nothing), first few shown
    metadata_unlisted: int = 0
    metadata_unlisted_examples: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # --metadata: casts made to the table's columns
    fidelity: dict | None = None  # a fast path's fidelity card (embedder.extract.fidelity)
    # a rerun's comparison of SOURCE with the cache (embedder.cache.sync): new, changed, gone, unchanged
    sync: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of_run(cls, config: EmbedConfig, spec: CacheSpec, listing: Listing, started: float, *, already_cached: int,
               embedded: int, errors: list[tuple[str, str]], total_rows: int, stage_s: dict[str, float],
               unlisted: list[str] | None = None, notes: list[str] | None = None,
               sync: dict[str, int] | None = None) -> EmbedReport:
        """The report of a run into `config.out` that began at `started` (`time.perf_counter()`);
        `unlisted`: the --metadata table's paths that are not in the listing."""
        unlisted = unlisted or []
        return cls(
            out=str(config.out),
            fingerprint=spec.fingerprint,
            listed=len(listing),
            already_cached=already_cached,
            embedded=embedded,
            errors=errors,
            total_rows=total_rows,
            ignored=len(listing.ignored),
            wall_s=time.perf_counter() - started,
            stage_s=stage_s,
            config={k: str(v) for k, v in spec.components.items()},
            ignored_by_reason=listing.ignored_counts(),
            metadata_unlisted=len(unlisted),
            metadata_unlisted_examples=unlisted[:UNLISTED_SHOWN],
            notes=list(notes or []),
            sync=dict(sync or {}),
        )

    @property
    def up_to_date(self) -> bool:
        return self.embedded == 0 and not self.errors and not self.sync.get("gone")

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
            *([self._sync_line()] if self.sync else []),
            *([f"  layers          : {', '.join(json.loads(self.config['layers']))} (the first is /features)"]
              if "layers" in self.config else []),
            f"  errors          : {len(self.errors)}" + (" (see the errors table: embedder info --errors)" if self.errors else ""),
        ]
        if self.ignored:
            lines.append(f"  ignored files   : {describe_ignored(self.ignored_by_reason)}")
        if self.metadata_unlisted:
            shown = ", ".join(display_path(p) for p in self.metadata_unlisted_examples)
            more = " ..." if self.metadata_unlisted > len(self.metadata_unlisted_examples) else ""
            lines.append(f"  metadata        : {self.metadata_unlisted} paths of the table are not in SOURCE's "
                         f"listing ({shown}{more})")
        for path, reason in self.errors[:5]:
            lines.append(f"    {display_path(path)}: {reason}")
        if len(self.errors) > 5:
            lines.append(f"    ... and {len(self.errors) - 5} more")
        if self.fidelity is not None:
            lines += card_lines(self.fidelity)
        lines.append("  time per stage  : " + ", ".join(f"{k} {v:.2f}s" for k, v in self.stage_s.items()))
        lines.append("                    (decode and resize run in the reader workers, in parallel with the model;")
        lines.append("                     'wait' is the time the model stage waited for them)")
        return "\n".join(lines)

    def _sync_line(self) -> str:
        s = self.sync
        return (f"  sync            : {s['new']} new, {s['changed']} changed, {s['gone']} gone, {s['unchanged']} "
                "unchanged (a changed file's old row is superseded, a gone one's removed)")

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
            "metadata_unlisted": self.metadata_unlisted,
            "metadata_unlisted_examples": self.metadata_unlisted_examples,
            "notes": self.notes,
            "fidelity": self.fidelity,
            "sync": self.sync,
        }


def embed(config: EmbedConfig, backbone: FrozenBackbone | None = None, command: str | None = None,
          lock: WriteLock | None = None) -> EmbedReport:
    """Embed every image of `config.source` into the cache `config.out` (create, resume or append).

    Parameters
    ----------
    config : EmbedConfig
        What to embed, with which feature space, into which cache (`embedder embed`'s options).
    backbone : FrozenBackbone, optional
        One built already; by default the config's feature space is loaded (and, for a fast path, its
        fidelity card measured and checked).
    command : str, optional
        The command line the cache records (default: `config.command_line()`).
    lock : WriteLock, optional
        The cache's write lock, when the caller holds it already (the CLI takes it first thing).

    Returns
    -------
    EmbedReport
        What was embedded, skipped and refused, with ``summary()`` and ``as_dict()``.
    """
    if lock is not None:
        return _embed_locked(config, backbone, command, lock)
    # The lock first: a second run into the same cache is refused at once, before it spends
    # tens of seconds building a model.
    with WriteLock(Path(config.out)) as taken:
        return _embed_locked(config, backbone, command, taken)


def _embed_locked(config: EmbedConfig, backbone: FrozenBackbone | None, command: str | None,
                  lock: WriteLock) -> EmbedReport:
    started = time.perf_counter()
    listing = list_source(config.source, config.layout, config.limit, config.table_columns())
    # The user's tables are checked before the model is built (seconds, or an ONNX export).
    metadata = load_metadata(config, listing)
    columns, unlisted = known_columns(listing, metadata)
    card = None
    if backbone is None:
        config = with_runtime(config)
        backbone, card = _backbone_and_card(config, listing)
    spec = cache_spec(config, listing, backbone, command if command is not None else config.command_line(), metadata,
                      card_json(card))
    _notices(config, backbone, metadata)
    with CacheWriter(config.out, spec, listing, overwrite=config.overwrite, commit_every=config.commit_every,
                     lock=lock, columns=columns, retry_errors=config.retry_errors,
                     sync=SyncOptions(hash=config.hash, refresh_urls=config.refresh_urls,
                                      prune=config.limit is None)) as writer:  # --limit lists part of SOURCE
        done = embed_into(writer, backbone, config)
        sync = writer.plan.as_dict()
    report = EmbedReport.of_run(config, spec, listing, started, already_cached=done.already_cached,
                                embedded=done.embedded, errors=done.errors, total_rows=done.total_rows,
                                stage_s=done.stage_s, unlisted=unlisted, notes=metadata.notes if metadata else [],
                                sync=sync)
    report.fidelity = card
    require_rows(config, done.total_rows)
    return report


def _backbone_and_card(config: EmbedConfig, listing: Listing) -> tuple[FrozenBackbone, dict | None]:
    """The run's backbone; for a CPU fast path (--precision int8, bf16, fast) also its fidelity card,
    measured on SOURCE's images (the calibration rows of a cache being resumed are the recorded ones)."""
    cpu = resolve_runtime(config.space.device, "fp32").device == "cpu"
    if config.space.precision not in FAST_PATHS or not cpu:
        return backbone_for(config), None
    recorded = None if config.overwrite else recorded_fidelity(config.out)
    if (recorded is None and config.space.precision == "bf16" and not config.overwrite
            and recorded_components(config.out)):
        return backbone_for(config), None  # a cache of the old bf16 default (no card): resumed as it was made
    return prepare(config, listing, recorded)


def _notices(config: EmbedConfig, backbone: FrozenBackbone, metadata=None) -> None:
    """What the user should know before a long run starts (the CLI shows each as one line)."""
    for note in metadata.notes if metadata is not None else []:
        warnings.warn(note, EmbedderNotice, stacklevel=3)
    if config.space.pool == "none":
        mib = sum(backbone.outputs.values()) * (2 if config.feature_dtype == "float16" else 4) * 1000 / 2**20
        warnings.warn(f"--pool none stores whole maps: {dict(backbone.outputs)} values per image, "
                      f"{mib:.0f} MiB per 1000 images.", EmbedderNotice, stacklevel=3)
    if config.space.compile and config.progress:
        warnings.warn(f"--compile: the first batch compiles {config.space.model} (tens of seconds on a CPU).",
                      EmbedderNotice, stacklevel=3)
