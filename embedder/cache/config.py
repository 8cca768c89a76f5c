"""Settings of `info`, `compact`, `merge`, `export-vectors` and `import-vectors`, declared once (embedder.options)."""

from __future__ import annotations

from dataclasses import dataclass

from embedder.errors import ConfigError
from embedder.options import check_choices, option, overwrite_option, positive


@dataclass(frozen=True)
class InfoConfig:
    cache: str = option(positional=True, path=True, metavar="CACHE.h5|INDEX_DIR",
                        help="feature cache, or index folder, to describe")
    errors: bool = option(False, help="list every file in the errors table")


@dataclass(frozen=True)
class CompactConfig:
    cache: str = option(positional=True, path=True,
                        help="feature cache to rewrite without its superseded and removed rows (live rows sorted by "
                             "path: what a fresh embed of a folder writes); rebuild its index afterwards")


@dataclass(frozen=True)
class MergeConfig:
    cache: str = option(positional=True, path=True,
                        help="the sharded cache OUT.h5 (a virtual view), or its OUT.h5.shards folder")
    out: str = option(path=True, help="single HDF5 cache to write")
    overwrite: bool = overwrite_option()


@dataclass(frozen=True)
class ExportVectorsConfig:
    cache: str = option(positional=True, path=True, help="feature cache to export")
    out: str = option(path=True, help="folder to write (staged, then swapped in whole)")
    format: str = option("parquet", choices=("parquet", "npy"),
                         help="parquet: one table with an `embedding` column; npy: clip-retrieval's img_emb/ + "
                              "metadata/ parts (autofaiss reads them)")
    layer: str | None = option(None, help="which layer of a multi-layer cache (default: the first, /features)")
    rows_per_file: int = option(1_000_000, help="npy: rows per img_emb_{i}.npy part")
    block_rows: int = option(8192, help="rows read and written at a time (a Parquet row group): what memory holds")
    overwrite: bool = overwrite_option()
    progress: bool = option(True, inverse="--quiet", toml=False, help="no progress bar")
    metric: str = option("cosine", choices=("cosine", "l2"),
                         help="npy: what the readers will rank by; autofaiss and clip-retrieval rank by inner "
                              "product, so cosine writes L2-normalised vectors, l2 the vectors as cached")

    def __post_init__(self):
        check_choices(self)
        positive(self, "rows_per_file", "block_rows")


@dataclass(frozen=True)
class ImportVectorsConfig:
    inputs: tuple[str, ...] = option(positional=True, path=True, metavar="DIR|FILE",
                                     help="a folder of export-vectors (either format) or of clip-retrieval's output, "
                                          "or .npy / .parquet files")
    out: str = option(path=True, help="HDF5 cache to create (e.g. imported.h5)")
    source: str | None = option(None, path=True,
                                help="the folder the rows' paths are relative to (default: the one the export "
                                     "recorded, else the input)")
    block_rows: int = option(8192, help="rows read and committed at a time")
    overwrite: bool = overwrite_option()
    progress: bool = option(True, inverse="--quiet", toml=False, help="no progress bar")

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs or ()))
        positive(self, "block_rows")
        if not str(self.out).endswith((".h5", ".hdf5")):
            raise ConfigError(f"--out should name an HDF5 file ending in .h5, got {self.out!r}.")
