"""Issue 7: inspect, any-layer extraction, Gram style descriptors, neural style transfer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embedder.cli.main import main
from embedder.errors import ConfigError
from embedder.models.backbone import FrozenBackbone, build_model
from embedder.models.inspection import inspect_model
from embedder.models.registry import get_backbone_spec
from embedder.models.space import BackboneConfig
from embedder.models.style import StyleDescriptor, gram, gram_triangle
from embedder.models.weights import resolve_weights

SMALL = {"weights": "none", "image_size": 64, "device": "cpu", "precision": "fp32", "memory_layout": "contiguous",
         "runtime": "torch"}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These tests run many tiny forward passes; on a shared 2-core machine two intra-op threads
    spin against each other and make them ~4x slower. One thread, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(ins):
    return {r.name: r for r in ins.layers}


def test_inspect_resnet18_names_shapes_and_marks():
    ins = inspect_model("resnet18", image_size=64)
    rows = _rows(ins)
    children = [r.name for r in ins.layers if r.child]
    assert children == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    expected = {
        "conv1": [1, 64, 32, 32], "maxpool": [1, 64, 16, 16], "layer1": [1, 64, 16, 16],
        "layer2": [1, 128, 8, 8], "layer3": [1, 256, 4, 4], "layer4": [1, 512, 2, 2],
        "layer3.1.conv2": [1, 256, 4, 4], "layer2.0.downsample.0": [1, 128, 8, 8],
        "avgpool": [1, 512, 1, 1], "flatten": [1, 512], "fc": [1, 1000],
    }
    assert {n: rows[n].shape for n in expected} == expected
    assert rows["layer1.0.conv1"].kind == "Conv2d" and rows["layer1"].kind == "Sequential"
    assert any("DEFAULT" in m for m in rows["avgpool"].marks)
    assert any("HEAD" in m for m in rows["fc"].marks)
    assert not any("HEAD" in m or "DEFAULT" in m for r in ins.layers if r.name not in ("fc", "avgpool") for m in r.marks)


def test_inspect_vgg16_cli_json(capsys):
    assert main(["inspect", "vgg16", "--image-size", "64", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in doc["layers"]}
    assert doc["default_layer"] == "features.30" and doc["head"] == "classifier.6"
    convs = [n for n, r in rows.items() if r["kind"] == "Conv2d"]
    assert len(convs) == 13  # VGG-16: 13 conv + 3 fully connected
    assert rows["features.0"]["shape"] == [1, 64, 64, 64]
    assert rows["features.29"]["shape"] == [1, 512, 4, 4]
    assert rows["features.30"]["shape"] == [1, 512, 2, 2]
    assert rows["avgpool"]["shape"] == [1, 512, 7, 7]  # adaptive pool: 7x7 at any input size
    assert rows["classifier.0"]["shape"] == [1, 4096] and rows["classifier.6"]["shape"] == [1, 1000]
    assert any("classifier[6]" in m for m in rows["classifier.6"]["marks"])
    assert "alias relu4_2" in rows["features.20"]["marks"]


def _manual_input(bb, x):
    return (x.float() / 255 - bb.mean) / bb.std


def test_hooked_layers_equal_a_manual_forward_cut():
    spec = get_backbone_spec("resnet18")
    model = build_model(spec, resolve_weights(spec.weights, "none")).eval()
    config = BackboneConfig("resnet18", layer="layer2", extra_layers=("layer3.0.conv1", "layer1"), pool="none", **SMALL)
    bb = FrozenBackbone(model, spec, config, resolve_weights(spec.weights, "none"))
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        h = _manual_input(bb, x)
        h = model.maxpool(model.relu(model.bn1(model.conv1(h))))
        l1 = model.layer1(h)
        l2 = model.layer2(l1)
        c = model.layer3[0].conv1(l2)
    out = bb.forward_all(x)
    assert list(out) == ["layer2", "layer3.0.conv1", "layer1"] and bb.feature_dim == 128 * 8 * 8
    torch.testing.assert_close(out["layer2"], l2.flatten(1))
    torch.testing.assert_close(out["layer3.0.conv1"], c.flatten(1))
    torch.testing.assert_close(out["layer1"], l1.flatten(1))
    torch.testing.assert_close(bb(x), l2.flatten(1))  # forward = the first layer

    for pool, ref in [("avg", l2.mean((2, 3))), ("max", l2.amax((2, 3))),
                      ("gem", l2.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3))]:
        pooled = FrozenBackbone(model, spec, BackboneConfig("resnet18", layer="layer2", pool=pool, **SMALL),
                                resolve_weights(spec.weights, "none"))
        torch.testing.assert_close(pooled(x), ref)


def test_vgg_conv_node_is_not_overwritten_by_its_inplace_relu():
    spec = get_backbone_spec("vgg11")
    model = build_model(spec, resolve_weights(spec.weights, "none")).eval()
    config = BackboneConfig("vgg11", layer="conv2_1", extra_layers=("relu2_1",), pool="none", **SMALL)
    bb = FrozenBackbone(model, spec, config, resolve_weights(spec.weights, "none"))
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        conv = model.features[:4](_manual_input(bb, x))  # features.3 = conv2_1, before its ReLU
    out = bb.forward_all(x)
    assert (conv < 0).any()
    torch.testing.assert_close(out["features.3"], conv.flatten(1))
    torch.testing.assert_close(out["features.4"], conv.relu().flatten(1))


def test_unknown_layer_names_inspect():
    with pytest.raises(ConfigError, match="embedder inspect resnet18"):
        FrozenBackbone.from_config(BackboneConfig("resnet18", layer="layer9", **SMALL))


def test_gram_is_normalised_and_invariant_to_circular_shifts():
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(3, c, s, s, generator=g).relu() for c, s in [(8, 12), (16, 6)]]
    # G = F F^T / (H W): compare with an explicit loop over positions
    f = maps[0][0].reshape(8, -1)
    torch.testing.assert_close(gram(maps[0])[0], sum(torch.outer(f[:, p], f[:, p]) for p in range(144)) / 144)
    # the triangle keeps Frobenius distances
    a, b = gram(maps[0][:1]), gram(maps[0][1:2])
    torch.testing.assert_close((gram_triangle(a) - gram_triangle(b)).norm(), (a - b).norm())

    for dim in (0, 64):
        desc = StyleDescriptor([8, 16], dim=dim)
        base = desc(maps)
        shifted = desc([torch.roll(m, shifts=(3, -2), dims=(2, 3)) for m in maps])
        torch.testing.assert_close(shifted, base)
        torch.testing.assert_close(base.norm(dim=1), torch.ones(3))
        assert base.shape == (3, dim or 8 * 9 // 2 + 16 * 17 // 2)
        # ... but not invariant to things that change the texture statistics
        scrambled = desc([m * torch.linspace(0.1, 2, m.shape[1]).view(1, -1, 1, 1) for m in maps])
        assert (scrambled - base).abs().max() > 1e-3


def test_style_output_of_the_backbone():
    config = BackboneConfig("resnet18", extra_layers=("style",), style_dim=256, **SMALL)
    bb = FrozenBackbone.from_config(config)
    assert bb.outputs == {"avgpool": 512, "style": 256}
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    out = bb.forward_all(x)
    maps = bb.feature_maps(x.float() / 255)
    ref = bb.style_descriptor([maps[n] for n in ("layer1", "layer2", "layer3", "layer4")])
    torch.testing.assert_close(out["style"], ref)
    torch.testing.assert_close(out["avgpool"], bb(x))
    assert np.isfinite(out["style"].numpy()).all()
    only = FrozenBackbone.from_config(BackboneConfig("resnet18", layer="style", style_dim=256, **SMALL))
    assert only.outputs == {"style": 256} and only.layers == ()
    torch.testing.assert_close(only(x), out["style"])


# --- stylize ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def style_pair(tmp_path_factory):
    from PIL import Image
    from skimage import data

    d = tmp_path_factory.mktemp("stylize")
    Image.fromarray(data.chelsea()).resize((60, 40)).save(d / "content.png")
    Image.fromarray(data.astronaut()).resize((48, 48)).save(d / "style.png")
    return d / "content.png", d / "style.png"


def _pixels(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


def test_stylize_pretrained_lite0_lowers_the_loss_and_changes_the_image(style_pair, tmp_path, capsys):
    content, style = style_pair
    out = tmp_path / "out.png"
    argv = ["stylize", "--content", str(content), "--style", str(style), "--out", str(out),
            "--model", "efficientnet_lite0", "--steps", "12", "--image-size", "48", "--quiet", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["final_loss"] * 2 < report["initial_loss"]  # measured ~3x in 12 steps at 48 px
    img = _pixels(out)
    assert img.shape == (32, 48, 3) and report["size"] == [32, 48]
    from PIL import Image

    ref = np.asarray(Image.open(content).resize((48, 32), Image.BILINEAR), dtype=np.float32)
    assert np.abs(img - ref).mean() > 5  # repainted, not the content image


def test_stylize_from_noise_drops_the_loss_by_a_large_factor(style_pair, tmp_path):
    from embedder.models.stylize import StylizeConfig, stylize

    content, style = style_pair
    config = StylizeConfig(str(content), str(style), str(tmp_path / "o.png"), model="vgg11", weights="none",
                           steps=8, image_size=48, init="noise", progress=False)
    report = stylize(config)
    assert report.reduction > 8, report.summary()  # measured ~17x in 8 steps


def test_stylize_is_deterministic_for_a_seed_and_keeps_the_backbone_frozen(style_pair, tmp_path):
    from embedder.models.stylize import StylizeConfig, stylize

    content, style = style_pair
    spec = get_backbone_spec("efficientnet_lite0")
    nodes = tuple(spec.node_name(n) for n in spec.style_layers)
    bb = FrozenBackbone.from_config(BackboneConfig(
        "efficientnet_lite0", layer=spec.content_layer, extra_layers=nodes, image_size=32, precision="fp32",
        memory_layout="contiguous", runtime="torch"))
    before = {k: v.clone() for k, v in bb.state_dict().items()}

    def run(seed, name):
        cfg = StylizeConfig(str(content), str(style), str(tmp_path / name), steps=3, image_size=32, init="noise",
                            seed=seed, progress=False)
        stylize(cfg, backbone=bb)
        return (tmp_path / name).read_bytes()

    a, b, c = run(0, "a.png"), run(0, "b.png"), run(1, "c.png")
    assert a == b
    assert a != c
    assert all(torch.equal(v, before[k]) for k, v in bb.state_dict().items())
    assert not any(p.requires_grad for p in bb.parameters()) and not any(m.training for m in bb.modules())


def test_style_layer_weights_are_parsed_and_checked(style_pair, tmp_path):
    from embedder.models.stylize import StylizeConfig, parse_style_layers, stylize

    assert parse_style_layers(["relu1_1", "relu2_1:0.5"]) == [("relu1_1", 1.0), ("relu2_1", 0.5)]
    with pytest.raises(ConfigError, match="must be a number"):
        parse_style_layers(["relu1_1:heavy"])
    content, style = style_pair
    with pytest.raises(ConfigError, match="embedder inspect resnet18"):
        stylize(StylizeConfig(str(content), str(style), str(tmp_path / "o.png"), model="resnet18", weights="none",
                              style_layers=("layer9",), steps=1, image_size=32, progress=False))
    with pytest.raises(ConfigError, match=".png"):
        StylizeConfig(str(content), str(style), str(tmp_path / "o.jpg"))
