"""The eval-locked, frozen feature extractor.

Three guards make "frozen" actually frozen:
  * every parameter has requires_grad=False and forward runs under inference_mode;
  * `train()` is overridden to keep eval mode, so `parent.train()` cannot switch it;
  * forward re-asserts eval mode on every submodule, so even code that walks
    `parent.modules()` and flips BatchNorm layers one by one cannot change the features
    or the running statistics.

The module takes uint8 RGB batches at the crop size ([N, 3, H, W]) and owns the
normalisation, precision and memory layout, so the Python API and the CLI compute the
same thing from the same pixels.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from embedder.errors import ConfigError
from embedder.registry import BackboneSpec, Preprocessing, get_backbone_spec
from embedder.weights import RANDOM_INIT_SEED, ResolvedWeights, resolve_weights

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
POOLINGS = ("avg",)
NORMALIZATIONS = ("none", "l2")


@dataclass(frozen=True)
class BackboneConfig:
    """Everything that determines the features of an image (besides the pixels)."""

    model: str
    weights: str = "DEFAULT"  # DEFAULT | none | path to a state-dict file
    layer: str | None = None  # None = the registry's default output point
    pool: str = "avg"
    normalize: str = "none"  # "none" or "l2"
    image_size: int | None = None  # overrides the weights' crop size (resize scales with it)
    device: str = "cpu"  # resolved device: "cpu" or "cuda[:i]"
    precision: str = "fp32"  # resolved: fp32 | bf16 | fp16
    channels_last: bool = False


def build_model(spec: BackboneSpec, weights: ResolvedWeights) -> nn.Module:
    """The architecture with its weights. Random init is seeded, so `--weights none` is reproducible."""
    with _seeded(RANDOM_INIT_SEED):
        model = spec.build()
    weights.apply(model)
    return model


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class FrozenBackbone(nn.Module):
    """uint8 images [N, 3, H, W] -> float32 features [N, D]. Cannot be put in train mode."""

    def __init__(
        self,
        model: nn.Module,
        spec: BackboneSpec,
        config: BackboneConfig,
        weights: ResolvedWeights,
        *,
        output: tuple[str, int] | None = None,
    ):
        """`output` = (graph node, width) overrides `config.layer`, e.g. a replaced head's logits."""
        super().__init__()
        if config.pool not in POOLINGS:
            raise ConfigError(f"--pool must be one of {', '.join(POOLINGS)}, got {config.pool!r}.")
        if config.normalize not in NORMALIZATIONS:
            raise ConfigError(f"normalize must be one of {NORMALIZATIONS}, got {config.normalize!r}.")
        if config.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}.")
        self.spec = spec
        self.config = config
        self.weights = weights
        if output is None:
            self.node = spec.resolve_layer(config.layer)
            self.feature_dim = spec.layer_dims[self.node]
        else:
            self.node, self.feature_dim = output
        preprocessing = spec.preprocessing
        if config.image_size is not None:
            preprocessing = preprocessing.with_image_size(config.image_size)
        self.preprocessing: Preprocessing = preprocessing

        self.body = _feature_extractor(model, self.node, spec.uses_timm)
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.to(config.device)
        if config.channels_last:
            self.to(memory_format=torch.channels_last)
        super().train(False)

    @classmethod
    def from_config(cls, config: BackboneConfig) -> FrozenBackbone:
        spec = get_backbone_spec(config.model)
        weights = resolve_weights(spec.weights, config.weights)
        return cls(build_model(spec, weights), spec, config, weights)

    # -- the lock -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FrozenBackbone:
        return super().train(False)

    def _assert_eval(self) -> None:
        for m in self.modules():
            m.training = False

    # -- compute --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.mean.device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self._features(images)
        # Inference tensors cannot enter autograd; a caller training a head on top gets a plain copy.
        return out if torch.is_inference_mode_enabled() else out.clone()

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        self._assert_eval()
        x = images.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        x = (x - self.mean) / self.std
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = PRECISIONS[self.config.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = self.body(x)[self.node]
        out = out.float()
        if out.ndim == 4:
            out = out.mean(dim=(2, 3))  # global average pool
        elif out.ndim != 2:
            out = out.flatten(1)
        if self.config.normalize == "l2":
            out = F.normalize(out, dim=1)
        return out


def _feature_extractor(model: nn.Module, node: str, uses_timm: bool) -> nn.Module:
    """A graph module that returns {node: output}. Only the needed part of the model runs."""
    if uses_timm:
        from timm.models import create_feature_extractor
    else:
        from torchvision.models.feature_extraction import create_feature_extractor
    model.eval()
    return create_feature_extractor(model, return_nodes={node: node})
