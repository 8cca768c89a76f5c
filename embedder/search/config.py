"""Settings of `index`, `search`, `dedup`, `plot` and `map`, each declared once (embedder.options)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from embedder.errors import ConfigError
from embedder.extract.config import EmbedConfig
from embedder.models.constants import RUNTIMES
from embedder.options import check_choices, option, overwrite_option, parse_size, specs
from embedder.outputs import PICTURE, require_suffix
from embedder.search import ask  # the query defaults, declared once there

KINDS = ("auto", "flat", "ivf", "hnsw", "ivfsq", "ivfpq")
METRICS = ("cosine", "l2")
PLOT_METHODS = ("pca", "tsne", "umap")
MAP_METHODS = ("umap", "pca")
DEFAULT_FIT_ROWS = 100_000  # `embedder map`: UMAP of this many rows takes minutes on a few cores
MIN_MAP_ROWS = 3  # fewer rows have no shape to show
LAYER_HELP = "which layer of a multi-layer cache (default: the first, /features)"


def query_weights_option():
    """`--weights` of the commands that embed query images (search, serve)."""
    return option(None, path=True, help="the weights file, when the cache was embedded with --weights PATH")


def query_runtime_option():
    """`--runtime` of the commands that embed query images (search, serve)."""
    return option("auto", choices=RUNTIMES,
                  help="what runs the backbone of queries by image (auto: the one the cache was made with)")


@dataclass(frozen=True)
class IndexConfig:
    BUILD_OPTIONS = ("out", "kind", "metric", "memory_budget", "target_recall", "on_disk", "layer", "seed", "update")

    cache: str = option(positional=True, path=True, metavar="CACHE.h5|INDEX_DIR",
                        help="feature cache to index; with --remove, --remove-from or --prune-missing: the INDEX_DIR "
                             "to remove rows from")
    out: str | None = option(None, path=True, help="INDEX_DIR to write (replaced atomically)")
    overwrite: bool = overwrite_option()
    kind: str = option("auto", choices=KINDS,
                       help="auto: exact when small, HNSW or IVF when large, IVF-SQ8 then IVF-PQ as memory gets short")
    metric: str = option("cosine", choices=METRICS, help="similarity of the neighbours")
    memory_budget: int | None = option(None, parse=parse_size, metavar="SIZE",
                                       help="e.g. 4G (default 4G): bounds the whole build, the index itself 3/4 of it")
    target_recall: float = option(0.95, help="recall@10 the search parameters are tuned to")
    on_disk: bool = option(False, help="ivf/ivfsq/ivfpq: build one index per shard and merge their lists on disk "
                                       "(faiss contrib.ondisk); automatic when the index would exceed --memory-budget")
    layer: str | None = option(None, help="which layer of a multi-layer cache to index, e.g. `style` "
                                          "(default: the first, /features)")
    seed: int = option(0, help="seed of the training sample and the tuning queries")
    update: bool = option(False, help="add the rows CACHE gained since INDEX_DIR was built (an append run, more "
                                      "shards) to the index, keeping its kind, metric, target recall and trained "
                                      "quantizer; the search knob is re-checked and raised if recall fell")
    remove: tuple[str, ...] = option((), nargs="+", metavar="PATH", group="removing rows from INDEX_DIR",
                                     help="remove these rows (paths as the cache stored them, or files under "
                                          "SOURCE) from every search")
    remove_from: str | None = option(None, path=True, metavar="FILE", group="removing rows from INDEX_DIR",
                                     help="remove the paths listed in FILE, one per line")
    prune_missing: bool = option(False, group="removing rows from INDEX_DIR",
                                 help="remove every row whose source file no longer exists")
    progress: bool = option(True, inverse="--quiet", toml=False, help="no progress bar")

    @property
    def removing(self) -> bool:
        """Whether this run removes rows from the INDEX_DIR given (rather than building one)."""
        return bool(self.remove or self.remove_from or self.prune_missing)

    def __post_init__(self):
        check_choices(self)
        if self.update and self.on_disk:
            raise ConfigError("--update keeps the index's own layout (in memory or on disk): drop --on-disk.")
        if not 0 < self.target_recall <= 1:
            raise ConfigError("--target-recall must be in (0, 1].")
        if self.removing:
            given = [s.flag for s in specs(type(self))
                     if s.name in self.BUILD_OPTIONS and getattr(self, s.name) != s.field.default]
            if given:
                raise ConfigError(f"{', '.join(given)} build an index, while --remove, --remove-from and "
                                  f"--prune-missing edit the INDEX_DIR given ({self.cache}): run them separately.")
        elif self.out is None:
            raise ConfigError("index needs --out INDEX_DIR to build into (or --remove PATH..., --remove-from FILE or "
                              "--prune-missing to remove rows from the INDEX_DIR given).")


@dataclass(frozen=True)
class SearchConfig:
    REQUIRED_GROUPS = ("query",)  # exactly one of --image, --path, --id, --vector

    index: str = option(positional=True, path=True, metavar="INDEX_DIR", help="index folder from `embedder index`")
    image: tuple[str, ...] = option((), exclusive="query", path=True, nargs="+",
                                    help="query image files or folders (several = batch mode)")
    path: str | None = option(None, exclusive="query", help="a path as stored in the cache")
    row_id: int | None = option(None, flag="--id", exclusive="query", help="a cache row id")
    vector: str | None = option(None, exclusive="query", path=True,
                                help="a .npy file with one vector (D,) or several (n, D)")
    k: int = option(ask.K, flag="-k", aliases=("--top-k",), help="neighbours per query")
    where: str | None = option(None, metavar="FILTER",
                               help="only rows this filter keeps, e.g. \"label == 'cat' and width >= 256\" "
                                    "(columns id, path, label and the index's metadata columns; docs/reference/filters.md)")
    combine: bool = option(False, help="one query from all the positive examples (--image files, or the rows of "
                                       "--vector) instead of one per example: Rocchio's alpha * mean(positives) "
                                       "- beta * mean(negatives); implied by any negative")
    negative: tuple[str, ...] = option((), path=True, nargs="+", metavar="IMAGE",
                                       help="negative example images or folders: results move away from them")
    negative_path: tuple[str, ...] = option((), metavar="CACHED_PATH",
                                            help="a negative example by its path in the cache (repeatable)")
    negative_id: tuple[int, ...] = option((), metavar="N", help="a negative example by its row id (repeatable)")
    alpha: float = option(ask.ALPHA, help="weight of the positives' mean in a combined query")
    beta: float = option(ask.BETA, help="weight of the negatives' mean subtracted from it")
    exclude_examples: bool = option(False, help="leave the examples themselves (indexed rows given by --id, "
                                                "--path, --negative-*, or indexed files given as images) out of "
                                                "the results; without it an indexed example usually ranks first")
    min_score: float | None = option(None, metavar="T",
                                     help="range search (metric cosine): every row with cosine similarity >= T, "
                                          "best first, instead of the k nearest")
    max_distance: float | None = option(None, metavar="D",
                                        help="range search (metric l2): every row with squared L2 distance <= D")
    max_results: int | None = option(None, metavar="N",
                                     help="at most N rows per range search (default: all; -k does not apply)")
    grid: str | None = option(None, path=True, help="write a PNG of each query and its neighbours")
    overwrite: bool = overwrite_option()
    layer: str | None = option(None, help="the layer the index must have been built on (checked; an index holds "
                                          "one layer)")
    weights: str | None = query_weights_option()
    runtime: str = query_runtime_option()

    def __post_init__(self):
        check_choices(self)
        given = [name for name in ("image", "path", "row_id", "vector") if getattr(self, name) not in (None, ())]
        if len(given) != 1:
            raise ConfigError("search needs exactly one query: image, path, id or vector"
                              + (f" (got {', '.join(given)})" if given else "") + ".")
        if self.k < 1:
            raise ConfigError(f"-k must be at least 1, got {self.k}.")
        if self.min_score is not None and self.max_distance is not None:
            raise ConfigError("Give --min-score (metric cosine) or --max-distance (metric l2), not both.")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ConfigError(f"--min-score / --max-distance must be a finite number, got {self.threshold}.")
        if self.max_results is not None and self.max_results < 1:
            raise ConfigError(f"--max-results must be at least 1, got {self.max_results}.")
        if self.max_results is not None and self.threshold is None:
            raise ConfigError("--max-results caps a range search: give --min-score or --max-distance (or use -k).")
        if not (self.alpha > 0 and self.beta >= 0):
            raise ConfigError(f"--alpha must be > 0 and --beta >= 0, got {self.alpha} and {self.beta}.")
        require_suffix(self.grid, PICTURE, "--grid")

    @property
    def combined(self) -> bool:
        """One query from all the examples: asked for, or implied by a negative."""
        return self.combine or bool(self.negative or self.negative_path or self.negative_id)

    @property
    def threshold(self) -> float | None:
        """The range search's bound (--min-score or --max-distance), None for k-nearest search."""
        return self.min_score if self.min_score is not None else self.max_distance


