"""Near-duplicate groups at scale: FAISS range search through an ANN index, queries in blocks.

An exact all-pairs search is quadratic in time, and its distance blocks grow with N: past a
few hundred thousand rows it no longer runs (imagededup #133/#191, fiftyone-brain #223/#224).
Here the rows go into an index chosen by `--kind` (auto: exact up to EXACT_ROWS rows, then IVF
with raw vectors while they fit 3/4 of `--memory-budget`, then IVF with 8-bit vectors), and the
rows are then range-searched against it one block at a time. Memory is the index (N*D*4 bytes
for IVF, N*D for IVF-SQ8) plus one block and the pairs found, whatever N.

IVF probes `nprobe` inverted lists per query: a near-duplicate sits almost on top of its
original, so both fall into the same or a neighbouring list and a few probes find nearly all
pairs (benchmarks/dedup.py measures the recall against the exact blocked search).

Pairs over the threshold are grouped so that a group cannot chain: every row a group marks to
drop is itself within the threshold of the row the group keeps. (Connected components of the
pairs would chain: a ~ b ~ c puts a and c in one group although they may be far apart; on the
digits with Lite0 features one component held 1,616 images of all ten classes.) The rule:
    visit the rows of the pairs in the order `--keep` prefers them; a row not yet in a group
    becomes the kept row of a new group and takes every row not yet in a group that it matches.
A row whose matches all sit in earlier groups stays out of every group (it is kept). The rows
of a group all come after its kept row in that order, so the kept row is the one `--keep`
would pick among them. The grouping is one pass over the rows and their pairs (plus a sort of
the pairs): near-linear in the pairs, as the range search is.

`--keep` orders the rows:
    largest  the row with most pixels (the cache's /columns width*height), else the largest
             file (the cache's /columns size, else the source file on disk); ties, and rows
             whose size is unknown (after the known ones), by path
    first    the first by path
With `--against OTHER.h5`, rows of CACHE are searched against OTHER's index only: OTHER's rows
are visited (by path) and each takes the CACHE rows it duplicates that no earlier OTHER row
took; OTHER's rows are kept and CACHE's are the ones to drop.

A group larger than max(LARGE_GROUP_ROWS, 1% of the rows) is unusual for near copies (a blank
or uniform image, or a threshold too loose for the features): it is reported (a warning and
`large_groups`), and so is a drop list of more than DROP_SHARE of the rows: nobody should
delete a class, or most of a dataset, by accident.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import h5py
import numpy as np

from embedder.cache.reader import FeatureCache
from embedder.data.rows import row_location
from embedder.errors import ConfigError, EmbedderNotice
from embedder.search.config import METRICS
from embedder.search.kinds import factory_string, inner, load_faiss, new_index, nlist_for, prepare

EXACT_ROWS = 50_000  # up to here an exact index: a few seconds of range search
DEDUP_KINDS = ("auto", "flat", "ivf", "ivfsq", "hnsw")
KEEP = ("largest", "first")
TRAIN_PER_LIST = 40  # training rows per inverted list (faiss warns under 39)
TRAIN_ITERATIONS = 10  # k-means iterations: the lists only need to keep near copies together
LARGE_GROUP_ROWS = 50  # a group above max(this, 1% of the rows) is reported as unusually large
DROP_SHARE = 0.2  # more than this share of the rows to drop is reported too


@dataclass
class Duplicates:
    """Pairs over the threshold, their groups and what to keep. Rows index CACHE; with
    `against`, rows >= `n_rows` are OTHER's rows (row - n_rows)."""

    groups: list[list[int]]  # each sorted: CACHE rows, then OTHER rows
    keep: list[list[int]]  # per group, the rows suggested to keep
    pairs: int
    kind: str
    n_rows: int
    timings: dict = field(default_factory=dict)
    large_groups: int = 0  # groups above large_group_limit(rows searched): see the module's docstring

    def drop(self) -> list[int]:
        return sorted(r for g, k in zip(self.groups, self.keep) for r in g if r not in set(k))


