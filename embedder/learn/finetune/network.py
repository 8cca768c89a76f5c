"""The network of a finetuning run: the backbone with a new head, and what of it may train.

Three ways of training, all on the same train/val/test split as the cached linear probe
(`embedder.data.splits.assign_splits`, same seed, same fractions):

  finetune          every weight trains (the default);
  --freeze-bn       every weight trains except the backbone's BatchNorm layers, which stay
                    in eval mode with their affine weights frozen: their running statistics
                    keep describing the pretraining data, which is what small fine-tuning
                    sets (and small batches) cannot estimate well;
  --freeze-backbone "ConvNet as fixed feature extractor" from the PyTorch transfer-learning
                    tutorial: the backbone runs again every epoch on augmented images and
                    only the head trains. Done right: the tutorial calls `model.train()`,
                    which puts the frozen backbone's BatchNorm layers in training mode, so
                    their running statistics drift towards the new data and the "frozen"
                    features change from epoch to epoch. Here every backbone module is held
                    in eval mode, so its weights and buffers stay bit-identical.

`--init-head` starts the linear head from a probe trained on the cached features of the
same model and layer (linear-probe-then-fine-tune).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from embedder.data.transforms import Preprocessing
from embedder.errors import ConfigError
from embedder.learn.config import HEADS
from embedder.learn.probefile import ProbeFile, read_probe
from embedder.models.heads import head_slot, mlp_head, replace_head
from embedder.models.spec import BackboneSpec


def build_network(
    spec: BackboneSpec,
    model: nn.Module,
    layer: str | None,
    n_classes: int,
    head: str = "linear",
    mlp_hidden: int = 512,
) -> tuple[nn.Module, nn.Module, str]:
    """`model` (the backbone's network with its weights: `FeatureSpace.network()`, the one place a
    network is built) with a new head for `n_classes` on `layer`'s features.

    Returns (model, the new head, its dotted path). The head is a *new module* (the
    `fc.out_features = n` mistake leaves 1000 outputs); its random init uses torch's global
    RNG, so callers seed it.
    """
    if head not in HEADS:
        raise ConfigError(f"--head must be one of {', '.join(HEADS)}, got {head!r}.")
    in_features = head_slot(spec, layer)[1]
    module = nn.Linear(in_features, n_classes) if head == "linear" else mlp_head(in_features, n_classes, mlp_hidden)
    installed, path = replace_head(model, spec, layer, module)
    return model, installed, path


class FinetuneNetwork(nn.Module):
    """uint8 images [N, 3, S, S] -> logits, normalised on the device, with the freezing rules.

    `train()` puts the network in training mode *except* for the frozen modules, and
    `forward` re-asserts that, so neither `net.train()` nor code that flips modules one by
    one can make a frozen BatchNorm layer update its running statistics.
    """

    def __init__(
        self,
        model: nn.Module,
        head: nn.Module,
        preprocessing: Preprocessing,
        *,
        freeze_backbone: bool = False,
        freeze_bn: bool = False,
    ):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)
        in_head = {id(m) for m in head.modules()}
        backbone = [m for m in model.modules() if id(m) not in in_head]  # includes `model` itself
        if freeze_backbone:
            self._frozen = backbone
        elif freeze_bn:
            self._frozen = [m for m in backbone if isinstance(m, _BatchNorm)]
        else:
            self._frozen = []
        for m in self._frozen:
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FinetuneNetwork:
        super().train(mode)
        self._lock()
        return self

    def _lock(self) -> None:
        for m in self._frozen:
            m.training = False

    @property
    def bn_trains(self) -> bool:
        """Whether a BatchNorm layer updates in training mode (then a batch of one image cannot train)."""
        return any(isinstance(m, _BatchNorm) and m.training for m in self.model.modules())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._lock()
        x = images.to(self.mean.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return self.model((x - self.mean) / self.std)


def read_init_head(probe_dir: str, spec: BackboneSpec, node: str, classes: list[str], in_features: int) -> ProbeFile:
    """The probe of `--init-head`, checked against this run: same model, head slot and classes."""
    probe = read_probe(probe_dir, option="--init-head")
    differences = _misfits(probe, spec, node, classes)
    if differences:
        raise ConfigError(
            f"--init-head: the probe in {probe_dir} does not fit this run:\n  "
            + "\n  ".join(differences)
            + "\nTrain the probe on features of the same model and layer, from the same labelled images."
        )
    if tuple(probe.coef.shape) != (len(classes), in_features) or tuple(probe.intercept.shape) != (len(classes),):
        raise ConfigError(
            f"--init-head: {probe.path} has coef {tuple(probe.coef.shape)} and intercept "
            f"{tuple(probe.intercept.shape)}; this head needs [{len(classes)}, {in_features}] and [{len(classes)}]. "
            "Re-train the probe on this model's features."
        )
    return probe


def _misfits(probe: ProbeFile, spec: BackboneSpec, node: str, classes: list[str]) -> list[str]:
    differences = []
    if probe.model != spec.name:
        differences.append(f"model: probe has {probe.model!r}, this run uses {spec.name!r}")
    else:
        # A probe on any output point that feeds the same head slot (e.g. ResNet `layer4`,
        # globally pooled, and `avgpool`) computed exactly the features this head consumes.
        try:
            same_slot = head_slot(spec, probe.layer) == head_slot(spec, node)
        except ConfigError:
            same_slot = False
        if not same_slot:
            differences.append(f"layer: probe has {probe.layer!r}, this run uses {node!r} (pass --layer)")
        pooling = probe.components.get("pooling", "avg")
        if pooling != "avg":
            differences.append(f"pooling: probe has {pooling!r}, the network's head sees average pooling (--pool avg)")
    if probe.classes != list(classes):
        differences.append(f"classes: probe has {probe.classes}, SOURCE has {list(classes)}")
    return differences


def load_head(head: nn.Module, probe: ProbeFile) -> None:
    """Copy the probe's weights into the new linear head (folded: they apply to raw features)."""
    with torch.no_grad():
        head.weight.copy_(probe.coef)
        head.bias.copy_(probe.intercept)
