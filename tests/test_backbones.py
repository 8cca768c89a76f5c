"""Backbones by library name, beyond tests/test_catalog.py: ViTs at another --image-size (the
position embeddings resampled as the libraries do), head replacement on every head kind through
finetune's and export's builders, and where the weights go when there is no network."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from embedder.cli.main import main
from embedder.errors import ConfigError, WeightsUnavailableError
from embedder.models.backbone import FrozenBackbone, build_model
from embedder.models.registry import get_backbone_spec, list_backbones
from embedder.models.space import BackboneConfig
from embedder.models.weights import load_into, resolve_weights
from tests.conftest import network_of

SMALL = {"weights": "none", "precision": "fp32", "memory_layout": "contiguous", "device": "cpu", "runtime": "torch"}
TIMM_VIT = "timm:vit_tiny_patch16_224"
TV_VIT = "torchvision:vit_b_16"


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def seeded(seed: int, make):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


# --- --image-size for token models ---------------------------------------------------------


@pytest.mark.parametrize("name, size", [(TIMM_VIT, 32), (TIMM_VIT, 64), (TV_VIT, 32)])
def test_vit_at_another_image_size(name, size):
    import timm
    import torchvision

    backbone = FrozenBackbone.from_config(BackboneConfig(name, image_size=size, **SMALL))
    spec = backbone.spec
    pre = backbone.preprocessing
    assert pre.crop_size == size and pre.resize_size == round(size * spec.preprocessing.resize_size / 224)
    grid = (size // 16) ** 2
    # Reference: the library's own model built for that size from the same seed, its pooled
    # pre-logits feature (timm's forward_head(pre_logits=True); torchvision's class token after ln).
    if name.startswith("timm:"):
        ref = seeded(0, lambda: timm.create_model("vit_tiny_patch16_224", img_size=size)).eval()
        assert tuple(ref.pos_embed.shape) == (1, grid + 1, 192)
        feats = lambda x: ref.forward_head(ref.forward_features(x), pre_logits=True)
    else:
        ref = seeded(0, lambda: torchvision.models.vit_b_16(image_size=size)).eval()
        assert tuple(ref.encoder.pos_embedding.shape) == (1, grid + 1, 768)
        feats = lambda x: ref.encoder(torch.cat([ref.class_token.expand(len(x), -1, -1),
                                                 ref._process_input(x)], dim=1))[:, 0]
    x = images(2, size)
    with torch.no_grad():
        want = feats((x.float() / 255 - backbone.mean) / backbone.std)
    out = backbone(x)
    assert out.shape == (2, spec.feature_dim) == want.shape
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_timm_vit_weights_are_resampled_like_timm_loads_them(tmp_path):
    """A 224-px weights file into the 32-px model equals timm's own `create_model(pretrained=True,
    img_size=32)` from that file (its checkpoint_filter_fn resamples the position embeddings)."""
    import timm

    path = tmp_path / "vit224.pth"
    torch.save(seeded(1, lambda: timm.create_model("vit_tiny_patch16_224")).state_dict(), path)
    spec = get_backbone_spec(TIMM_VIT)
    ours = build_model(spec, resolve_weights(spec.weights, str(path)), 32).state_dict()
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                            img_size=32).state_dict()
    assert ours.keys() == ref.keys() and ours["pos_embed"].shape == (1, 5, 192)
    assert all(torch.equal(ours[k], ref[k]) for k in ours)
    # The features at 32 px use that state (not a random one).
    a = FrozenBackbone.from_config(BackboneConfig(TIMM_VIT, image_size=32, **{**SMALL, "weights": str(path)}))
    b = FrozenBackbone.from_config(BackboneConfig(TIMM_VIT, image_size=32, **SMALL))
    x = images(2, 32)
    assert not torch.allclose(a(x), b(x))


def test_torchvision_vit_weights_are_resampled_on_the_grid():
    import torchvision

    state = seeded(1, lambda: torchvision.models.vit_b_16()).state_dict()
    spec = get_backbone_spec(TV_VIT)
    model = build_model(spec, resolve_weights(spec.weights, "none"), 32)
    load_into(model, state)
    got = model.state_dict()
    # Reference: the 14x14 grid of patch embeddings resized to 2x2 (bicubic, corners aligned, as
    # torchvision's interpolate_embeddings), the class token's embedding kept.
    old = state["encoder.pos_embedding"]
    grid = old[:, 1:].reshape(1, 14, 14, 768).permute(0, 3, 1, 2)
    small = F.interpolate(grid, size=2, mode="bicubic", align_corners=True).permute(0, 2, 3, 1).reshape(1, 4, 768)
    torch.testing.assert_close(got["encoder.pos_embedding"], torch.cat([old[:, :1], small], dim=1))
    assert all(torch.equal(got[k], v) for k, v in state.items() if k != "encoder.pos_embedding")


@pytest.mark.parametrize("name", [TIMM_VIT, TV_VIT])
def test_image_size_off_the_patch_grid_is_a_config_error(name):
    with pytest.raises(ConfigError, match="multiple of 16"):
        FrozenBackbone.from_config(BackboneConfig(name, image_size=40, **SMALL))


def test_weights_of_another_size_without_resampling_are_refused(tmp_path):
    import timm

    path = tmp_path / "convnext.pth"
    torch.save(timm.create_model("convnext_atto", num_classes=10).state_dict(), path)
    with pytest.raises(WeightsUnavailableError, match="head.fc.weight has shape"):
        FrozenBackbone.from_config(BackboneConfig("timm:convnext_atto", image_size=32,
                                                  **{**SMALL, "weights": str(path)}))


@pytest.mark.parametrize("name, blocks, width", [
    (TIMM_VIT, [f"blocks.{i}" for i in range(12)], 192),
    (TV_VIT, [f"encoder.layers.encoder_layer_{i}" for i in range(12)], 768),
])
def test_inspect_lists_the_blocks_at_the_image_size(name, blocks, width, capsys):
    assert main(["inspect", name, "--image-size", "32", "--json"]) == 0
    ins = json.loads(capsys.readouterr().out)
    assert ins["blocks"] == blocks and ins["input_shape"] == [1, 3, 32, 32]
    rows = {r["name"]: r for r in ins["layers"]}
    assert all(rows[b]["shape"] == [1, 5, width] for b in blocks)  # 2x2 patches + the class token
    assert main(["inspect", name, "--image-size", "32"]) == 0
    assert f"transformer blocks (12, --layer NAME, repeatable): {blocks[0]}" in capsys.readouterr().out


def test_finetune_and_predict_a_vit_at_32_px(tmp_path, capsys):
    from tests.conftest import make_tree

    tree = make_tree(tmp_path / "img", classes=("a", "b"), per_class=4)
    out = tmp_path / "ft"
    assert main(["finetune", str(tree), "--model", TIMM_VIT, "--weights", "none", "--image-size", "32",
                 "--epochs", "1", "--batch-size", "4", "--workers", "0", "--out", str(out), "--quiet", "--json"]) == 0
    capsys.readouterr()
    from embedder.learn.checkpoint import load_classifier

    clf = load_classifier(out / "best.pt", device="cpu", runtime="torch")
    assert clf.network.preprocessing.crop_size == 32
    assert tuple(clf.network.body.state_dict()["pos_embed"].shape) == (1, 5, 192)
    assert clf(images(3, 32)).shape == (3, 2)
    assert main(["predict", str(out / "best.pt"), str(tree / "a"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4


def test_exported_vit_probe_predicts_like_the_probe(tmp_path):
    """A probe on 32-px ViT features, exported: the network rebuilt at 32 px gives the probe's logits."""
    import numpy as np

    from embedder.cache.reader import FeatureCache
    from embedder.extract.core import embed_images
    from embedder.extract.local import embed
    from embedder.learn.checkpoint import load_classifier
    from embedder.learn.export import export_probe
    from embedder.learn.train import ProbeConfig, run_probe
    from tests.conftest import fast_config, make_tree

    tree = make_tree(tmp_path / "img", classes=("a", "b"), per_class=5)
    cache = tmp_path / "vit.h5"
    embed(fast_config(tree, cache, model=TIMM_VIT))
    run_probe(ProbeConfig(str(cache), out=str(tmp_path / "p"), Cs=(1.0,), device="cpu"))
    clf = load_classifier(export_probe(tmp_path / "p", tmp_path / "m.pt"), device="cpu", runtime="torch")
    head = clf.network.body.get_submodule("head")
    assert isinstance(head, nn.Linear) and tuple(head.weight.shape) == (2, 192)
    with FeatureCache(cache) as c:
        paths, features = c.paths, c.features()
    saved = torch.load(tmp_path / "p" / "probe.pt", weights_only=True)
    logits, errors = embed_images(clf.network, [tree / p for p in paths], batch_size=4)
    assert not errors
    np.testing.assert_allclose(logits, features @ saved["coef"].numpy().T + saved["intercept"].numpy(),
                               rtol=1e-4, atol=1e-4)


# --- head replacement on each head kind -----------------------------------------------------

HEAD_KINDS = [  # (model, where the new head goes, input size)
    ("torchvision:shufflenet_v2_x0_5", "fc", 32),
    ("torchvision:mobilenet_v3_small", "classifier.3", 32),  # classifier[-1]
    ("torchvision:densenet121", "classifier", 32),  # classifier, a Linear
    (TV_VIT, "heads.head", 32),
    ("timm:convnext_atto", "head.fc", 32),  # get_classifier(), inside a head module
    ("timm:mobilenetv3_small_050", "classifier", 32),
    (TIMM_VIT, "head", 32),
]


@pytest.mark.parametrize("name, path, size", HEAD_KINDS)
def test_finetune_network_replaces_each_kind_of_head(name, path, size):
    from embedder.learn.finetune.network import build_network

    spec = get_backbone_spec(name)
    assert spec.head == path
    weights = resolve_weights(spec.weights, "none")
    old = build_model(spec, weights, size).get_submodule(path)
    model, head, where = build_network(spec, network_of(name, size), None, 7)
    assert where == path and model.get_submodule(path) is head
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (old.in_features, 7)
    assert head.in_features == spec.feature_dim
    if spec.uses_timm:
        # timm's own answer: reset_classifier(7) puts its new Linear in that very place.
        reference = build_model(spec, weights, size)
        reference.reset_classifier(7)
        fresh = reference.get_submodule(path)
        assert isinstance(fresh, nn.Linear) and (fresh.in_features, fresh.out_features) == (old.in_features, 7)
    assert model.eval()(torch.zeros(2, 3, size, size)).shape == (2, 7)


def test_an_mlp_head_on_a_timm_vit(tmp_path):
    from embedder.learn.finetune.network import build_network

    spec = get_backbone_spec(TIMM_VIT)
    model, head, where = build_network(spec, network_of(TIMM_VIT, 32), None, 3, head="mlp", mlp_hidden=16)
    assert where == "head" and head[0].in_features == 192 and head[-1].out_features == 3
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_a_convolution_head_is_refused_with_the_way_out():
    """SqueezeNet's classifier is a 1x1 convolution before ReLU and pooling: no head on pooled
    features can take its place. Its default feature is its pooled 512-channel map."""
    from embedder.learn.finetune.network import build_network

    spec = get_backbone_spec("torchvision:squeezenet1_1")
    backbone = FrozenBackbone.from_config(BackboneConfig("torchvision:squeezenet1_1", image_size=64, **SMALL))
    assert spec.feature_dim == backbone.feature_dim == backbone(images(2, 64)).shape[1] == 512
    with pytest.raises(ConfigError, match="embedder probe"):
        build_network(spec, network_of("torchvision:squeezenet1_1"), None, 3)


def test_a_distilled_models_two_heads_are_refused_but_it_embeds():
    """DeiT-distilled averages a class-token head and a distillation head: one new Linear cannot
    replace both, so finetune/export refuse it; embedding takes the class-token head's input."""
    from embedder.learn.finetune.network import build_network

    name = "timm:deit_tiny_distilled_patch16_224"
    spec = get_backbone_spec(name)
    assert spec.head == "head" and spec.head_inputs == ()
    with pytest.raises(ConfigError, match="two heads"):
        build_network(spec, network_of(name, 32), None, 3)
    backbone = FrozenBackbone.from_config(BackboneConfig(name, image_size=32, **SMALL))
    x = images(2, 32)
    model = build_model(spec, resolve_weights(spec.weights, "none"), 32).eval()
    with torch.no_grad():
        tokens = model.forward_features((x.float() / 255 - backbone.mean) / backbone.std)
    torch.testing.assert_close(backbone(x), tokens[:, 0], rtol=1e-4, atol=1e-4)


# --- weights on a machine without network ---------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache of the test's own."""
    import huggingface_hub.constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def put_in_hf_cache(cache, repo: str, state: dict) -> None:
    """The hub cache's layout: refs/main names a snapshot that holds the file."""
    from safetensors.torch import save_file

    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "snapshots" / ("0" * 40) / "model.safetensors")


def test_timm_weights_missing_then_read_from_the_hf_cache(hf_cache, capsys):
    import timm

    repo = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    folder = hf_cache / ("models--" + repo.replace("/", "--"))
    assert main(["models", TIMM_VIT, "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["weights_offline"] is False and entry["weights_file"] == str(folder)
    assert f"huggingface-cli download {repo}" in entry["weights_hint"]
    assert main(["models", TIMM_VIT]) == 0
    text = capsys.readouterr().out
    assert "NOT present offline" in text and str(folder) in text and "--weights PATH" in text
    # The one-line error of a command that needs them names the repository, the folder and the way out.
    assert main(["inspect", TIMM_VIT, "--weights", "DEFAULT"]) != 0
    err = capsys.readouterr().err
    assert repo in err and str(folder) in err and "HF_HOME" in err and "--weights /path" in err
    assert "Traceback" not in err

    state = seeded(1, lambda: timm.create_model("vit_tiny_patch16_224")).state_dict()
    put_in_hf_cache(hf_cache, repo, state)
    assert main(["models", TIMM_VIT, "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["weights_offline"] is True and entry["weights_file"].startswith(str(folder))
    assert entry["weights_hint"] == ""
    cached = FrozenBackbone.from_config(BackboneConfig(TIMM_VIT, image_size=32, **{**SMALL, "weights": "DEFAULT"}))
    assert cached.weights.identity == f"timm:vit_tiny_patch16_224:hf:{repo}"
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32)
    load_into(ref, state)  # the 224-px file, resampled to the 32-px grid
    x = images(2, 32)
    with torch.no_grad():
        want = ref.eval().forward_head(ref.forward_features((x.float() / 255 - cached.mean) / cached.std),
                                       pre_logits=True)
    torch.testing.assert_close(cached(x), want, rtol=1e-4, atol=1e-4)


def test_torchvision_weights_missing_then_read_from_torch_home(tmp_path, monkeypatch, capsys):
    import urllib.error

    import torchvision

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)  # a machine without network
    name = "torchvision:mobilenet_v3_small"
    file = tmp_path / "th" / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    assert main(["models", name]) == 0
    text = capsys.readouterr().out
    assert "NOT present offline" in text and str(file) in text and "TORCH_HOME" in text
    assert main(["inspect", name, "--weights", "DEFAULT"]) != 0
    err = capsys.readouterr().err
    assert str(file) in err and "TORCH_HOME" in err and "--weights" in err and "Traceback" not in err

    state = seeded(1, lambda: torchvision.models.mobilenet_v3_small()).state_dict()
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, file)
    assert main(["models", name, "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["weights_offline"] is True and entry["weights_file"] == str(file) and entry["weights_hint"] == ""
    cached = FrozenBackbone.from_config(BackboneConfig(name, image_size=32, **{**SMALL, "weights": "DEFAULT"}))
    from_file = FrozenBackbone.from_config(BackboneConfig(name, image_size=32, **{**SMALL, "weights": str(file)}))
    x = images(2, 32)
    assert torch.equal(cached(x), from_file(x))


# --- the curated names -----------------------------------------------------------------------


def test_curated_names_stay_short_aliases():
    """The registry's own entries keep their short names; resnet18 is torchvision's resnet18."""
    names = list_backbones()
    assert len(names) == 14 and not any(":" in n for n in names)  # resnet18-152, vgg11-19 (+_bn), lite0
    short = FrozenBackbone.from_config(BackboneConfig("resnet18", image_size=32, **SMALL))
    long = FrozenBackbone.from_config(BackboneConfig("torchvision:resnet18", image_size=32, **SMALL))
    assert short.feature_dim == long.feature_dim == 512
    x = images(2, 32)
    assert torch.equal(short(x), long(x))
    assert get_backbone_spec("resnet18").weights.identity == get_backbone_spec("torchvision:resnet18").weights.identity


def test_readme_vit_command_two_token_layers_in_one_pass(tmp_path, capsys):
    """README: `embed --model timm:vit_small_patch16_224.dino --layer tokens --layer blocks.10 --pool cls+avg`,
    here on the tiny ViT at 32 px: each layer its own [N, 2C] dataset, equal to the backbone's own pass."""
    import numpy as np

    from embedder.cache.reader import FeatureCache
    from tests.conftest import make_tree

    tree = make_tree(tmp_path / "img", classes=("a", "b"), per_class=3)
    out = tmp_path / "vit.h5"
    assert main(["embed", str(tree), "--model", TIMM_VIT, "--weights", "none", "--image-size", "32",
                 "--layer", "tokens", "--layer", "blocks.10", "--pool", "cls+avg", "--out", str(out),
                 "--workers", "0", "--precision", "fp32", "--memory-layout", "contiguous", "--runtime", "torch",
                 "--quiet"]) == 0
    capsys.readouterr()
    from embedder.extract.core import embed_images

    with FeatureCache(out) as c:
        assert c.layers == {"norm": 384, "blocks.10": 384} and c.layer == "norm"
        paths = c.paths
    for layer in ("tokens", "blocks.10"):  # each as a single-layer backbone would give it
        backbone = FrozenBackbone.from_config(BackboneConfig(TIMM_VIT, layer=layer, pool="cls+avg", image_size=32,
                                                             **SMALL))
        want, errors = embed_images(backbone, [tree / p for p in paths])
        assert not errors and want.shape == (6, 384)
        with FeatureCache(out, layer=layer) as c:
            np.testing.assert_allclose(c.features(), want, rtol=1e-5, atol=1e-5)