def near_duplicates(cache_path, threshold: float = 0.95, metric: str = "cosine", block_rows: int = 16384,
                    layer: str | None = None) -> list[list[int]]:
    """Groups of rows closer than `threshold` (cosine similarity >= T, or squared L2 distance <= T)."""
    return find_duplicates(cache_path, threshold, metric, block_rows=block_rows, layer=layer).groups


def find_duplicates(cache_path, threshold: float = 0.95, metric: str = "cosine", *, against=None,
                    kind: str = "auto", nprobe: int = 8, keep: str = "largest", memory_budget: int = 4 << 30,
                    block_rows: int = 16384, layer: str | None = None, seed: int = 0,
                    progress: bool = False) -> Duplicates:
    """Near-duplicate groups of a cache (or of CACHE against OTHER) with a keep suggestion each."""
    _check(metric, kind, keep, nprobe)
    with FeatureCache(cache_path, layer=layer) as cache:
        if against is None:
            pairs, used = duplicate_pairs(lambda: _blocks(cache, block_rows), len(cache), cache.dim, threshold,
                                          metric, kind=kind, nprobe=nprobe, memory_budget=memory_budget, seed=seed,
                                          progress=progress)
            paths = cache.paths  # read once: each read decodes every path
            members = np.unique(pairs)
            sizes = row_sizes(cache, members.tolist(), paths) if keep == "largest" else None
            groups, kept = anchored_groups(pairs, keep_order(members, paths, sizes))
            found = Duplicates(groups, [[r] for r in kept], len(pairs), used, len(cache))
            return _flag_large(found, len(cache), threshold, metric, paths)
        with FeatureCache(against, layer=layer) as other:
            if other.dim != cache.dim:
                raise ConfigError(f"{against} holds {other.dim}-d features and {cache_path} {cache.dim}-d ones: "
                                  "embed both with the same model and layer.")
            pairs, used = duplicate_pairs(lambda: _blocks(other, block_rows), len(other), other.dim, threshold,
                                          metric, kind=kind, nprobe=nprobe, memory_budget=memory_budget, seed=seed,
                                          progress=progress, queries=lambda: _blocks(cache, block_rows))
            n = len(cache)
            pairs = np.stack([pairs[:, 0], pairs[:, 1] + n], axis=1) if len(pairs) else pairs
            paths = cache.paths + other.paths
            groups, kept = anchored_groups(pairs, keep_order(np.unique(pairs[:, 1]), paths, None))
            found = Duplicates(groups, [[r] for r in kept], len(pairs), used, n)  # OTHER is the reference set
            return _flag_large(found, n, threshold, metric, paths)  # shares of CACHE, the rows to drop from


