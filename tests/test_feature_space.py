"""FeatureSpace: the one declaration of the backbone's settings (issue 27).

Its components round-trip exactly, `resolve()` has one precedence (explicit, then what a cache
recorded, then the machine's default), and every other front door (load_backbone, extract, the embed
options) takes its settings from it rather than from a list of its own.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import fields

import numpy as np
import pytest

from embedder.errors import ConfigError
from embedder.models.space import BackboneConfig, FeatureSpace, components
from tests.conftest import REPO

SMALL = {"weights": "none", "image_size": 32, "device": "cpu", "precision": "fp32", "memory_layout": "contiguous",
         "runtime": "torch"}


@pytest.mark.parametrize("settings", [
    {},
    {"layer": "layer3", "extra_layers": ("layer2", "style"), "style_layers": ("layer1",), "style_dim": 16},
    {"layer": "style", "style_dim": 0},
    {"layer": "layer2+layer3", "pool": "gem", "normalize": "l2"},
    {"pool": "max", "image_size": 48, "memory_layout": "channels_last"},
    {"precision": "bf16"},
    {"runtime": "onnxruntime"},
])
def test_components_round_trip_exactly(settings):
    space = FeatureSpace("resnet18", **{**SMALL, **settings})
    recorded = components(space.load(), "float16", jpeg_draft=True)
    again = FeatureSpace.from_components(recorded)
    assert components(again.load(), "float16", jpeg_draft=True) == recorded
    # The space read back is a fixed point: reading its own components gives it again.
    assert FeatureSpace.from_components(components(again.load())) == again
    assert again.resolve() == again  # what a cache records is already resolved


def test_the_space_read_back_names_what_was_asked():
    space = FeatureSpace("resnet18", layer="layer3", extra_layers=("style",), style_layers=("layer1",),
                         style_dim=16, pool="gem", normalize="l2", **{**SMALL, "image_size": 48})
    again = FeatureSpace.from_components(components(space.load()))
    assert again == space  # resnet18's layer names are its graph nodes; weights "none" reads back as "none"


def test_resolve_explicit_beats_recorded_beats_auto(monkeypatch):
    from embedder.models import runtime as runtimes

    auto = FeatureSpace("resnet18").resolve()
    machine = runtimes.resolve_runtime("auto", "auto", "auto")
    assert (auto.device, auto.precision, auto.memory_layout) == (machine.device, machine.precision,
                                                                 machine.memory_layout)
    assert auto.runtime == runtimes.choose_runtime("auto", "resnet", machine.device, machine.precision)
    cache = {"precision": "bf16", "memory_layout": "contiguous"}  # made on torch (no runtime component)
    recorded = FeatureSpace("resnet18", device="cpu").resolve(recorded=cache)
    assert (recorded.precision, recorded.runtime) == ("bf16", "torch")
    assert recorded.memory_layout == auto.memory_layout  # the layout is auto's on every run, not recorded
    explicit = FeatureSpace("resnet18", device="cpu", precision="fp32", runtime="onnxruntime").resolve(recorded=cache)
    assert (explicit.precision, explicit.runtime) == ("fp32", "onnxruntime")
    int8 = FeatureSpace("resnet18", device="cpu").resolve(recorded={"precision": "int8", "runtime": "onnxruntime 1"})
    assert (int8.precision, int8.runtime) == ("int8", "onnxruntime")
    assert explicit.resolve() == explicit and auto.resolve() == auto
    # One resolution of the machine's defaults per resolve (choose_runtime used to resolve again).
    calls = []
    real = runtimes.resolve_runtime
    monkeypatch.setattr(runtimes, "resolve_runtime", lambda *a, **k: calls.append(a) or real(*a, **k))
    FeatureSpace("resnet18").resolve()
    assert len(calls) == 1


def test_a_backbone_is_built_from_a_resolved_space_only():
    from embedder.models.backbone import FrozenBackbone, build_model
    from embedder.models.registry import get_backbone_spec
    from embedder.models.weights import resolve_weights

    spec = get_backbone_spec("resnet18")
    weights = resolve_weights(spec.weights, "none")
    with pytest.raises(ConfigError, match=r"resolved FeatureSpace: use FeatureSpace\(\.\.\.\)\.load\(\)"):
        FrozenBackbone(build_model(spec, weights, 32), spec, FeatureSpace("resnet18", weights="none"), weights)
    backbone = FeatureSpace("resnet18", **SMALL).load()
    assert backbone.config == FeatureSpace("resnet18", **SMALL) and not backbone.training


def test_the_settings_are_declared_once():
    import embedder
    from embedder.extract.api import MODEL_SETTINGS, extract
    from embedder.extract.core import load_backbone
    from embedder.options import specs

    names, defaults = FeatureSpace.field_names(), FeatureSpace.defaults()
    assert embedder.BackboneConfig is BackboneConfig is FeatureSpace
    # load_backbone's keywords are FeatureSpace's fields, with its defaults, in its order.
    params = inspect.signature(load_backbone).parameters
    assert tuple(params) == names
    assert {n: p.default for n, p in params.items() if n != "model"} == defaults
    with pytest.raises(ConfigError, match="Unknown backbone setting 'pooling'"):
        load_backbone("resnet18", pooling="avg")
    # extract() takes every setting but extra_layers (one array: one output), with FeatureSpace's defaults and
    # types, and refuses other keywords before it builds anything.
    given = inspect.signature(extract).parameters
    assert MODEL_SETTINGS == tuple(n for n in names if n not in ("model", "extra_layers"))
    assert {n: (given[n].default, given[n].annotation) for n in MODEL_SETTINGS} == {
        f.name: (f.default, f.type) for f in fields(FeatureSpace) if f.name in MODEL_SETTINGS}
    assert all(given[n].kind is inspect.Parameter.KEYWORD_ONLY for n in MODEL_SETTINGS)
    # Their docs are entries generated from the same declarations (each setting's option help), one a setting.
    doc, backbone_doc = inspect.getdoc(extract), inspect.getdoc(load_backbone)
    for name in MODEL_SETTINGS:
        help_text = " ".join(next(s.option.help for s in specs(FeatureSpace) if s.name == name).split())
        assert f"\n{name} : " in doc and f"\n{name} : " in backbone_doc, name
        assert help_text[:30] in " ".join(doc.split()), name
    assert "\nextra_layers : " not in doc and "\nextra_layers : " in backbone_doc
    for bad in ("pooling", "extra_layers"):
        with pytest.raises(ConfigError, match=f"Unknown backbone setting '{bad}'"):
            extract([np.zeros((8, 8, 3), np.uint8)], "resnet18", **{bad: "avg"})


# Options named as a FeatureSpace setting that are a setting of something else: a cache's or an index's
# layer, the query backbone of search/serve (declared once as search.config.query_*_option), the probe's
# device, predict's MODEL.pt and its network's runtime, and the model commands (models --card, inspect,
# stylize) whose model is built for another purpose, with other defaults.
OTHER_MEANINGS = {
    "ProbeConfig": {"device", "layer"}, "CurateConfig": {"device", "layer"}, "ExportVectorsConfig": {"layer"},
    "IndexConfig": {"layer"}, "SearchConfig": {"layer", "weights", "runtime"}, "DedupConfig": {"layer"},
    "PlotConfig": {"layer"}, "ServeConfig": {"weights", "runtime"}, "ExportConfig": {"weights"},
    "PredictConfig": {"model", "device", "runtime"}, "ModelsConfig": {"weights", "image_size"},
    "InspectConfig": {"model", "image_size", "weights"},
    "StylizeConfig": {"model", "weights", "style_layers", "image_size", "device"},
}


def test_the_backbone_options_are_declared_only_on_feature_space():
    # embed, watch and finetune take the backbone settings by nesting a FeatureSpace: their options are its
    # fields (the same declaration); no command declares one of them again.
    from embedder.cli.main import COMMANDS
    from embedder.options import specs

    own = {f.name: f for f in fields(FeatureSpace)}
    again, nested = [], {}
    for name, command in COMMANDS.items():
        cls = command.config() if command.config else None
        for spec in specs(cls) if cls else ():
            if spec.owner is not None:
                assert spec.field is own[spec.name], (name, spec.name)
                nested.setdefault(name, set()).add(spec.name)
            elif spec.name in own and spec.name not in OTHER_MEANINGS.get(cls.__name__, ()):
                again.append(f"{cls.__name__}.{spec.name}")
    assert not again, f"declared again (nest a FeatureSpace instead): {again}"
    assert nested["embed"] == nested["watch"] == set(own)
    assert nested["finetune"] == {"model", "weights", "layer", "image_size", "device"}


def test_a_config_cannot_declare_a_nested_option_twice():
    from dataclasses import dataclass

    from embedder.options import option, specs

    @dataclass(frozen=True)
    class Twice:
        space: FeatureSpace = option(nested=True)  # noqa: RUF009
        pool: str = option("avg")

    with pytest.raises(TypeError, match=r"Twice declares \['pool'\] twice"):
        specs(Twice)


def test_only_models_builds_a_backbone():
    # FeatureSpace.load is the one builder: no module outside embedder/models constructs a FrozenBackbone,
    # calls from_config, or builds a network (build_model; finetune and export take FeatureSpace.network()'s).
    offenders = []
    for path in sorted((REPO / "embedder").rglob("*.py")):
        if path.parent.name == "models":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in ("FrozenBackbone", "from_config", "build_model"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def test_the_style_name_is_one_constant():
    from embedder.cache import fingerprint
    from embedder.models import backbone, constants, space

    assert backbone.STYLE_OUTPUT == space.STYLE == fingerprint.STYLE == constants.STYLE
    source = (REPO / "embedder" / "cache" / "fingerprint.py").read_text()
    assert '"style"' not in source


def test_the_onnx_graph_key_is_read_off_the_components_and_keeps_its_form():
    # Cached graphs (an int8 cache's own, which query by image needs) must still be found: the identity is
    # the one built from the backbone's attributes before the components keyed it.
    import json

    import torch

    from embedder.models.onnx import GRAPH_FORMAT, OPSET, graph_key, versions

    if versions() is None:
        pytest.skip("ONNX Runtime is not installed")
    backbone = FeatureSpace("resnet18", **{**SMALL, "extra_layers": ("layer3", "style"), "style_layers": ("layer1",),
                                           "style_dim": 16, "memory_layout": "channels_last"}).load()
    key, identity = graph_key(backbone, components(backbone))
    cfg = backbone.config
    before = {"format": GRAPH_FORMAT, "opset": OPSET, "model": backbone.spec.name, "weights": backbone.weights.identity,
              "preprocessing": backbone.preprocessing.as_dict(), "layers": list(backbone.layers),
              "style_nodes": list(backbone.style_nodes), "pool": cfg.pool, "normalize": cfg.normalize,
              "channels_last": cfg.channels_last, "torch": str(torch.__version__),
              **{k: v for k, v in versions().items() if k != "onnxruntime"}}
    assert {k: v for k, v in identity.items() if k != "tensors"} == json.loads(json.dumps(before))
    assert identity["layers"] == ["avgpool", "layer3"] and key.startswith("resnet18-")
