"""2-D maps of a feature space: the projections behind `embedder plot`, and the map of an index
that the service's /map page draws (`embedder map INDEX_DIR`, stored as INDEX_DIR/map.h5).

    project(X, method, seed)        (n, 2) coordinates of the rows of X: pca, tsne or umap, seeded
    compute_map(index_dir, ...)     fit a map of an index's live rows and store it as INDEX_DIR/map.h5
    index_map(index)                the stored map when it is current, else a PCA fallback (not stored)

INDEX_DIR/map.h5 holds `/xy` (float32, ntotal x 2; NaN for rows removed when it was computed)
and attributes: method, seed, rows (the index's ntotal then), fingerprint (the index's), fit_rows,
metric, seconds, version. A map is *current* when its rows and fingerprint match the index's: a
rebuild starts a new folder without one, `index --remove` carries it over (rows stay, removed ones
are hidden when served), `index --update` carries it too, but the index then has more rows than
the map, so it is stale and the service falls back to PCA (and says so) until `embedder map` runs
again.

Why these choices:
  * The map is fitted once, offline, because UMAP of 100k rows takes minutes; the service only
    reads it. Above `fit_rows` rows, the projection is fitted on a seeded sample and the other
    rows are placed by the fitted model's `transform`, block by block, so memory stays bounded.
  * Vectors are prepared as the index compares them (L2-normalised under cosine), so the map's
    neighbourhoods are the search's neighbourhoods.
  * The file is written under INDEX_DIR's write lock (the one build, update and removal take) to a
    temporary name and renamed: a reader sees the old map or the new one, never half of one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from embedder.errors import ConfigError
from embedder.search.config import DEFAULT_FIT_ROWS, MAP_METHODS, PLOT_METHODS
from embedder.search.config import MIN_MAP_ROWS as MIN_ROWS

MAP_FILE = "map.h5"
FALLBACK_FIT_ROWS = 20_000  # the service's PCA fallback: a sample this large fixes two axes well
UMAP_NEIGHBOURS = 15  # umap-learn's default


def project(X: np.ndarray, method: str, seed: int = 0, metric: str = "euclidean"):
    """A fitted 2-D projection of the rows of X and their coordinates: (model, (n, 2) float32).

    `metric` is UMAP's (PCA and t-SNE are Euclidean). The same X and seed give the same coordinates.
    t-SNE has no model to place other rows with: its model is None."""
    if method not in PLOT_METHODS:
        raise ConfigError(f"--method must be one of {', '.join(PLOT_METHODS)}, got {method!r}.")
    if len(X) < MIN_ROWS:
        raise ConfigError(f"A 2-D map needs at least {MIN_ROWS} rows, got {len(X)}.")
    X = np.asarray(X, dtype=np.float32)
    if method == "pca":
        from sklearn.decomposition import PCA

        model = PCA(n_components=2, random_state=seed)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        if not np.ptp(X, axis=0).any():
            # scikit-learn scales its PCA start by the spread of the rows, zero here: the Barnes-Hut
            # step then crashes the process (SIGSEGV) instead of raising.
            raise ConfigError(f"t-SNE cannot lay out {len(X)} identical rows (they are one point); "
                              "use --method pca, which places them together.")
        xy = TSNE(n_components=2, init="pca", random_state=seed,
                  perplexity=min(30, max(2, len(X) // 4))).fit_transform(X)
        return None, xy.astype(np.float32)
    else:
        model = _umap(len(X), seed, metric)
    return model, model.fit_transform(X).astype(np.float32)


def _umap(n: int, seed: int, metric: str):
    try:
        import umap
    except ImportError:  # a declared dependency, but an environment may lack it
        raise ConfigError("--method umap needs umap-learn: pip install 'umap-learn>=0.5'.") from None
    # n_jobs=1: a random_state makes umap-learn run single-threaded anyway, which is what makes it
    # reproducible; saying so keeps it from warning about it.
    return umap.UMAP(n_components=2, n_neighbors=min(UMAP_NEIGHBOURS, n - 1), metric=metric, random_state=seed,
                     transform_seed=seed, n_jobs=1, low_memory=True, verbose=False)


# ---------------------------------------------------------------- the map of an index


@dataclass(frozen=True)
class IndexMap:
    """Coordinates of every index row (NaN for rows left out) and where they came from."""

    xy: np.ndarray  # (ntotal, 2) float32
    method: str
    stored: bool  # read from INDEX_DIR/map.h5 (False: the service's PCA fallback)
    note: str | None = None  # why the stored map was not used


def compute_map(index_dir, method: str = "umap", seed: int = 0, fit_rows: int = DEFAULT_FIT_ROWS,
                progress: bool = True, scores=None) -> dict:
    """Fit a 2-D map of the live rows of the index in `index_dir` and store it as INDEX_DIR/map.h5
    (atomically, under INDEX_DIR's write lock). `scores`: a `curate` REPORT_DIR (or its
    scores.parquet) whose numeric columns are stored beside the map, to colour it by. Returns a report."""
    from embedder.atomic import WriteLock
    from embedder.search.query import SearchIndex

    if method not in MAP_METHODS:
        raise ConfigError(f"--method must be one of {', '.join(MAP_METHODS)}, got {method!r}.")
    if fit_rows < MIN_ROWS:
        raise ConfigError(f"--fit-rows must be at least {MIN_ROWS}, got {fit_rows}.")
    index_dir = Path(index_dir)
    if not (index_dir / "meta.json").is_file():  # before the lock, which would create folders
        raise ConfigError(f"No index at {index_dir}. Build one with `embedder index CACHE.h5 --out {index_dir}`.")
    t0 = time.perf_counter()
    with WriteLock(index_dir):  # no build, update or removal swaps the folder meanwhile
        index = SearchIndex.open(index_dir)
        table = score_columns(index, scores) if scores is not None else {}  # refused before minutes of UMAP
        xy = map_rows(index, method, seed, fit_rows, progress)
        seconds = time.perf_counter() - t0
        attrs = {"method": method, "seed": seed, "rows": index.ntotal, "fit_rows": fit_rows,
                 "fingerprint": _fingerprint(index), "metric": index.metric, "seconds": seconds,
                 "version": _version()}
        _write_map(index_dir / MAP_FILE, xy, attrs, table)
    live = int(np.isfinite(xy[:, 0]).sum())
    return {"index": str(index_dir), "map": str(index_dir / MAP_FILE), "method": method, "rows": index.ntotal,
            "mapped": live, "fitted_on": min(live, fit_rows), "seconds": seconds, "scores": list(table)}


def score_columns(index, scores) -> dict[str, np.ndarray]:
    """The numeric (and bool, as 0/1) columns of a `curate` scores.parquet, by the index's row id
    (NaN for rows the table lacks). Refused when no path of the table is a row of the index."""
    import pyarrow.parquet as pq

    path = Path(scores)
    path = path / "scores.parquet" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"No curate scores at {path}: give the REPORT_DIR of `embedder curate` (its scores.parquet).")
    table = pq.read_table(path)
    if "path" not in table.column_names:
        raise ConfigError(f"{path} has no `path` column: it is not a scores table of `embedder curate`.")
    rows = index.rows.rows_of(table.column("path").to_pylist())
    if not (rows >= 0).any():
        raise ConfigError(f"No path of {path} is a row of {index.dir}: curate the index's own cache "
                          f"({index.meta.get('cache')}).")
    out = {}
    for name in table.column_names:
        values = table.column(name).to_numpy(zero_copy_only=False)
        if name != "path" and values.dtype.kind in "biuf":
            column = np.full(index.ntotal, np.nan)
            column[rows[rows >= 0]] = values[rows >= 0].astype(np.float64)
            out[name] = column
    return out


def map_scores(index) -> dict[str, np.ndarray]:
    """The curate scores stored beside the current map ({} without a current map or scores)."""
    path = Path(index.dir) / MAP_FILE
    if read_map(index)[0] is None:
        return {}
    with h5py.File(path, "r") as f:
        return {name: ds[:] for name, ds in f["scores"].items()} if "scores" in f else {}


def map_rows(index, method: str, seed: int, fit_rows: int, progress: bool = False) -> np.ndarray:
    """(ntotal, 2) coordinates of the index's rows, NaN for removed ones: fitted on a seeded sample
    of at most `fit_rows` live rows, the others placed by the fitted model block by block."""
    from embedder.progress import bar, stage
    from embedder.search.kinds import prepare

    live = np.setdiff1d(np.arange(index.ntotal, dtype=np.int64), index.removed)
    if len(live) < MIN_ROWS:
        raise ConfigError(f"A 2-D map needs at least {MIN_ROWS} live rows; {index.dir} has {len(live)}.")
    rng = np.random.default_rng(seed)
    fit = live if len(live) <= fit_rows else np.sort(rng.choice(live, size=fit_rows, replace=False))
    xy = np.full((index.ntotal, 2), np.nan, dtype=np.float32)
    with _VectorReader(index) as read:
        with stage(f"map: fitting {method} on {len(fit)} rows", enabled=progress):
            model, xy[fit] = project(prepare(read(fit), index.metric), method, seed)
        rest = np.setdiff1d(live, fit)
        block = 16384
        for start in bar(range(0, len(rest), block), desc=f"map: placing rows ({method})", unit="block",
                         enabled=progress and len(rest) > 0):
            rows = rest[start:start + block]
            xy[rows] = model.transform(prepare(read(rows), index.metric))
    return xy


class _VectorReader:
    """The exact vectors of index rows: from the index's cache when it is there (one open file),
    else from the index itself where it keeps them (flat, HNSW, IVF)."""

    def __init__(self, index):
        self.index, self.cache = index, None

    def __enter__(self):
        from embedder.cache.reader import FeatureCache

        path = self.index.meta.get("cache")
        if path and Path(path).is_file():
            self.cache = FeatureCache(path, layer=self.index.meta.get("layer"), live=False)  # ids: stored rows
        elif not self.index.searcher.reconstructs:
            raise ConfigError(f"A map needs the index's vectors: this {self.index.meta['kind']} index keeps "
                              f"compressed codes and its cache is not at {path}. Put the cache back there.")
        return self

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        if self.cache is not None:
            return np.asarray(self.cache.features(rows), dtype=np.float32)  # rows sorted, as h5py wants
        return self.index.searcher.vectors(rows)

    def __exit__(self, *exc) -> None:
        if self.cache is not None:
            self.cache.close()


def _write_map(path: Path, xy: np.ndarray, attrs: dict, scores: dict | None = None) -> None:
    """Write map.h5 under a temporary name and rename it (the caller holds INDEX_DIR's lock)."""
    from embedder.atomic import atomic_replace, discard, remove_leftovers, temp_file

    remove_leftovers(path)  # what a killed `embedder map` left
    tmp = temp_file(path)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("xy", data=xy, dtype=np.float32)
            for name, values in (scores or {}).items():
                f.create_dataset(f"scores/{name}", data=values, dtype=np.float64)
            f.attrs.update(attrs)
        atomic_replace(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def read_map(index) -> tuple[np.ndarray | None, dict, str | None]:
    """(xy, attrs, None) of INDEX_DIR/map.h5 when it is current for `index`; (None, attrs, why) when not."""
    path = Path(index.dir) / MAP_FILE
    if not path.is_file():
        return None, {}, f"no stored map: run `embedder map {index.dir}` to compute one (UMAP)"
    with h5py.File(path, "r") as f:
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        xy = f["xy"][:]
    if attrs.get("rows") != index.ntotal or xy.shape != (index.ntotal, 2) or attrs.get("fingerprint") != \
            _fingerprint(index):
        return None, attrs, (f"the stored map covers {attrs.get('rows')} rows of another state of the index (it now "
                             f"has {index.ntotal}): run `embedder map {index.dir}` again")
    return xy, attrs, None


def index_map(index, seed: int = 0) -> IndexMap:
    """The stored map of `index` when it is current, else a PCA of its live rows computed now (not stored)."""
    xy, attrs, why = read_map(index)
    if xy is not None:
        return IndexMap(xy, str(attrs.get("method")), True)
    return IndexMap(map_rows(index, "pca", seed, FALLBACK_FIT_ROWS), "pca", False, why)


def _fingerprint(index) -> str:
    """What identifies the rows of an index: its cache's fingerprint and the layer it holds."""
    return json.dumps([index.meta.get("fingerprint"), index.meta.get("layer")])


def _version() -> str:
    from embedder._version import __version__

    return __version__
