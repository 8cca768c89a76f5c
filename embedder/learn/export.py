"""`embedder export`: a trained linear probe + its backbone -> one image classifier.

The probe's folded weights go into a *new* `nn.Linear(in_features, n_classes)` installed
where the pretrained head was (ResNet `fc`, VGG `classifier[6]` for fc7 features, ...),
so the exported network computes exactly the cached features and then the probe.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from embedder.cache.fingerprint import backbone_settings
from embedder.cache.vectors import imported_refusal
from embedder.errors import ConfigError, WeightsUnavailableError
from embedder.learn.checkpoint import ClassifierInfo, save_classifier
from embedder.learn.probefile import read_probe
from embedder.models.backbone import build_model
from embedder.models.heads import replace_head
from embedder.models.registry import get_backbone_spec
from embedder.models.weights import resolve_weights
from embedder.outputs import CLASSIFIER, claim, require_suffix


def export_probe(probe_dir: str | os.PathLike, out: str | os.PathLike, weights_path: str | None = None,
                 overwrite: bool = False) -> Path:
    require_suffix(out, CLASSIFIER)
    claim(out, CLASSIFIER, [probe_dir], overwrite)  # before the backbone is built
    probe = read_probe(probe_dir)
    components = probe.components
    if "weights" not in components:  # a probe.pt written by hand (enough for --init-head, not here)
        raise ConfigError(
            f"The probe in {probe_dir} does not record the cache it was trained on, which export needs to rebuild "
            "the backbone. Train it with `embedder probe CACHE.h5`."
        )
    refusal = imported_refusal(components, "put the probe on",
                               "Apply the probe to caches of the same vectors with `embedder evaluate` instead.")
    if refusal:
        raise ConfigError(refusal)
    if components.get("normalization", "none") != "none":
        raise ConfigError(
            "This probe was trained on L2-normalised features, which the replaced head cannot reproduce inside "
            "the network. Embed without --normalize l2 and train the probe again to export it."
        )
    if components.get("pooling", "avg") != "avg":
        raise ConfigError(
            f"This probe was trained on {components['pooling']}-pooled features, but the network's classifier "
            "sits after global *average* pooling. Embed with --pool avg and train the probe again to export it."
        )
    spec = get_backbone_spec(probe.model)
    settings = backbone_settings(components, weights_path)
    weights = resolve_weights(spec.weights, settings["weights"])
    if weights.identity != components["weights"]:
        raise WeightsUnavailableError(
            f"--weights gives {weights.identity}, but the probe's cache was embedded with {components['weights']}."
        )
    model = build_model(spec, weights, settings["image_size"])
    head, _ = replace_head(model, spec, probe.layer, len(probe.classes))
    with torch.no_grad():
        head.weight.copy_(probe.coef)
        head.bias.copy_(probe.intercept)
    info = ClassifierInfo(
        model=probe.model,
        layer=probe.layer,
        classes=list(probe.classes),
        image_size=settings["image_size"],
        precision=settings["precision"],
        memory_layout=settings["memory_layout"],
        weights=components["weights"],
        origin={"kind": "linear-probe", "probe_dir": str(probe_dir), "fingerprint": probe.fingerprint, "C": probe.C},
    )
    return save_classifier(out, model, info)
