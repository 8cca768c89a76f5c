"""Near-duplicate groups: FAISS range search over an exact index, joined into connected components."""

from __future__ import annotations

import numpy as np

from embedder.cache.reader import FeatureCache
from embedder.errors import ConfigError
from embedder.search.config import METRICS
from embedder.search.kinds import faiss_metric, load_faiss, prepare


def near_duplicates(cache_path, threshold: float = 0.95, metric: str = "cosine", block_rows: int = 16384,
                    layer: str | None = None) -> list[list[int]]:
    """Groups of rows closer than `threshold` (cosine similarity >= T, or squared L2 distance <= T),
    found with FAISS range search over an exact index; groups are connected components."""
    if metric not in METRICS:
        raise ConfigError("--metric must be cosine or l2.")
    faiss = load_faiss()
    with FeatureCache(cache_path, layer=layer) as cache:
        index = faiss.IndexFlat(cache.dim, faiss_metric(metric))
        for block in cache.iter_blocks(block_rows):
            index.add(prepare(block.features, metric))
        parent = np.arange(len(cache))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for block in cache.iter_blocks(block_rows):
            lims, _, ids = index.range_search(prepare(block.features, metric), threshold)
            for q in range(len(block.features)):
                row = block.start + q
                for j in ids[lims[q] : lims[q + 1]]:
                    if j != row:
                        a, b = find(row), find(int(j))
                        if a != b:
                            parent[max(a, b)] = min(a, b)
        roots = np.array([find(i) for i in range(len(cache))])
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(roots):
        groups.setdefault(int(r), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))
