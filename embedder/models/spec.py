"""What a backbone is: `BackboneSpec`, one registry entry (curated in embedder.models.registry, or read off
a library's model by embedder.models.catalog), and how its layer names resolve to graph nodes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from embedder.data.transforms import Preprocessing
from embedder.errors import ConfigError
from embedder.models.outputspec import COMBINE, OutputSpec  # noqa: F401 - COMBINE re-exported
from embedder.models.weights import WeightsSource


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # "resnet", "vgg" or "efficientnet_lite"
    build: Callable[[], nn.Module]  # the architecture, randomly initialised
    weights: WeightsSource  # where DEFAULT weights come from
    preprocessing: Preprocessing
    default_layer: str  # graph node whose output is the default feature
    layer_dims: dict[str, int]  # graph node -> feature width after pooling
    layer_aliases: dict[str, str] = field(default_factory=dict)  # friendly name -> graph node
    head: str = "fc"  # dotted path of the classifier layer that a new head replaces
    # Output points whose (pooled) features are exactly what `head` consumes, so a head
    # trained on them can be put in its place.
    head_inputs: tuple[str, ...] = ()
    uses_timm: bool = False
    # Neural-style defaults (Gatys et al.): Gram matrices over several depths carry texture,
    # one mid-depth map carries the layout. Any graph node or alias may be named here.
    style_layers: tuple[str, ...] = ()
    content_layer: str = ""
    # Token models (ViTs): leading tokens (class, registers) that `--pool avg` leaves out and
    # whose first one `--pool cls` takes; blocks lists the transformer blocks for --layer.
    prefix_tokens: int = 0
    blocks: tuple[str, ...] = ()
    # Whether the first prefix token is a class token (timm's `has_class_token`; torchvision's ViT
    # always has one). A `*_gap` ViT with registers has prefix tokens but no class token: its
    # token 0 is a register, so `--pool cls` is not offered (see `poolings`).
    class_token: bool = False
    # The architecture for another input size (--image-size), for models whose position
    # embeddings fix it (ViTs); None where `build()` takes any size (CNNs).
    build_at: Callable[[int], nn.Module] | None = None
    # The preprocessing at another crop size (--image-size), as the model's library builds it (timm:
    # resolve_data_config + create_transform, embedder.models.catalog.timm_preprocessing); None: the
    # weights' resize/crop ratio kept (torchvision's weights transforms take both sizes and define no rule).
    preprocessing_at: Callable[[int], Preprocessing] | None = None

    @property
    def feature_dim(self) -> int:
        return self.layer_dims[self.default_layer]

    @property
    def poolings(self) -> tuple[str, ...]:
        """The --pool values this model can do, read from its own description: CNN maps pool by
        avg/max/gem; a ViT's tokens by avg/max over the patch tokens, and by its class token only
        where it has one."""
        if self.prefix_tokens == 0:
            return ("avg", "max", "gem", "none")
        return ("avg", "max", "none") + (("cls", "cls+avg") if self.class_token else ())

    def check_pool(self, pool: str) -> None:
        """ConfigError, in one line naming the poolings it can do, for a pooling this model cannot do."""
        if pool in self.poolings:
            return
        if pool in ("cls", "cls+avg"):
            why = ("its leading tokens are registers, not a class token" if self.prefix_tokens
                   else "it has no class token (its layers output CNN maps)")
        else:
            why = "that pools CNN maps, not a ViT's tokens" if self.prefix_tokens else "that is not a pooling"
        raise ConfigError(f"--pool {pool} does not apply to {self.name}: {why}; "
                          f"it can pool with {', '.join(self.poolings)}.")

    def preprocessing_for(self, image_size: int | None) -> Preprocessing:
        """The preprocessing at crop `image_size` (None: the weights' own)."""
        if image_size is None or image_size == self.preprocessing.crop_size:
            return self.preprocessing
        if self.preprocessing_at is None or image_size < 8:  # with_image_size refuses sizes below 8
            return self.preprocessing.with_image_size(image_size)
        return self.preprocessing_at(image_size)

    def resolve_layer(self, layer: str | None) -> str:
        """Map a user-facing layer name (None = default, alias, or graph node) to a graph node."""
        if layer is None or layer == "default":
            return self.default_layer
        node = self.layer_aliases.get(layer, layer)
        if node not in self.layer_dims:
            known = ", ".join(sorted(set(self.layer_dims) | set(self.layer_aliases)))
            raise ConfigError(
                f"Model {self.name!r} has no layer {layer!r}. Layers available: {known}."
            )
        return node

    def node_name(self, layer: str | None) -> str:
        """Like `resolve_layer`, but any name passes through: graph nodes beyond `layer_dims` are
        checked against the traced graph by the backbone (see `embedder inspect MODEL`)."""
        # `a+b`: the outputs of a and b concatenated (each pooled), e.g. a ViT's last blocks.
        return OutputSpec.parse(layer).node(self.layer_aliases, self.default_layer)
