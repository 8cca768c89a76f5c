"""Recall@10 against exact search, and tuning of the search knob (nprobe, efSearch) on fresh queries.

Tuning queries must be *fresh*: a query that is itself in an HNSW graph lands on its own
node and finds its neighbours through its own links, which overstates recall (efSearch 16
gave 0.995 on indexed rows but 0.91 on new queries at 100k x 512). So the query rows are
held out of the index while the knob is tuned, and added last, under their own row ids.
(Merged on-disk lists take no later additions; the on-disk kinds, all IVF, are tuned on
indexed rows with their own row excluded, which agrees with fresh queries for IVF.)

Plain functions over numpy arrays and a built index: reading the cache is the builder's job.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from embedder.search.kinds import faiss_metric, set_knob

EVAL_K = 10


def holds_out(knob: str | None, on_disk: bool, n: int, n_queries: int) -> bool:
    """Whether the tuning queries stay out of the index until tuned: only when there is a knob
    to tune, the lists take later additions (not on disk), and the index keeps most rows."""
    return bool(knob) and not on_disk and n > 2 * n_queries


@dataclass(frozen=True)
class Truth:
    """Exact neighbours of the tuning queries, as cache rows."""

    rows: np.ndarray  # [queries, k]: exact top-k among the indexed rows
    own: np.ndarray  # each query's own row where it is indexed (a self-match is no achievement), else -1
    k: int  # neighbours asked of the index: one more than counted when the queries are indexed
    counted: int  # neighbours counted: recall@counted


@dataclass(frozen=True)
class Tuned:
    recall: float  # recall@10 at the chosen setting
    tuning: list[dict]  # [{knob: value, "recall_at_10": r}] in the order tried
    value: int | None  # the knob's chosen value; None for exact search (no knob)


def ground_truth(queries: np.ndarray, q_rows: np.ndarray, held_out: bool, db_blocks: Iterable[np.ndarray],
                 indexed: np.ndarray, metric: str) -> Truth:
    """Exact top-k of the queries (cache rows `q_rows`, `held_out` of the index or not) over `db_blocks`,
    the prepared vectors of the `indexed` rows in order."""
    from faiss.contrib.exhaustive_search import knn_ground_truth

    k = min(EVAL_K + (0 if held_out else 1), len(indexed))
    _, found = knn_ground_truth(queries, db_blocks, k, metric_type=faiss_metric(metric))
    own = np.full(len(q_rows), -1) if held_out else q_rows
    return Truth(indexed[found], own, k, k if held_out else k - 1)


def recall(found: np.ndarray, truth: Truth) -> float:
    """recall@k with the query's own row (if indexed) removed from both lists: a self-match is no achievement."""
    hits = 0
    k = truth.counted
    for q, f, t in zip(truth.own, found, truth.rows):
        f = [i for i in f if i != q and i >= 0][:k]
        t = [i for i in t if i != q][:k]
        hits += len(set(f) & set(t))
    asked = k * len(truth.own)
    # No neighbour to find (a one-row index: the query's only neighbour is itself): none is missed.
    return hits / asked if asked else 1.0


def tune(index, knob: str | None, values: list[int], queries: np.ndarray, truth: Truth, target: float) -> Tuned:
    """Raise the knob through `values` until recall reaches `target`; the index keeps the last setting."""
    if not knob:
        _, found = index.search(queries, truth.k)
        return Tuned(recall(found, truth), [], None)
    tuning = []
    for value in values:
        set_knob(index, knob, value)
        _, found = index.search(queries, truth.k)
        tuning.append({knob: value, "recall_at_10": recall(found, truth)})
        if tuning[-1]["recall_at_10"] >= target:
            break
    return Tuned(tuning[-1]["recall_at_10"], tuning, tuning[-1][knob])
