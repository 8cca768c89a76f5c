"""`FeatureSpace`: everything besides the pixels that decides a feature's bits, as one immutable value.

The one declaration of the backbone's settings, their command-line flags and pipeline keys included
(`option(...)`, embedder.options). The other front doors derive from it: the keywords of
`embedder.load_backbone` and `embedder.extract`, the options of `embed`, `watch` and `finetune` (which
nest a FeatureSpace: `EmbedConfig.space`) and a cache's fingerprint components.

The value's life, as timm's `resolve_model_data_config` and torchvision's `WeightsEnum.verify` parse once:

* `FeatureSpace(model, ...)`: what was asked for; `device`, `precision`, `memory_layout` and `runtime`
  may be ``"auto"``.
* `resolve(recorded=None)`: every ``"auto"`` made concrete, with one precedence: the explicit value,
  then what a cache recorded (`recorded`, its fingerprint components: its precision and runtime, so a
  resumed or appended cache keeps them), then the default for this machine and model family
  (`embedder.models.runtime`: `resolve_runtime`, then `choose_runtime`, each once).
* `load()`: the eval-locked `FrozenBackbone` of the resolved space, on its runtime (the checked
  ONNX Runtime session attached for ``runtime="onnxruntime"``). Nothing outside `embedder.models`
  builds a backbone any other way.
* `components(backbone)`: the readable strings a cache records and compares (its fingerprint), and
  `FeatureSpace.from_components(components)` its exact inverse, which search by image, export and
  predict use to rebuild the backbone a cache or a probe was made with.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from dataclasses import MISSING, dataclass, fields, replace
from typing import TYPE_CHECKING

from embedder._version import __version__
from embedder.errors import ConfigError, WeightsUnavailableError
from embedder.models.constants import DEFAULT_STYLE_DIM, POOLINGS, PRECISIONS, RUNTIMES, STYLE
from embedder.models.outputspec import OutputSpec, parse_outputs
from embedder.options import document, option, parameters_doc

if TYPE_CHECKING:
    from torch import nn

    from embedder.models.backbone import FrozenBackbone
    from embedder.models.spec import BackboneSpec
    from embedder.models.weights import ResolvedWeights

# torch and the model code are imported where they are used: the configs declare their options from this
# module, and a command that builds no model (index, probe, search by vector) must not pay for torch.

AUTO = "auto"
# Fingerprint components that record how a cache was made rather than the backbone: not settings.
NOT_SETTINGS = ("feature_dtype", "jpeg_draft", "quantization")
# The help groups of the settings' options (`embed --help`).
ROW_OPTIONS = "what is embedded"
RUN_OPTIONS = "how it runs (none of these change the features, except --precision and --memory-layout)"


@document
@dataclass(frozen=True)
class FeatureSpace:
    """Everything that determines the features of an image, besides the pixels.

    Its Parameters section is generated from the fields' `option(help=...)`, the one text of each setting
    (also `embed --help`'s). A setting's Python value is the flag's text: ``pool="gem"``, ``weights="none"``.
    ``compile`` changes the last bits (about 1e-4), so it is part of the fingerprint, like every setting.
    """

    # Each setting's command-line and pipeline spelling is declared here, once (embedder.options): `embed`,
    # `watch` and `finetune` nest a FeatureSpace and take these options as their own flags and TOML keys.
    model: str = option(help="backbone name (see `embedder models`)")
    weights: str = option("DEFAULT", path=("DEFAULT", "none", "random"),
                          help="DEFAULT (pretrained), none (random init) or PATH to a state dict")
    # The CLI's repeated --layer fills `layer` (the first: /features) and `extra_layers` (EmbedConfig._from_cli).
    layer: str | None = option(None, repeat=True, metavar="NAME", group=ROW_OPTIONS,
                               help="output point (default: the pooled last conv stage); any name from `embedder "
                                    "inspect MODEL`. Repeat for several layers in one pass: each is stored as its own "
                                    "dataset, the first as /features; A+B is one output of A's and B's pooled outputs side by side "
                                    "(a ViT's last blocks); `style` names the Gram style descriptor")
    extra_layers: tuple[str, ...] = option((), cli=False, help="more layers of the same pass, each its own dataset")
    style_layers: tuple[str, ...] = option((), flag="--style-layer", metavar="NAME", group=ROW_OPTIONS,
                                           help="a layer of the style descriptor; repeat (default: the model's, "
                                                "see `embedder inspect`)")
    style_dim: int = option(DEFAULT_STYLE_DIM, group=ROW_OPTIONS,
                            help="length of the style descriptor (seeded count-sketch projection); 0 = full Gram "
                                 "triangles")
    pool: str = option("avg", choices=POOLINGS, group=ROW_OPTIONS,
                       help="how a [C, H, W] map becomes a vector: average, max, generalised mean (p=3), "
                            "none = flatten; a ViT block's tokens: cls, avg (of the patch tokens) or cls+avg")
    normalize: str = option("none", choices=("none", "l2"), group=ROW_OPTIONS, help="store L2-normalised features")
    image_size: int | None = option(None, group=ROW_OPTIONS,
                                    help="override the weights' crop size (resize keeps its ratio)")
    device: str = option(AUTO, group=RUN_OPTIONS, help="auto, cpu or cuda[:N]")
    # "fast" is embed's choice, resolved there before a backbone is built (EmbedConfig amends the choices);
    # the help says it because only embed and watch show this flag.
    precision: str = option(AUTO, choices=(AUTO, *PRECISIONS), group=RUN_OPTIONS,
                            help="auto = fp32 on every CPU (exact, the same on every machine), bf16/fp16 on a GPU. "
                                 "On the CPU, int8 (ONNX Runtime, calibrated on some of SOURCE's images) and bf16 "
                                 "run with a fidelity card checked against fp32 on held-aside images; fast = the "
                                 "fastest of them, measured here, whose card passes (README: fast paths)")
    memory_layout: str = option(AUTO, choices=(AUTO, "channels_last", "contiguous"), group=RUN_OPTIONS,
                                help="tensor layout of the model's input and weights")
    compile: bool = option(False, group=RUN_OPTIONS,
                           help="torch.compile the backbone: 1.25-1.5x faster on CPU once compiled, 18-26 s to "
                                "compile; worth it from about 1,300 images (docs/BENCHMARKS.md)")
    runtime: str = option(AUTO, choices=RUNTIMES, group=RUN_OPTIONS,
                          help="what runs the frozen pass. auto: ONNX Runtime on the CPU for the model families "
                               "where it is faster (docs/BENCHMARKS.md), else torch; a cache being resumed or "
                               "appended to keeps the runtime it was made with")

    def __post_init__(self):
        for name in ("extra_layers", "style_layers"):  # lists from TOML or JSON
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        # The layer names are parsed here, once, at the boundary (a flag, a TOML key, a keyword, a cache's
        # components): a name outside the grammar is refused before any model is built. The strings stay
        # the fields (what a command line, a TOML step and a fingerprint spell); `outputs` is the parse.
        object.__setattr__(self, "_outputs", parse_outputs(self.layer, self.extra_layers))

    @property
    def outputs(self) -> tuple[OutputSpec, ...]:
        """The requested outputs, primary first, parsed (`embedder.models.outputspec`): `layer`, then
        `extra_layers`. The backbone resolves them to graph nodes, once."""
        return self._outputs

    @property
    def channels_last(self) -> bool:
        """The resolved memory layout, as the backbone applies it."""
        return self.memory_layout == "channels_last"

    @property
    def resolved(self) -> bool:
        """No setting is left "auto" (what a backbone is built from)."""
        return AUTO not in (self.device, self.precision, self.memory_layout, self.runtime)

    # -- resolve ----------------------------------------------------------------------------
    def resolve(self, recorded: dict | None = None) -> FeatureSpace:
        """This space with every ``"auto"`` made concrete: the explicit value, else what `recorded` (a
        cache's fingerprint components) recorded of it (precision and runtime), else the default of
        this machine and model family (`resolve_runtime`, then `choose_runtime`). Idempotent; a choice
        this machine cannot run (cuda without a GPU, int8 on torch) is a ConfigError."""
        from embedder.models.registry import get_backbone_spec

        return self._resolve(get_backbone_spec(self.model), recorded)

    def _resolve(self, spec: BackboneSpec, recorded: dict | None = None) -> FeatureSpace:
        from embedder.models.runtime import choose_runtime, resolve_runtime

        space = self
        if recorded is not None:
            kept = recorded_settings(recorded)
            space = replace(space, **{k: v for k, v in kept.items() if getattr(space, k) == AUTO})
        machine = resolve_runtime(space.device, space.precision, space.memory_layout, spec.family)
        engine = choose_runtime(space.runtime, spec.family, machine.device, machine.precision, space.compile)
        return replace(space, device=machine.device, precision=machine.precision,
                       memory_layout=machine.memory_layout, runtime=engine)

    # -- load -------------------------------------------------------------------------------
    def load(self, *, network: nn.Module | None = None, weights: ResolvedWeights | None = None,
             output: tuple[str, int] | None = None) -> FrozenBackbone:
        """The eval-locked backbone of this space (resolved first), on its runtime.

        `network` (with the `weights` it holds) replaces the registry's architecture and weights, and
        `output` = (graph node, width) the layers: a classifier's network with its replaced head
        (embedder.learn.checkpoint)."""
        from embedder.models.backbone import FrozenBackbone
        from embedder.models.onnx import check_runnable, session_for
        from embedder.models.registry import get_backbone_spec

        spec = get_backbone_spec(self.model)
        space = self._resolve(spec)
        if network is None:
            network, weights = space._network(spec)
        backbone = FrozenBackbone(network, spec, space, weights, output=output)
        if space.runtime == "onnxruntime" and space.precision == "int8":
            # It runs only its quantised graph, attached by embedder.extract.fidelity or quantize.cached;
            # the fp32 graph it starts from is exported and checked by the exact backbone of its card.
            check_runnable(backbone)
        elif space.runtime == "onnxruntime":  # its checked graph, keyed by the components (embedder.models.onnx)
            backbone.use_session(session_for(backbone, components(backbone)))
        return backbone

    def network(self, recorded_weights: str | None = None) -> tuple[BackboneSpec, nn.Module, ResolvedWeights]:
        """(the model's registry entry, its architecture at `image_size` with the weights loaded, those
        weights): what `load()` locks, and what export and finetune put a new head on. `recorded_weights`:
        the identity a cache recorded, refused (before anything is built) when `weights` gives others."""
        from embedder.models.registry import get_backbone_spec

        spec = get_backbone_spec(self.model)
        return (spec, *self._network(spec, recorded_weights))

    def _network(self, spec: BackboneSpec, recorded_weights: str | None = None) -> tuple[nn.Module, ResolvedWeights]:
        from embedder.models.backbone import build_model
        from embedder.models.weights import resolve_weights

        weights = resolve_weights(spec.weights, self.weights)
        if recorded_weights is not None and weights.identity != recorded_weights:
            raise WeightsUnavailableError(
                f"--weights gives {weights.identity}, but the cache was embedded with {recorded_weights}.")
        return build_model(spec, weights, self.image_size), weights

    # -- components -------------------------------------------------------------------------
    @classmethod
    def from_components(cls, components: dict, weights_path: str | None = None) -> FeatureSpace:
        """The space a cache's fingerprint `components` record, resolved: `components(space.load(), ...)`
        gives them back. `weights_path`: the file behind recorded file weights (they are recorded by hash).
        A cuda cache read where torch sees no GPU gives a cpu space; compare the rebuilt backbone's
        components (`component_differences`) to be told of that and of library versions."""
        from embedder.models.registry import get_backbone_spec
        from embedder.models.weights import weights_choice_for

        spec = get_backbone_spec(components["model"])
        crop = json.loads(components["preprocessing"])["crop_size"]
        style = json.loads(components[STYLE]) if STYLE in components else {}
        outputs = json.loads(components["layers"]) if "layers" in components else [components["layer"]]
        return cls(
            model=components["model"],
            weights=weights_choice_for(components["weights"], weights_path),
            layer=components["layer"],
            extra_layers=tuple(outputs[1:]),
            style_layers=tuple(style.get("layers", ())),
            style_dim=int(style.get("dim", DEFAULT_STYLE_DIM)),
            pool=components["pooling"],
            normalize=components["normalization"],
            image_size=None if crop == spec.preprocessing.crop_size else int(crop),
            device=_recorded_device(components),
            precision=components["precision"],
            memory_layout=components["memory_layout"],
            compile="compile" in components,
            runtime="onnxruntime" if "runtime" in components else "torch",
        )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The settings, in declaration order: the keywords of `load_backbone` (after `model`)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def defaults(cls) -> dict:
        """{setting: default} of every setting but `model`."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


BackboneConfig = FeatureSpace  # its name before issue 27, kept so old imports work


def recorded_settings(components: dict) -> dict:
    """What a cache's `components` record of the settings that `auto` would otherwise choose per machine:
    the precision and the runtime (a resumed or appended cache keeps them). The device and the layout
    are not taken: `auto` chooses them the same way on every run."""
    kept = {"runtime": "onnxruntime" if "runtime" in components else "torch"}
    if components.get("precision") in PRECISIONS:
        kept["precision"] = components["precision"]
    return kept


def _recorded_device(components: dict) -> str:
    device = components.get("device_type", "cpu")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "cpu"  # the caller's difference check reports it
    return device


def components(backbone: FrozenBackbone, feature_dtype: str = "float32", *, jpeg_draft: bool = False) -> dict[str, str]:
    """Everything that can change a feature's bits, as readable strings: what a cache records (its
    fingerprint hashes them) and compares. `jpeg_draft`: embed --jpeg-draft."""
    import torch
    import torchvision

    from embedder.data.decode import DECODER
    from embedder.models.onnx import runtime_component
    from embedder.models.style import SKETCH_SEED

    space = backbone.config
    found = {
        "model": backbone.spec.name,
        "weights": backbone.weights.identity,
        "preprocessing": json.dumps(backbone.preprocessing.as_dict(), sort_keys=True),
        "decoder": DECODER,
        "layer": backbone.node,
        "pooling": space.pool,
        "normalization": space.normalize,
        "precision": space.precision,
        "memory_layout": "channels_last" if space.channels_last else "contiguous",
        "device_type": torch.device(space.device).type,
        "feature_dtype": feature_dtype,
        "embedder_version": __version__,
        "torch_version": str(torch.__version__),
        "torchvision_version": str(torchvision.__version__),
    }
    if backbone.spec.uses_timm:
        import timm

        found["timm_version"] = str(timm.__version__)
    # Only present when used, so single-layer caches keep the fingerprints they always had.
    if space.compile:
        found["compile"] = "torch.compile inductor, freezing, fixed batch"
    if space.runtime != "torch":
        found["runtime"] = runtime_component()
    if backbone.quantization is not None:  # int8: the settings, the calibration set and the nodes kept in fp32
        found["quantization"] = json.dumps(backbone.quantization, sort_keys=True)
    if jpeg_draft:
        found["jpeg_draft"] = "PIL draft: libjpeg DCT scaling, shorter side >= resize_size"
    if len(backbone.outputs) > 1:
        found["layers"] = json.dumps(list(backbone.outputs))
    if backbone.style_descriptor is not None:
        found[STYLE] = json.dumps(
            {"layers": list(backbone.style_nodes), "dim": space.style_dim, "gram": "FF^T/(HW), triu*sqrt2, l2 per layer",
             "projection": f"count-sketch seed {SKETCH_SEED}" if space.style_dim else "none"},
            sort_keys=True,
        )
    return found


def setting_parameters(names: tuple[str, ...]) -> list[inspect.Parameter]:
    """Keyword-only parameters for the settings `names`, with their defaults and types: the signature that
    help() and inspect show for a function that takes them as ``**settings`` (`load_backbone`, `extract`)."""
    found = {f.name: f for f in fields(FeatureSpace)}
    return [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=found[n].default, annotation=found[n].type)
            for n in names]


def takes_settings(names: tuple[str, ...], documented: tuple[str, ...] | None = None):
    """Decorator for a function that takes settings as ``**settings``: help(), inspect and the API docs show
    each of `names` as a keyword with its type and default, where ``**settings`` stood (before the other
    keyword-only parameters), and the docstring's ``SETTINGS`` line becomes the numpydoc entries of
    `documented` (default: `names`), from the settings' one declaration. So neither can drift from the fields."""
    def wrap(func):
        sig = inspect.signature(func)
        params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.KEYWORD_ONLY), len(params))
        func.__signature__ = sig.replace(parameters=[*params[:at], *setting_parameters(names), *params[at:]])
        entries = textwrap.indent(parameters_doc(FeatureSpace, documented or names), "    ")
        func.__doc__ = func.__doc__.replace("    SETTINGS\n", entries + "\n")
        return func

    return wrap


def check_settings(settings: dict, allowed: tuple[str, ...] | None = None) -> None:
    """Refuse a keyword that is not a setting (or not one of `allowed`), naming the settings (a typo must not
    be ignored)."""
    allowed = FeatureSpace.field_names() if allowed is None else allowed
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ConfigError(f"Unknown backbone setting {', '.join(map(repr, unknown))}; the settings are "
                          f"{', '.join(n for n in allowed if n != 'model')} (embedder.models.space.FeatureSpace).")
