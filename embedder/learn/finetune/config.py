"""`FinetuneConfig`: the settings of one `embedder finetune` run, checked when it is made."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from embedder.data.decode import DEFAULT_MAX_PIXELS
from embedder.data.sources import LAYOUTS
from embedder.errors import ConfigError
from embedder.models.runtime import auto_workers
from embedder.options import config_from_table, positive

SCHEDULES = ("step", "cosine")
HEADS = ("linear", "mlp")


@dataclass(frozen=True)
class FinetuneConfig:
    source: str  # ImageFolder tree, split tree (train/ val/ [test/]) or file list
    model: str  # registry name, see `embedder models`
    out: str  # output directory: best.pt and history.json
    weights: str = "DEFAULT"  # DEFAULT | none | path to a state-dict file
    layer: str | None = None  # feature layer the head sits on (None = the registry's default)
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "step"  # "step" (StepLR step_size, gamma) or "cosine" (over all epochs)
    step_size: int = 7
    gamma: float = 0.1
    freeze_backbone: bool = False  # only the head trains; the backbone is eval-locked
    freeze_bn: bool = False  # backbone BatchNorm layers eval-locked with frozen affine weights
    init_head: str | None = None  # a probe directory holding probe.pt: start the linear head from it
    head: str = "linear"  # "linear" or "mlp" (Linear, BatchNorm, ReLU, Linear)
    mlp_hidden: int = 512
    image_size: int | None = None  # override the weights' crop size; resize keeps its ratio
    workers: int | None = None  # None = auto (one per spare core, at most 8)
    device: str = "auto"
    seed: int = 0  # split, head init, shuffling and augmentation
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    limit: int | None = None  # only the first N files of the (sorted) listing
    layout: str = "auto"  # how SOURCE is organised, see embedder.data.sources
    progress: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard, as for `embed`

    def __post_init__(self):
        positive(self, "epochs", "batch_size", "step_size", "mlp_hidden", "max_pixels")
        positive(self, "limit", "image_size", optional=True)
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise ConfigError(f"--workers must be 0 or more, got {self.workers!r}.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}.")
        if self.head not in HEADS:
            raise ConfigError(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}.")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}.")
        _number(self, "lr", low=0.0)
        _number(self, "weight_decay", low=0.0)
        _number(self, "momentum", low=0.0, below=1.0)
        _number(self, "gamma", low=0.0, positive=True)
        _number(self, "val_fraction", low=0.0, below=1.0, positive=True)
        _number(self, "test_fraction", low=0.0, below=1.0)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"--val-fraction + --test-fraction must leave images for training, got "
                f"{self.val_fraction} + {self.test_fraction} >= 1."
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"--seed must be an integer, got {self.seed!r}.")
        if self.init_head is not None and self.head != "linear":
            # A probe is one linear map; there is no honest way to start an MLP from it.
            raise ConfigError(
                "--init-head starts a linear head from a linear probe; it cannot initialise an MLP head. "
                "Drop --init-head, or use --head linear."
            )

    @property
    def mode(self) -> str:
        return "frozen-backbone" if self.freeze_backbone else "finetune"

    @classmethod
    def from_mapping(cls, values: dict, base_dir: Path | None = None) -> FinetuneConfig:
        """Build from a pipeline TOML table; relative paths are taken from `base_dir`."""
        return config_from_table(cls, values, base_dir, "finetune", path_keys=("source", "out", "init_head"))

    def resolved_workers(self) -> int:
        return auto_workers(self.workers)


def _number(cfg, name: str, *, low: float, below: float | None = None, positive: bool = False) -> None:
    value = getattr(cfg, name)
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{flag} must be a number, got {value!r}.")
    if value < low or (positive and value == low) or (below is not None and value >= below):
        bound = f"{'above' if positive else 'at least'} {low}" + (f" and below {below}" if below is not None else "")
        raise ConfigError(f"{flag} must be {bound}, got {value!r}.")
