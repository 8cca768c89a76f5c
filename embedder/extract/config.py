"""Typed configs, parsed once at the boundary (CLI flags or a pipeline TOML step).

Precedence, as in timm's `resolve_data_config`: explicit values given by the user, then
the backbone's own settings from the registry (preprocessing, default layer), then the
defaults below. `auto` values are resolved by `embedder.models.runtime` and the resolved value is
what lands in the cache fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from embedder.data.decode import DEFAULT_MAX_PIXELS
from embedder.data.sources import LAYOUTS
from embedder.errors import ConfigError
from embedder.models.runtime import auto_workers
from embedder.options import config_from_table, positive


@dataclass(frozen=True)
class EmbedConfig:
    source: str  # image folder, or .txt/.csv file list
    model: str  # registry name, see `embedder models`
    out: str  # the HDF5 cache to create, resume or append to
    weights: str = "DEFAULT"  # DEFAULT | none | path to a state-dict file
    layer: str | None = None  # None = the registry's default pooling point; the cache's /features
    extra_layers: tuple[str, ...] = ()  # more layers, same pass, each its own dataset in /layers
    pool: str = "avg"  # avg | max | gem | none (flatten)
    style: bool = False  # also store the Gram style descriptor as the layer "style"
    style_layers: tuple[str, ...] = ()  # () = the model's style layers (see `embedder inspect`)
    style_dim: int = 2048  # length of the projected style descriptor; 0 = full Gram triangles
    normalize: str = "none"  # "l2" stores unit-length features
    batch_size: int | None = None  # None = auto: measured best for the device (see auto_batch_size)
    workers: int | None = None  # None = auto (one per spare core, at most 8)
    device: str = "auto"
    precision: str = "auto"
    memory_layout: str = "auto"
    compile: bool = False  # torch.compile the backbone: faster for large jobs, ~20 s to start (CPU)
    image_size: int | None = None  # override the weights' crop size; resize keeps its ratio
    limit: int | None = None  # only the first N files of the (sorted) listing
    layout: str = "auto"  # how SOURCE is organised, see embedder.data.sources
    feature_dtype: str = "float32"
    commit_every: int = 512  # files per committed part: the most a kill can lose
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("extra_layers", "style_layers"):  # TOML gives lists
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        if self.batch_size is None:
            from embedder.models.runtime import auto_batch_size

            object.__setattr__(self, "batch_size", auto_batch_size(self.device))
        from embedder.models.backbone import POOLINGS

        if self.pool not in POOLINGS:
            raise ConfigError(f"--pool must be one of {', '.join(POOLINGS)}, got {self.pool!r}.")
        if self.style_dim < 0:
            raise ConfigError(f"--style-dim must be 0 (no projection) or positive, got {self.style_dim}.")
        positive(self, "batch_size", "commit_every", "max_pixels")
        positive(self, "limit", "image_size", optional=True)
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be 0 or more, got {self.workers}.")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}.")
        if self.feature_dtype not in ("float32", "float16"):
            raise ConfigError(f"--dtype must be float32 or float16, got {self.feature_dtype!r}.")
        if self.normalize not in ("none", "l2"):
            raise ConfigError(f"normalize must be 'none' or 'l2', got {self.normalize!r}.")
        if not str(self.out).endswith((".h5", ".hdf5")):
            raise ConfigError(f"--out should name an HDF5 file ending in .h5, got {self.out!r}.")

    @classmethod
    def from_mapping(cls, values: dict, base_dir: Path | None = None) -> EmbedConfig:
        """Build from a TOML table; relative paths are taken relative to `base_dir`."""
        return config_from_table(cls, values, base_dir, "embed", path_keys=("source", "out"))

    @property
    def outputs(self) -> tuple[str | None, ...]:
        """Requested outputs, primary first: `layer`, `extra_layers`, then "style" with --style."""
        extra = self.extra_layers + (("style",) if self.style and "style" not in (self.layer, *self.extra_layers) else ())
        return (self.layer, *extra)

    def resolved_workers(self) -> int:
        return auto_workers(self.workers)

    def command_line(self, backend: str = "local") -> str:
        """The `embedder embed` command equivalent to this config (what the cache records, so that an
        interrupted run can be told how to resume)."""
        import dataclasses
        import shlex

        flags = {"feature_dtype": "--dtype", "progress": None, "overwrite": None, "extra_layers": None}
        args = ["embedder", "embed", self.source, "--model", self.model, "--out", self.out]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("source", "model", "out") or value == f.default or f.name in flags and not flags[f.name]:
                continue
            flag = flags.get(f.name) or "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag)
            elif isinstance(value, tuple):  # repeated flags are singular: --style-layer A --style-layer B
                args += [tok for v in value for tok in (flag.removesuffix("s"), str(v))]
            else:
                args += [flag, str(value)]
                if f.name == "layer":
                    args += [tok for v in self.extra_layers for tok in ("--layer", v)]
        return shlex.join(args + (["--backend", "ray"] if backend == "ray" else []))
