"""Frozen backbones: the registry, weights, the eval-locked backbone, heads, inspection, style."""
