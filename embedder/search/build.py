"""Building an index from a feature cache: plan -> train -> add -> tune -> save, in one staged folder.

`build_index` plans the whole build from the cache's size and the budget before any work
(`BuildPlan`: the kind, why, its faiss factory string and sizes), trains IVF / PQ on a
seeded sample, streams the cache into the index block by block (adding vectors never loads
the whole cache), tunes the search parameter (nprobe or efSearch) until recall@10 against
exact search reaches the target on held-out queries (embedder.search.tune), and saves
atomically: everything is written into a temporary folder that replaces INDEX_DIR only
when complete.

INDEX_DIR holds:
    index.faiss   the FAISS index; faiss id = cache row
    rows.h5       paths, labels, classes of the rows (the mapping back to images)
    meta.json     fingerprint and components of the cache, kind, faiss factory string, metric,
                  parameters and why they were chosen, build time, recall@10 against exact search

Memory: `--memory-budget` bounds the whole build, not just the index. Three quarters of it
go to the index itself; the rest to working buffers (the block being added or compared,
the training sample), whose sizes are derived from the budget. An inverted-list index
larger than its three quarters keeps its lists on disk.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np

from embedder.cache.columns import write_columns
from embedder.cache.reader import STR, FeatureCache
from embedder.errors import ConfigError
from embedder.names import encode_path
from embedder.outputs import CACHE, INDEX, claim, expect, write_dir
from embedder.search.config import KINDS, METRICS
from embedder.search.kinds import (
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    INVERTED_LIST_KINDS,
    choose_kind,
    factory_string,
    index_bytes,
    knob_of,
    knob_values,
    load_faiss,
    new_index,
    nlist_for,
    pq_bytes,
    prepare,
)
from embedder.search.removal import drop_dead_rows
from embedder.search.tune import Truth, Tuned, ground_truth, holds_out, tune


@dataclass(frozen=True)
class BuildPlan:
    """What `build_index` builds, decided from the cache's size and the budget before any work."""

    kind: str  # flat, hnsw, ivf, ivfsq or ivfpq (`auto` resolved)
    why: str  # why this kind (and why its lists live on disk), as meta.json records it
    factory: str  # the faiss factory string (embedder.search.kinds)
    metric: str  # cosine or l2
    n: int  # rows of the cache
    dim: int
    budget: int  # bytes for the whole build
    index_budget: int  # the three quarters of it that the index itself may take
    block_rows: int  # rows per block read, added or compared: sized to the budget's last quarter
    nlist: int = 0  # inverted lists (IVF kinds)
    pq_m: int = 0  # PQ bytes per vector (ivfpq)
    pq_nbits: int = 0  # bits per PQ sub-code (ivfpq)
    train_size: int = 0  # rows of the seeded training sample (IVF kinds; 0: nothing to train)
    on_disk: bool = False  # inverted lists merged into lists.ivfdata, memory-mapped by search

    @property
    def knob(self) -> str | None:
        return knob_of(self.kind)

    def params(self) -> dict:
        """The parameters meta.json records before adding and tuning add theirs."""
        params: dict = {}
        if self.kind == "hnsw":
            params.update(M=HNSW_M, efConstruction=HNSW_EF_CONSTRUCTION)
        elif self.kind == "ivfsq":
            params.update(sq="8bit")
        elif self.kind == "ivfpq":
            params.update(pq_m=self.pq_m, pq_nbits=self.pq_nbits)
        if self.kind in INVERTED_LIST_KINDS:
            params.update(nlist=self.nlist, trained_on=self.train_size)
        return params


