"""Any torchvision or timm model by name: its spec, token pooling, the eval lock, head replacement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from embedder.errors import ConfigError, WeightsUnavailableError
from embedder.models.backbone import FrozenBackbone, build_model
from embedder.models.registry import get_backbone_spec
from embedder.models.space import BackboneConfig
from embedder.models.weights import resolve_weights, weights_choice_for

SMALL = {"weights": "none", "precision": "fp32", "memory_layout": "contiguous", "device": "cpu", "runtime": "torch"}


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def head_input(backbone: FrozenBackbone, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reference: what the plain eval-mode model feeds its classifier, caught by a forward hook."""
    seen = []
    handle = model.get_submodule(backbone.spec.head).register_forward_hook(lambda m, a, o: seen.append(a[0]))
    x = (x.float() / 255 - backbone.mean) / backbone.std
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return seen[0].flatten(1)


@pytest.mark.parametrize("name, size", [
    ("torchvision:convnext_tiny", 64), ("torchvision:mobilenet_v3_small", 64),
    ("torchvision:densenet121", 64), ("torchvision:regnet_y_800mf", 64), ("torchvision:vit_b_16", 32),
    ("timm:mobilenetv3_small_100", 64), ("timm:vit_tiny_patch16_224", 32),
    ("timm:levit_128s", 64),  # eval-only graph nodes (its attention-bias cache)
])
def test_default_feature_is_what_the_head_consumes(name, size):
    backbone = FrozenBackbone.from_config(BackboneConfig(name, image_size=size, **SMALL))
    spec = backbone.spec
    model = build_model(spec, resolve_weights(spec.weights, "none"), size)
    head = model.get_submodule(spec.head)
    linear = next(m for m in head.modules() if isinstance(m, nn.Linear))  # LeViT's head: BatchNorm1d + Linear
    assert spec.feature_dim == backbone.feature_dim == linear.in_features
    x = images(2, size)
    torch.testing.assert_close(backbone(x), head_input(backbone, model, x), rtol=1e-4, atol=1e-4)


def test_preprocessing_comes_from_the_weights():
    import timm
    import torchvision
    from timm.data import resolve_data_config

    pre = get_backbone_spec("torchvision:regnet_y_800mf").preprocessing
    t = torchvision.models.RegNet_Y_800MF_Weights.DEFAULT.transforms()
    assert (pre.resize_size, pre.crop_size, pre.interpolation) == (t.resize_size[0], t.crop_size[0], t.interpolation.value)
    assert pre.mean == tuple(t.mean) and pre.std == tuple(t.std)
    pre = get_backbone_spec("timm:vit_small_patch16_224.dino").preprocessing
    cfg = resolve_data_config({}, model=timm.create_model("vit_small_patch16_224.dino", pretrained=False))
    assert pre.crop_size == cfg["input_size"][-1] and pre.interpolation == cfg["interpolation"]
    assert pre.resize_size == int(cfg["input_size"][-1] / cfg["crop_pct"])
    assert pre.mean == tuple(cfg["mean"]) and pre.std == tuple(cfg["std"])


@pytest.mark.parametrize("name", ["torchvision:vit_b_16", "timm:vit_tiny_patch16_224"])
def test_token_pooling_on_blocks(name):
    spec = get_backbone_spec(name)
    last, before = spec.blocks[-1], spec.blocks[-2]
    backbone = FrozenBackbone.from_config(BackboneConfig(name, layer=last, extra_layers=(before,), pool="cls+avg",
                                                         image_size=48, **SMALL))
    x = images(2, 48)
    out = backbone.forward_all(x)
    model = build_model(spec, resolve_weights(spec.weights, "none"), 48).eval()
    maps = {}
    hooks = [model.get_submodule(b).register_forward_hook(lambda m, a, o, b=b: maps.__setitem__(b, o))
             for b in (last, before)]
    with torch.no_grad():
        model((x.float() / 255 - backbone.mean) / backbone.std)
    for h in hooks:
        h.remove()
    for block in (last, before):
        tokens = maps[block]
        want = torch.cat([tokens[:, 0], tokens[:, spec.prefix_tokens:].mean(1)], dim=1)
        assert backbone.outputs[block] == want.shape[1]
        torch.testing.assert_close(out[block], want, rtol=1e-4, atol=1e-4)


def test_cls_pool_is_refused_for_cnn_maps():
    with pytest.raises(ConfigError, match="class token"):
        FrozenBackbone.from_config(BackboneConfig("torchvision:convnext_tiny", pool="cls", image_size=64, **SMALL))


# Dropout and stochastic depth switched on at creation, so that train mode would change the
# features if the lock let it through (BatchNorm's batch statistics would too).
NOISY = {"torchvision:convnext_tiny": {"stochastic_depth_prob": 0.5}, "torchvision:vit_b_16": {"dropout": 0.5},
         "torchvision:mobilenet_v3_small": {"dropout": 0.5}, "torchvision:densenet121": {"drop_rate": 0.5}}


