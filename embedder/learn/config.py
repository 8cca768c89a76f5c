"""Settings of `probe`, `finetune`, `evaluate`, `export` and `predict`, declared once (embedder.options)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedder.data.decode import DEFAULT_MAX_PIXELS
from embedder.data.sources import LAYOUTS
from embedder.errors import ConfigError
from embedder.models.constants import RUNTIMES
from embedder.models.space import FeatureSpace
from embedder.options import (
    check_choices,
    from_keywords,
    from_table,
    int_or_auto,
    option,
    overwrite_option,
    parse_size,
    positive,
)
from embedder.outputs import CLASSIFIER, PICTURE, require_suffix

CLASSIFIERS = ("logreg", "linear-svm", "ridge", "knn", "mlp")  # scikit-learn pipelines (embedder.learn.classifiers)
DEFAULT_CS = tuple(float(c) for c in np.logspace(-3, 4, 15))  # the probe's C sweep (embedder.learn.probe)
KNN_VOTE = "knn-vote"  # DINOv2's weighted k-NN vote (embedder.learn.knn)
DEFAULT_KS = (1, 3, 5, 10, 20, 50, 100, 200)  # DINOv2's 10, 20, 100, 200 and the small k a small train split needs
ALL_LAYERS = "all"  # --layer all: the layer sweep (embedder.learn.sweep)
SCHEDULES = ("step", "cosine")
HEADS = ("linear", "mlp")
FINETUNE_SETTINGS = ("model", "weights", "layer", "image_size", "device")  # of FeatureSpace's, those finetune takes


def _int_list(text, flag: str) -> tuple[int, ...]:
    """`1,2,5` -> (1, 2, 5)."""
    try:
        return tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes integers separated by commas, e.g. 1,2,5,10; got {text!r}.") from None


def shot_counts(text: str) -> tuple[int, ...]:
    """--shots 1,2,5,10 -> (1, 2, 5, 10)."""
    return _int_list(text, "--shots")


@dataclass(frozen=True)
class EvaluateConfig:
    probe_dir: str = option(positional=True, path=True, help="PROBE_DIR from `embedder probe`")
    cache: str = option(positional=True, path=True, help="feature cache to apply it to")


@dataclass(frozen=True)
class ExportConfig:
    probe_dir: str = option(positional=True, path=True, help="PROBE_DIR of a linear probe")
    out: str = option(path=True, help="MODEL.pt to write")
    overwrite: bool = overwrite_option()
    weights: str | None = option(None, path=True,
                                 help="the weights file, when the cache was embedded with --weights PATH")

    def __post_init__(self):
        require_suffix(self.out, CLASSIFIER)


@dataclass(frozen=True)
class PredictConfig:
    model: str = option(positional=True, path=True, help="MODEL.pt from `embedder export` or `embedder finetune`")
    images: tuple[str, ...] = option(positional=True, path=True, help="image files or folders")
    top_k: int = option(1, flag="--top-k", aliases=("-k",), help="labels per image")
    batch_size: int | None = option(None, parse=int_or_auto, metavar="N|auto",
                                    help="images per forward pass (default auto: as embed's --batch-size)")
    device: str = option("auto", help="auto, cpu or cuda[:N]")
    runtime: str = option("auto", choices=RUNTIMES,
                          help="what runs the network (auto: ONNX Runtime on the CPU where it is faster)")

    def __post_init__(self):
        check_choices(self)
        if self.top_k < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise ConfigError("-k/--top-k and --batch-size must be at least 1.")


@dataclass(frozen=True)
class ProbeConfig:
    cache: str = option(positional=True, path=True,
                        help="feature cache to train on (split by train/ val/ folders, or stratified)")
    out: str | None = option(None, path=True, help="PROBE_DIR for the model, report.json and confusion_matrix.png "
                                                   "(default: CACHE.probe/ beside the cache)")
    overwrite: bool = overwrite_option()
    val_cache: str | None = option(None, path=True,
                                   help="validation cache (same fingerprint): selects the regularisation")
    test_cache: str | None = option(None, path=True, help="test cache (same fingerprint), reported once")
    classifier: str = option("probe", choices=("probe", KNN_VOTE, *CLASSIFIERS),
                             help="probe = PyTorch linear head with a C sweep; knn-vote = DINOv2's k-NN vote, k chosen "
                                  "on validation; others = scikit-learn pipelines tuned by CV")
    Cs: tuple[float, ...] = option(DEFAULT_CS, cli=False, help="the C values the probe sweeps")
    ks: tuple[int, ...] = option(DEFAULT_KS, cli=False, help="the k values knn-vote compares")
    temperature: float = option(0.07, help="knn-vote: a neighbour's vote is exp(cosine similarity / T)")
    shots: tuple[int, ...] = option((), parse=shot_counts, metavar="N[,N...]",
                                    help="few-shot: also train on N rows per class drawn from the train split "
                                         "(e.g. 1,2,5,10) and report the test accuracy's mean and std")
    draws: int = option(5, help="few-shot: seeded draws per shot count")
    plot: str | None = option(None, path=True, metavar="PNG",
                              help="--layer all: where the accuracy-by-layer plot goes (default: PROBE_DIR/layers.png)")
    seed: int = option(0, help="seed of the split")
    val_fraction: float = option(0.2, help="share of the rows for validation (without a val/ folder)")
    test_fraction: float = option(0.2, help="share of the rows for testing (without a test/ folder)")
    memory_budget: int = option(2 << 30, parse=parse_size, metavar="SIZE",
                                help="train in memory up to this size (default 2G), else stream blocks")
    device: str = option("auto", help="auto, cpu or cuda[:N]")
    layer: str | None = option(None, help="which layer of a multi-layer cache (default: the first, /features); "
                                          "all = train on every layer and compare them")
    progress: bool = option(True, inverse="--quiet", toml=False, help="no progress bar")

    def __post_init__(self):
        check_choices(self)
        # `--shots 1,2 --shots 5` and TOML's "1,2,5" or [1, 2, 5] all end as one sorted tuple.
        shots = [n for item in self.shots for n in (_int_list(item, "--shots") if isinstance(item, str)
                                                    else item if isinstance(item, tuple | list) else (item,))]
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shots):
            raise ConfigError(f"--shots must be positive integers (rows per class), got {shots!r}.")
        object.__setattr__(self, "shots", tuple(sorted(set(shots))))
        positive(self, "draws")
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            raise ConfigError(f"ks must be positive integers, got {self.ks!r}.")
        _number(self, "temperature", low=0.0, positive=True)
        if not (0 < self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ConfigError("val and test fractions must be in (0, 1) and sum to less than 1.")
        if self.memory_budget < 1 << 10:
            raise ConfigError("--memory-budget must be at least 1K.")
        object.__setattr__(self, "Cs", tuple(float(c) for c in self.Cs))
        require_suffix(self.plot, PICTURE, "--plot")

    @property
    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        suffix = "probe" if self.classifier == "probe" else self.classifier
        return Path(self.cache).with_suffix(f".{suffix}")

    @property
    def plot_path(self) -> Path:
        return Path(self.plot) if self.plot else self.out_dir / "layers.png"

    @classmethod
    def from_mapping(cls, values: dict, base_dir: Path | None = None) -> ProbeConfig:
        return from_table(cls, values, base_dir, "probe")


@dataclass(frozen=True)
class FinetuneConfig:
    source: str = option(positional=True, path=True,
                         help="ImageFolder tree, split tree (train/ val/ [test/]) or file list")
    # The backbone settings finetune honours, declared by FeatureSpace (--model, --weights, ...); its --layer
    # is one layer, the head's input.
    space: FeatureSpace = option(  # noqa: RUF009 (a field declaration, as every option(...) here)
        nested=True, only=FINETUNE_SETTINGS, group="", amend={"layer": {
            "repeat": False, "metavar": None, "help": "feature layer the head sits on (default: the pooled last stage)"}})
    out: str = option(path=True, help="output folder: best.pt (for `embedder predict`) and history.json")
    overwrite: bool = overwrite_option()
    epochs: int = option(5, help="passes over the training images")
    batch_size: int = option(32, help="images per step")
    lr: float = option(0.001, help="learning rate (SGD)")
    momentum: float = option(0.9, help="SGD momentum")
    weight_decay: float = option(0.0, help="L2 penalty")
    schedule: str = option("step", choices=SCHEDULES,
                           help="step (StepLR: --step-size, --gamma) or cosine (over all epochs)")
    step_size: int = option(7, help="epochs between LR drops (step schedule)")
    gamma: float = option(0.1, help="LR factor at each drop (step schedule)")
    freeze_backbone: bool = option(False, help="fixed feature extractor: only the head trains, the backbone re-runs "
                                               "every epoch (eval-locked)")
    freeze_bn: bool = option(False, help="keep BatchNorm statistics and affine weights locked")
    init_head: str | None = option(None, path=True, metavar="PROBE_DIR",
                                   help="start the head from a trained linear probe")
    head: str = option("linear", choices=HEADS, help="linear, or mlp (Linear, BatchNorm, ReLU, Linear)")
    mlp_hidden: int = option(512, help="hidden width of the mlp head")
    workers: int | None = option(None, parse=int_or_auto, help="reader processes (default auto)")
    seed: int = option(0, help="split, head init, shuffling and augmentation")
    val_fraction: float = option(0.2, help="share of the images for validation (without a val/ folder)")
    test_fraction: float = option(0.2, help="share of the images for testing (without a test/ folder)")
    limit: int | None = option(None, help="only the first N files of the sorted listing")
    layout: str = option("auto", choices=LAYOUTS, help="how SOURCE is organised (default: detect)")
    progress: bool = option(True, inverse="--quiet", toml=False, help="no progress bar")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, help="refuse larger images as decompression bombs")

    def __post_init__(self):
        positive(self, "epochs", "batch_size", "step_size", "mlp_hidden", "max_pixels")
        positive(self, "limit", optional=True)
        positive(self.space, "image_size", optional=True)
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise ConfigError(f"--workers must be 0 or more, got {self.workers!r}.")
        check_choices(self)
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
        return from_table(cls, values, base_dir, "finetune")

    def resolved_workers(self) -> int:
        from embedder.models.runtime import auto_workers

        return auto_workers(self.workers)

    # FinetuneConfig.of(source=..., model=..., out=..., layer=...): flat keywords, as the flags.
    of = classmethod(from_keywords)


def _number(cfg, name: str, *, low: float, below: float | None = None, positive: bool = False) -> None:
    value = getattr(cfg, name)
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{flag} must be a number, got {value!r}.")
    if value < low or (positive and value == low) or (below is not None and value >= below):
        bound = f"{'above' if positive else 'at least'} {low}" + (f" and below {below}" if below is not None else "")
        raise ConfigError(f"{flag} must be {bound}, got {value!r}.")