def plan_build(n: int, dim: int, kind: str = "auto", metric: str = "cosine", memory_budget: int | None = None,
               block_rows: int = 65536, on_disk: bool = False) -> BuildPlan:
    """The plan for `n` x `dim` vectors within `memory_budget` bytes (default 4 GiB)."""
    budget = memory_budget or (4 << 30)
    index_budget = budget * 3 // 4
    # Up to four copies of a block are alive at once (read, normalised, masked, FAISS's own),
    # and the training sample is one more buffer: together they keep to the last quarter.
    work_rows = max(1024, budget // 4 // (5 * dim * 4))
    why = "chosen with --kind"
    if kind == "auto":
        kind, why = choose_kind(n, dim, index_budget)
    if on_disk and kind not in INVERTED_LIST_KINDS:
        raise ConfigError(f"--on-disk needs --kind ivf, ivfsq or ivfpq (inverted lists), not {kind}.")
    plan = BuildPlan(kind, why, factory_string(kind), metric, n, dim, budget, index_budget,
                     block_rows=min(block_rows, work_rows), on_disk=on_disk)
    return _plan_inverted_lists(plan, work_rows) if kind in INVERTED_LIST_KINDS else plan


def _plan_inverted_lists(plan: BuildPlan, work_rows: int) -> BuildPlan:
    """The sizes of an IVF kind: lists, training sample, PQ codes, and whether the lists live on disk."""
    n, why, on_disk = plan.n, plan.why, plan.on_disk
    # 10,000 points is the floor for sound k-means (8-bit PQ needs 39 x 256), whatever the budget.
    train_size = min(max(40 * nlist_for(n), 10_000), max(work_rows, 10_000), n)
    nlist = min(nlist_for(n), max(1, train_size // 39))  # FAISS wants >= 39 training points per list
    pq_m, pq_nbits = 0, 0
    if plan.kind == "ivfpq":
        pq_m, pq_nbits = pq_bytes(n, plan.dim, plan.index_budget), 8 if n >= 256 * 39 else 4
    size = index_bytes(plan.kind, n, plan.dim, pq_m)
    if not on_disk and size > plan.index_budget:
        on_disk, why = True, f"{why}; its {size / 2**20:.0f} MiB exceed the budget, so its lists live on disk"
    return replace(plan, why=why, factory=factory_string(plan.kind, nlist, pq_m, pq_nbits), nlist=nlist, pq_m=pq_m,
                   pq_nbits=pq_nbits, train_size=train_size, on_disk=on_disk)


def build_index(
    cache_path,
    out_dir,
    kind: str = "auto",
    metric: str = "cosine",
    memory_budget: int | None = None,
    target_recall: float = 0.95,
    seed: int = 0,
    progress: bool = True,
    block_rows: int = 65536,
    n_eval: int = 500,
    on_disk: bool = False,
    layer: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Build, tune, evaluate and atomically save an index of the cache. Returns the metadata
    (and `notes`: files of a replaced INDEX_DIR that the new one lacks, such as its map).

    `out_dir` follows the output policy (embedder.outputs): an index of the same cache is rebuilt,
    one of another cache is replaced only with `overwrite`, anything else is refused.

    `on_disk` (ivf, ivfsq, ivfpq; automatic when the index would not fit `memory_budget`): one index
    per shard of the cache (its virtual-dataset sources, else blocks of `block_rows`), all
    sharing the trained quantizer, merged into one inverted-list file on disk with faiss
    `contrib.ondisk`. Search then memory-maps the lists; the results equal an in-memory build.

    Crash safety: the build holds INDEX_DIR's write lock (`.INDEX_DIR.lock`) and writes into a
    hidden temporary folder that replaces INDEX_DIR in one step, so a kill leaves the old index
    or the new one; the next build removes what a killed one left.
    """
    from embedder.progress import bar as progress_bar

    _check_options(kind, metric, target_recall)
    expect(cache_path, CACHE)
    claim(out_dir, INDEX, [cache_path], overwrite)  # before the cache is read (embedder.outputs)
    with write_dir(out_dir, INDEX, [cache_path], overwrite) as (tmp, written), \
            FeatureCache(cache_path, layer=layer, live=False) as cache:  # tmp becomes INDEX_DIR; ids = stored rows
        t0 = time.perf_counter()
        dead = dead_rows(cache)
        if len(cache) == len(dead):
            raise ConfigError(f"{cache_path} has no rows to index.")
        plan = plan_build(len(cache), cache.dim, kind, metric, memory_budget, block_rows, on_disk)
        index = new_index(plan.factory, plan.dim, plan.metric)
        train(index, cache, plan, seed)
        q_rows = sample_rows(plan.n, n_eval, seed + 1)
        keep = np.ones(plan.n, dtype=bool)  # the rows added before tuning
        if holds_out(plan.knob, plan.on_disk, plan.n, len(q_rows)):
            keep[q_rows] = False  # fresh tuning queries, added last under their own rows
        shards = None
        with progress_bar(total=plan.n, unit="vec", desc=f"index ({plan.kind})",
                          enabled=progress and not plan.on_disk) as bar:
            if plan.on_disk:
                shards = add_on_disk(index, cache, plan, tmp, progress)
            else:
                add_blocks(index, cache, plan, keep, bar)
            queries = read_rows(cache, q_rows, plan.metric, plan.block_rows)
            tuned = tune(index, plan.knob, knob_values(plan.knob, plan.nlist), queries,
                         exact_truth(cache, plan, queries, q_rows, keep), target_recall)
            if not keep.all():
                add_rows(index, queries, q_rows, np.ones(len(q_rows), bool))
                bar.update(len(q_rows))
        meta = metadata(cache, cache_path, plan, index, shards, tuned, q_rows, keep, target_recall, t0)
        save(tmp, index, cache, meta)
        if len(dead):  # rows a sync superseded or removed: never returned by a search
            drop_dead_rows(Path(out_dir), tmp, meta, dead, staged=True)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return {**meta, "notes": written.notes()}


def dead_rows(cache: FeatureCache) -> np.ndarray:
    """The stored rows of `cache` that a sync superseded or removed (sorted; empty when none)."""
    state = cache.row_state
    return np.zeros(0, np.int64) if state is None else np.flatnonzero(state).astype(np.int64)


def _check_options(kind: str, metric: str, target_recall: float) -> None:
    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    if metric not in METRICS:
        raise ConfigError(f"--metric must be cosine or l2, got {metric!r}.")
    if not 0 < target_recall <= 1:
        raise ConfigError("--target-recall must be in (0, 1].")


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """A seeded sample of `size` distinct rows of `n`, in row order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def read_rows(cache: FeatureCache, rows: np.ndarray, metric: str, window: int = 65536) -> np.ndarray:
    """The prepared vectors of sorted `rows`."""
    # One contiguous read per window of rows: HDF5 point selection is slow.
    out = []
    for start in range(0, len(cache), window):
        sel = rows[(rows >= start) & (rows < start + window)]
        if len(sel):
            block = cache.features(slice(start, min(start + window, len(cache))))
            out.append(block[sel - start])
    return prepare(np.concatenate(out), metric)


def train(index, cache: FeatureCache, plan: BuildPlan, seed: int) -> None:
    """Train the coarse quantizer (and codebooks) on the seeded sample; flat and HNSW need none."""
    if plan.train_size:
        index.train(read_rows(cache, sample_rows(plan.n, plan.train_size, seed), plan.metric, plan.block_rows))


def add_blocks(index, cache: FeatureCache, plan: BuildPlan, keep: np.ndarray, bar) -> None:
    """Stream the rows `keep` selects into the index, block by block, with faiss id = cache row."""
    for block in cache.iter_blocks(plan.block_rows):
        rows, mask = np.arange(block.start, block.stop), keep[block.start:block.stop]
        add_rows(index, prepare(block.features, plan.metric), rows, mask)
        bar.update(int(mask.sum()))


def add_rows(index, x: np.ndarray, rows: np.ndarray, mask: np.ndarray) -> None:
    """Add the rows of a block that `mask` selects, with faiss id = cache row."""
    if mask.all() and index.ntotal == rows[0] and not isinstance(index, load_faiss().IndexIDMap):
        index.add(x)  # in order: the implicit ids are the rows
    elif mask.any():
        index.add_with_ids(np.ascontiguousarray(x[mask]), rows[mask].astype(np.int64))


def add_on_disk(index, cache: FeatureCache, plan: BuildPlan, tmp: Path, progress: bool) -> int:
    """Fill the trained, empty `index` through per-shard indexes merged on disk. Returns the shard count."""
    from faiss.contrib.ondisk import merge_ondisk

    from embedder.cache.shards import row_ranges
    from embedder.progress import bar as progress_bar

    faiss = load_faiss()
    files = []
    with progress_bar(total=plan.n, unit="vec", desc=f"index ({plan.kind}, on disk)", enabled=progress) as bar:
        for k, (start, stop) in enumerate(row_ranges(cache, plan.block_rows)):
            shard = faiss.clone_index(index)  # same trained quantizer (and codebooks), no vectors
            for s in range(start, stop, plan.block_rows):
                e = min(s + plan.block_rows, stop)
                x = prepare(cache.features(slice(s, e)), plan.metric)
                shard.add_with_ids(x, np.arange(s, e, dtype=np.int64))
                bar.update(e - s)
            files.append(tmp / f"shard-{k:05d}.index")
            faiss.write_index(shard, str(files[-1]))
            del shard
    merge_ondisk(index, [str(f) for f in files], str(tmp / "lists.ivfdata"))
    for f in files:
        f.unlink()
    return len(files)


def exact_truth(cache: FeatureCache, plan: BuildPlan, queries: np.ndarray, q_rows: np.ndarray,
                keep: np.ndarray) -> Truth:
    """Exact neighbours of the tuning queries among the rows the index holds now."""
    db_blocks = (prepare(b.features[keep[b.start:b.stop]], plan.metric) for b in cache.iter_blocks(plan.block_rows))
    return ground_truth(queries, q_rows, not keep.all(), db_blocks, np.flatnonzero(keep), plan.metric)


def metadata(cache: FeatureCache, cache_path, plan: BuildPlan, index, shards: int | None, tuned: Tuned,
             q_rows: np.ndarray, keep: np.ndarray, target_recall: float, t0: float) -> dict:
    """meta.json: where the index came from, what was built and why, and how well it finds neighbours."""
    params = plan.params()
    if shards is not None:
        params["on_disk_shards"] = shards
    if tuned.value is not None:
        params[plan.knob] = tuned.value
    return {
        "format": "embedder-index/1",
        "cache": str(Path(cache_path).resolve()),
        "cache_generation": cache.generation,  # the cache's rows this index reflects (embedder.cache.sync)
        "fingerprint": cache.fingerprint,
        "components": cache.components,
        "layer": cache.layer,
        "layer_label": cache.layer_label(),
        "layer_names": cache.layer_names,  # {name: layer} the cache resolves --layer with (None: an older cache)
        "source": cache.source,
        "kind": plan.kind,
        "factory": plan.factory,
        "on_disk": plan.on_disk,
        "metric": plan.metric,
        "why": plan.why,
        "params": params,
        "tuning": tuned.tuning,
        "ntotal": int(index.ntotal),
        "dim": plan.dim,
        "memory_budget": plan.budget,
        "recall_at_10": tuned.recall,
        "target_recall": target_recall,
        "target_reached": tuned.recall >= target_recall,
        "eval_queries": len(q_rows),
        "eval_queries_held_out": not keep.all(),
        "build_s": time.perf_counter() - t0,
        "faiss_version": load_faiss().__version__,
    }


def save(tmp: Path, index, cache: FeatureCache, meta: dict) -> None:
    """Write the index files into `tmp` (which may already hold the on-disk lists)."""
    load_faiss().write_index(index, str(tmp / "index.faiss"))
    with h5py.File(tmp / "rows.h5", "w") as f:
        f.create_dataset("paths", data=_names(cache.paths), dtype=STR)
        f.create_dataset("labels", data=cache.labels)
        f.create_dataset("classes", data=_names(cache.classes), dtype=STR)
        # The cache's metadata columns, so that queries can filter and show them (the same layout).
        if cache.column_kinds:
            write_columns(f, cache.column_kinds, cache.columns())
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


def _names(names: list[str]) -> np.ndarray:
    """Names as the bytes the file system gave (embedder.names), so a Latin-1 name survives."""
    return np.array([encode_path(n) for n in names], dtype=object)
