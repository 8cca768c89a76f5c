"""The eval lock, determinism, the registry, and weight loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from embedder.errors import ConfigError, WeightsUnavailableError
from embedder.models.backbone import FrozenBackbone, build_model
from embedder.models.registry import get_backbone_spec, list_backbones
from embedder.models.space import BackboneConfig
from embedder.models.weights import resolve_weights

SMALL = {"weights": "none", "image_size": 32, "precision": "fp32", "memory_layout": "contiguous", "device": "cpu",
         "runtime": "torch"}


def bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.named_buffers() if "running" in k or "num_batches" in k}


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def resnet() -> FrozenBackbone:
    return FrozenBackbone.from_config(BackboneConfig("resnet18", **SMALL))


def test_parameters_frozen_and_outputs_carry_no_graph(resnet):
    assert all(not p.requires_grad for p in resnet.parameters())
    out = resnet(images(2))
    assert not out.requires_grad and out.grad_fn is None
    assert out.dtype == torch.float32 and out.shape == (2, 512)
    # A trainable head on top still trains, while the backbone gets no gradient.
    head = nn.Linear(512, 3)
    head(out).sum().backward()
    assert head.weight.grad is not None
    assert all(p.grad is None for p in resnet.parameters())


def test_train_on_backbone_or_parent_cannot_change_features_or_bn_stats(resnet):
    x = images(8)
    before = resnet(x)
    buffers = bn_buffers(resnet)

    resnet.train()
    assert not resnet.training and not any(m.training for m in resnet.modules())
    assert torch.equal(resnet(x), before)

    parent = nn.Sequential(resnet, nn.Linear(512, 3))
    parent.train()
    assert parent[1].training  # the lock is local: the parent's own layers do train
    assert not any(m.training for m in resnet.modules())
    feats = parent[0](x)
    parent(x)  # a forward through the parent while it is in train mode
    assert torch.equal(feats, before)

    # The bypass that a plain override misses: flipping the inner BatchNorm layers one by one.
    for m in parent.modules():
        m.train()
    assert torch.equal(resnet(x), before)
    assert torch.equal(resnet(x), before)
    for name, value in bn_buffers(resnet).items():
        assert torch.equal(value, buffers[name]), f"BatchNorm buffer {name} changed"


def test_unlocked_model_would_change_bn_stats():
    """Control for the test above: the same architecture without the lock does change."""
    spec = get_backbone_spec("resnet18")
    model = build_model(spec, resolve_weights(spec.weights, "none"))
    before = bn_buffers(model)
    model.train()
    with torch.no_grad():
        model(images(4).float())
    assert any(not torch.equal(v, before[k]) for k, v in bn_buffers(model).items())


def test_two_builds_are_bit_identical():
    x = images(5)
    a = FrozenBackbone.from_config(BackboneConfig("resnet18", **SMALL))(x)
    b = FrozenBackbone.from_config(BackboneConfig("resnet18", **SMALL))(x)
    assert torch.equal(a, b)


def test_batch_sizes_agree(resnet):
    x = images(32, seed=1)
    full = resnet(x)
    for bs in (1, 7):
        parts = torch.cat([resnet(x[i : i + bs]) for i in range(0, len(x), bs)])
        torch.testing.assert_close(parts, full, rtol=0, atol=1e-5)


def test_l2_normalisation():
    bb = FrozenBackbone.from_config(BackboneConfig("resnet18", normalize="l2", **SMALL))
    norms = bb(images(3)).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(3))


@pytest.mark.parametrize("name", list_backbones())
def test_registry_entry_builds_and_declares_its_widths(name):
    """Every entry, random init at 32 px: each declared output has its declared width, and the
    classifier head named in the registry is a Linear that takes exactly the features it sits on."""
    spec = get_backbone_spec(name)
    model = build_model(spec, resolve_weights(spec.weights, "none"))
    head = model.get_submodule(spec.head)
    assert isinstance(head, nn.Linear)
    for node, dim in spec.layer_dims.items():
        bb = FrozenBackbone(model, spec, BackboneConfig(name, layer=node, **SMALL), resolve_weights(spec.weights, "none"))
        assert bb(images(2)).shape == (2, dim), node
    assert spec.preprocessing.crop_size == 224
    assert head.in_features in spec.layer_dims.values()


def test_vgg_fc7_alias_and_unknown_layer():
    spec = get_backbone_spec("vgg16")
    assert spec.resolve_layer("fc7") == "classifier.4"
    assert spec.resolve_layer(None) == "features.30"
    with pytest.raises(ConfigError, match="Layers available"):
        spec.resolve_layer("nope")
    with pytest.raises(ConfigError, match="Unknown model"):
        get_backbone_spec("resnet9000")


def test_weights_from_a_file(tmp_path):
    spec = get_backbone_spec("resnet18")
    model = build_model(spec, resolve_weights(spec.weights, "none"))
    with torch.no_grad():
        model.layer4[1].conv2.weight.mul_(2.0)
    path = tmp_path / "tuned.pth"
    torch.save({"state_dict": model.state_dict()}, path)  # wrapped, as training checkpoints are
    bb_file = FrozenBackbone.from_config(BackboneConfig("resnet18", **{**SMALL, "weights": str(path)}))
    bb_none = FrozenBackbone.from_config(BackboneConfig("resnet18", **SMALL))
    assert bb_file.weights.identity.startswith("file:sha256:")
    x = images(2)
    assert not torch.equal(bb_file(x), bb_none(x))

    torch.save(get_backbone_spec("vgg11").build().state_dict(), tmp_path / "vgg.pth")
    with pytest.raises(WeightsUnavailableError, match="Check that --model matches"):
        FrozenBackbone.from_config(BackboneConfig("resnet18", **{**SMALL, "weights": str(tmp_path / "vgg.pth")}))
    with pytest.raises(ConfigError, match="neither DEFAULT"):
        resolve_weights(spec.weights, tmp_path / "missing.pth")


def test_missing_default_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    spec = get_backbone_spec("resnet18")
    assert not spec.weights.available_offline()
    with pytest.raises(WeightsUnavailableError) as err:
        FrozenBackbone.from_config(BackboneConfig("resnet18", weights="DEFAULT", image_size=32))
    msg = str(err.value)
    assert str(tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "--weights" in msg and "TORCH_HOME" in msg


@pytest.mark.slow
def test_shipped_efficientnet_lite0_sees_a_cat_in_chelsea():
    """Real pretrained weights through our own decode/preprocess/feature path."""
    from PIL import Image
    from skimage.data import chelsea

    from embedder.data.transforms import geometric_transform

    bb = FrozenBackbone.from_config(BackboneConfig("efficientnet_lite0", precision="fp32", memory_layout="contiguous",
                                                   runtime="torch"))
    assert bb.weights.kind == "default"
    pixels = torch.from_numpy(np.array(Image.fromarray(chelsea()))).permute(2, 0, 1)
    x = geometric_transform(bb.preprocessing)(pixels)[None]
    feats = bb(x)
    spec = bb.spec
    model = build_model(spec, resolve_weights(spec.weights, "DEFAULT"))
    logits = model.get_submodule(spec.head)(feats)
    top3 = logits.topk(3).indices[0].tolist()
    assert all(281 <= c <= 287 for c in top3), top3  # ImageNet's cat classes


@pytest.mark.slow
def test_compiled_backbone_matches_eager_pads_the_last_batch_and_stays_locked(resnet):
    """`--compile`: same features as eager (within float rounding), the same bits from two
    compiled backbones, a short last batch computed exactly like rows of a full one, and the
    eval lock intact. (Its speed is measured in benchmarks/compiled.py, not here.)"""
    from embedder.cache.fingerprint import fingerprint_components

    config = BackboneConfig("resnet18", compile=True, **SMALL)
    compiled = FrozenBackbone.from_config(config)
    x = images(5)
    first, last = compiled(x[:3]), compiled(x[3:])  # compiled at batch 3; the last batch of 2 is padded
    eager = resnet(x)
    got = torch.cat([first, last])
    assert torch.allclose(got, eager, rtol=1e-4, atol=1e-4 * eager.abs().max().item())
    assert torch.equal(compiled(x[[3, 4, 0]])[:2], last)  # padding rows do not touch the real ones
    again = FrozenBackbone.from_config(config)
    assert torch.equal(again(x[:3]), first) and torch.equal(again(x[3:]), last)

    compiled.train()
    nn.Sequential(compiled).train()
    assert not any(m.training for m in compiled.modules())
    assert torch.equal(compiled(x[:3]), first)
    # The compiled wrapper is not a second copy in the module tree or the state dict.
    assert len(list(compiled.modules())) == len(list(resnet.modules()))
    assert compiled.state_dict().keys() == resnet.state_dict().keys()
    # Compiling changes the last bits on other models, so a cache records it.
    assert fingerprint_components(compiled)["compile"] and "compile" not in fingerprint_components(resnet)
