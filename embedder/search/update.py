"""Updating an index in place after its cache has grown: add the new rows, re-check the knob, swap.

`update_index` adds only the cache rows the index does not hold yet (rows >= the index's row
count) to the saved index, reusing what was trained (IVF centroids, SQ / PQ codebooks: never
retrained, so an updated IVF index equals one that the same quantizer filled with all rows).
It refuses a cache that is not the index's grown cache: another feature space (fingerprint),
another layer, or rows that are not the index's rows followed by new ones (a re-made cache, not
an appended one). Then the search knob (nprobe / efSearch) is re-checked on fresh queries
against exact search, raised until recall@10 reaches the index's target again (never lowered),
and meta.json records the update (`updates`: when, rows added, knob before and after, recall).

On-disk IVF lists (`on_disk`) take no additions in place: the new rows go into one more shard
with the same quantizer, and the old lists and the shard are merged into a new lists.ivfdata.

Advice, not refusal: the report says when a rebuild would serve better, because the IVF lists
were sized for a quarter or less of the rows they now hold, or because `--kind auto` would now
pick another kind. The update is done either way.

Crash safety as for a build: INDEX_DIR's write lock is held throughout and the updated index is
written into a staged folder that replaces INDEX_DIR in one step, so an interrupted update leaves
the old index whole. Nothing is written when the cache has no new rows.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from embedder.atomic import WriteLock, staging
from embedder.cache.reader import FeatureCache, read_paths
from embedder.errors import CacheMismatchError, ConfigError
from embedder.search.build import add_rows, dead_rows, plan_build, read_rows, sample_rows, save
from embedder.search.kinds import INVERTED_LIST_KINDS, knob_of, knob_values, load_faiss, prepare, set_knob
from embedder.search.removal import drop_dead_rows
from embedder.search.tune import Truth, Tuned, ground_truth, tune

GROWTH_ADVICE = 4  # rows per row the IVF lists were sized for, past which a rebuild pays
MIN_FRESH = 50  # fewest new rows held out as fresh tuning queries; fewer: indexed rows, self excluded
WRITTEN = ("index.faiss", "rows.h5", "meta.json", "lists.ivfdata")  # what an update writes anew


def update_index(cache_path, index_dir, layer: str | None = None, kind: str = "auto", memory_budget: int | None = None,
                 seed: int = 0, n_eval: int = 500, block_rows: int = 65536, progress: bool = True) -> dict:
    """Add the rows `cache_path` has gained since INDEX_DIR was built (or last updated). Returns a report:
    status (`updated` or `up_to_date`), rows_added, ntotal, knob, knob_before, knob_after, recall_at_10,
    retuned, advice (why a rebuild would be better; empty when none) and the new meta.

    The index keeps its kind, metric, target recall and trained quantizer; `kind` other than auto
    must name the index's kind. `layer` (default: the index's) must be the index's layer.
    `memory_budget` (default: the build's) sizes the blocks read, as for a build; the advice's
    `--kind auto` ladder is judged against it too."""
    out = Path(index_dir).absolute()
    meta = _read_meta(out)
    if memory_budget is not None:
        meta = {**meta, "memory_budget": memory_budget}
    if kind not in ("auto", meta["kind"]):
        raise ConfigError(f"{index_dir} is a {meta['kind']} index; --update keeps its kind. To make a {kind} index, "
                          f"rebuild without --update: `embedder index {cache_path} --out {index_dir} --kind {kind}`.")
    t0 = time.perf_counter()
    # Stored rows (live=False): faiss ids are stored rows, which a sync never renumbers.
    with WriteLock(out), FeatureCache(cache_path, layer=_layer(meta, layer, index_dir, cache_path),
                                      live=False) as cache:
        _check_same_space(cache, cache_path, meta, index_dir)
        old_paths, removed = _read_rows(out)
        n_old = _check_prefix(cache, old_paths, cache_path, index_dir)
        dead = np.setdiff1d(dead_rows(cache), removed if removed is not None else np.zeros(0, np.int64))
        advice = rebuild_advice(meta, len(cache))
        # Blocks as a build of the grown cache would read them: the budget's last quarter bounds them.
        block_rows = plan_build(len(cache), cache.dim, meta["kind"], meta["metric"], meta["memory_budget"],
                                block_rows).block_rows
        if len(cache) == n_old and not len(dead):
            return {"status": "up_to_date", "rows_added": 0, "rows_removed": 0, "ntotal": n_old,
                    "knob": knob_of(meta["kind"]), "knob_before": _knob_value(meta), "knob_after": _knob_value(meta),
                    "recall_at_10": meta["recall_at_10"], "retuned": False, "advice": advice, "meta": meta}
        if len(cache) == n_old:  # a sync that only removed files: their rows leave every search
            return _drop_only(out, meta, cache, cache_path, dead, advice, t0)
        with staging(out) as tmp:  # tmp becomes INDEX_DIR; a failure or kill before the swap leaves the old one
            index, tuned, fresh, held_out = _grow(cache, out, tmp, meta, n_old, removed, seed, n_eval, block_rows,
                                                  progress)
            new_meta = _updated_meta(meta, cache, cache_path, index, tuned, n_old, fresh, held_out, advice, t0)
            save(tmp, index, cache, new_meta)
            _carry_forward(out, tmp, removed)
            # Superseded and removed rows go in the same swap: no search ever sees a path twice.
            new_meta["updates"][-1]["rows_removed"] = drop_dead_rows(out, tmp, new_meta, dead, staged=True)
            (tmp / "meta.json").write_text(json.dumps(new_meta, indent=2))
    before = _knob_value(meta)
    return {"status": "updated", "rows_added": new_meta["ntotal"] - n_old, "ntotal": new_meta["ntotal"],
            "rows_removed": new_meta["updates"][-1]["rows_removed"],
            "knob": knob_of(meta["kind"]),
            "knob_before": before, "knob_after": tuned.value, "recall_at_10": tuned.recall,
            "retuned": tuned.value != before, "advice": advice, "meta": new_meta}


def _drop_only(out: Path, meta: dict, cache: FeatureCache, cache_path, dead: np.ndarray, advice: list[str],
               t0: float) -> dict:
    """An update that adds nothing: the rows a sync superseded or removed leave the index, in one staged swap."""
    new = json.loads(json.dumps(meta))
    with staging(out) as tmp:
        dropped = drop_dead_rows(out, tmp, new, dead, staged=False)
        new.update(cache=str(Path(cache_path).resolve()), cache_generation=cache.generation)
        new.setdefault("updates", []).append({"at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                              "rows_added": 0, "rows_removed": dropped, "ntotal": meta["ntotal"],
                                              "update_s": round(time.perf_counter() - t0, 3)})
        (tmp / "meta.json").write_text(json.dumps(new, indent=2))
    value = _knob_value(meta)
    return {"status": "updated", "rows_added": 0, "rows_removed": dropped, "ntotal": meta["ntotal"],
            "knob": knob_of(meta["kind"]), "knob_before": value, "knob_after": value,
            "recall_at_10": meta["recall_at_10"], "retuned": False, "advice": advice, "meta": new}


def _read_meta(out: Path) -> dict:
    path = out / "meta.json"
    if not path.is_file():
        raise ConfigError(f"No index at {out} to update. Build one first: `embedder index CACHE.h5 --out {out}`.")
    return json.loads(path.read_text())


def _layer(meta: dict, layer: str | None, index_dir, cache_path) -> str | None:
    built_on = meta.get("layer")
    if layer is not None and built_on is not None and layer != built_on:
        raise ConfigError(f"{index_dir} indexes the layer {built_on!r}, not {layer!r}; an update adds rows of the "
                          f"same layer. For {layer!r}, build another index: `embedder index {cache_path} --layer "
                          f"{layer} --out DIR`.")
    return layer or built_on


def _check_same_space(cache: FeatureCache, cache_path, meta: dict, index_dir) -> None:
    """The cache must hold the feature space the index was built on: same fingerprint and layer."""
    if cache.fingerprint == meta["fingerprint"] and cache.layer == meta.get("layer", cache.layer):
        return
    old, new = meta.get("components", {}), cache.components
    differences = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    if cache.layer != meta.get("layer", cache.layer):
        differences["layer"] = (meta.get("layer"), cache.layer)
    raise CacheMismatchError(
        index_dir, differences or {"fingerprint": (meta["fingerprint"], cache.fingerprint)},
        f"An update adds rows of the same features only. Rebuild the index from this cache without --update: "
        f"`embedder index {cache_path} --out {index_dir}`.")


def _read_rows(out: Path) -> tuple[list[str], np.ndarray | None]:
    """The index's row paths and its removed row ids (None when none were ever removed)."""
    with h5py.File(out / "rows.h5", "r") as f:
        paths = read_paths(f["paths"]) if len(f["paths"]) else []
        removed = f["removed"][:] if "removed" in f else None
    return paths, removed


def _check_prefix(cache: FeatureCache, old_paths: list[str], cache_path, index_dir) -> int:
    """The index's rows must be the cache's first rows, in order: the cache was appended to, not re-made."""
    n_old = len(old_paths)
    paths = cache.paths
    if len(paths) < n_old or paths[:n_old] != old_paths:
        where = next((i for i, (a, b) in enumerate(zip(paths, old_paths)) if a != b), min(len(paths), n_old))
        raise ConfigError(
            f"{cache_path} is not {index_dir}'s cache grown by new rows: its rows differ from the index's from row "
            f"{where} on ({len(paths)} rows in the cache, {n_old} in the index), as when a cache is made again "
            f"rather than appended to. Rebuild without --update: `embedder index {cache_path} --out {index_dir}`.")
    return n_old


def _knob_value(meta: dict) -> int | None:
    knob = knob_of(meta["kind"])
    return meta["params"].get(knob) if knob else None


def rebuild_advice(meta: dict, n: int) -> list[str]:
    """Why a rebuild of the index at `n` rows would be better than updating it (empty: it would not)."""
    advice = []
    sized_for = int(meta.get("sized_for", meta["ntotal"]))
    if meta["kind"] in INVERTED_LIST_KINDS and n > GROWTH_ADVICE * sized_for:
        advice.append(f"the IVF lists were sized and trained for {sized_for} rows and the cache now has {n} "
                      f"(over {GROWTH_ADVICE}x): a rebuild trains more lists, for faster searches at the same recall")
    auto = plan_build(n, int(meta["dim"]), "auto", meta["metric"], meta.get("memory_budget"))
    if auto.kind != meta["kind"]:
        advice.append(f"at {n} rows --kind auto would now pick {auto.kind}, not {meta['kind']} ({auto.why})")
    return advice


def _grow(cache: FeatureCache, out: Path, tmp: Path, meta: dict, n_old: int, removed: np.ndarray | None, seed: int,
          n_eval: int, block_rows: int, progress: bool):
    """The saved index with the new rows added, its knob re-checked. Returns (index, tuned, queries' rows, held out)."""
    from embedder.progress import bar as progress_bar

    n, metric, on_disk = len(cache), meta["metric"], bool(meta.get("on_disk"))
    knob = knob_of(meta["kind"])
    q_rows, held_out = _fresh_rows(n, n_old, removed, knob, on_disk, n_eval, seed)
    keep = np.ones(n, dtype=bool)
    keep[:n_old] = False  # the rows to add ...
    if held_out:
        keep[q_rows] = False  # ... but the fresh tuning queries only after tuning
    index = _read_index(out, on_disk)
    if meta["kind"] == "flat" and index.ntotal != n_old:
        # A plain flat index numbers its vectors by position: after an in-place removal, new rows
        # would land under the wrong ids.
        raise ConfigError(f"{out} holds {index.ntotal} vectors for {n_old} rows, so new rows cannot be numbered "
                          f"by their cache row. Rebuild without --update: `embedder index CACHE.h5 --out {out}`.")
    with progress_bar(total=n - n_old, unit="vec", desc=f"update ({meta['kind']})", enabled=progress) as bar:
        if on_disk:
            index = _add_on_disk(index, cache, metric, n_old, block_rows, out, tmp, bar)
        else:
            for start in range(n_old, n, block_rows):
                stop = min(start + block_rows, n)
                add_rows(index, prepare(cache.features(slice(start, stop)), metric), np.arange(start, stop),
                         keep[start:stop])
                bar.update(int(keep[start:stop].sum()))
        queries = read_rows(cache, q_rows, metric, block_rows)
        tuned = _retune(index, meta, queries, _truth(cache, metric, queries, q_rows, held_out, removed, keep,
                                                     n_old, block_rows))
        if held_out:
            add_rows(index, queries, q_rows, np.ones(len(q_rows), bool))
            bar.update(len(q_rows))
    return index, tuned, q_rows, held_out


def _fresh_rows(n: int, n_old: int, removed: np.ndarray | None, knob: str | None, on_disk: bool, n_eval: int,
                seed: int) -> tuple[np.ndarray, bool]:
    """The tuning queries (cache rows) and whether they are held out of the index while tuning.

    Fresh queries are new rows kept out of the index until tuned (an HNSW graph overstates the
    recall of its own nodes: embedder.search.tune). With too few new rows, or lists on disk that
    take no later additions, the queries are indexed rows of the whole grown cache, each one's own
    row excluded from its neighbours, which agrees with fresh queries for IVF."""
    n_new = n - n_old
    size = min(n_eval, n_new // 2)
    if knob and not on_disk and size >= MIN_FRESH:
        return n_old + sample_rows(n_new, size, seed + 1), True
    live = np.setdiff1d(np.arange(n), removed) if removed is not None else np.arange(n)
    return live[sample_rows(len(live), n_eval, seed + 1)], False


def _read_index(out: Path, on_disk: bool):
    faiss = load_faiss()
    # On-disk lists are opened where they are now (beside index.faiss), read only: the old folder stays whole.
    return faiss.read_index(str(out / "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR if on_disk else 0)


def _add_on_disk(index, cache: FeatureCache, metric: str, n_old: int, block_rows: int, out: Path, tmp: Path,
                 bar):
    """A new on-disk index: the old lists and one more shard (the new rows, same quantizer) merged into
    tmp/lists.ivfdata, as faiss contrib.ondisk.merge_ondisk does. The old lists.ivfdata is only read."""
    faiss = load_faiss()
    empty = _read_index(out, True)  # a second copy, its lists swapped for empty ones in memory
    ivf = faiss.extract_index_ivf(empty)
    _own(ivf, faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size))
    empty.ntotal = ivf.ntotal = 0
    shard = faiss.clone_index(empty)  # the same trained quantizer (and codebooks), no vectors
    for start in range(n_old, len(cache), block_rows):
        stop = min(start + block_rows, len(cache))
        shard.add_with_ids(prepare(cache.features(slice(start, stop)), metric), np.arange(start, stop, dtype=np.int64))
        bar.update(stop - start)
    merged = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(tmp / "lists.ivfdata"))
    sources = faiss.InvertedListsPtrVector()
    for lists in (faiss.extract_index_ivf(index).invlists, faiss.extract_index_ivf(shard).invlists):
        sources.push_back(lists)
    ntotal = merged.merge_from_multiple(sources.data(), sources.size(), False)
    empty.ntotal = ivf.ntotal = ntotal
    _own(ivf, merged)
    return empty


def _own(ivf, lists) -> None:
    """Give `lists` to the IVF index for good: Python must not free them with its wrapper."""
    ivf.replace_invlists(lists, True)
    lists.this.disown()


def _truth(cache: FeatureCache, metric: str, queries: np.ndarray, q_rows: np.ndarray, held_out: bool,
           removed: np.ndarray | None, keep: np.ndarray, n_old: int, block_rows: int) -> Truth:
    """Exact neighbours of the tuning queries among the rows the index holds now and searches return:
    the old rows but the removed ones, and the new rows added so far."""
    indexed = keep.copy()
    indexed[:n_old] = True
    if removed is not None:
        # Removed rows an HNSW graph still holds may come back from the raw index and count as misses:
        # the knob errs high, never low.
        indexed[removed] = False
    blocks = (prepare(b.features[indexed[b.start:b.stop]], metric) for b in cache.iter_blocks(block_rows))
    return ground_truth(queries, q_rows, held_out, blocks, np.flatnonzero(indexed), metric)


def _retune(index, meta: dict, queries: np.ndarray, truth: Truth) -> Tuned:
    """Recall@10 at the index's knob; raised through the larger values until the target is reached again.
    A knob is never lowered by an update: more rows do not make a search easier."""
    knob = knob_of(meta["kind"])
    if not knob:
        return tune(index, None, [], queries, truth, meta["target_recall"])
    values = knob_values(knob, int(meta["params"].get("nlist", 0)))
    before = _knob_value(meta) or values[0]
    set_knob(index, knob, before)
    return tune(index, knob, [before] + [v for v in values if v > before], queries, truth, meta["target_recall"])


def _updated_meta(meta: dict, cache: FeatureCache, cache_path, index, tuned: Tuned, n_old: int, q_rows: np.ndarray,
                  held_out: bool, advice: list[str], t0: float) -> dict:
    """meta.json after the update: the new size, knob and recall, and one more entry in `updates`."""
    knob = knob_of(meta["kind"])
    new = json.loads(json.dumps(meta))  # a deep copy
    new.setdefault("sized_for", meta["ntotal"])  # the rows the build planned for (lists, training sample)
    if knob:
        new["params"][knob] = tuned.value
    if "on_disk_shards" in new["params"]:
        new["params"]["on_disk_shards"] += 1
    new.update(cache=str(Path(cache_path).resolve()), cache_generation=cache.generation, ntotal=len(cache),
               recall_at_10=tuned.recall,
               tuning=tuned.tuning, target_reached=tuned.recall >= meta["target_recall"], eval_queries=len(q_rows),
               eval_queries_held_out=held_out, faiss_version=load_faiss().__version__)
    new.setdefault("updates", []).append({
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows_added": len(cache) - n_old,
        "ntotal": len(cache),
        "faiss_ntotal": int(index.ntotal),
        "knob": knob,
        "knob_before": _knob_value(meta),
        "knob_after": tuned.value,
        "recall_at_10": tuned.recall,
        "rebuild_advice": advice,
        "update_s": round(time.perf_counter() - t0, 3),
    })
    return new


def _carry_forward(out: Path, tmp: Path, removed: np.ndarray | None) -> None:
    """What the update does not make anew: the removed row ids (unchanged) and any other file of INDEX_DIR."""
    if removed is not None:
        with h5py.File(tmp / "rows.h5", "a") as f:
            if "removed" not in f:
                f.create_dataset("removed", data=removed)
    for entry in out.iterdir():
        if entry.name not in WRITTEN and not (tmp / entry.name).exists():
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