@dataclass(frozen=True)
class DedupConfig:
    cache: str = option(positional=True, path=True, help="feature cache")
    threshold: float = option(0.95, help="cosine similarity >= T (or squared L2 <= T)")
    metric: str = option("cosine", choices=METRICS, help="similarity measure")
    against: str | None = option(None, path=True, metavar="OTHER.h5",
                                 help="find the rows of CACHE that duplicate rows of OTHER (same feature space); "
                                      "OTHER's rows are kept")
    keep: str = option("largest", choices=("largest", "first"),
                       help="which row of a group to keep: the most pixels or bytes (ties: first by path), or the "
                            "first by path")
    kind: str = option("auto", choices=("auto", "flat", "ivf", "ivfsq", "hnsw"),
                       help="index the range search goes through (auto: exact up to 50,000 rows, then IVF, IVF-SQ8 "
                            "when raw vectors exceed the budget)")
    nprobe: int = option(8, help="inverted lists probed per query (ivf, ivfsq; hnsw: efSearch = max(64, 4x))")
    memory_budget: int = option(4 << 30, parse=parse_size, metavar="SIZE",
                                help="bounds the index (default 4G): raw vectors while they fit 3/4 of it")
    layer: str | None = option(None, help=LAYER_HELP)
    progress: bool = option(True, inverse="--quiet", toml=False, help="no progress bar")

    def __post_init__(self):
        check_choices(self)
        if self.nprobe < 1:
            raise ConfigError(f"--nprobe must be at least 1, got {self.nprobe}.")
        if not math.isfinite(self.threshold):  # NaN matches nothing and every range search would say so silently
            raise ConfigError(f"--threshold must be a finite number, got {self.threshold}.")


