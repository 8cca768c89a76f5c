"""embedder: frozen pretrained CNN features, extracted once into an HDF5 cache.

    from embedder import EmbedConfig, embed, FeatureCache, load_backbone

    embed(EmbedConfig(source="photos/", model="efficientnet_lite0", out="feats.h5"))
    with FeatureCache("feats.h5") as cache:
        for block in cache.iter_blocks():
            ...
"""

__version__ = "0.1.0"

from embedder.backbone import BackboneConfig, FrozenBackbone
from embedder.cache import FeatureCache, open_cache
from embedder.config import EmbedConfig
from embedder.errors import (
    CacheError,
    CacheMismatchError,
    ConfigError,
    EmbedderError,
    SourceError,
    WeightsUnavailableError,
)
from embedder.extract import EmbedReport, embed, embed_images, load_backbone
from embedder.probe import LinearProbe
from embedder.registry import get_backbone_spec, list_backbones

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
    "WeightsUnavailableError",
    "__version__",
    "embed",
    "embed_images",
    "get_backbone_spec",
    "list_backbones",
    "load_backbone",
    "open_cache",
]
