"""embedder: frozen pretrained CNN features, extracted once into an HDF5 cache.

    from embedder import EmbedConfig, embed, FeatureCache, load_backbone

    embed(EmbedConfig(source="photos/", model="efficientnet_lite0", out="feats.h5"))
    with FeatureCache("feats.h5") as cache:
        for block in cache.iter_blocks():
            ...

The names below are imported on first use (PEP 562), so `import embedder.errors` or the CLI's
`--help` do not pay for torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "BackboneConfig": "embedder.backbone",
    "FrozenBackbone": "embedder.backbone",
    "FeatureCache": "embedder.cache",
    "open_cache": "embedder.cache",
    "EmbedConfig": "embedder.config",
    "CacheError": "embedder.errors",
    "CacheMismatchError": "embedder.errors",
    "ConfigError": "embedder.errors",
    "EmbedderError": "embedder.errors",
    "SourceError": "embedder.errors",
    "WeightsUnavailableError": "embedder.errors",
    "EmbedReport": "embedder.extract",
    "embed": "embedder.extract",
    "embed_images": "embedder.extract",
    "load_backbone": "embedder.extract",
    "LinearProbe": "embedder.probe",
    "get_backbone_spec": "embedder.registry",
    "list_backbones": "embedder.registry",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'embedder' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
