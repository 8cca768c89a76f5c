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
import math

import torch
import torch.nn.functional as F
from torch import nn

from embedder.data.transforms import Preprocessing
from embedder.errors import ConfigError, did_you_mean
from embedder.models.constants import POOLINGS, STYLE
from embedder.models.graph import feature_extractor, graph_node_names
from embedder.models.outputspec import COMBINE, DEFAULT
from embedder.models.spec import BackboneSpec
from embedder.models.style import StyleDescriptor
from embedder.models.weights import RANDOM_INIT_SEED, ResolvedWeights

# int8's torch pass is the exact fp32 one; its features come from a quantised ONNX Runtime graph,
# calibrated on the user's images (embedder.models.quantize) and attached with `use_quantized`.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}
NORMALIZATIONS = ("none", "l2")
GEM_P = 3.0  # generalised-mean exponent (Radenović et al.): between average (1) and max (inf)
STYLE_OUTPUT = STYLE  # output name of the Gram style descriptor, next to the layers' node names


def build_model(spec: BackboneSpec, weights: ResolvedWeights, image_size: int | None = None) -> nn.Module:
    """The architecture for `image_size` (None = the weights' crop) with its weights; a ViT's
    position embeddings are resampled to the model's grid on loading (weights.load_into)."""
    model = build_architecture(spec, image_size)
    weights.apply(model)
    return model


def build_architecture(spec: BackboneSpec, image_size: int | None = None) -> nn.Module:
    """The random-init architecture, seeded so that `--weights none` is reproducible. Only models
    whose input size is fixed by their position embeddings are built differently for `image_size`."""
    sized = spec.build_at is not None and image_size is not None and image_size != spec.preprocessing.crop_size
    with _seeded(RANDOM_INIT_SEED):
        return spec.build_at(image_size) if sized else spec.build()


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _validate(config) -> None:
    if not config.resolved:
        raise ConfigError("A backbone is built from a resolved FeatureSpace: use FeatureSpace(...).load(), which "
                          f"resolves device, precision, memory_layout and runtime (got {config}).")
    if config.pool not in POOLINGS:
        raise ConfigError(f"--pool must be one of {', '.join(POOLINGS)}, got {config.pool!r}.")
    if config.normalize not in NORMALIZATIONS:
        raise ConfigError(f"normalize must be one of {NORMALIZATIONS}, got {config.normalize!r}.")
    if config.precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}.")
    if config.style_dim < 0:
        raise ConfigError(f"--style-dim must be 0 (no projection) or positive, got {config.style_dim}.")
    if config.runtime not in ("torch", "onnxruntime"):
        raise ConfigError(f"runtime must be torch or onnxruntime (resolved), got {config.runtime!r}.")
    if config.precision == "int8" and config.runtime != "onnxruntime":
        raise ConfigError("--precision int8 runs on ONNX Runtime; use --runtime onnxruntime (or auto).")


