"""Putting a new classification head where the pretrained one was.

The well-known mistake is `model.fc.out_features = n`: it changes an attribute and leaves
the weight matrix [1000, in_features] in place, so the model still has 1000 outputs. The
right move is a new `nn.Linear(in_features, n)` (or a small MLP) assigned in place of the
old layer: ResNet `fc`, VGG `classifier[6]`, EfficientNet `classifier`; for `torchvision:` and
`timm:` models, the layer the catalog found (`fc`, `classifier[-1]`, `heads.head`, timm's
`get_classifier()`, the very module `reset_classifier()` replaces).
"""

from __future__ import annotations

from torch import nn

from embedder.errors import ConfigError
from embedder.models.spec import BackboneSpec


def mlp_head(in_features: int, n_classes: int, hidden: int = 512) -> nn.Sequential:
    """Linear -> BatchNorm -> ReLU -> Linear; no activation after the last layer (logits)."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, n_classes),
    )


def head_slot(spec: BackboneSpec, layer: str | None) -> tuple[str, int]:
    """(dotted path where the head goes, its in_features) for a head on `layer`'s features."""
    node = spec.node_name(layer)
    if node in spec.head_inputs:
        return spec.head, spec.layer_dims[node]
    if spec.family == "vgg" and node == spec.default_layer:
        return "classifier", spec.layer_dims[node]  # pooled conv features skip fc6/fc7
    allowed = sorted(set(spec.head_inputs) | ({spec.default_layer} if spec.family == "vgg" else set()))
    if not allowed:
        raise ConfigError(
            f"{spec.name}'s classifier {spec.head} is not one Linear layer on pooled features (a 1x1 convolution, "
            "or a distilled model's two heads), so no new head can take its place. Train a probe on the cached "
            "features instead (`embedder probe`)."
        )
    raise ConfigError(
        f"A head cannot replace {spec.name}'s classifier from layer {layer!r}: the features must be "
        f"what the classifier consumes. Use one of: {', '.join(allowed)}."
    )


def replace_head(model: nn.Module, spec: BackboneSpec, layer: str | None, head: nn.Module | int) -> tuple[nn.Module, str]:
    """Put `head` (a module, or a class count for a new Linear) on top of `layer`'s features.

    Returns (the installed head, its dotted path in `model`).
    """
    path, in_features = head_slot(spec, layer)
    if isinstance(head, int):
        head = nn.Linear(in_features, head)
    first = head if isinstance(head, nn.Linear) else next(m for m in head.modules() if isinstance(m, nn.Linear))
    if first.in_features != in_features:
        raise ConfigError(f"The head takes {first.in_features} features but {layer!r} gives {in_features}.")
    if path == "classifier" and spec.family == "vgg":
        model.avgpool = nn.AdaptiveAvgPool2d(1)  # global pooling instead of VGG's 7x7 grid
    model.set_submodule(path, head)
    return head, path
