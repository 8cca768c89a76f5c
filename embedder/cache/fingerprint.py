"""Cache fingerprints: everything that can change a feature's bits, as readable components.

`fingerprint_components(backbone)` is what a cache records; `fingerprint_of` hashes it;
`component_differences` is the one comparison every refusal (resume, append, probe on
another cache, query backbone) is made with, so each lists the same differing fields.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from embedder._version import __version__

if TYPE_CHECKING:
    from embedder.models.backbone import FrozenBackbone


def fingerprint_of(components: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


def layer_view_components(components: dict[str, str], name: str) -> dict[str, str]:
    """The components a cache embedded with `--layer name` alone would have."""
    view = {k: v for k, v in components.items() if k != "layers"}
    view["layer"] = name
    if name != "style":
        view.pop("style", None)
    return view


def component_differences(a: dict, b: dict, ignore: frozenset[str] | set[str] = frozenset()) -> dict:
    """{component: (a's value, b's value)} for every component that differs (missing = None)."""
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)}


def fingerprint_components(backbone: FrozenBackbone, feature_dtype: str = "float32") -> dict[str, str]:
    """Everything that can change a feature's bits, as readable strings."""
    # Imported here: reading a cache (this module's other half) must not pay for torch.
    import torch
    import torchvision

    from embedder.data.decode import DECODER
    from embedder.models.style import SKETCH_SEED

    cfg = backbone.config
    components = {
        "model": backbone.spec.name,
        "weights": backbone.weights.identity,
        "preprocessing": json.dumps(backbone.preprocessing.as_dict(), sort_keys=True),
        "decoder": DECODER,
        "layer": backbone.node,
        "pooling": cfg.pool,
        "normalization": cfg.normalize,
        "precision": cfg.precision,
        "memory_layout": "channels_last" if cfg.channels_last else "contiguous",
        "device_type": torch.device(cfg.device).type,
        "feature_dtype": feature_dtype,
        "embedder_version": __version__,
        "torch_version": str(torch.__version__),
        "torchvision_version": str(torchvision.__version__),
    }
    if backbone.spec.uses_timm:
        import timm

        components["timm_version"] = str(timm.__version__)
    # Only present when used, so single-layer caches keep the fingerprints they always had.
    if cfg.compile:
        components["compile"] = "torch.compile inductor, freezing, fixed batch"
    if len(backbone.outputs) > 1:
        components["layers"] = json.dumps(list(backbone.outputs))
    if backbone.style_descriptor is not None:
        components["style"] = json.dumps(
            {"layers": list(backbone.style_nodes), "dim": cfg.style_dim, "gram": "FF^T/(HW), triu*sqrt2, l2 per layer",
             "projection": f"count-sketch seed {SKETCH_SEED}" if cfg.style_dim else "none"},
            sort_keys=True,
        )
    return components