class FrozenBackbone(nn.Module):
    """uint8 images [N, 3, H, W] -> float32 features [N, D]. Cannot be put in train mode.

    One pass can produce several outputs (`outputs`: name -> width, the primary first): the
    pooled maps of `config.layer` and `config.extra_layers`, named by their graph node, and
    the Gram style descriptor (`"style"`). `forward` returns the primary output only, so
    single-output callers never see the others; `forward_all` returns them all.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: BackboneSpec,
        config,
        weights: ResolvedWeights,
        *,
        output: tuple[str, int] | None = None,
    ):
        """`config`: the resolved `embedder.models.space.FeatureSpace` (built by its `load()`, the one
        builder); `output` = (graph node, width) overrides `config.layer`, e.g. a replaced head's logits."""
        super().__init__()
        _validate(config)
        spec.check_pool(config.pool)  # from the model's own description (registers are no class token)
        self.spec = spec
        self.config = config
        self.weights = weights
        self.preprocessing: Preprocessing = spec.preprocessing_for(config.image_size)
        nodes = self._name_outputs(model, output)
        self._lock(model, nodes)
        # torch.compile's wrapper and the batch size its graph is fixed to; set at the end of __init__.
        self.__dict__.update(_compiled=None, _compiled_batch=None, _session=None)
        self.quantization: dict | None = None  # int8: what `use_quantized` attached (settings, calibration)
        self._size_outputs(output)
        # Set last, so that the shape probe above runs eagerly. Kept out of the module tree (no
        # double entries in modules() or state_dict); it wraps self.body.
        if config.compile:
            self.__dict__["_compiled"] = torch.compile(self.body, dynamic=False, options={"freezing": True})
        # runtime "onnxruntime": FeatureSpace.load attaches the checked session (`use_session`).

    def _name_outputs(self, model: nn.Module, output: tuple[str, int] | None) -> tuple[str, ...]:
        """Set the primary node, the outputs and the style nodes; return every graph node to extract."""
        spec, config = self.spec, self.config
        # The one resolution of the requested names (aliases -> graph nodes); a cache records it (`layer_names`).
        self.requested: dict[str, str] = {}
        if output is None:
            wanted = config.outputs  # parsed once, when the space was made
            self.requested = {str(o): o.node(spec.layer_aliases, spec.default_layer) for o in wanted}
            self.node = self.requested[str(wanted[0])]
            names = list(dict.fromkeys(self.requested.values()))
        else:
            self.node = output[0]
            names = [self.node]
        self.output_names: tuple[str, ...] = tuple(names)  # order kept, repeats dropped; primary first
        self.layers: tuple[str, ...] = tuple(n for n in names if n != STYLE_OUTPUT)  # pooled outputs
        # Each pooled output's graph nodes: itself, or the parts of `a+b` (concatenated once pooled).
        self.parts: dict[str, tuple[str, ...]] = {n: tuple(n.split(COMBINE)) for n in self.layers}
        style = STYLE_OUTPUT in names
        style_layers = (config.style_layers or spec.style_layers) if style else ()
        self.style_nodes: tuple[str, ...] = tuple(dict.fromkeys(spec.node_name(n) for n in style_layers))
        if style and not self.style_nodes:
            raise ConfigError(f"Model {spec.name!r} has no default style layers; name them with --style-layer.")
        nodes = tuple(dict.fromkeys([p for n in self.layers for p in self.parts[n]] + list(self.style_nodes)))
        _check_nodes(model, spec, [n for n in nodes if n not in spec.layer_dims])
        return nodes

    def _lock(self, model: nn.Module, nodes: tuple[str, ...]) -> None:
        """The eval lock: the feature extractor over `nodes`, no gradients, on the device, in eval mode."""
        # Modules that overwrite their input would also overwrite the maps of nodes returned
        # before them (VGG's conv output under its in-place ReLU); the values are otherwise identical.
        for m in model.modules():
            if getattr(m, "inplace", False) is True:
                m.inplace = False
        self.body = feature_extractor(model, nodes, self.spec.uses_timm)
        self.register_buffer("mean", torch.tensor(self.preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.preprocessing.std).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.to(self.config.device)
        if self.config.channels_last:
            self.to(memory_format=torch.channels_last)
        super().train(False)

    def _size_outputs(self, output: tuple[str, int] | None) -> None:
        """Each output's width (from the registry, else measured by one eager pass) and the style descriptor."""
        spec, config = self.spec, self.config
        self.style_descriptor = None
        if output is not None:
            self.outputs: dict[str, int] = {self.node: output[1]}
        else:
            nodes = [p for n in self.layers for p in self.parts[n]]
            known = config.pool != "none" and not self.style_nodes and all(p in spec.layer_dims for p in nodes)
            shapes = {} if known else self._probe_shapes()
            width = {p: spec.layer_dims[p] if known else _pooled_width(shapes[p], config.pool, spec.prefix_tokens)
                     for p in nodes}
            self.outputs = {n: sum(width[p] for p in self.parts[n]) for n in self.layers}
            if STYLE_OUTPUT in self.output_names:
                for n in self.style_nodes:
                    if len(shapes[n]) != 4:
                        raise ConfigError(
                            f"Style layer {n!r} of {spec.name} outputs shape {list(shapes[n])}, not a [C, H, W] "
                            "feature map; pick convolutional layers (see `embedder inspect MODEL`)."
                        )
                self.style_descriptor = StyleDescriptor([shapes[n][1] for n in self.style_nodes], config.style_dim)
                self.outputs[STYLE_OUTPUT] = self.style_descriptor.dim
            self.outputs = {n: self.outputs[n] for n in self.output_names}
        self.feature_dim = self.outputs[self.node]

    @property
    def layer_names(self) -> dict[str, str]:
        """{name -> what the graph and a cache call it}: each name this pass was asked for, and every alias
        of the model for one of its outputs or their parts (`a+b`). What a cache records, so that a reader
        resolves a `--layer` without the registry. `default` is left out: a cache's default is its first layer."""
        held = set(self.outputs) | {p for n in self.layers for p in self.parts[n]}
        names = {name: node for name, node in self.requested.items() if name != DEFAULT}
        for alias, node in self.spec.layer_aliases.items():
            if node in held:
                names.setdefault(alias, node)
        return names

    @classmethod
    def from_config(cls, config) -> FrozenBackbone:
        """The backbone of `config`, a FeatureSpace: `config.load()` (kept for callers from before it)."""
        return config.load()

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
        """The primary output [N, D]."""
        return self.forward_all(images)[self.node]

    def forward_all(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output ({name: [N, width]}, ordered as `outputs`) from one pass."""
        with torch.inference_mode():
            out = self._features(images)
        # Inference tensors cannot enter autograd; a caller training a head on top gets a plain copy.
        return out if torch.is_inference_mode_enabled() else {k: v.clone() for k, v in out.items()}

    def feature_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw (unpooled) maps of every node, {node: tensor}, from one pass, with autograd flowing
        back to `images` (float RGB in [0, 1]) unless the caller disables grad mode.

        For optimising the *input* (style transfer): unlike `forward` it does not run under
        inference_mode, but the eval lock still holds and every parameter stays frozen
        (requires_grad False), so gradients reach the pixels and never the network.
        """
        if not torch.is_floating_point(images):
            raise TypeError("feature_maps takes float images in [0, 1]; convert uint8 with .float() / 255")
        return self.maps(images.to(self.device))

    def maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The torch pass's raw maps of every node, {node: tensor}, for float pixels in [0, 1] already on the
        device: the normalisation, the layout, the precision and the graph, without `feature_maps`'s checks.
        What the ONNX exporter traces (embedder.models.onnx) and a classifier's export wraps."""
        self._assert_eval()
        x = (x - self.mean) / self.std
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = PRECISIONS[self.config.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            if self._compiled is None or torch.is_grad_enabled():  # freezing is for inference only
                return self.body(x)
            return self._run_compiled(x)

    def _run_compiled(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The compiled graph at one fixed batch size: a smaller (last) batch is zero-padded
        to it, so it neither triggers a second compile nor runs other kernels (rows are
        independent in eval mode)."""
        n, first = x.shape[0], self._compiled_batch is None
        if first:
            self.__dict__["_compiled_batch"] = n
        size = self._compiled_batch
        if n < size:
            pad = x.new_zeros((size - n, *x.shape[1:]))
            x = torch.cat([x, pad]).contiguous(memory_format=torch.channels_last if self.config.channels_last
                                               else torch.contiguous_format)
        try:
            maps = self._compiled(x)
        except Exception as exc:
            if not first:
                raise
            raise ConfigError(
                f"torch.compile could not compile {self.spec.name} ({type(exc).__name__}: {str(exc)[:300]}). "
                "On CPU it needs a working C++ compiler (gcc or clang); run without --compile to use eager mode."
            ) from exc
        return {k: v[:n] for k, v in maps.items()} if n < size else maps

    def use_session(self, session) -> None:
        """Run `session`, the checked ONNX Runtime graph of this backbone's pass (embedder.models.onnx.session_for),
        from now on: what `runtime="onnxruntime"` asks for."""
        if self.config.runtime != "onnxruntime":
            raise ConfigError(f"An ONNX Runtime session is for a backbone of runtime onnxruntime, not {self.config.runtime}.")
        self.__dict__["_session"] = session

    def use_quantized(self, session, record: dict) -> None:
        """Run `session`, the int8 graph of this backbone (embedder.models.quantize.quantize), from now on."""
        if self.config.precision != "int8":
            raise ConfigError(f"A quantised graph is for an int8 backbone, not {self.config.precision}.")
        self.__dict__["_session"] = session
        self.quantization = dict(record)

    def _features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.to(self.device, non_blocking=True)
        if self.config.precision == "int8" and self.quantization is None:
            raise ConfigError("An int8 backbone is calibrated on sample images before it runs "
                              "(embedder.extract.fidelity.prepare, as `embed --precision int8` does).")
        if self._session is None and self.config.runtime == "onnxruntime":
            raise ConfigError("A backbone of runtime onnxruntime runs its ONNX graph: build it with "
                              "embedder.models.space.FeatureSpace.load (as embedder.load_backbone does).")
        if self._session is not None:
            return self._run_session(x)  # it scales uint8 itself, off torch's thread pool
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        maps = self.maps(x)
        out = {}
        for node in self.output_names:
            if node == STYLE_OUTPUT:
                out[node] = self.style_descriptor([maps[n].float() for n in self.style_nodes])
                continue
            out[node] = self.pooled_output(maps, node)
        return out

    def pooled_output(self, maps: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """One pooled output from the pass's maps: a node's, or the parts of `a+b` side by side;
        --normalize l2 applies to the whole vector."""
        parts = [pool_map(maps[p].float(), self.config.pool, self.spec.prefix_tokens) for p in self.parts[name]]
        feats = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return F.normalize(feats, dim=1) if self.config.normalize == "l2" else feats

    def _run_session(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ONNX Runtime pass: the graph gives the pooled layers, then the style layers' raw maps,
        from which the style descriptor is computed here as in the torch pass."""
        results = self._session.run(pixels)
        out = dict(zip(self.layers, results[: len(self.layers)]))
        if STYLE_OUTPUT in self.output_names:
            out[STYLE_OUTPUT] = self.style_descriptor(results[len(self.layers):])
        return {n: out[n] for n in self.output_names}

    def _probe_shapes(self) -> dict[str, tuple[int, ...]]:
        """Output shape of every node for one image at the crop size (one forward of zeros)."""
        size = self.preprocessing.crop_size
        with torch.inference_mode():
            maps = self.maps(torch.zeros(1, 3, size, size, device=self.device))
        return {k: tuple(v.shape) for k, v in maps.items()}


def pool_map(x: torch.Tensor, pool: str, prefix_tokens: int = 0) -> torch.Tensor:
    """[N, C, H, W] -> [N, C] (avg, max, gem) or [N, C·H·W] (none). Tokens [N, T, C] of a
    model with `prefix_tokens` > 0 -> [N, C] (cls, avg or max over the patch tokens) or [N, 2C]
    (cls+avg). Vectors pass through."""
    if x.ndim == 2:
        return x
    if x.ndim == 3 and prefix_tokens > 0 and pool != "none":
        return _pool_tokens(x, pool, prefix_tokens)
    if pool in ("cls", "cls+avg"):
        raise ConfigError(
            f"--pool {pool} takes the class token of a ViT block's tokens, but this layer outputs "
            f"shape {list(x.shape[1:])}; use --pool avg, max or gem for a CNN map."
        )
    if x.ndim != 4 or pool == "none":
        return x.flatten(1)
    if pool == "avg":
        return x.mean(dim=(2, 3))
    if pool == "max":
        return x.amax(dim=(2, 3))
    if pool == "gem":  # defined for non-negative maps (after a ReLU); negatives are clamped
        return x.clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)
    raise ConfigError(f"--pool must be one of {', '.join(POOLINGS)}, got {pool!r}.")


def _pool_tokens(x: torch.Tensor, pool: str, prefix: int) -> torch.Tensor:
    patches = x[:, prefix:]
    if pool == "cls":
        return x[:, 0]
    if pool == "avg":
        return patches.mean(dim=1)
    if pool == "cls+avg":
        return torch.cat([x[:, 0], patches.mean(dim=1)], dim=1)
    if pool == "max":
        return patches.amax(dim=1)
    raise ConfigError(f"--pool {pool} is for CNN maps; pool a ViT block's tokens with cls, avg, cls+avg or max.")


def _pooled_width(shape: tuple[int, ...], pool: str, prefix_tokens: int = 0) -> int:
    if len(shape) == 3 and prefix_tokens > 0 and pool != "none":
        return shape[2] * (2 if pool == "cls+avg" else 1)
    if len(shape) == 4 and pool != "none":
        return shape[1]
    return int(math.prod(shape[1:]))


def _check_nodes(model: nn.Module, spec: BackboneSpec, nodes: list[str]) -> None:
    """Refuse names that are neither a graph node nor a module holding graph nodes (as
    create_feature_extractor accepts `layer3` for the last node inside it)."""
    if not nodes:
        return
    names = graph_node_names(model, spec.uses_timm)
    for node in nodes:
        if node in names or any(n.startswith(node + ".") for n in names):
            continue
        raise ConfigError(
            f"Model {spec.name!r} has no layer {node!r}.{did_you_mean(node, names + list(spec.layer_aliases))} "
            f"List every layer with `embedder inspect {spec.name}`."
        )
