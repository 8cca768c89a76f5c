"""`embedder curate`: every curation score of a cache in one table, a gallery and a summary.

REPORT_DIR holds (written into a temporary folder that replaces REPORT_DIR in one step):
    scores.parquet, scores.csv   one row per image (columns: SCORE_COLUMNS)
    gallery.html                 the top suspects of each question, thumbnails embedded
    summary.json                 what the CLI prints, as JSON

The features are read into memory once (N x D float32, plus a normalised copy). The scores are
documented where they are computed: embedder.curate.labels (label_quality, suggested_label,
label issues) and embedder.curate.neighbours (outlier_score, uniqueness, representative,
leak_of); duplicate_group comes from embedder.search.dedup, as `embedder dedup` finds them.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedder.cache.reader import FeatureCache
from embedder.curate import labels as mistakes
from embedder.curate import neighbours as nb
from embedder.curate.config import CurateConfig
from embedder.data.rows import row_location
from embedder.data.splits import folder_splits
from embedder.errors import ConfigError, EmbedderNotice
from embedder.learn.trainer import same_feature_space
from embedder.names import display_path
from embedder.outputs import CACHE, CURATE, claim, expect, write_dir
from embedder.progress import stage
from embedder.search.dedup import anchored_groups, dedup_notices, duplicate_pairs, keep_order, row_sizes
from embedder.search.kinds import prepare

SCORE_COLUMNS = ("path", "split", "given_label", "suggested_label", "label_quality", "label_issue",
                 "mistake_rank", "outlier_score", "uniqueness", "representative", "leak_of", "leak_similarity",
                 "duplicate_group", "duplicate_keep")
TOP = 10  # rows per question in summary.json


@dataclass
class _Data:
    X: np.ndarray  # raw features, rows of every cache in order
    paths: list[str]
    labels: np.ndarray  # codes into classes, -1 unlabelled
    classes: list[str]
    split: np.ndarray | None  # "train" / "val" / "test" per row, None without splits
    split_how: str
    files: list[Path]  # the image file of each row
    parts: list[tuple[int, FeatureCache]]  # (first row, cache) of each cache, in order

    def sizes(self, rows) -> dict[int, float]:
        """Pixels or bytes of these rows (the duplicate keep), -1 unknown."""
        out = {}
        for (start, cache), stop in zip(self.parts, [s for s, _ in self.parts[1:]] + [len(self.paths)]):
            mine = [int(r) - start for r in rows if start <= r < stop]
            if mine:
                out.update({start + r: v for r, v in row_sizes(cache, mine, self.paths[start:stop]).items()})
        return out


def run_curate(config: CurateConfig) -> dict:
    """Score every row of the cache(s) and write REPORT_DIR; returns the summary."""
    t0 = time.perf_counter()
    expect(config.cache, CACHE)
    claim(config.out, CURATE, [config.cache], config.overwrite)  # before any cache is read
    with write_dir(config.out, CURATE, [config.cache], config.overwrite) as (tmp, _), contextlib.ExitStack() as stack:
        data = _load(config, lambda p: stack.enter_context(FeatureCache(p, layer=config.layer)))
        columns, summary = _score(config, data)
        _write_scores(columns, tmp)
        if config.gallery:
            from embedder.curate.gallery import write_gallery

            with stage("curate: gallery", enabled=config.progress):
                write_gallery(tmp / "gallery.html", columns, data.files, summary, config.gallery)
        summary["out"] = str(config.out)
        summary["files"] = sorted(p.name for p in tmp.iterdir() if not p.name.startswith(".")) + ["summary.json"]
        summary["wall_s"] = time.perf_counter() - t0
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _load(config: CurateConfig, open_cache) -> _Data:
    main = open_cache(config.cache)
    parts = [("train", main)]
    if config.index is not None and config.val_cache is not None:
        raise ConfigError("--index holds CACHE's rows only; with --val-cache/--test-cache leave --index out.")
    for name, path in (("val", config.val_cache), ("test", config.test_cache)):
        if path is not None:
            cache = open_cache(path)
            same_feature_space(main, cache, f"{name} cache")
            parts.append((name, cache))
    classes = list(main.classes)
    for _, cache in parts[1:]:
        classes += [c for c in cache.classes if c not in classes]
    X, paths, labels, files, split, offsets = [], [], [], [], [], []
    for name, cache in parts:
        remap = np.array([classes.index(c) for c in cache.classes] + [-1], dtype=np.int64)
        offsets.append((len(paths), cache))
        X.append(cache.features() if len(cache) else np.zeros((0, cache.dim), np.float32))
        paths += cache.paths
        labels.append(remap[cache.labels])
        files += [row_location(cache.source, p) for p in cache.paths]
        split += [name] * len(cache)
    if len(parts) > 1:
        split_arr, how = np.array(split, dtype=object), "separate caches"
    else:
        split_arr = folder_splits(paths)
        how = "split folders" if split_arr is not None else "none"
    return _Data(np.concatenate(X), paths, np.concatenate(labels), classes, split_arr, how, files, offsets)


def _score(config: CurateConfig, data: _Data) -> tuple[dict, dict]:
    """The columns of the scores table, and the summary."""
    n = len(data.paths)
    cols: dict[str, object] = {"path": [display_path(p) for p in data.paths],
                               "split": list(data.split) if data.split is not None else [""] * n,
                               "given_label": [data.classes[c] if c >= 0 else "" for c in data.labels]}
    summary = {"cache": str(config.cache), "rows": n, "labelled": int((data.labels >= 0).sum()),
               "classes": len(data.classes), "splits": _split_counts(data), "split_how": data.split_how}
    with stage(f"curate: label mistakes ({config.folds}-fold probe)", enabled=config.progress):
        summary["label_mistakes"] = _label_scores(config, data, cols)
    Xn = prepare(data.X, "cosine")
    with stage("curate: neighbours, outliers, uniqueness, representatives", enabled=config.progress):
        sims, _ = nb.neighbours(Xn, max(config.k, 3), _index_search(config, data) if config.index else None)
        cols["outlier_score"] = nb.outlier_scores(sims, config.k)
        cols["uniqueness"] = nb.uniqueness(sims)
        cols["representative"] = nb.representatives(Xn, data.labels, config.representatives, config.seed)
    summary["outliers"] = {"k": min(config.k, n - 1), "top": _top(cols, np.argsort(-cols["outlier_score"]),
                                                                  "outlier_score")}
    summary["uniqueness"] = {"weights": list(nb.UNIQUENESS_WEIGHTS),
                             "least_unique": _top(cols, np.argsort(cols["uniqueness"]), "uniqueness")}
    summary["representatives"] = {
        data.classes[c]: [cols["path"][r] for r in sorted(np.flatnonzero((data.labels == c) & (
            cols["representative"] > 0)), key=lambda r: cols["representative"][r])]
        for c in range(len(data.classes))}
    with stage("curate: leaks", enabled=config.progress):
        summary["leaks"] = _leak_scores(config, data, Xn, cols)
    summary["duplicates"] = _duplicate_scores(config, data, Xn, cols)
    return cols, summary


def _label_scores(config: CurateConfig, data: _Data, cols: dict) -> dict:
    n = len(data.paths)
    labelled = np.flatnonzero(data.labels >= 0)
    quality, suggested = np.full(n, np.nan), [""] * n
    issue, rank = np.zeros(n, bool), np.zeros(n, np.int64)
    cols.update(label_quality=quality, suggested_label=suggested, label_issue=issue, mistake_rank=rank)
    counts = np.bincount(data.labels[labelled], minlength=len(data.classes))
    # A class with one labelled image cannot be held out and learnt at once: its rows go unscored.
    labelled = labelled[counts[data.labels[labelled]] >= 2]
    if len(np.unique(data.labels[labelled])) < 2:
        return {"skipped": "label mistakes need two classes with at least 2 labelled images each"}
    codes = data.labels[labelled]
    P, C = mistakes.out_of_fold_probabilities(data.X[labelled], codes, len(data.classes), config.folds,
                                              config.seed, config.device)
    quality[labelled] = P[np.arange(len(labelled)), codes]
    for r, c in zip(labelled, P.argmax(axis=1)):
        suggested[r] = data.classes[c]
    found = mistakes.label_issues(codes, P)
    issue[labelled[found]] = True
    rank[labelled[mistakes.mistake_ranking(codes, P)]] = np.arange(1, len(labelled) + 1)
    return {"folds": min(config.folds, int(counts[counts >= 2].min())), "C": C,
            "unscored_classes": [data.classes[c] for c in np.flatnonzero(counts == 1)],
            "out_of_fold_accuracy": float((P.argmax(axis=1) == codes).mean()), "issues": len(found),
            "top": _top(cols, labelled[found], "label_quality", extra=("given_label", "suggested_label"))}


def _index_search(config: CurateConfig, data: _Data):
    """search(block, k) through the INDEX_DIR given, after checking it indexes these rows."""
    from embedder.search.query import SearchIndex

    index = SearchIndex.open(config.index)
    # Index ids are stored cache rows; curate reads live rows (a synced cache hides superseded and removed ones).
    live = [i for i in range(len(index.paths)) if not index.is_removed(i)]
    if index.metric != "cosine" or [index.paths[i] for i in live] != data.paths:
        raise ConfigError(f"{config.index} must be a cosine index of {config.cache} (built with `embedder index "
                          f"{config.cache} --out DIR`, or updated with --update after its last sync); leave "
                          "--index out to let curate build its own.")
    position = {row: n for n, row in enumerate(live)}

    def search(block: np.ndarray, k: int):
        hits = index.search(block, k)
        sims = np.array([[h.score for h in row] + [-1.0] * (k - len(row)) for row in hits], np.float32)
        ids = np.array([[position.get(h.id, -1) for h in row] + [-1] * (k - len(row)) for row in hits], np.int64)
        return sims, ids

    return search


def _leak_scores(config: CurateConfig, data: _Data, Xn: np.ndarray, cols: dict) -> dict:
    n = len(data.paths)
    cols["leak_of"], cols["leak_similarity"] = [""] * n, np.full(n, np.nan)
    cols["leak_row"] = np.full(n, -1, np.int64)  # for the gallery: paths of separate caches may coincide
    if data.split is None:
        return {"skipped": "no splits: the cache is not a split tree (train/ val/ test/) and no --val-cache was "
                           "given"}
    nearest, sim = nb.leaks(Xn, data.split, config.leak_threshold)
    cols["leak_similarity"] = sim
    hit = np.flatnonzero(sim >= config.leak_threshold)
    for r in hit:
        cols["leak_of"][r] = cols["path"][nearest[r]]
        cols["leak_row"][r] = nearest[r]
    order = hit[np.argsort(-sim[hit], kind="stable")]
    return {"threshold": config.leak_threshold, "count": len(hit),
            "by_split": {s: int((data.split[hit] == s).sum()) for s in ("val", "test")},
            "pairs": [{"path": cols["path"][r], "split": data.split[r], "train_path": cols["leak_of"][r],
                       "similarity": float(sim[r])} for r in order[:TOP]]}


def _duplicate_scores(config: CurateConfig, data: _Data, Xn: np.ndarray, cols: dict) -> dict:
    n = len(data.paths)

    def blocks():
        for start in range(0, n, nb.BLOCK_ROWS):
            yield start, Xn[start : start + nb.BLOCK_ROWS]

    pairs, kind = duplicate_pairs(blocks, n, Xn.shape[1], config.duplicate_threshold, "cosine", seed=config.seed,
                                  progress=config.progress)
    members = np.unique(pairs)
    order = keep_order(members, data.paths, data.sizes(members) if config.keep == "largest" else None)
    groups, kept = anchored_groups(pairs, order)  # every dropped row matches its group's kept row
    group, keep = np.full(n, -1, np.int64), np.ones(n, bool)
    for g, members in enumerate(groups):
        group[members] = g
        keep[members] = False
    keep[kept] = True
    cols["duplicate_group"], cols["duplicate_keep"] = group, keep
    large, notices = dedup_notices(groups, kept, n, config.duplicate_threshold, "cosine", data.paths,
                                   "--duplicate-threshold")
    for notice in notices:
        warnings.warn(notice, EmbedderNotice, stacklevel=2)
    return {"threshold": config.duplicate_threshold, "kind": kind, "groups": len(groups),
            "rows_in_groups": int((group >= 0).sum()), "to_drop": int((~keep).sum()), "keep": config.keep,
            "large_groups": large, "largest_groups": [[cols["path"][r] for r in g] for g in groups[:TOP]]}


def _split_counts(data: _Data) -> dict | None:
    if data.split is None:
        return None
    return {s: int((data.split == s).sum()) for s in ("train", "val", "test")}


def _top(cols: dict, order, score: str, extra: tuple[str, ...] = ()) -> list[dict]:
    return [{"path": cols["path"][r], score: float(cols[score][r]), **{e: cols[e][r] for e in extra}}
            for r in list(order)[:TOP]]


def _write_scores(cols: dict, tmp: Path) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.table({name: pa.array(np.asarray(cols[name]).tolist() if isinstance(cols[name], np.ndarray)
                                     else cols[name]) for name in SCORE_COLUMNS})
    pq.write_table(table, tmp / "scores.parquet")
    pacsv.write_csv(table, tmp / "scores.csv")