def large_group_limit(rows: int) -> int:
    """Groups above this many rows are unusual for near copies: max(LARGE_GROUP_ROWS, 1% of the rows)."""
    return max(LARGE_GROUP_ROWS, rows // 100)


def dedup_notices(groups: list[list[int]], kept: list[int], rows: int, threshold: float, metric: str,
                  paths: list[str], flag: str = "--threshold") -> tuple[int, list[str]]:
    """(groups above large_group_limit(rows), the notices to show): one for those groups, naming
    the largest one's kept row, and one when more than DROP_SHARE of the rows would be dropped."""
    limit = large_group_limit(rows)
    sizes = [len(g) for g in groups if len(g) > limit]
    looser = f"raise {flag}" if metric == "cosine" else f"lower {flag}"
    out = []
    if sizes:
        out.append(f"{len(sizes)} near-duplicate group(s) hold more than {limit} rows (the largest {max(sizes)}, "
                   f"kept row {paths[kept[0]]}): near copies rarely come in such numbers. Look at them before "
                   f"deleting anything, or {looser} (now {threshold}).")
    drop = sum(len(g) for g in groups) - len(groups)
    if drop > DROP_SHARE * rows:
        out.append(f"{drop} of {rows} rows ({100 * drop / rows:.0f}%) would be dropped as near duplicates: a threshold "
                   f"of {threshold} may be too loose for these features ({looser}).")
    return len(sizes), out


def _flag_large(found: Duplicates, rows: int, threshold: float, metric: str, paths: list[str]) -> Duplicates:
    found.large_groups, notices = dedup_notices(found.groups, [k[0] for k in found.keep], rows, threshold, metric,
                                                paths)
    for notice in notices:
        warnings.warn(notice, EmbedderNotice, stacklevel=3)
    return found


def _check(metric: str, kind: str, keep: str, nprobe: int) -> None:
    if metric not in METRICS:
        raise ConfigError("--metric must be cosine or l2.")
    if kind not in DEDUP_KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(DEDUP_KINDS)}, got {kind!r}.")
    if keep not in KEEP:
        raise ConfigError(f"--keep must be largest or first, got {keep!r}.")
    if nprobe < 1:
        raise ConfigError(f"--nprobe must be at least 1, got {nprobe}.")


def _blocks(cache: FeatureCache, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    for block in cache.iter_blocks(block_rows):
        yield block.start, block.features


def dedup_kind(kind: str, n: int, dim: int, memory_budget: int) -> str:
    """The index `--kind auto` searches through (see the module's docstring)."""
    if kind != "auto":
        return kind
    if n <= EXACT_ROWS:
        return "flat"
    return "ivf" if n * (4 * dim + 8) <= memory_budget * 3 // 4 else "ivfsq"


def duplicate_pairs(blocks, n: int, dim: int, threshold: float, metric: str = "cosine", *, kind: str = "auto",
                    nprobe: int = 8, memory_budget: int = 4 << 30, seed: int = 0, progress: bool = False,
                    queries=None) -> tuple[np.ndarray, str]:
    """(pairs [P, 2], kind used): rows (i, j) whose vectors are within `threshold`.

    `blocks()` yields (start row, vectors) afresh on each call: the indexed rows. Without
    `queries` the rows are searched against themselves and each pair comes once, i < j; with
    `queries` (same form) pair (q, j) holds a query row and an indexed row."""
    from embedder.progress import bar as progress_bar

    used = dedup_kind(kind, n, dim, memory_budget)
    index = _build(blocks, n, dim, metric, used, nprobe, seed)
    found = []
    bar = progress_bar(desc="dedup", unit="row", total=n if queries is None else None, enabled=progress)
    for start, x in (queries or blocks)():
        lims, _, ids = index.range_search(prepare(x, metric), threshold)
        q = np.repeat(np.arange(start, start + len(x), dtype=np.int64), np.diff(lims).astype(np.int64))
        pair = np.stack([q, ids.astype(np.int64)], axis=1)
        found.append(pair if queries is not None else pair[pair[:, 0] < pair[:, 1]])
        bar.update(len(x))
    bar.close()
    return (np.concatenate(found) if found else np.zeros((0, 2), np.int64)), used


def _build(blocks, n: int, dim: int, metric: str, kind: str, nprobe: int, seed: int):
    """The filled index of `kind` over the rows of `blocks`, its search knob set."""
    faiss = load_faiss()
    factory = _factory(kind, n)
    index = new_index(factory, dim, metric)
    if not index.is_trained:
        faiss.extract_index_ivf(index).cp.niter = TRAIN_ITERATIONS
        index.train(_training_sample(blocks, n, _factory_lists(kind, n) * TRAIN_PER_LIST, metric, seed))
    for start, x in blocks():
        if "IDMap" in factory:
            index.add_with_ids(prepare(x, metric), np.arange(start, start + len(x), dtype=np.int64))
        else:
            index.add(prepare(x, metric))
    if kind in ("ivf", "ivfsq"):
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(nprobe, ivf.nlist)
    elif kind == "hnsw":
        inner(index).hnsw.efSearch = max(64, 4 * nprobe)
    return index


def _factory_lists(kind: str, n: int) -> int:
    """Half the lists a search index gets (embedder.search.kinds.nlist_for): every row is a
    query here, so the scan per query matters less than training, which grows with the lists."""
    return max(16, nlist_for(n) // 2) if kind in ("ivf", "ivfsq") else 0


def _factory(kind: str, n: int) -> str:
    if kind == "hnsw":
        return factory_string("hnsw")
    return factory_string(kind, nlist=_factory_lists(kind, n))


def _training_sample(blocks, n: int, size: int, metric: str, seed: int) -> np.ndarray:
    """A seeded sample of `size` rows (all rows when fewer), read in one pass over the blocks."""
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, size), replace=False))
    parts = []
    for start, x in blocks():
        sel = rows[(rows >= start) & (rows < start + len(x))] - start
        if len(sel):
            parts.append(prepare(x[sel], metric))
    return np.concatenate(parts)


