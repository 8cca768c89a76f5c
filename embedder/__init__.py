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

from embedder._version import __version__ as __version__

_EXPORTS = {
    "BackboneConfig": "embedder.models.backbone",
    "FrozenBackbone": "embedder.models.backbone",
    "FeatureCache": "embedder.cache.reader",
    "open_cache": "embedder.cache.reader",
    "EmbedConfig": "embedder.extract.config",
    "CacheError": "embedder.errors",
    "CacheMismatchError": "embedder.errors",
    "ConfigError": "embedder.errors",
    "EmbedderError": "embedder.errors",
    "SourceError": "embedder.errors",
    "WeightsUnavailableError": "embedder.errors",
    "EmbedReport": "embedder.extract.local",
    "embed": "embedder.extract.local",
    "sync": "embedder.search.watch",
    "SyncReport": "embedder.search.watch",
    "embed_images": "embedder.extract.core",
    "load_backbone": "embedder.extract.core",
    "LinearProbe": "embedder.learn.probe",
    "get_backbone_spec": "embedder.models.registry",
    "list_backbones": "embedder.models.registry",
}

__all__ = [
    "BackboneConfig",
    "CacheError",
    "CacheMismatchError",
    "ConfigError",
    "EmbedConfig",
    "EmbedReport",
    "EmbedderError",
    "FeatureCache",
    "FrozenBackbone",
    "LinearProbe",
    "SourceError",
    "SyncReport",
    "WeightsUnavailableError",
    "__version__",
    "embed",
    "embed_images",
    "get_backbone_spec",
    "list_backbones",
    "load_backbone",
    "open_cache",
    "sync",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'embedder' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
