"""Typed configs, parsed once at the boundary (CLI flags or a pipeline TOML step).

Precedence, as in timm's `resolve_data_config`: explicit values given by the user, then
the backbone's own settings from the registry (preprocessing, default layer), then the
defaults below. `auto` values are resolved by `embedder.models.runtime` and the resolved value is
what lands in the cache fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from embedder.cache.schema import FEATURE_DTYPES
from embedder.data.decode import DEFAULT_MAX_PIXELS
from embedder.data.fetch import DEADLINE_FACTOR, RETRY_AFTER_MAX, FetchSettings
from embedder.data.metadata import TABLE_SUFFIXES
from embedder.data.sources import LAYOUTS
from embedder.data.table import TableColumns
from embedder.errors import ConfigError
from embedder.models.batchsize import batch_size_for
from embedder.models.constants import CALIBRATION_IMAGES, FIDELITY_IMAGES, PRECISIONS, STYLE
from embedder.models.space import AUTO, ROW_OPTIONS, RUN_OPTIONS, FeatureSpace
from embedder.options import (
    check_choices,
    document,
    from_keywords,
    from_table,
    int_or_auto,
    option,
    overwrite_option,
    positive,
    to_arguments,
)

SOURCE_OPTIONS = "table and URL sources"
FAST_OPTIONS = "fast paths (--precision int8, bf16 or fast on the CPU)"
# embed's own precision: the fastest fast path whose fidelity card passes (embedder.extract.fidelity), chosen
# before the backbone is built, so a FeatureSpace never holds it.
FAST = "fast"


@document
@dataclass(frozen=True)
class EmbedConfig:
    """`embedder embed`'s settings: `space`, a `FeatureSpace`, holds the backbone's (`--model`, `--pool`, ...),
    the other fields say what is read and how it runs. From Python, `EmbedConfig.of(source=..., model=...,
    out=..., pool=...)` takes the flags' names."""

    source: str = option(positional=True, path=True,
                         help="image folder (ImageFolder tree, train/val split tree or flat), .txt/.csv file list "
                              "(paths or http(s) URLs), .parquet/.csv table, .tar shard(s) or a pattern such as "
                              "shards/{00000..00099}.tar")
    # The backbone's settings, their flags and TOML keys declared once, by FeatureSpace: --model, --pool, ...
    space: FeatureSpace = option(  # noqa: RUF009 (a field declaration, as every option(...) here)
        nested=True, amend={"precision": {"choices": (AUTO, *PRECISIONS, FAST)}},
        help="the feature space: the backbone's settings, spelled as embed's flags of the same names (--model, "
             "--layer, --pool, --precision, ...; `EmbedConfig.of` takes them as flat keywords)")
    out: str = option(path=True, help="HDF5 cache to create, resume or append to (e.g. feats.h5)")
    style: bool = option(False, group=ROW_OPTIONS,
                         help="also store the Gram-matrix style descriptor as the layer `style` (indexable)")
    batch_size: int | None = option(None, parse=int_or_auto, group=RUN_OPTIONS,
                                    help="images per forward pass (default auto: 4 on CPU, 32 on GPU; measured, see "
                                         "docs/BENCHMARKS.md)")
    workers: int | None = option(None, parse=int_or_auto, group=RUN_OPTIONS,
                                 help="reader processes (default auto: one per spare core, at most 8)")
    calibration_images: int = option(CALIBRATION_IMAGES, metavar="N", group=FAST_OPTIONS,
                                     help="int8: calibrate on N images evenly spaced over SOURCE's sorted listing (a "
                                          "resumed or appended cache: the ones its card recorded)")
    fidelity_images: int = option(FIDELITY_IMAGES, metavar="N", group=FAST_OPTIONS,
                                  help="other images (evenly spaced) that the fidelity card is measured on")
    calibration: str = option("percentile", choices=("percentile", "entropy", "minmax"), group=FAST_OPTIONS,
                              help="int8 activation ranges: ONNX Runtime's calibration method")
    min_cosine: float = option(0.995, metavar="X", group=FAST_OPTIONS,
                               help="gate: refuse a fast path whose mean cosine to fp32 is lower")
    min_overlap: float = option(0.9, metavar="X", group=FAST_OPTIONS,
                                help="gate: refuse a fast path whose k-NN@10 neighbour overlap with fp32 is lower")
    max_accuracy_drop: float = option(0.5, metavar="POINTS", group=FAST_OPTIONS,
                                      help="gate (labelled SOURCE): refuse a fast path whose linear-probe or k-NN "
                                           "accuracy drops more")
    limit: int | None = option(None, group=ROW_OPTIONS, help="only the first N files of the sorted listing")
    layout: str = option("auto", choices=LAYOUTS, group=ROW_OPTIONS, help="how SOURCE is organised (default: detect)")
    feature_dtype: str = option("float32", flag="--dtype", choices=FEATURE_DTYPES, group=ROW_OPTIONS,
                                help="storage type of the features")
    commit_every: int = option(512, group=RUN_OPTIONS, help="files per committed part (the most a kill can lose)")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, group=ROW_OPTIONS,
                             help="refuse larger images as decompression bombs")
    jpeg_draft: bool = option(False, group=ROW_OPTIONS,
                              help="decode JPEGs reduced by libjpeg's DCT scaling (PIL draft), their shorter side "
                                   "still >= the model's resize size: 2 MP photos read 1.8x faster, but not the exact "
                                   "pixels (Lite0 features at a cosine of 0.995 on average, docs/BENCHMARKS.md); "
                                   "recorded in the fingerprint")
    metadata: str | None = option(None, path=True, metavar="FILE", group=ROW_OPTIONS,
                                  help="a .csv or .parquet table with a `path` column (relative to SOURCE) and any "
                                       "other columns, joined to the rows by path and stored as /columns (docs/reference/cache-format.md: "
                                       "metadata columns)")
    path_column: str | None = option(None, metavar="NAME", group=SOURCE_OPTIONS,
                                     help="a table SOURCE's column of image paths (relative to the table's folder) "
                                          "or URLs (default: the first of path, url, file, filename, image)")
    url_column: str | None = option(None, metavar="NAME", group=SOURCE_OPTIONS,
                                    help="a table SOURCE's column of http(s) URLs (instead of --path-column)")
    label_column: str | None = option(None, metavar="NAME", group=SOURCE_OPTIONS,
                                      help="a table SOURCE's column of labels (integers >= 0: class indices; else "
                                           "class names); every other column is stored as a metadata column. Tar "
                                           "shards: what gives a sample's label, cls, txt or a .json key (default: "
                                           ".cls, else the .json's label or class key)")
    fetch_timeout: float = option(FetchSettings.timeout, metavar="SECONDS", group=SOURCE_OPTIONS,
                                  help="http(s) rows: seconds to connect and between two reads; an attempt ends "
                                       f"within {DEADLINE_FACTOR}x this, connect to last byte, and a row's attempts "
                                       "and waits within (retries + 1) times that; a Retry-After is honoured up to "
                                       f"{RETRY_AFTER_MAX:g} s, and only where it fits that deadline")
    fetch_retries: int = option(FetchSettings.retries, metavar="N", group=SOURCE_OPTIONS,
                                help="http(s) rows: further attempts after a connection error, timeout, cut-short "
                                     f"body, 429 or 5xx, with exponential backoff from {FetchSettings.backoff:g} s")
    max_download_mb: float = option(FetchSettings.max_bytes / 2**20, metavar="MB", group=SOURCE_OPTIONS,
                                    help="http(s) rows: refuse bodies larger than this")
    fetch_threads: int = option(FetchSettings.threads, metavar="N", group=SOURCE_OPTIONS,
                                help="http(s) rows: downloads in flight per reader process")
    keep_downloads: str | None = option(None, path=True, metavar="DIR", group=SOURCE_OPTIONS,
                                        help="http(s) rows: keep each download as DIR/<h[:2]>/<h><.ext> (h: the SHA-256 "
                                             "of the URL; .ext: the URL's, else the Content-Type's, else none), "
                                             "listed in DIR/urls.tsv, and read it from there next time; "
                                             "by default nothing is written to disk")
    retry_errors: bool = option(False, group=ROW_OPTIONS,
                                help="read the rows of the cache's errors table again (downloads that timed out "
                                     "or were refused, files since repaired): each becomes a row or a newer error")
    hash: bool = option(False, group=ROW_OPTIONS,
                        help="a rerun finds changed files by a SHA-256 of their bytes, stored in the cache, instead "
                             "of their size and mtime (for file systems whose mtimes cannot be trusted; reads "
                             "every file on each rerun). A cache that stores hashes keeps comparing them")
    refresh_urls: bool = option(False, group=ROW_OPTIONS,
                                help="a rerun fetches every http(s) row again and replaces its row (URL rows are "
                                     "otherwise left as they are: comparing them would download them)")
    overwrite: bool = overwrite_option()
    progress: bool = option(True, inverse="--quiet", toml=False, help="no progress bar")

    def __post_init__(self):
        space = self.space
        if self.style and STYLE not in (space.layer, *space.extra_layers):  # --style: one more output
            object.__setattr__(self, "space", replace(space, extra_layers=(*space.extra_layers, STYLE)))
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", batch_size_for(self.space.device))
        check_choices(self)
        if space.style_dim < 0:
            raise ConfigError(f"--style-dim must be 0 (no projection) or positive, got {space.style_dim}.")
        positive(space, "image_size", optional=True)
        positive(self, "batch_size", "commit_every", "max_pixels")
        positive(self, "limit", optional=True)
        positive(self, "fetch_threads", "calibration_images", "fidelity_images")
        for name in ("fetch_timeout", "max_download_mb"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be above 0, got {getattr(self, name)!r}.")
        if self.fetch_retries < 0:
            raise ConfigError(f"--fetch-retries must be 0 or more, got {self.fetch_retries}.")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be 0 or more, got {self.workers}.")
        if self.metadata is not None and not str(self.metadata).lower().endswith(TABLE_SUFFIXES):
            raise ConfigError(f"--metadata should name a .csv or .parquet table, got {self.metadata!r}.")
        if not str(self.out).endswith((".h5", ".hdf5")):
            raise ConfigError(f"--out should name an HDF5 file ending in .h5, got {self.out!r}.")

    @classmethod
    def from_mapping(cls, values: dict, base_dir: Path | None = None) -> EmbedConfig:
        """The config of a pipeline's embed step.

        Parameters
        ----------
        values : dict
            The TOML table: embed's flags as keys (``model``, ``pool``, ...); unknown and missing keys are
            refused by name.
        base_dir : Path, optional
            Relative paths are taken relative to it (the pipeline file's folder).

        Returns
        -------
        EmbedConfig
        """
        return from_table(cls, values, base_dir, "embed")

    @classmethod
    def of(cls, **settings: object) -> EmbedConfig:
        """The config of flat keywords, named as embed's flags: the feature space's go into `space`.

        Parameters
        ----------
        **settings
            ``source``, ``model``, ``out`` and any other option (``pool="gem"``, ``precision="int8"``).

        Returns
        -------
        EmbedConfig

        Examples
        --------
        >>> EmbedConfig.of(source="photos/", model="resnet50", out="feats.h5", layer="layer3")
        """
        return from_keywords(cls, **settings)

    @classmethod
    def _from_cli(cls, values: dict) -> dict:
        """The command line's repeated --layer: the first is `layer`, the others `extra_layers`."""
        layers = values.get("layer")
        if isinstance(layers, (list, tuple)):
            values = {**values, "layer": layers[0] if layers else None}
            values["extra_layers"] = tuple(layers[1:]) + tuple(values.get("extra_layers", ()))
        return values

    def _to_cli(self, values: dict) -> dict:
        """The outputs as repeated --layer, less the one --style added (__post_init__)."""
        extra = values["extra_layers"]
        if self.style and extra and extra[-1] == STYLE:
            extra = extra[:-1]
        layers = tuple(n or "default" for n in (values["layer"], *extra)) if extra else values["layer"]
        return {**values, "layer": layers, "extra_layers": extra}

    def table_columns(self) -> TableColumns:
        """The table source's path, URL and label columns, as the listing takes them."""
        return TableColumns(self.path_column, self.url_column, self.label_column)

    def fetch_settings(self) -> FetchSettings:
        """How http(s) rows are downloaded (`embedder.data.fetch`)."""
        return FetchSettings(timeout=self.fetch_timeout, retries=self.fetch_retries,
                             max_bytes=int(self.max_download_mb * 2**20), threads=self.fetch_threads,
                             keep=str(self.keep_downloads) if self.keep_downloads else None)

    def resolved_workers(self) -> int:
        """The reader processes: `workers`, or one per spare core (at most 8) when it is auto."""
        from embedder.models.runtime import auto_workers

        return auto_workers(self.workers)

    def command_line(self, backend: str = "local") -> str:
        """The `embedder embed` command equivalent to this config (what the cache records, so that an
        interrupted run can be told how to resume).

        Parameters
        ----------
        backend : {"local", "ray"}
            The backend the command names.

        Returns
        -------
        str
            A shell-quoted command line.
        """
        import shlex

        extra = ["--backend", "ray"] if backend == "ray" else []
        return shlex.join(["embedder", "embed", *to_arguments(self), *extra])


RAY_OPTIONS = "scale-out on Ray (docs/SCALING.md)"


@dataclass(frozen=True)
class RayOptions:
    """How `--backend ray` runs (a pipeline's embed step: `ray = {...}`). None of it changes the features."""

    address: str | None = option(None, group=RAY_OPTIONS,
                                 help="Ray cluster to join: auto (the one `ray start` made) or HOST:PORT; default: "
                                      "start a local one")
    shard_size: int = option(65536, group=RAY_OPTIONS,
                             help="rows per shard file (rounded up to whole batches): the unit of work and of resume")
    actors: int | None = option(None, group=RAY_OPTIONS, help="actor pool size (default: fill the cluster)")
    gpus_per_actor: float | None = option(None, group=RAY_OPTIONS,
                                          help="default: 1 when the cluster has GPUs, else 0")
    cpus_per_actor: float = option(1.0, group=RAY_OPTIONS,
                                   help="CPUs reserved per actor (its reader processes are --workers)")

    def __post_init__(self):
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be a positive integer, got {self.shard_size}.")
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--actors must be at least 1, got {self.actors}.")
        if self.cpus_per_actor <= 0 or (self.gpus_per_actor or 0) < 0:
            raise ConfigError("--cpus-per-actor must be > 0 and --gpus-per-actor >= 0.")