def keep_order(rows, paths: list[str], sizes: dict[int, float] | None) -> np.ndarray:
    """`rows` in the order `--keep` prefers them (see the module's docstring): the largest by
    `sizes` first (-1: unknown, after the known ones), ties and no sizes by path."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return rows
    names = np.array([paths[r] for r in rows.tolist()])  # sorted in C: a million rows in about a second
    if sizes is None:
        return rows[np.argsort(names, kind="stable")]
    return rows[np.lexsort((names, -np.array([sizes[r] for r in rows.tolist()], dtype=np.float64)))]


def anchored_groups(pairs: np.ndarray, order: np.ndarray) -> tuple[list[list[int]], list[int]]:
    """(groups, kept row of each) from the pairs, largest group first: each row of `order`, in
    turn, that is in no group yet takes every row it is paired with that is in no group yet
    (see the module's docstring). Every row of a group is paired with its kept row."""
    if len(pairs) == 0:
        return [], []
    n = int(pairs.max()) + 1
    ends = np.concatenate([pairs[:, 0], pairs[:, 1]]).astype(np.int64)
    mates = np.concatenate([pairs[:, 1], pairs[:, 0]]).astype(np.int64)[np.argsort(ends, kind="stable")].tolist()
    start = np.concatenate([[0], np.cumsum(np.bincount(ends, minlength=n))]).tolist()  # row r: mates[start[r]:...]
    taken = bytearray(n)
    groups, kept = [], []
    for r in order.tolist():  # plain Python lists: a pass costs about a microsecond per pair
        if taken[r]:
            continue
        group = [r]
        for m in mates[start[r] : start[r + 1]]:
            if not taken[m]:
                taken[m] = 1
                group.append(m)
        if len(group) > 1:
            taken[r] = 1
            groups.append(sorted(group))
            kept.append(r)
    by_size = sorted(range(len(groups)), key=lambda g: (-len(groups[g]), groups[g][0]))
    return [groups[g] for g in by_size], [kept[g] for g in by_size]


def row_sizes(cache: FeatureCache, rows: list[int], paths: list[str] | None = None) -> dict[int, float]:
    """Pixel count (or else file size) of each row, -1 when neither is known. `paths`: the
    cache's paths, when the caller has read them already."""
    with h5py.File(cache.path, "r") as f:
        cols = f.get("columns")
        if cols is not None and "width" in cols and "height" in cols:
            w, h = cols["width"], cols["height"]
            return {r: float(w[r]) * float(h[r]) for r in rows}
        if cols is not None and "size" in cols:
            return {r: float(cols["size"][r]) for r in rows}
    paths = cache.paths if paths is None else paths
    out = {}
    for r in rows:
        try:
            out[r] = float(os.stat(row_location(cache.source, paths[r])).st_size)
        except OSError:
            out[r] = -1.0
    return out
