"""Gram-matrix style: the statistics neural style transfer matches, as an indexable vector.

G = F Fᵀ / (H·W) for a [C, H, W] map F flattened to [C, H·W]: the channel co-activations
averaged over positions. Averaging over positions throws the layout away and keeps the
texture, and makes G independent of the image size, so one style descriptor compares
images of any size, and a circular shift of the map leaves G unchanged.

The descriptor of an image is, for each style layer, the upper triangle of G (diagonal
included) with the off-diagonal entries scaled by √2, so that Euclidean distance between
triangles equals the Frobenius distance between the Gram matrices. Each layer's block is
L2-normalised (deep layers have far larger Grams and would otherwise decide alone) and the
blocks are concatenated and divided by √L, so the descriptor has unit length and cosine
similarity is the mean of the per-layer Gram cosines.

The full triangle is long (C(C+1)/2 per layer: 174,560 values for ResNet-18's four
stages), so by default it is projected to `dim` values with a seeded count sketch (signed
feature hashing, Weinberger et al. 2009): each entry is added, with a random sign, to one
of `dim` buckets. It is a sparse random projection that preserves inner products in
expectation, needs O(input) memory rather than a dense input×dim matrix, and is the same
for every run (its seed is part of the cache fingerprint).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SKETCH_SEED = 0


def gram(maps: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, C], divided by H·W. Differentiable (stylize optimises through it)."""
    if maps.ndim != 4:
        raise ValueError(f"a Gram matrix needs [N, C, H, W] maps, got shape {tuple(maps.shape)}")
    n, c, h, w = maps.shape
    f = maps.reshape(n, c, h * w).float()
    return torch.bmm(f, f.transpose(1, 2)) / (h * w)


def triangle_dim(channels: int) -> int:
    return channels * (channels + 1) // 2


def gram_triangle(g: torch.Tensor) -> torch.Tensor:
    """[N, C, C] -> [N, C(C+1)/2]: upper triangle with off-diagonals × √2 (Frobenius-preserving)."""
    c = g.shape[-1]
    rows, cols = torch.triu_indices(c, c, device=g.device)
    scale = torch.where(rows == cols, 1.0, math.sqrt(2.0)).to(g.dtype)
    return g[:, rows, cols] * scale


def style_descriptor_dim(channels: list[int], dim: int) -> int:
    """Width of the descriptor: `dim` when projecting (dim > 0), else the full triangles."""
    return dim if dim > 0 else sum(triangle_dim(c) for c in channels)


class CountSketch:
    """Seeded signed feature hashing from `in_dim` to `out_dim` values."""

    def __init__(self, in_dim: int, out_dim: int, seed: int = SKETCH_SEED):
        gen = torch.Generator().manual_seed(seed)
        self.out_dim = out_dim
        self.bucket = torch.randint(0, out_dim, (in_dim,), generator=gen)
        self.sign = torch.randint(0, 2, (in_dim,), generator=gen).float().mul_(2).sub_(1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bucket, sign = self.bucket.to(x.device), self.sign.to(x.device)
        out = torch.zeros(x.shape[0], self.out_dim, dtype=x.dtype, device=x.device)
        return out.index_add_(1, bucket, x * sign)


class StyleDescriptor:
    """Feature maps of the style layers -> one unit-length style vector per image."""

    def __init__(self, channels: list[int], dim: int = 0, seed: int = SKETCH_SEED):
        if dim < 0:
            raise ValueError("dim must be 0 (no projection) or positive")
        self.channels = list(channels)
        self.dim = style_descriptor_dim(self.channels, dim)
        full = sum(triangle_dim(c) for c in self.channels)
        self.sketch = CountSketch(full, dim, seed) if dim > 0 else None

    def __call__(self, maps: list[torch.Tensor]) -> torch.Tensor:
        blocks = [F.normalize(gram_triangle(gram(m)), dim=1) for m in maps]
        out = torch.cat(blocks, dim=1) / math.sqrt(len(blocks))
        if self.sketch is not None:
            out = F.normalize(self.sketch(out), dim=1)  # unit length again after hashing
        return out
