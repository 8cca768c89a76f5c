"""Settings of `embedder curate`, each declared once (embedder.options)."""

from __future__ import annotations

from dataclasses import dataclass

from embedder.errors import ConfigError
from embedder.options import check_choices, option, overwrite_option, positive


@dataclass(frozen=True)
class CurateConfig:
    cache: str = option(positional=True, path=True, help="feature cache to curate (a split tree's train/ val/ test/ "
                                                          "folders give the splits)")
    out: str = option(path=True, metavar="REPORT_DIR",
                      help="folder for scores.parquet, scores.csv, gallery.html and summary.json (replaced atomically)")
    overwrite: bool = overwrite_option()
    index: str | None = option(None, path=True, metavar="INDEX_DIR",
                               help="take the neighbours from this cosine index of CACHE (`embedder index`) instead "
                                    "of building one")
    val_cache: str | None = option(None, path=True, help="validation cache (same fingerprint), curated with CACHE "
                                                         "as the training split")
    test_cache: str | None = option(None, path=True, help="test cache (same fingerprint)")
    folds: int = option(5, help="folds of the out-of-fold linear probe (label mistakes)")
    k: int = option(10, flag="-k", help="outlier_score is the cosine distance to the k-th nearest neighbour")
    leak_threshold: float = option(0.95, help="a val/test row whose nearest train row has cosine similarity >= T "
                                              "is a leak")
    duplicate_threshold: float = option(0.95, help="rows with cosine similarity >= T share a duplicate_group")
    representatives: int = option(3, help="representative images per class (k-means centres of the class)")
    gallery: int = option(24, help="images per question in gallery.html (0: no gallery)")
    keep: str = option("largest", choices=("largest", "first"), help="which row of a duplicate group to keep")
    seed: int = option(0, help="seed of the folds and of k-means")
    device: str = option("auto", help="auto, cpu or cuda[:N] (the probe)")
    layer: str | None = option(None, help="which layer of a multi-layer cache (default: the first, /features)")
    progress: bool = option(True, inverse="--quiet", toml=False, help="no progress bar")

    def __post_init__(self):
        check_choices(self)
        positive(self, "k", "representatives")
        if not isinstance(self.folds, int) or self.folds < 2:
            raise ConfigError(f"--folds must be at least 2, got {self.folds!r}.")
        if self.gallery < 0:
            raise ConfigError(f"--gallery must be 0 or more, got {self.gallery}.")
        for name in ("leak_threshold", "duplicate_threshold"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} is a cosine similarity, in [-1, 1].")
        if self.test_cache is not None and self.val_cache is None:
            raise ConfigError("--test-cache needs --val-cache as well (or put both in a split tree).")