@dataclass(frozen=True)
class PlotConfig:
    cache: str = option(positional=True, path=True, help="feature cache")
    method: str = option("pca", choices=PLOT_METHODS,
                         help="2-D projection (umap: umap-learn, by cosine; all seeded)")
    out: str | None = option(None, path=True, help="PNG to write (default: CACHE.METHOD.png beside the cache)")
    overwrite: bool = overwrite_option()
    max_points: int = option(5000, help="seeded sample of at most this many rows")
    seed: int = option(0, help="seed of the sample and of the projection (same cache and seed: same picture)")
    layer: str | None = option(None, help=LAYER_HELP)
    progress: bool = option(True, inverse="--quiet", toml=False, help="no progress bar")

    def __post_init__(self):
        check_choices(self)
        require_suffix(self.out, PICTURE)


@dataclass(frozen=True)
class MapConfig:
    index: str = option(positional=True, path=True, metavar="INDEX_DIR", help="index folder from `embedder index`")
    method: str = option("umap", choices=MAP_METHODS, help="2-D projection of the index's rows")
    fit_rows: int = option(DEFAULT_FIT_ROWS, metavar="N",
                           help="fit on a seeded sample of at most N rows and place the others with the fitted model")
    seed: int = option(0, help="seed of the sample and of the projection (same index and seed: same map)")
    scores: str | None = option(None, path=True, metavar="REPORT_DIR",
                                help="store the numeric scores of `embedder curate`'s REPORT_DIR (label_quality, "
                                     "outlier_score, uniqueness, ...) beside the map, to colour the /map page by")
    progress: bool = option(True, inverse="--quiet", toml=False, help="no progress bar")

    def __post_init__(self):
        check_choices(self)
        if self.fit_rows < MIN_MAP_ROWS:
            raise ConfigError(f"--fit-rows must be at least {MIN_MAP_ROWS}, got {self.fit_rows}.")


@dataclass(frozen=True)
class WatchConfig(EmbedConfig):
    """`embedder watch`: the embed options, and how the folder is followed."""

    index: str | None = option(None, path=True, metavar="INDEX_DIR",
                               help="index to keep in step (built at the first sync when absent; updated after each)")
    settle: float = option(1.0, metavar="SECONDS",
                          help="sync once no event came for this long and every new file kept its size and mtime "
                               "over it (a file still being copied is not read half-done)")
    poll: bool = option(False, help="poll the folder instead of the platform's file-system events (network file "
                                    "systems, containers without inotify)")
    interval: float = option(1.0, metavar="SECONDS", help="--poll: seconds between two scans")

    def __post_init__(self):
        super().__post_init__()
        if not self.settle > 0 or not self.interval > 0:
            raise ConfigError("--settle and --interval must be above 0 seconds.")
