"""Pictures of a feature space: a 2-D scatter of the cache, and grids of search results."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embedder.cache.reader import FeatureCache
from embedder.errors import ConfigError
from embedder.figures import pyplot, save_figure
from embedder.outputs import CACHE, PICTURE, claim, expect
from embedder.progress import stage
from embedder.search.maps import PLOT_METHODS, project


def plot_space(cache_path, out: str | Path, method: str = "pca", max_points: int = 5000, seed: int = 0,
               layer: str | None = None, overwrite: bool = False, progress: bool = False) -> Path:
    """A 2-D scatter of the features (PCA, t-SNE or UMAP of a seeded sample), coloured by label.

    Seeded throughout (the sample, and the projection's random_state): the same cache gives the same PNG."""
    plt = pyplot()
    if method not in PLOT_METHODS:
        raise ConfigError(f"--method must be one of {', '.join(PLOT_METHODS)}.")
    expect(cache_path, CACHE)
    claim(out, PICTURE, [cache_path], overwrite)  # before the projection, which can take minutes
    with FeatureCache(cache_path, layer=layer) as cache:
        n = len(cache)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, max_points), replace=False))
        X = cache.features()[rows] if n <= 4 * max_points else np.concatenate(
            [b.features[np.isin(np.arange(b.start, b.stop), rows)] for b in cache.iter_blocks()]
        )
        labels, classes = cache.labels[rows], cache.classes
    # UMAP by cosine, as features are compared; PCA and t-SNE as before, Euclidean.
    with stage(f"plot: {method} of {len(X)} rows", enabled=progress):
        xy = project(X, method, seed, metric="cosine")[1]
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    if classes:
        cmap = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
        for i, c in enumerate(classes):
            sel = labels == i
            ax.scatter(xy[sel, 0], xy[sel, 1], s=8, color=cmap(i % cmap.N), label=c)
        if len(classes) <= 20:
            ax.legend(markerscale=2, fontsize=8, loc="best")
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=8)
    ax.set_title(f"{Path(cache_path).name}: {method.upper()} of {len(X)} rows")
    return save_figure(fig, out, [cache_path], overwrite)


def result_grid(queries: list[tuple[str | None, list]], image_of, out: str | Path, thumb: int = 128,
                inputs=None, overwrite: bool = False) -> Path:
    """One row per query: the query image (if any), then its hits with rank and score.

    `queries` is [(query image path or None, hits)], `image_of(hit)` gives a hit's image file.
    """
    from PIL import Image

    from embedder.data.rows import load_location_rgb
    from embedder.errors import BadImageError

    def picture(path):
        try:
            img = Image.fromarray(load_location_rgb(str(path)).permute(1, 2, 0).numpy())
        except BadImageError:
            return None
        img.thumbnail((thumb, thumb))
        return img

    cols = 1 + max(len(h) for _, h in queries)
    fig, axes = pyplot().subplots(len(queries), cols, figsize=(1.6 * cols, 1.9 * len(queries)), dpi=100, squeeze=False)
    for r, (qpath, hits) in enumerate(queries):
        cells = [(qpath, "query")] + [(image_of(h), f"#{h.rank} {h.score:.3f}\n{h.label or ''}") for h in hits]
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(cells) and cells[c][0] is not None:
                img = picture(cells[c][0])
                if img is not None:
                    ax.imshow(img)
                ax.set_title(cells[c][1], fontsize=7)
    return save_figure(fig, out, inputs, overwrite, flag="--grid")