def noisy_model(name: str, size: int) -> nn.Module:
    vit = "vit" in name  # built for the small input (its position embeddings fix the size)
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name.removeprefix("timm:"), pretrained=False, drop_rate=0.5,
                                 **({} if "densenet" in name else {"drop_path_rate": 0.5}),
                                 **({"img_size": size} if vit else {}))
    import torchvision

    return torchvision.models.get_model(name.removeprefix("torchvision:"), weights=None, **NOISY[name],
                                        **({"image_size": size} if vit else {}))


@pytest.mark.parametrize("name, size", [
    ("torchvision:convnext_tiny", 64), ("torchvision:vit_b_16", 32), ("torchvision:mobilenet_v3_small", 64),
    ("torchvision:densenet121", 64), ("timm:convnext_atto", 64), ("timm:vit_tiny_patch16_224", 32),
    ("timm:mobilenetv3_small_050", 64), ("timm:densenet121", 64),
])
def test_eval_lock_holds_for_every_architecture(name, size):
    spec = get_backbone_spec(name)
    model = noisy_model(name, size)
    x = images(3, size)
    plain = (x.float() / 255 - 0.45) / 0.225
    seen = []  # the head's input (torchvision's ViT head is zero-initialised, so its logits say nothing)
    model.get_submodule(spec.head).register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        model.train()(plain), model.eval()(plain)
    assert not torch.allclose(seen[0], seen[1])  # the attack below would show, were the lock to fail
    config = BackboneConfig(name, image_size=size, **SMALL)
    backbone = FrozenBackbone(model, spec, config, resolve_weights(spec.weights, "none"))
    before = backbone(x)
    buffers = {k: v.clone() for k, v in backbone.named_buffers()}
    parent = nn.Sequential(backbone)
    parent.train()  # the attack: a parent's train(), then every submodule flipped one by one
    for m in backbone.modules():
        m.train()
    after = backbone(x)
    assert torch.equal(before, after)
    assert all(not m.training for m in backbone.modules())
    assert all(torch.equal(v, buffers[k]) for k, v in backbone.named_buffers())


def test_named_torchvision_weights():
    spec = get_backbone_spec("torchvision:convnext_tiny")
    named = resolve_weights(spec.weights, "IMAGENET1K_V1")  # convnext_tiny's DEFAULT is V1
    assert named.identity == resolve_weights(spec.weights, "DEFAULT").identity
    assert weights_choice_for(named.identity) == "DEFAULT"
    with pytest.raises(ConfigError, match="neither DEFAULT"):
        resolve_weights(spec.weights, "IMAGENET9K_V9")
    # resnet50's DEFAULT (V2) resizes to 232, V1 to 256: the model name must carry V1.
    with pytest.raises(ConfigError, match="torchvision:resnet50.IMAGENET1K_V1"):
        resolve_weights(get_backbone_spec("resnet50").weights, "IMAGENET1K_V1")
    v1 = get_backbone_spec("torchvision:resnet50.IMAGENET1K_V1")
    assert v1.preprocessing.resize_size == 256 and get_backbone_spec("resnet50").preprocessing.resize_size == 232
    assert weights_choice_for(resolve_weights(v1.weights, "DEFAULT").identity) == "IMAGENET1K_V1"


def test_missing_timm_weights_say_where_to_put_them():
    spec = get_backbone_spec("timm:vit_small_patch16_224.dino")
    if spec.weights.available_offline():
        pytest.skip("the weights are in this machine's Hugging Face cache")
    model = build_model(spec, resolve_weights(spec.weights, "none"))
    with pytest.raises(WeightsUnavailableError, match="(?s)timm/vit_small_patch16_224.dino.*--weights /path"):
        resolve_weights(spec.weights, "DEFAULT").apply(model)


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ConfigError, match="torchvision:convnext_tiny"):
        get_backbone_spec("torchvision:convnext_tiyn")
    with pytest.raises(ConfigError, match="timm:"):
        get_backbone_spec("timm:no_such_model_xyz")


def test_models_all_and_one_entry(capsys):
    import json

    import torchvision

    from embedder.cli.main import main
    from embedder.models.registry import list_backbones

    assert main(["models", "--all", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    assert groups["curated"] == list_backbones()
    assert groups["torchvision"] == ["torchvision:" + n for n in torchvision.models.list_models(module=torchvision.models)]
    assert "timm:convnext_small.fb_in22k" in groups["timm_pretrained"] and "timm:vit_small_patch16_224" in groups["timm"]
    assert main(["models", "--all", "timm:vit_small_patch16_224*", "--json"]) == 0
    filtered = json.loads(capsys.readouterr().out)
    assert filtered["curated"] == [] and "timm:vit_small_patch16_224.dino" in filtered["timm_pretrained"]
    assert all(n.startswith("timm:vit_small_patch16_224") for n in filtered["timm"] + filtered["timm_pretrained"])
    assert main(["models", "torchvision:mobilenet_v3_small", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)
    spec = get_backbone_spec("torchvision:mobilenet_v3_small")
    assert entry["feature_dim"] == spec.feature_dim and entry["head"] == "classifier.3"
    assert entry["preprocessing"]["crop_size"] == 224 and entry["weights_offline"] is False
    assert main(["models", "timm:vit_tiny_patch16_224"]) == 0
    assert "transformer blocks (12" in capsys.readouterr().out
