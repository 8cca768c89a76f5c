"""A whole classifier from image to label: the backbone with its head replaced, eval-locked.

Saved as a self-describing checkpoint (plain tensors and strings, loadable with
`torch.load(weights_only=True)`), written by `embedder export` (from a linear probe) and
by `embedder finetune` (the best epoch), read by `embedder predict`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from embedder.atomic import save_torch, staged_file
from embedder.errors import ConfigError
from embedder.models.backbone import FrozenBackbone, build_architecture
from embedder.models.heads import head_slot, mlp_head, replace_head
from embedder.models.registry import get_backbone_spec
from embedder.models.space import FeatureSpace
from embedder.models.weights import ResolvedWeights

FORMAT = "embedder-classifier/1"


@dataclass
class ClassifierInfo:
    model: str  # registry name
    layer: str  # the feature layer the head sits on
    classes: list[str]
    head_kind: str = "linear"  # "linear" or "mlp"
    mlp_hidden: int = 512
    image_size: int | None = None
    precision: str = "fp32"
    memory_layout: str = "contiguous"
    weights: str = ""  # identity of the backbone weights it started from
    origin: dict = field(default_factory=dict)  # how it was trained: probe fingerprint, metrics, ...


def build_head(info: ClassifierInfo, in_features: int) -> nn.Module:
    n = len(info.classes)
    if info.head_kind == "linear":
        return nn.Linear(in_features, n)
    if info.head_kind == "mlp":
        return mlp_head(in_features, n, info.mlp_hidden)
    raise ConfigError(f"head must be 'linear' or 'mlp', got {info.head_kind!r}.")


def logits_node(head_path: str, head: nn.Module) -> str:
    if isinstance(head, nn.Sequential):
        return f"{head_path}.{len(head) - 1}"
    return head_path


def save_classifier(path: str | os.PathLike, model: nn.Module, info: ClassifierInfo) -> Path:
    """Write the checkpoint `path` (replaced in one step: a kill leaves the old file or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "info": {**info.__dict__}, "state_dict": model.state_dict()}
    with staged_file(path) as tmp:
        save_torch(payload, tmp)
    return path


class ImageClassifier(nn.Module):
    """uint8 images [N, 3, S, S] -> logits [N, n_classes]; the whole network is eval-locked."""

    def __init__(self, network: FrozenBackbone, info: ClassifierInfo):
        super().__init__()
        self.network = network
        self.info = info
        self.classes = list(info.classes)
        self.preprocessing = network.preprocessing

    def train(self, mode: bool = True) -> ImageClassifier:  # `mode` is ignored: frozen as a whole
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        return torch.softmax(self(images), dim=1).cpu().numpy()


def load_classifier(path: str | os.PathLike, device: str = "auto", runtime: str = "auto") -> ImageClassifier:
    """An exported probe or a fine-tuned network, ready for inference (`runtime`: auto, torch or onnxruntime)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"No classifier at {path}. Make one with `embedder export` or `embedder finetune`.") from None
    except Exception as exc:
        raise ConfigError(f"{path} is not a readable classifier checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an embedder classifier ({FORMAT}).")
    info = ClassifierInfo(**payload["info"])
    spec = get_backbone_spec(info.model)
    model = build_architecture(spec, info.image_size)  # a ViT's position embeddings fit the saved size
    head, head_path = replace_head(model, spec, info.layer, build_head(info, head_slot(spec, info.layer)[1]))
    model.load_state_dict(payload["state_dict"], strict=True)
    space = FeatureSpace(info.model, info.weights, image_size=info.image_size, device=device,
                         precision=info.precision, memory_layout=info.memory_layout, runtime=runtime)
    weights = ResolvedWeights("file", f"classifier:{Path(path).name}", lambda m: None)
    network = space.load(network=model, weights=weights, output=(logits_node(head_path, head), len(info.classes)))
    return ImageClassifier(network, info)
