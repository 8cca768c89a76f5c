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


def fingerprint_components(backbone: FrozenBackbone, feature_dtype: str = "float32", *,
                           jpeg_draft: bool = False) -> dict[str, str]:
    """Everything that can change a feature's bits, as readable strings (`jpeg_draft`: embed --jpeg-draft)."""
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
    if cfg.runtime != "torch":
        from embedder.models.onnx import runtime_component

        components["runtime"] = runtime_component()
    if backbone.quantization is not None:  # int8: the settings, the calibration set and the nodes kept in fp32
        components["quantization"] = json.dumps(backbone.quantization, sort_keys=True)
    if jpeg_draft:
        components["jpeg_draft"] = "PIL draft: libjpeg DCT scaling, shorter side >= resize_size"
    if len(backbone.outputs) > 1:
        components["layers"] = json.dumps(list(backbone.outputs))
    if backbone.style_descriptor is not None:
        components["style"] = json.dumps(
            {"layers": list(backbone.style_nodes), "dim": cfg.style_dim, "gram": "FF^T/(HW), triu*sqrt2, l2 per layer",
             "projection": f"count-sketch seed {SKETCH_SEED}" if cfg.style_dim else "none"},
            sort_keys=True,
        )
    return components


def backbone_settings(components: dict, weights_path: str | None = None) -> dict:
    """The inverse of `fingerprint_components`: the `load_backbone` settings that rebuild the backbone a
    cache records (queries by image, export). Compare the rebuilt backbone's components with
    `component_differences` to be sure nothing else differs (library versions, decoder)."""
    from embedder.models.registry import get_backbone_spec
    from embedder.models.weights import weights_choice_for

    spec = get_backbone_spec(components["model"])
    crop = json.loads(components["preprocessing"])["crop_size"]
    style = json.loads(components["style"]) if "style" in components else {}
    device = components.get("device_type", "cpu")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            device = "cpu"  # the caller's difference check reports it
    return {
        "model": components["model"],
        "weights": weights_choice_for(components["weights"], weights_path),
        "layer": components["layer"],
        "normalize": components["normalization"],
        "image_size": None if crop == spec.preprocessing.crop_size else int(crop),
        "device": device,
        "precision": components["precision"],
        "memory_layout": components["memory_layout"],
        "pool": components["pooling"],
        "style_layers": tuple(style.get("layers", ())),
        "style_dim": int(style.get("dim", 0)),
        "runtime": "onnxruntime" if "runtime" in components else "torch",
    }
