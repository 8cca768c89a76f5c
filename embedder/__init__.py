"""embedder: frozen pretrained CNN features, extracted once into an HDF5 cache.

    import embedder

    X = embedder.extract(["a.jpg", "b.png"], model="efficientnet_lite0")   # row i is image i
    index = embedder.Index.from_array(X, paths=["a.jpg", "b.png"])
    scores, ids, paths = index.search(X, k=2)

    embedder.embed(embedder.EmbedConfig.of(source="photos/", model="efficientnet_lite0", out="feats.h5"))
    with embedder.FeatureCache("feats.h5") as cache:
        X, y = cache.features(), cache.labels

`__all__` is the public API (`extract` is the subpackage `embedder.extract`, which is callable:
`embedder.extract.api.extract`); the other names below stay importable from here for older code.
They are imported on first use (PEP 562), so `import embedder.errors` or the CLI's `--help` do
not pay for torch.
"""

from __future__ import annotations

import importlib

from embedder._version import __version__ as __version__

_EXPORTS = {
    "BackboneConfig": "embedder.models.space",
    "FeatureSpace": "embedder.models.space",
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
    "ImageError": "embedder.extract.images",
    "Index": "embedder.search.api",
    "Query": "embedder.search.ask",
    "Example": "embedder.search.ask",
    "Neighbours": "embedder.search.api",
    "load_backbone": "embedder.extract.core",
    "LinearProbe": "embedder.learn.probe",
    "get_backbone_spec": "embedder.models.registry",
    "list_backbones": "embedder.models.registry",
}

__all__ = [
    "EmbedConfig",
    "EmbedderError",
    "FeatureCache",
    "Index",
    "LinearProbe",
    "Query",
    "__version__",
    "embed",
    "extract",
    "list_backbones",
    "load_backbone",
]


def __getattr__(name: str):
    if name == "extract":  # the callable subpackage (embedder/extract/__init__.py), imported on first use too
        return importlib.import_module("embedder.extract")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'embedder' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *_EXPORTS})
